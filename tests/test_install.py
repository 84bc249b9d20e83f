"""``pip install .`` for real: a non-editable install into a fresh virtual environment
gives the console commands, and finds the shipped recipes, DeepSpeed configs and data
from any working directory; an editable install finds the checkout's own.

The environments reuse this interpreter's site-packages (torch, deepspeed, ...) through
a .pth line, so nothing is downloaded: ``pip install --no-deps --no-build-isolation``.
``--ignore-installed`` keeps pip from touching the project's own (editable) install,
which it can see through that line."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from conftest import REPO, _free_port

# What a build of the package reads from a checkout.
SOURCES = ("pyproject.toml", "README.md", "loradrop_ds", "launch", "recipes", "ds_configs", "data")
SHIPPED = ("recipes/default.yaml", "recipes/llama3_70b_loradrop.yaml", "ds_configs/zero3.json",
           "ds_configs/zero3_tiny.json", "data/wordnet_categories/train.jsonl", "data/wordnet_categories/eval.jsonl",
           "launch/train.py", "launch/export.py")


def _copy_sources(dest: Path) -> Path:
    dest.mkdir()
    for name in SOURCES:
        src = REPO / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info"))
        else:
            shutil.copy2(src, dest / name)
    return dest


def _venv(path: Path) -> Path:
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(path)], check=True)
    (site,) = path.glob("lib/python*/site-packages")
    (site / "_project_venv.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return path / "bin"


def _pip_install(bin_dir: Path, *args: str) -> None:
    own = sorted(p.name for p in Path(sysconfig.get_paths()["purelib"]).glob("loradrop_ds*"))
    proc = subprocess.run([str(bin_dir / "python"), "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                           "--ignore-installed", "--no-compile", *args], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # The project's own environment is untouched.
    assert sorted(p.name for p in Path(sysconfig.get_paths()["purelib"]).glob("loradrop_ds*")) == own


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["OMP_NUM_THREADS"] = "1"
    return env


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """bin/ of a venv with a regular (non-editable) ``pip install .`` of a copy of the checkout."""
    root = tmp_path_factory.mktemp("install")
    src = _copy_sources(root / "src")
    bin_dir = _venv(root / "venv")
    _pip_install(bin_dir, str(src))
    shutil.rmtree(src)  # nothing may point back at the sources
    return bin_dir


@pytest.fixture
def elsewhere(tmp_path: Path) -> Path:
    """A working directory with no recipes/, ds_configs/ or data/ in it."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    return cwd


