"""Console commands of an installed loradrop_ds, and where its shipped files are.

``pip install .`` installs three commands that run the launch scripts (a checkout runs
the same scripts directly):

    loradrop-train  [--config RECIPE] [dotted.key=value ...]     python launch/train.py ...
    loradrop-export RUN_OR_CHECKPOINT --out DIR [...]             python launch/export.py ...
    loradrop-plan   --config RECIPE --nodes N --gpus-per-node G   python launch/plan.py ...

RECIPE may be a path or the name of a shipped recipe (``default``, ``llama2_7b_loradrop``).
Training on several processes needs a launcher, which runs a Python file or module:

    deepspeed --num_gpus N launch/train.py ...                   (a checkout: the documented launch)
    deepspeed --num_gpus N $(which loradrop-train) ...
    torchrun --nproc_per_node N $(which loradrop-train) ...
    torchrun --nproc_per_node N -m loradrop_ds.cli train ...

The package carries launch/, recipes/, ds_configs/ and data/ under ``loradrop_ds/_shipped``
(see pyproject.toml); in a checkout (or an editable install) they are the checkout's own.
A relative path such as ``ds_configs/zero3.json`` means the file in the working directory
when there is one, else the shipped one: ``resolve_shipped``.
"""

from __future__ import annotations

import os
import runpy
import sys
from pathlib import Path
from typing import Any

_PACKAGE = Path(__file__).resolve().parent
SHIPPED_DIRS = ("launch", "recipes", "ds_configs", "data")
COMMANDS = {"train": "train.py", "export": "export.py", "plan": "plan.py"}


def shipped_root() -> Path:
    """The directory holding launch/, recipes/, ds_configs/ and data/: the installed
    copy in the package, or the checkout the package is imported from."""
    installed = _PACKAGE / "_shipped"
    if (installed / "recipes").is_dir():
        return installed
    checkout = _PACKAGE.parent
    if (checkout / "recipes").is_dir() and (checkout / "launch").is_dir():
        return checkout
    return installed  # neither: paths resolved against it simply do not exist


def resolve_shipped(path: str | os.PathLike) -> Path:
    """``path`` itself when it exists (or is absolute), else the shipped file of that
    relative name when there is one, else ``path`` unchanged (so the caller's own
    "no such file" error names what the user wrote). Deterministic, so every rank of a
    run resolves a path the same way."""
    given = Path(path).expanduser()
    if given.is_absolute() or given.exists():
        return given
    shipped = shipped_root() / given
    return shipped if shipped.exists() else given


def resolve_recipe(name: str | os.PathLike) -> Path:
    """A recipe path from what a user typed: a path (``recipes/default.yaml``,
    ``my.yaml``) or a shipped recipe's name (``default``, ``default.yaml``). Files in the
    working directory win over shipped ones; unknown names come back unchanged."""
    given = Path(name).expanduser()
    candidates = [given]
    if given.suffix not in (".yaml", ".yml"):
        candidates.append(given.with_name(given.name + ".yaml"))
    if len(given.parts) == 1:
        candidates += [Path("recipes") / c for c in candidates]
    for candidate in candidates:
        resolved = resolve_shipped(candidate)
        if resolved.is_file():
            return resolved
    return given


# The settings that name shipped files (ds_configs/..., data/...) by relative path.
SHIPPED_SETTINGS = ("deepspeed", "data.train_file", "data.eval_file")


def load_recipe(recipe: str | None, overrides: list[str]) -> tuple[Any, list[str]]:
    """The config of the recipe a user named (``resolve_recipe``; None: the embedded default)
    with their ``dotted.key=value`` overrides, its path settings pointed at shipped files
    (``resolve_shipped_paths``); and those changes, for the log. What train.py and plan.py load."""
    from .config import load_config

    cfg = load_config(resolve_recipe(recipe) if recipe else None, overrides)
    return cfg, resolve_shipped_paths(cfg)


def resolve_shipped_paths(cfg: Any) -> list[str]:
    """Point the path settings of a loaded config (``SHIPPED_SETTINGS``) that name no file
    in the working directory at the shipped file of that name, in place. Returns one
    ``"key: old -> new"`` line per change, for the log. A path that exists here, an
    absolute one, a hub dataset id and an unknown name are left as they are."""
    changes = []
    for key in SHIPPED_SETTINGS:
        *parents, leaf = key.split(".")
        holder = cfg
        for part in parents:
            holder = getattr(holder, part)
        value = getattr(holder, leaf)
        if not value:
            continue
        resolved = resolve_shipped(value)
        if resolved != Path(value).expanduser():
            setattr(holder, leaf, str(resolved))
            changes.append(f"{key}: {value} -> {resolved}")
    return changes


def shipped_recipes() -> list[str]:
    """Names of the shipped recipes (for help texts and error messages)."""
    return sorted(p.stem for p in (shipped_root() / "recipes").glob("*.yaml"))


def _resolve_config_arg(args: list[str]) -> list[str]:
    """``--config NAME`` / ``--config=NAME`` with NAME resolved by ``resolve_recipe``."""
    out = list(args)
    for i, arg in enumerate(out):
        if arg == "--config" and i + 1 < len(out):
            out[i + 1] = str(resolve_recipe(out[i + 1]))
            break
        if arg.startswith("--config="):
            out[i] = "--config=" + str(resolve_recipe(arg.split("=", 1)[1]))
            break
        if arg == "--":
            break
    return out


def _run_script(command: str, args: list[str]) -> int:
    """Run launch/<script> as ``python launch/<script> args`` would, in this process (so a
    launcher's environment, ranks included, applies unchanged)."""
    script = shipped_root() / "launch" / COMMANDS[command]
    if not script.is_file():
        print(f"error: loradrop-{command}: {script} is not part of this installation of loradrop_ds "
              f"(reinstall it from a checkout that has launch/{COMMANDS[command]})", file=sys.stderr)
        return 2
    if command in ("train", "plan"):
        args = _resolve_config_arg(args)
    sys.argv = [str(script), *args]
    runpy.run_path(str(script), run_name="__main__")  # the scripts end with sys.exit / os._exit on their own
    return 0


def train(argv: list[str] | None = None) -> int:
    """``loradrop-train``: launch/train.py (one process; use a launcher for more)."""
    return _run_script("train", sys.argv[1:] if argv is None else argv)


def export(argv: list[str] | None = None) -> int:
    """``loradrop-export``: launch/export.py."""
    return _run_script("export", sys.argv[1:] if argv is None else argv)


def plan(argv: list[str] | None = None) -> int:
    """``loradrop-plan``: launch/plan.py."""
    return _run_script("plan", sys.argv[1:] if argv is None else argv)


def main(argv: list[str] | None = None) -> int:
    """``python -m loradrop_ds.cli {train,export,plan} ...`` (what ``torchrun -m`` and
    ``deepspeed --module`` run). The deepspeed launcher puts ``--local_rank=N`` before
    the command; it is passed on after it."""
    args = sys.argv[1:] if argv is None else list(argv)
    local_rank = [a for a in args[:2] if a.startswith(("--local_rank", "--local-rank"))]
    rest = [a for a in args if a not in local_rank]
    if not rest or rest[0] not in COMMANDS:
        print(f"usage: python -m loradrop_ds.cli {{{','.join(COMMANDS)}}} [ARGS ...]\n\n"
              f"shipped recipes: {', '.join(shipped_recipes()) or 'none found'}", file=sys.stderr)
        return 0 if rest and rest[0] in ("-h", "--help") else 2
    return _run_script(rest[0], [*local_rank, *rest[1:]])


if __name__ == "__main__":
    sys.exit(main())
