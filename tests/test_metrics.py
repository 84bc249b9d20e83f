import json
import logging
import sys
import time
import types
from pathlib import Path

import numpy as np
import pytest
import torch

import loradrop_ds.metrics as metrics
from loradrop_ds.metrics import MetricsLogger, format_count, progress_bar


def _read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture
def no_tensorboard(monkeypatch: pytest.MonkeyPatch) -> None:
    # A None entry in sys.modules makes `from torch.utils.tensorboard import ...` fail.
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    monkeypatch.setattr(metrics, "_tb_missing_reported", False)


class FakeWriter:
    instances: list["FakeWriter"] = []

    def __init__(self, log_dir: str) -> None:
        self.log_dir = log_dir
        self.scalars: list[tuple[str, float, int]] = []
        self.closed = False
        FakeWriter.instances.append(self)

    def add_scalar(self, tag: str, value: float, global_step: int) -> None:
        self.scalars.append((tag, value, global_step))

    def close(self) -> None:
        self.closed = True


@pytest.fixture
def fake_tensorboard(monkeypatch: pytest.MonkeyPatch) -> type[FakeWriter]:
    FakeWriter.instances = []
    module = types.ModuleType("torch.utils.tensorboard")
    module.SummaryWriter = FakeWriter
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", module)
    return FakeWriter


def test_writes_json_lines_with_step_and_time(tmp_path: Path, no_tensorboard) -> None:
    before = time.time()
    with MetricsLogger(tmp_path, enabled=True) as log:
        log.log({"loss": 2.5, "stage": "main"}, step=3)
        log.log({"loss": 2.25, "stage": "main"}, step=4)
    after = time.time()
    rows = _read(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows] == [3, 4]
    assert [r["loss"] for r in rows] == [2.5, 2.25]
    assert all(r["stage"] == "main" for r in rows)
    assert all(isinstance(r["time"], float) and before <= r["time"] <= after for r in rows)


def test_converts_tensor_and_numpy_scalars(tmp_path: Path, no_tensorboard) -> None:
    with MetricsLogger(tmp_path, enabled=True) as log:
        log.log(
            {"t": torch.tensor(1.5), "n": np.float32(0.25), "i": np.int64(7), "v": torch.tensor([1.0, 2.0])},
            step=0,
        )
    (row,) = _read(tmp_path / "metrics.jsonl")
    assert row["t"] == 1.5 and isinstance(row["t"], float)
    assert row["n"] == 0.25
    assert row["i"] == 7
    assert row["v"] == [1.0, 2.0]


def test_line_visible_before_close(tmp_path: Path, no_tensorboard) -> None:
    log = MetricsLogger(tmp_path, enabled=True)
    log.log({"loss": 1.0}, step=1)
    # Flushed per line: another reader sees it while the logger is still open.
    assert _read(tmp_path / "metrics.jsonl")[0]["loss"] == 1.0
    log.close()
    log.close()  # idempotent
    with pytest.raises(RuntimeError):
        log.log({"loss": 1.0}, step=2)


def test_appends_across_loggers(tmp_path: Path, no_tensorboard) -> None:
    with MetricsLogger(tmp_path, enabled=True) as log:
        log.log({"a": 1}, step=1)
    with MetricsLogger(tmp_path, enabled=True) as log:
        log.log({"a": 2}, step=2)
    assert [(r["step"], r["a"]) for r in _read(tmp_path / "metrics.jsonl")] == [(1, 1), (2, 2)]


def test_disabled_logger_writes_nothing(tmp_path: Path, fake_tensorboard) -> None:
    out = tmp_path / "run"
    with MetricsLogger(out, enabled=False) as log:
        log.log({"loss": 1.0}, step=1)
    assert not out.exists()
    assert fake_tensorboard.instances == []


def test_non_numeric_fields_never_raise(tmp_path: Path, fake_tensorboard) -> None:
    with MetricsLogger(tmp_path, enabled=True) as log:
        log.log({"name": "x", "path": tmp_path, "none": None, "loss": 0.5}, step=1)
    (row,) = _read(tmp_path / "metrics.jsonl")
    assert row["name"] == "x" and row["path"] == str(tmp_path) and row["none"] is None
    (writer,) = fake_tensorboard.instances
    assert writer.scalars == [("loss", 0.5, 1)]


def test_tensorboard_absent_logs_once_and_continues(
    tmp_path: Path, no_tensorboard, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="loradrop_ds.metrics"):
        for i in range(2):
            with MetricsLogger(tmp_path, enabled=True, tensorboard=True) as log:
                log.log({"loss": float(i)}, step=i)
    notices = [r for r in caplog.records if "tensorboard" in r.getMessage()]
    assert len(notices) == 1
    assert len(_read(tmp_path / "metrics.jsonl")) == 2
    assert not (tmp_path / "tensorboard").exists()


def test_tensorboard_mirrors_numeric_fields_with_stage_prefix(tmp_path: Path, fake_tensorboard) -> None:
    with MetricsLogger(tmp_path, enabled=True, tensorboard=True) as log:
        log.log({"stage": "sampling", "loss": torch.tensor(0.75), "lr": 1e-4}, step=5)
        log.log({"loss": 0.5}, step=6)
    (writer,) = fake_tensorboard.instances
    assert writer.log_dir == str(tmp_path / "tensorboard")
    assert writer.scalars == [("sampling/loss", 0.75, 5), ("sampling/lr", 1e-4, 5), ("loss", 0.5, 6)]
    assert writer.closed


def test_tensorboard_flag_off_skips_writer(tmp_path: Path, fake_tensorboard) -> None:
    with MetricsLogger(tmp_path, enabled=True, tensorboard=False) as log:
        log.log({"loss": 0.5}, step=1)
    assert fake_tensorboard.instances == []


@pytest.mark.parametrize(
    "n,expected",
    [
        (0, "0"),
        (999, "999"),
        (1000, "1.00K"),
        (1234, "1.23K"),
        (4_194_304, "4.19M"),
        (999_999, "1.00M"),
        (7e9, "7.00B"),
        (1_500_000_000_000, "1.50T"),
        (-2048, "-2.05K"),
    ],
)
def test_format_count(n, expected: str) -> None:
    assert format_count(n) == expected


def test_progress_bar_enabled_and_disabled() -> None:
    for enabled in (True, False):
        bar = progress_bar(total=10, desc="train", enabled=enabled)
        bar.update(3)
        bar.set_postfix(loss=1.0)
        assert bar.disable is (not enabled)
        if enabled:
            assert bar.n == 3
            assert bar.dynamic_ncols and bar.mininterval == 1.0
        bar.close()