def _run(bin_dir: Path, cmd: list[str], cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    exe = bin_dir / cmd[0] if (bin_dir / cmd[0]).exists() else cmd[0]
    return subprocess.run([str(exe), *cmd[1:]], cwd=cwd, env=_env(), capture_output=True, text=True, timeout=timeout)


def _py(bin_dir: Path, code: str, cwd: Path) -> list[str]:
    proc = _run(bin_dir, ["python", "-c", code], cwd)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.split()


def test_installed_package_ships_recipes_configs_data_and_scripts(installed: Path, elsewhere: Path) -> None:
    package, shipped_root, *resolved = _py(installed, (
        "import loradrop_ds, loradrop_ds.cli as c\n"
        "print(loradrop_ds.__file__, c.shipped_root())\n"
        f"for p in {list(SHIPPED)!r}: print(c.resolve_shipped(p))\n"
        "print(c.resolve_recipe('default'), c.resolve_recipe('default.yaml'), c.resolve_recipe('recipes/default.yaml'))"
    ), elsewhere)
    venv = installed.parent
    assert Path(package).is_relative_to(venv) and shipped_root == str(Path(package).parent / "_shipped")
    for rel, path in zip(SHIPPED, resolved[:len(SHIPPED)], strict=True):
        assert path == f"{shipped_root}/{rel}"
        assert Path(path).read_bytes() == (REPO / rel).read_bytes(), rel
    assert resolved[len(SHIPPED):] == [f"{shipped_root}/recipes/default.yaml"] * 3


def test_files_in_the_working_directory_win(installed: Path, elsewhere: Path) -> None:
    (elsewhere / "recipes").mkdir()
    (elsewhere / "recipes" / "default.yaml").write_text("seed: 7\n")
    (elsewhere / "mine.yaml").write_text("seed: 8\n")
    out = _py(installed, "import loradrop_ds.cli as c\n"
                         "print(c.resolve_recipe('default'), c.resolve_recipe('mine'), c.resolve_recipe('nosuch'),"
                         " c.resolve_shipped('ds_configs/nosuch.json'))", elsewhere)
    assert out == ["recipes/default.yaml", "mine.yaml", "nosuch", "ds_configs/nosuch.json"]


def test_console_commands(installed: Path, elsewhere: Path) -> None:
    for command, expected in (("loradrop-train", "--config"), ("loradrop-export", "--format")):
        proc = _run(installed, [command, "--help"], elsewhere)
        assert proc.returncode == 0 and expected in proc.stdout, (command, proc.stdout, proc.stderr)
    # The recipe is found by name from the installed copy and parsed: the run stops at the
    # bad setting (exit 2), not at "no such file".
    proc = _run(installed, ["loradrop-train", "--config", "default", "train.max_steps=0"], elsewhere)
    assert proc.returncode == 2 and "train.max_steps must be >= 1" in proc.stderr, proc.stderr
    proc = _run(installed, ["loradrop-train", "--config=nosuch"], elsewhere)
    assert proc.returncode == 2 and "nosuch: no such file" in proc.stderr, proc.stderr


def test_plan_command(installed: Path, elsewhere: Path) -> None:
    proc = _run(installed, ["loradrop-plan", "--help"], elsewhere)
    if not (REPO / "launch" / "plan.py").exists():
        # launch/plan.py is being written alongside this (issue 7). Until it lands, the
        # command exists and says what is missing; once it is there, --help must work.
        assert proc.returncode == 2 and "launch/plan.py" in proc.stderr, proc.stderr
        return
    assert proc.returncode == 0 and "--nodes" in proc.stdout, proc.stdout + proc.stderr


def test_torchrun_runs_the_installed_module(installed: Path, elsewhere: Path) -> None:
    # `torchrun -m loradrop_ds.cli train ...` (what `python -m` runs on every rank); the
    # recipe comes from the installed copy, the run stops at the bad setting on the rank.
    proc = _run(installed, ["python", "-m", "torch.distributed.run", "--nproc_per_node=1",
                            f"--master_port={_free_port()}", "-m", "loradrop_ds.cli", "train", "--config", "default",
                            "train.max_steps=0"], elsewhere)
    assert proc.returncode != 0 and "train.max_steps must be >= 1" in proc.stdout + proc.stderr, proc.stderr[-3000:]


def test_module_usage(installed: Path, elsewhere: Path) -> None:
    proc = _run(installed, ["python", "-m", "loradrop_ds.cli"], elsewhere)
    assert proc.returncode == 2 and "default" in proc.stderr and "llama2_7b_loradrop" in proc.stderr, proc.stderr


def test_editable_install_uses_the_checkout(tmp_path: Path, elsewhere: Path) -> None:
    src = _copy_sources(tmp_path / "src")
    bin_dir = _venv(tmp_path / "venv")
    _pip_install(bin_dir, "-e", str(src))
    root, recipe, proc_out = _py(bin_dir, "import loradrop_ds.cli as c\n"
                                          "print(c.shipped_root(), c.resolve_recipe('default'), "
                                          "c.resolve_shipped('ds_configs/zero3.json'))", elsewhere)
    assert root == str(src) and recipe == str(src / "recipes/default.yaml") and proc_out == str(src / "ds_configs/zero3.json")
    assert (bin_dir / "loradrop-train").exists()


# ------------------------------------------------------------------- in process (checkout)


def test_resolve_shipped_paths_changes_only_missing_relative_paths(tmp_path: Path, monkeypatch) -> None:
    from loradrop_ds import config as config_lib
    from loradrop_ds.cli import resolve_shipped_paths

    monkeypatch.chdir(tmp_path)
    (tmp_path / "ds_configs").mkdir()
    (tmp_path / "ds_configs" / "zero3.json").write_text("{}")  # the user's own copy wins
    cfg = config_lib.load_config(None, ["data.eval_file=org/some-hub-dataset"])
    changes = resolve_shipped_paths(cfg)
    assert cfg.deepspeed == "ds_configs/zero3.json"
    assert cfg.data.train_file == str(REPO / "data/wordnet_categories/train.jsonl")
    assert cfg.data.eval_file == "org/some-hub-dataset"  # not a shipped file: left for the hub
    assert changes == [f"data.train_file: data/wordnet_categories/train.jsonl -> {REPO}/data/wordnet_categories/train.jsonl"]
    assert resolve_shipped_paths(cfg) == []  # idempotent


def test_module_entry_passes_local_rank_after_the_command(monkeypatch) -> None:
    from loradrop_ds import cli

    calls = []
    monkeypatch.setattr(cli, "_run_script", lambda command, args: calls.append((command, args)) or 0)
    # The deepspeed launcher with --module: python -m loradrop_ds.cli --local_rank=1 train ...
    assert cli.main(["--local_rank=1", "train", "--config", "default"]) == 0
    assert cli.main(["export", "run", "--out", "x"]) == 0
    assert calls == [("train", ["--local_rank=1", "--config", "default"]), ("export", ["run", "--out", "x"])]
    assert cli.main(["nosuch"]) == 2


def test_config_argument_is_resolved_in_every_form(tmp_path: Path, monkeypatch) -> None:
    from loradrop_ds.cli import _resolve_config_arg

    monkeypatch.chdir(tmp_path)
    recipe = str(REPO / "recipes" / "default.yaml")
    assert _resolve_config_arg(["--config", "default", "a=1"]) == ["--config", recipe, "a=1"]
    assert _resolve_config_arg(["--config=default"]) == [f"--config={recipe}"]
    assert _resolve_config_arg(["x=1"]) == ["x=1"]
