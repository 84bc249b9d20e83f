import json
import logging
import os
import socket
import struct
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


@pytest.fixture(autouse=True)
def fresh_notices(monkeypatch: pytest.MonkeyPatch) -> None:
    # Notices are once per process; every test starts as a new process would.
    monkeypatch.setattr(metrics, "_reported", set())


@pytest.fixture
def no_tensorboard(monkeypatch: pytest.MonkeyPatch) -> None:
    # A None entry in sys.modules makes `from torch.utils.tensorboard import ...` fail.
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)


class FakeWriter:
    instances: list["FakeWriter"] = []

    def __init__(self, log_dir: str) -> None:
        self.log_dir = log_dir
        self.scalars: list[tuple[str, float, int]] = []
        self.texts: list[tuple[str, str]] = []
        self.closed = False
        FakeWriter.instances.append(self)

    def add_scalar(self, tag: str, value: float, global_step: int) -> None:
        self.scalars.append((tag, value, global_step))

    def add_text(self, tag: str, text: str) -> None:
        self.texts.append((tag, text))

    def flush(self) -> None:
        pass

    def close(self) -> None:
        self.closed = True


@pytest.fixture
def fake_tensorboard(monkeypatch: pytest.MonkeyPatch) -> type[FakeWriter]:
    FakeWriter.instances = []
    module = types.ModuleType("torch.utils.tensorboard")
    module.SummaryWriter = FakeWriter
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", module)
    return FakeWriter


