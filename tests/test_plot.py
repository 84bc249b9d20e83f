from pathlib import Path

import pytest

from loradrop_ds.plot import plot_importance

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _layers(n: int) -> tuple[list[str], list[float], list[bool]]:
    labels = [str(i) for i in range(n)]
    importance = [float((i * 7) % n + 1) for i in range(n)]
    kept = [v > n / 2 for v in importance]
    return labels, importance, kept


@pytest.mark.parametrize("n", [1, 4, 30])
def test_writes_valid_png(tmp_path: Path, n: int) -> None:
    out = tmp_path / "importance.png"
    labels, importance, kept = _layers(n)
    plot_importance(out, labels, importance, kept, threshold=0.9)
    data = out.read_bytes()
    assert data[:8] == PNG_MAGIC
    assert len(data) > 5_000  # a real rendered chart, not an empty stub
    assert [p.name for p in tmp_path.iterdir()] == ["importance.png"]


def test_module_labels_and_string_path(tmp_path: Path) -> None:
    out = tmp_path / "mods.png"
    labels = [f"{layer}.{m}" for layer in range(3) for m in ("q_proj", "v_proj")]
    plot_importance(str(out), labels, [0.0, 1.0, 2.0, 3.0, 4.0, 5.0], [False] * 3 + [True] * 3, 0.5, title="t")
    assert out.read_bytes()[:8] == PNG_MAGIC


def test_overwrites_existing_file(tmp_path: Path) -> None:
    out = tmp_path / "p.png"
    out.write_bytes(b"old")
    plot_importance(out, ["0", "1"], [1.0, 2.0], [False, True], 0.5)
    assert out.read_bytes()[:8] == PNG_MAGIC
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.png"]


def test_all_zero_importance_does_not_crash(tmp_path: Path) -> None:
    out = tmp_path / "z.png"
    plot_importance(out, ["0", "1", "2"], [0.0, 0.0, 0.0], [True, False, False], 0.9)
    assert out.read_bytes()[:8] == PNG_MAGIC


@pytest.mark.parametrize(
    "labels,importance,kept",
    [
        (["0", "1"], [1.0], [True, False]),
        (["0", "1"], [1.0, 2.0], [True]),
        (["0"], [1.0, 2.0], [True, False]),
        ([], [], []),
    ],
)
def test_bad_lengths_raise(tmp_path: Path, labels, importance, kept) -> None:
    out = tmp_path / "bad.png"
    with pytest.raises(ValueError):
        plot_importance(out, labels, importance, kept, 0.9)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("importance,threshold", [([1.0, float("nan")], 0.9), ([1.0, -1.0], 0.9), ([1.0, 2.0], 1.5)])
def test_bad_values_raise(tmp_path: Path, importance, threshold) -> None:
    with pytest.raises(ValueError):
        plot_importance(tmp_path / "bad.png", ["0", "1"], importance, [True, False], threshold)
    assert list(tmp_path.iterdir()) == []


def test_no_temp_file_left_when_save_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from matplotlib.figure import Figure

    def boom(self, *args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(Figure, "savefig", boom)
    with pytest.raises(OSError, match="disk full"):
        plot_importance(tmp_path / "p.png", ["0", "1"], [1.0, 2.0], [True, False], 0.5)
    assert list(tmp_path.iterdir()) == []


def test_missing_matplotlib_raises_runtime_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    # A None entry in sys.modules makes the import raise ImportError.
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(RuntimeError, match="pip install matplotlib"):
        plot_importance(tmp_path / "p.png", ["0"], [1.0], [True], 0.5)


def test_does_not_touch_pyplot(tmp_path: Path) -> None:
    import sys

    plot_importance(tmp_path / "p.png", ["0", "1"], [1.0, 2.0], [True, False], 0.5)
    pyplot = sys.modules.get("matplotlib.pyplot")
    # Either pyplot was never imported, or no global figure was left open.
    assert pyplot is None or pyplot.get_fignums() == []