@pytest.fixture
def artifacts(tmp_path: Path) -> tuple[Path, Path]:
    """A selection.json and a real importance.png, as a run writes them."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    src = tmp_path / "artifacts"
    src.mkdir()
    selection = src / "selection.json"
    selection.write_text(json.dumps({"kept": [3, 1], "threshold": 0.9}))
    fig, ax = plt.subplots(figsize=(2, 1), dpi=50)
    ax.bar([0, 1], [0.3, 0.7])
    fig.savefig(src / "importance.png")
    plt.close(fig)
    return selection, src / "importance.png"


def _closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"  # nothing listens there now: connection refused


CONFIG = {"seed": 1, "lora": {"r": 8, "target_modules": ["q_proj", "v_proj"]}, "train": {"lr": 0.001},
          "model": {"tokenizer": "tok-path", "hub_token": "hf_SECRETSECRET"}}


# --------------------------------------------------------------------- metrics.jsonl


def test_writes_json_lines_with_step_and_time(tmp_path: Path) -> None:
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


def test_converts_tensor_and_numpy_scalars(tmp_path: Path) -> None:
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


def test_line_visible_before_close(tmp_path: Path) -> None:
    log = MetricsLogger(tmp_path, enabled=True)
    log.log({"loss": 1.0}, step=1)
    # Flushed per line: another reader sees it while the logger is still open.
    assert _read(tmp_path / "metrics.jsonl")[0]["loss"] == 1.0
    log.close()
    log.close()  # idempotent
    with pytest.raises(RuntimeError):
        log.log({"loss": 1.0}, step=2)


def test_appends_across_loggers(tmp_path: Path) -> None:
    with MetricsLogger(tmp_path, enabled=True) as log:
        log.log({"a": 1}, step=1)
    with MetricsLogger(tmp_path, enabled=True) as log:
        log.log({"a": 2}, step=2)
    assert [(r["step"], r["a"]) for r in _read(tmp_path / "metrics.jsonl")] == [(1, 1), (2, 2)]


def test_disabled_logger_writes_and_imports_nothing(tmp_path: Path, fake_tensorboard, monkeypatch) -> None:
    # Non-main ranks: no file, no tracker, not even an import attempt.
    monkeypatch.setitem(sys.modules, "wandb", None)
    monkeypatch.setitem(sys.modules, "mlflow", None)
    out = tmp_path / "run"
    with MetricsLogger(out, enabled=False, report_to=["tensorboard", "wandb", "mlflow"]) as log:
        log.log({"loss": 1.0}, step=1)
        log.log_config(CONFIG)
        log.log_artifact(out / "selection.json")
    assert not out.exists()
    assert fake_tensorboard.instances == []
    assert metrics._reported == set()


def test_default_is_metrics_jsonl_only(tmp_path: Path, fake_tensorboard) -> None:
    # report_to empty (the recipe default): TensorBoard is not written even when installed.
    with MetricsLogger(tmp_path, enabled=True) as log:
        log.log({"loss": 0.5}, step=1)
        assert log.active_trackers == []
    assert fake_tensorboard.instances == []
    assert len(_read(tmp_path / "metrics.jsonl")) == 1


def test_unknown_tracker_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="comet"):
        MetricsLogger(tmp_path, enabled=True, report_to=["comet"])


def test_non_numeric_fields_never_raise(tmp_path: Path, fake_tensorboard) -> None:
    with MetricsLogger(tmp_path, enabled=True, report_to=["tensorboard"]) as log:
        log.log({"name": "x", "path": tmp_path, "none": None, "loss": 0.5}, step=1)
    (row,) = _read(tmp_path / "metrics.jsonl")
    assert row["name"] == "x" and row["path"] == str(tmp_path) and row["none"] is None
    (writer,) = fake_tensorboard.instances
    assert writer.scalars == [("loss", 0.5, 1)]


def test_tensorboard_mirrors_numeric_fields_with_stage_prefix(tmp_path: Path, fake_tensorboard) -> None:
    with MetricsLogger(tmp_path, enabled=True, report_to=["tensorboard"]) as log:
        log.log({"stage": "sampling", "loss": torch.tensor(0.75), "lr": 1e-4}, step=5)
        log.log({"loss": 0.5}, step=6)
    (writer,) = fake_tensorboard.instances
    assert writer.log_dir == str(tmp_path / "tensorboard")
    assert writer.scalars == [("sampling/loss", 0.75, 5), ("sampling/lr", 1e-4, 5), ("loss", 0.5, 6)]
    assert writer.closed


# --------------------------------------------------------------------- missing packages


def test_missing_trackers_warn_once_each_and_run_goes_on(tmp_path: Path, monkeypatch, caplog) -> None:
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    monkeypatch.setitem(sys.modules, "wandb", None)
    monkeypatch.setitem(sys.modules, "mlflow", None)
    monkeypatch.setitem(sys.modules, "mlflow.tracking", None)
    with caplog.at_level(logging.INFO, logger="loradrop_ds.metrics"):
        for i in range(2):  # a second logger in the same process: no second notice
            with MetricsLogger(tmp_path, enabled=True, report_to=["tensorboard", "wandb", "mlflow"]) as log:
                assert log.active_trackers == []
                log.log({"loss": float(i)}, step=i)
                log.log_config(CONFIG)
                log.log_artifact(tmp_path / "metrics.jsonl")
    notices = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(notices) == 3, [r.getMessage() for r in notices]
    for name, record in zip(("tensorboard", "wandb", "mlflow"), notices, strict=True):
        assert f"pip install {name}" in record.getMessage()
    assert len(_read(tmp_path / "metrics.jsonl")) == 2
    assert not (tmp_path / "tensorboard").exists()


# ------------------------------------------------------------------ real TensorBoard


def _tb_events(log_dir: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    acc.Reload()
    return acc


def _tb_text(acc, tag: str) -> str:
    from tensorboard.util import tensor_util

    (event,) = acc.Tensors(f"{tag}/text_summary")
    return tensor_util.make_ndarray(event.tensor_proto).item().decode()


def test_tensorboard_events_land_on_disk(tmp_path: Path, artifacts) -> None:
    out = tmp_path / "run"
    with MetricsLogger(out, enabled=True, report_to=["tensorboard"]) as log:
        assert log.active_trackers == ["tensorboard"]
        log.log_config(CONFIG)
        for step in (1, 2):
            log.log({"stage": "sampling", "loss": 1.0 / step, "lr": 1e-3}, step=step)
        log.log({"stage": "main", "loss": 0.25}, step=1)
        for path in artifacts:
            log.log_artifact(path)
    assert _read(out / "metrics.jsonl")[-1]["loss"] == 0.25
    acc = _tb_events(out / "tensorboard")
    assert [(e.step, e.value) for e in acc.Scalars("sampling/loss")] == [(1, 1.0), (2, 0.5)]
    assert [(e.step, e.value) for e in acc.Scalars("main/loss")] == [(1, 0.25)]
    config_text = _tb_text(acc, "config")
    assert "target_modules" in config_text and "tok-path" in config_text
    assert "hf_SECRETSECRET" not in config_text and "<redacted>" in config_text
    assert '"kept": [3, 1]' in _tb_text(acc, "selection")
    (image,) = acc.Images("importance")
    assert image.width == 100 and image.height == 50


# ------------------------------------------------------------------ real wandb, offline


def _wandb_records(run_dir: Path):
    """The records of a run's .wandb file (LevelDB log format: 7-byte W&B header, then
    32 KiB blocks of [crc32 u32, length u16, type u8] chunks)."""
    from wandb.proto import wandb_internal_pb2 as pb

    (path,) = run_dir.glob("run-*.wandb")
    data, pos, pending = path.read_bytes(), 7, b""
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if left < 7 or (length == 0 and kind == 0):
            pos += left
            continue
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST
            record = pb.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def _wandb_history(records) -> list[dict]:
    rows = []
    for r in records:
        if r.WhichOneof("record_type") == "history":
            rows.append({"/".join(i.nested_key) or i.key: json.loads(i.value_json) for i in r.history.item})
    return rows


@pytest.fixture
def wandb_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_BASE_URL", "WANDB_PROJECT", "WANDB_NAME"):
        monkeypatch.delenv(var, raising=False)
    home = tmp_path / "home"
    home.mkdir()
    (home / "netrc").write_text("")  # no `wandb login` either
    monkeypatch.setenv("NETRC", str(home / "netrc"))
    for var in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(var, str(home / var.lower()))
    monkeypatch.setenv("WANDB_SILENT", "true")


def _wandb_offline_run(out: Path) -> Path:
    (run_dir,) = (out / "wandb").glob("offline-run-*")
    return run_dir


def test_wandb_without_api_key_logs_offline(tmp_path: Path, wandb_env, artifacts, caplog) -> None:
    out = tmp_path / "run"
    with caplog.at_level(logging.INFO, logger="loradrop_ds.metrics"):
        with MetricsLogger(out, enabled=True, report_to=["wandb"]) as log:
            assert log.active_trackers == ["wandb"]
            log.log_config(CONFIG)
            for step in (1, 2, 3):
                log.log({"stage": "sampling", "loss": 1.0 / step}, step=step)
            # main counts from 0 again: its rows must not be dropped as "steps going back"
            log.log({"stage": "main", "loss": 0.5}, step=0)
            log.log({"stage": "main", "loss": 0.25}, step=1)
            for path in artifacts:
                log.log_artifact(path)
    (notice,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert "no API key" in notice and "offline" in notice
    run_dir = _wandb_offline_run(out)
    records = list(_wandb_records(run_dir))
    history = _wandb_history(records)
    assert [(h["sampling/step"], h["sampling/loss"]) for h in history if "sampling/loss" in h] == [
        (1, 1.0), (2, 0.5), (3, 1.0 / 3)]
    assert [(h["main/step"], h["main/loss"]) for h in history if "main/loss" in h] == [(0, 0.5), (1, 0.25)]
    config = {}
    for r in records:
        kind = r.WhichOneof("record_type")
        if kind in ("run", "config"):
            updates = r.run.config.update if kind == "run" else r.config.update
            config.update({u.key: json.loads(u.value_json) for u in updates})
    assert config["lora"]["target_modules"] == ["q_proj", "v_proj"]
    assert config["model"]["hub_token"] == "<redacted>"
    assert json.loads((run_dir / "files" / "selection.json").read_text())["kept"] == [3, 1]
    assert (run_dir / "files" / "importance.png").read_bytes()[:4] == b"\x89PNG"


def test_wandb_unreachable_server_logs_offline_once_and_never_logs_the_key(
        tmp_path: Path, wandb_env, monkeypatch, caplog) -> None:
    key = "k" * 40
    monkeypatch.setenv("WANDB_API_KEY", key)
    monkeypatch.setenv("WANDB_BASE_URL", _closed_port_url())
    with caplog.at_level(logging.INFO, logger="loradrop_ds.metrics"):
        for i in range(2):
            with MetricsLogger(tmp_path / f"run{i}", enabled=True, report_to=["wandb"]) as log:
                assert log.active_trackers == ["wandb"]
                log.log({"loss": 1.5}, step=1)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "cannot reach" in warnings[0], warnings
    assert key not in caplog.text
    for i in range(2):
        run_dir = _wandb_offline_run(tmp_path / f"run{i}")
        assert [h["loss"] for h in _wandb_history(_wandb_records(run_dir)) if "loss" in h] == [1.5]
        for path in run_dir.rglob("*"):
            assert not path.is_file() or key.encode() not in path.read_bytes(), path


# ------------------------------------------------------------------------------ mlflow


class FakeMlflowClient:
    instances: list["FakeMlflowClient"] = []

    def __init__(self, tracking_uri: str) -> None:
        self.tracking_uri = tracking_uri
        self.calls: list[tuple] = []
        self.fail_on: str | None = None
        FakeMlflowClient.instances.append(self)

    def _call(self, name: str, *args, **kwargs):
        if self.fail_on == name:
            raise RuntimeError(f"{name} failed")
        self.calls.append((name, args, kwargs))

    def get_experiment_by_name(self, name):
        return None

    def create_experiment(self, name, artifact_location=None):
        self._call("create_experiment", name, artifact_location=artifact_location)
        return "7"

    def create_run(self, experiment_id, run_name=None):
        self._call("create_run", experiment_id, run_name=run_name)
        return types.SimpleNamespace(info=types.SimpleNamespace(run_id="r1"))

    def log_batch(self, run_id, metrics=(), params=()):
        self._call("log_batch", run_id, metrics=list(metrics), params=list(params))

    def log_dict(self, run_id, dictionary, artifact_file):
        self._call("log_dict", run_id, dictionary, artifact_file)

    def log_artifact(self, run_id, local_path):
        self._call("log_artifact", run_id, local_path)

    def set_terminated(self, run_id, status):
        self._call("set_terminated", run_id, status)


@pytest.fixture
def fake_mlflow(monkeypatch: pytest.MonkeyPatch) -> type[FakeMlflowClient]:
    FakeMlflowClient.instances = []
    mlflow = types.ModuleType("mlflow")
    tracking = types.ModuleType("mlflow.tracking")
    tracking.MlflowClient = FakeMlflowClient
    entities = types.ModuleType("mlflow.entities")
    entities.Metric = lambda key, value, timestamp, step: (key, value, step)
    entities.Param = lambda key, value: (key, value)
    for name, module in (("mlflow", mlflow), ("mlflow.tracking", tracking), ("mlflow.entities", entities)):
        monkeypatch.setitem(sys.modules, name, module)
    for var in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_EXPERIMENT_ID"):
        monkeypatch.delenv(var, raising=False)
    return FakeMlflowClient


@pytest.mark.parametrize("sqlalchemy", [False, True])
def test_mlflow_defaults_to_a_local_store_under_output_dir(tmp_path: Path, fake_mlflow, artifacts, monkeypatch,
                                                           sqlalchemy: bool) -> None:
    # `pip install mlflow` brings SQLAlchemy: a SQLite store; mlflow-skinny: the file store.
    monkeypatch.setitem(sys.modules, "sqlalchemy", types.ModuleType("sqlalchemy") if sqlalchemy else None)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "")
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE")
    out = tmp_path / "run"
    with MetricsLogger(out, enabled=True, report_to=["mlflow"]) as log:
        log.log_config(CONFIG)
        log.log({"stage": "main", "loss": 0.5, "note": "x"}, step=3)
        log.log_artifact(artifacts[0])
    (client,) = fake_mlflow.instances
    if sqlalchemy:
        assert client.tracking_uri == f"sqlite:///{(out / 'mlflow.db').resolve()}"
        assert client.calls[0][2] == {"artifact_location": (out / "mlartifacts").resolve().as_uri()}
    else:
        assert client.tracking_uri == (out / "mlruns").resolve().as_uri()
        assert os.environ["MLFLOW_ALLOW_FILE_STORE"] == "true"  # MLflow 3 refuses the file store otherwise
    names = [c[0] for c in client.calls]
    assert names == ["create_experiment", "create_run", "log_batch", "log_dict", "log_batch", "log_artifact",
                     "set_terminated"]
    params = dict(client.calls[2][2]["params"])
    assert params["lora.r"] == "8" and params["lora.target_modules"] == '["q_proj", "v_proj"]'
    assert params["model.hub_token"] == "<redacted>" and params["model.tokenizer"] == "tok-path"
    assert client.calls[4][2]["metrics"] == [("main/loss", 0.5, 3)]
    assert client.calls[5][1] == ("r1", str(artifacts[0]))
    assert client.calls[6][1] == ("r1", "FINISHED")


def test_mlflow_unreachable_server_warns_once_and_never_raises(
        tmp_path: Path, fake_mlflow, monkeypatch, caplog, fake_tensorboard) -> None:
    url = _closed_port_url()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", url.replace("http://", "http://alice:pa55word@"))
    with caplog.at_level(logging.INFO, logger="loradrop_ds.metrics"):
        for i in range(2):
            with MetricsLogger(tmp_path, enabled=True, report_to=["mlflow", "tensorboard"]) as log:
                assert log.active_trackers == ["tensorboard"]  # the others go on
                log.log({"loss": 1.0}, step=i)
                log.log_config(CONFIG)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "mlflow" in warnings[0] and "cannot reach" in warnings[0], warnings
    assert "pa55word" not in caplog.text and url in warnings[0]
    assert fake_mlflow.instances == []  # MLflow's own retries never started
    assert len(_read(tmp_path / "metrics.jsonl")) == 2
    assert [w.scalars for w in fake_tensorboard.instances] == [[("loss", 1.0, 0)], [("loss", 1.0, 1)]]


@pytest.fixture
def http_server():
    """A local server that answers every GET with 404 (as a tracking server without
    /health would): an answer, so the server is reachable."""
    import http.server
    import threading

    class NotFound(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            self.send_error(404)

        def log_message(self, *args) -> None:
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), NotFound)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_mlflow_reachable_server_with_credentials_in_uri(tmp_path: Path, fake_mlflow, monkeypatch, http_server,
                                                         caplog) -> None:
    uri = f"http://alice:pa55word@{http_server}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    with caplog.at_level(logging.INFO, logger="loradrop_ds.metrics"):
        with MetricsLogger(tmp_path, enabled=True, report_to=["mlflow"]) as log:
            assert log.active_trackers == ["mlflow"]
    (client,) = fake_mlflow.instances
    assert client.tracking_uri == uri  # MLflow gets the URI as given; only logs and the probe drop the credentials
    assert "pa55word" not in caplog.text and f"http://{http_server}" in caplog.text


def test_tracker_failing_mid_run_is_switched_off_once(tmp_path: Path, fake_mlflow, fake_tensorboard, caplog) -> None:
    with caplog.at_level(logging.INFO, logger="loradrop_ds.metrics"):
        with MetricsLogger(tmp_path, enabled=True, report_to=["mlflow", "tensorboard"]) as log:
            (client,) = fake_mlflow.instances
            client.fail_on = "log_batch"  # e.g. the server went away
            for step in range(3):
                log.log({"loss": 1.0}, step=step)
            assert log.active_trackers == ["tensorboard"]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "mlflow failed in log_metrics" in warnings[0], warnings
    assert client.calls[-1] == ("set_terminated", ("r1", "FAILED"), {})
    assert len(fake_tensorboard.instances[0].scalars) == 3
    assert len(_read(tmp_path / "metrics.jsonl")) == 3


def test_failed_run_is_marked_failed(tmp_path: Path, fake_mlflow) -> None:
    with pytest.raises(KeyError):
        with MetricsLogger(tmp_path, enabled=True, report_to=["mlflow"]):
            raise KeyError("boom")
    assert fake_mlflow.instances[0].calls[-1] == ("set_terminated", ("r1", "FAILED"), {})


def test_mlflow_real_local_store(tmp_path: Path, monkeypatch, artifacts) -> None:
    pytest.importorskip("mlflow", reason="mlflow is not in the test extra (about 60 packages, several hundred MB); "
                        "`pip install mlflow` to run this test against a real local store")
    from mlflow.tracking import MlflowClient

    for var in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_EXPERIMENT_ID"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "")
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE")
    out = tmp_path / "run"
    with MetricsLogger(out, enabled=True, report_to=["mlflow"]) as log:
        assert log.active_trackers == ["mlflow"]
        log.log_config(CONFIG)
        for step in (1, 2):
            log.log({"stage": "main", "loss": 1.0 / step}, step=step)
        for path in artifacts:
            log.log_artifact(path)
    client = MlflowClient(tracking_uri=metrics._mlflow_local_store(out)[0])
    (run,) = client.search_runs([client.get_experiment_by_name("loradrop_ds").experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_name == "run"
    assert run.data.params["train.lr"] == "0.001" and run.data.params["model.hub_token"] == "<redacted>"
    assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "main/loss")] == [(1, 1.0), (2, 0.5)]
    assert {a.path for a in client.list_artifacts(run.info.run_id)} == {"config.yaml", "selection.json",
                                                                         "importance.png"}


# ---------------------------------------------------------------------------- helpers


def test_safe_url_and_redaction() -> None:
    assert metrics._safe_url("https://u:p@host:5000/x?y=1") == "https://host:5000/x?y=1"
    assert metrics._safe_url("http://host/a") == "http://host/a"
    redacted = metrics._redact({"tokenizer": "t", "max_tokens": 3, "hub_token": "s", "nested": [{"api_key": "k"}],
                                "password": None})
    assert redacted == {"tokenizer": "t", "max_tokens": 3, "hub_token": "<redacted>",
                        "nested": [{"api_key": "<redacted>"}], "password": None}


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
