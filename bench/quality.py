#!/usr/bin/env python
"""Quality grid: accuracy and eval loss against trainable parameters, several seeds.

    .venv/bin/python bench/quality.py                       # run (or continue) the whole grid
    .venv/bin/python bench/quality.py --dry-run             # print the commands and what is done
    .venv/bin/python bench/quality.py --report              # table + plot from what has finished
    .venv/bin/python bench/quality.py --configs plain T0.9 --seeds 1 2

The embedded default (SmolLM2-135M-Instruct on the shipped WordNet definition -> category
task, ZeRO-3, 2 ranks) through the real CLI, ``torchrun --nproc_per_node 2 launch/train.py``,
once per (config, seed). Configs (dotted overrides on top of the default recipe):

* ``plain``: plain LoRA in every layer (loradrop.enabled=false);
* ``T0.8``, ``T0.9``, ``T0.95``: LoRA-drop, output_norm selection at threshold T;
* ``budget0.5``: LoRA-drop keeping the top layers that fit 50% of plain LoRA's parameters;
* ``T0.9_scale_{scalar,vector}``, ``budget0.5_scale_{scalar,vector}``: the same with a learned
  gain on the shared LoRA (``none`` is the default, i.e. the rows ``T0.9`` and ``budget0.5``);
  ``T0.8_scale_scalar``, ``T0.95_scale_scalar``: the scalar gain at the other thresholds (the
  vector gain gave the scalar's results to 4 digits at T = 0.9 and the budget, so it is not
  repeated there);
* ``T0.9_random``, ``T0.9_bottom``: random / least-output layers, as many as output_norm keeps at T;
* ``T0.9_kept_only``: unselected layers carry no adapter (loradrop.train_shared=false);
* ``T0.9_param_norm``, ``T0.9_grad_norm``: other importance measures, same count;
* ``allora``, ``allora_T0.9``: ALLoRA (lora.variant=allora, no dropout, alpha = r, lr x eta)
  in every layer and with LoRA-drop at T = 0.9, against ``plain`` and ``T0.9``;
* ``allora_control``: plain LoRA with ALLoRA's dropout, alpha and lr but no gradient rescaling.

Zero-shot (the base model) needs no run: every summary.json holds ``zero_shot``, measured
before training; the report gives it once and flags it if it differs between runs.

Resumable: run (config, seed) writes into ``<out>/<config>/seed<S>/`` (default
bench/out/quality). A run whose summary.json exists is skipped. Any other run is launched
again with the same command: the CLI's ``resume=auto`` continues from its newest complete
checkpoint, and ``overwrite=true`` lets a run killed before its first checkpoint start
afresh (its files are moved aside by the CLI, nothing is deleted). A resume with other
settings (e.g. another --steps) is refused by the CLI: use another --out. Each attempt's
output is appended to ``<out>/<config>/seed<S>.log`` and its wall time to
``<out>/<config>/seed<S>.attempts.jsonl``. A failed run is reported and the grid goes on.
torchrun starts each rank in its own session, so a SIGKILL to this script can leave the
ranks of the killed attempt running: before a run starts, processes whose command line holds
its exact ``output_dir=`` are stopped (SIGTERM, then SIGKILL). Ctrl-C or SIGTERM to this
script stops torchrun cleanly (it stops its ranks). One instance per --out (a lock file).

Size: 19 configs x 3 seeds = 57 runs. At the defaults (--steps 50, the recipe's; all 320 eval
examples; 10 sampling steps) a run takes about 3.5 min on the project's 2-core CPU machine
(bench/RESULTS.md), so the grid takes about 2.5 h when nothing else runs.

After every run, and with --report, the results (from every summary.json under --out) go to
--results (bench/results/quality.json); --report also prints a Markdown table and writes
--plot (bench/results/quality.png); bench/quality_report.py does only that.
"""

from __future__ import annotations

import argparse
import ctypes
import fcntl
import json
import os
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parents[1]

# name -> (overrides, short description). Order: the table's order.
ALLORA = ["lora.variant=allora", "lora.dropout=0", "lora.alpha=8", "train.lr=0.002"]
CONFIGS: dict[str, tuple[list[str], str]] = {
    "plain": (["loradrop.enabled=false"], "plain LoRA (all layers)"),
    "T0.8": (["loradrop.threshold=0.8"], "LoRA-drop T=0.8"),
    "T0.9": (["loradrop.threshold=0.9"], "LoRA-drop T=0.9"),
    "T0.95": (["loradrop.threshold=0.95"], "LoRA-drop T=0.95"),
    "budget0.5": (["loradrop.param_budget=0.5"], "LoRA-drop, 50% param budget"),
    "T0.9_scale_scalar": (["loradrop.threshold=0.9", "loradrop.shared_scale=scalar"], "T=0.9, shared scale scalar"),
    "T0.9_scale_vector": (["loradrop.threshold=0.9", "loradrop.shared_scale=vector"], "T=0.9, shared scale vector"),
    "budget0.5_scale_scalar": (["loradrop.param_budget=0.5", "loradrop.shared_scale=scalar"],
                               "budget 0.5, shared scale scalar"),
    "budget0.5_scale_vector": (["loradrop.param_budget=0.5", "loradrop.shared_scale=vector"],
                               "budget 0.5, shared scale vector"),
    "T0.8_scale_scalar": (["loradrop.threshold=0.8", "loradrop.shared_scale=scalar"], "T=0.8, shared scale scalar"),
    "T0.95_scale_scalar": (["loradrop.threshold=0.95", "loradrop.shared_scale=scalar"],
                           "T=0.95, shared scale scalar"),
    "T0.9_random": (["loradrop.threshold=0.9", "loradrop.selection=random"], "random layers, size of T=0.9"),
    # Issue 20: what the selection buys. Random layers at the same 50% budget; one LoRA per module
    # type shared by every layer (no sampling stage), with and without a learned gain per use;
    # (layer, module) pairs chosen at the same budget; the sampling stage stopped on the ranking.
    "budget0.5_random": (["loradrop.param_budget=0.5", "loradrop.selection=random"], "random layers, 50% budget"),
    "share_all": (["loradrop.selection=share_all"], "one shared LoRA per module, every layer"),
    "share_all_scale_scalar": (["loradrop.selection=share_all", "loradrop.shared_scale=scalar"],
                               "share-all, scalar gain per layer"),
    # Share-all at budget0.5's parameter count: r = 120 is 15 x the rank (one shared LoRA per
    # module = 1/30 of plain LoRA at r = 8), alpha scaled with it so alpha / r stays 2.
    "share_all_r120": (["loradrop.selection=share_all", "lora.r=120", "lora.alpha=240"],
                       "share-all at r=120: 50% of plain's parameters"),
    "module_budget0.5": (["loradrop.granularity=module", "loradrop.param_budget=0.5"],
                         "(layer, module) pairs, 50% budget"),
    "budget0.5_rankstop": (["loradrop.param_budget=0.5", "loradrop.sampling_steps=auto", "loradrop.auto_stop=ranking",
                            "loradrop.auto_patience=4"], "50% budget, sampling stopped on the ranking"),
    "T0.9_bottom": (["loradrop.threshold=0.9", "loradrop.selection=bottom"], "bottom layers, size of T=0.9"),
    "T0.9_kept_only": (["loradrop.threshold=0.9", "loradrop.train_shared=false"], "T=0.9 kept only (no shared LoRA)"),
    "T0.9_param_norm": (["loradrop.threshold=0.9", "loradrop.selection=param_norm"], "param-norm, size of T=0.9"),
    "T0.9_grad_norm": (["loradrop.threshold=0.9", "loradrop.selection=grad_norm"], "grad-norm, size of T=0.9"),
    # ALLoRA (issue 10): no dropout, no alpha/r scaling (alpha = r), and the paper's learning
    # rate rule, base lr x eta = 1e-3 x 2.
    "allora": (["loradrop.enabled=false", *ALLORA], "ALLoRA, all layers (lr 2e-3 = 1e-3 x eta)"),
    "allora_T0.9": (["loradrop.threshold=0.9", *ALLORA], "ALLoRA with LoRA-drop T=0.9"),
    # The control for ``allora``: every ALLoRA setting (no dropout, alpha = r, lr 2e-3) except the
    # gradient rescaling, so allora - allora_control is the rescaling's own effect.
    "allora_control": (["loradrop.enabled=false", *[o for o in ALLORA if not o.startswith("lora.variant")]],
                       "LoRA with ALLoRA's settings, no rescaling (control)"),
}
DEFAULT_SEEDS = [1, 2, 3]
DEFAULT_STEPS = 50  # the recipe's train.max_steps
MINUTES_PER_RUN = 3.5  # default settings, 2-core CPU (bench/RESULTS.md)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def settings_overrides(args: argparse.Namespace) -> list[str]:
    """The overrides every run gets besides its config's (recorded in the results)."""
    out = [f"train.max_steps={args.steps}"]
    if args.eval is not None:
        out.append(f"data.max_eval_examples={args.eval}")
    return out + list(args.set)


def run_dir(out: Path, config: str, seed: int) -> Path:
    return out / config / f"seed{seed}"


def command(args: argparse.Namespace, config: str, seed: int, port: int | str = "PORT") -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}",
            "launch/train.py", f"output_dir={run_dir(args.out, config, seed)}", f"seed={seed}",
            "resume=auto", "overwrite=true", *CONFIGS[config][0], *settings_overrides(args)]


def _die_with_parent() -> None:  # torchrun ends (and ends its ranks) if this script is killed
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def status(d: Path) -> str:
    if (d / "summary.json").exists():
        return "done"
    ckpts = sorted(p.name for p in (d / "checkpoints").glob("*") if (p / "COMPLETE.json").exists()) \
        if (d / "checkpoints").is_dir() else []
    if ckpts:
        return f"partial (resumes from {ckpts[-1]})"
    return "started, no checkpoint (restarts)" if d.exists() else "todo"


def stale_processes(d: Path) -> list[int]:
    """Live processes of a run in `d`: torchrun starts each rank in its own session, so a
    SIGKILL to this script (or to its process group) can leave the ranks of the killed
    attempt running. Matched by the exact ``output_dir=<d>`` argument."""
    mark, pids = f"output_dir={d}".encode(), []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            args = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if mark in args and int(proc.name) != os.getpid():
            pids.append(int(proc.name))
    return sorted(pids)


def stop_stale(d: Path, grace_s: float = 20.0) -> None:
    """End the leftover processes of an earlier attempt on run directory `d` (by pid: SIGTERM,
    then SIGKILL after `grace_s`), so that two attempts never write into it at once."""
    pids = stale_processes(d)
    if not pids:
        return
    print(f"stopping leftover processes of an earlier attempt on {d}: {pids}", flush=True)
    for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 10.0)):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            pids = [pid for pid in pids if Path(f"/proc/{pid}").exists()
                    and "Z" not in Path(f"/proc/{pid}/stat").read_text(errors="replace").split(")")[-1][:3]]
            if not pids:
                return
            time.sleep(0.5)
    if pids:
        raise SystemExit(f"could not stop processes {pids} still running on {d}")


def run_one(args: argparse.Namespace, config: str, seed: int) -> bool:
    d = run_dir(args.out, config, seed)
    d.parent.mkdir(parents=True, exist_ok=True)
    stop_stale(d)
    if (d / "summary.json").exists():  # a leftover attempt finished the run before it was stopped
        print(f"done {config} seed {seed} (finished by an earlier attempt)", flush=True)
        return True
    cmd = command(args, config, seed, free_port())
    print(f"$ (cd {shlex.quote(str(HERE))} && {shlex.join(cmd)})", flush=True)
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"), TOKENIZERS_PARALLELISM="false")
    log_path = d.parent / f"seed{seed}.log"
    state_before = status(d)
    start = time.perf_counter()
    with open(log_path, "a") as log:
        log.write(f"\n===== {time.strftime('%Y-%m-%d %H:%M:%S')} {state_before}: {shlex.join(cmd)}\n")
        log.flush()
        proc = subprocess.Popen(cmd, cwd=HERE, env=env, stdout=log, stderr=subprocess.STDOUT,
                                preexec_fn=_die_with_parent)
        try:
            proc.wait()
        except BaseException:  # Ctrl-C / SIGTERM: let torchrun stop its ranks (SIGKILL would orphan them)
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
            stop_stale(d)
            raise
    wall = time.perf_counter() - start
    with open(d.parent / f"seed{seed}.attempts.jsonl", "a") as f:
        f.write(json.dumps({"time": time.time(), "before": state_before, "wall_s": wall, "rc": proc.returncode}) + "\n")
    ok = proc.returncode == 0 and (d / "summary.json").exists()
    if not ok:
        attempt = log_path.read_text(errors="replace").rsplit("\n===== ", 1)[-1].splitlines()
        # the CLI's one-line "error: ..." or an exception's last line, not torchrun's failure banner
        why = [x for x in attempt if "error:" in x or "Error:" in x or "Error(" in x][-4:] or attempt[-10:]
        print(f"FAILED {config} seed {seed} (rc {proc.returncode}, {wall:.0f} s); log {log_path}:\n  "
              + "\n  ".join(why), flush=True)
    else:
        s = json.loads((d / "summary.json").read_text())
        acc = s.get("final", {}).get("eval_accuracy")
        print(f"done {config} seed {seed}: accuracy {acc if acc is None else f'{acc:.1%}'}, eval loss "
              f"{s['final']['eval_loss']:.4f}, trainable {s['trainable_params']:,}, {wall:.0f} s", flush=True)
    return ok


# ---------------------------------------------------------------------------- results


SETTING_KEYS = ["model.path", "train.max_steps", "data.max_eval_examples", "loradrop.sampling_steps",
                "loradrop.sample_ratio", "train.lr", "train.micro_batch_size", "train.grad_accum", "lora.r"]


def run_settings(d: Path) -> dict:
    """The settings that change results, from the run's own config.yaml (what it really ran)."""
    import yaml

    try:
        cfg = yaml.safe_load((d / "config.yaml").read_text())
    except (OSError, yaml.YAMLError):
        return {}
    out = {}
    for key in SETTING_KEYS:
        v = cfg
        for part in key.split("."):
            v = v.get(part) if isinstance(v, dict) else None
        out[key] = v
    if cfg.get("loradrop", {}).get("enabled") is False:
        out["loradrop.sampling_steps"] = out["loradrop.sample_ratio"] = None  # no sampling stage
    return out


def common_settings(runs: list[dict]) -> dict:
    """Each setting's value if all runs agree, else the sorted list of values (a mixed grid)."""
    out = {}
    for key in SETTING_KEYS:
        vals = {json.dumps(r["settings"].get(key)) for r in runs
                if r["settings"] and not (key.startswith("loradrop.sampl") and r["settings"].get(key) is None)}
        out[key] = json.loads(vals.pop()) if len(vals) == 1 else {"MIXED": sorted(vals)} if vals else None
    return out


def gather(out: Path, settings: dict | None = None) -> dict:
    """Every finished run under `out` (known configs first, in grid order, then any others)."""
    runs = []
    names = [c for c in CONFIGS if (out / c).is_dir()] + sorted(
        p.name for p in out.glob("*") if p.is_dir() and p.name not in CONFIGS) if out.is_dir() else []
    for config in names:
        for d in sorted((out / config).glob("seed*"), key=lambda p: (len(p.name), p.name)):
            if not (d / "summary.json").is_file():
                continue
            s = json.loads((d / "summary.json").read_text())
            attempts_file = out / config / f"{d.name}.attempts.jsonl"
            attempts = [json.loads(x) for x in attempts_file.read_text().splitlines() if x.strip()] \
                if attempts_file.exists() else []
            runs.append({
                "config": config, "seed": int(d.name[4:]) if d.name[4:].isdigit() else d.name,
                "eval_accuracy": s.get("final", {}).get("eval_accuracy"),
                "eval_loss": s.get("final", {}).get("eval_loss"),
                "zero_shot": s.get("zero_shot"),
                "trainable_params": s.get("trainable_params"), "plain_lora_params": s.get("plain_lora_params"),
                "kept_layers": s.get("kept_layers"), "num_layers": s.get("num_layers"),
                "wall_s_last_process": s.get("wall_seconds_this_process"),
                "wall_s_all_attempts": sum(a["wall_s"] for a in attempts) if attempts else None,
                "attempts": len(attempts) or None, "resumed_from": s.get("resumed_from"),
                "main_steps": (s.get("main") or {}).get("steps"), "sampling_steps": (s.get("sampling") or {}).get("steps"),
                "settings": run_settings(d), "dir": str(d),
            })
    return {"settings": settings, "run_settings": common_settings(runs) if runs else None, "runs": runs,
            "table": aggregate(runs), "zero_shot": zero_shot(runs)}


def _stats(xs: list[float]) -> dict:
    xs = [x for x in xs if x is not None]
    if not xs:
        return {"mean": None, "std": None, "min": None, "max": None}
    return {"mean": statistics.fmean(xs), "std": statistics.stdev(xs) if len(xs) > 1 else None,
            "min": min(xs), "max": max(xs)}


def aggregate(runs: list[dict]) -> dict:
    table: dict[str, dict] = {}
    for r in runs:
        table.setdefault(r["config"], []).append(r)  # type: ignore[arg-type]
    out = {}
    for config, rs in table.items():  # type: ignore[assignment]
        trainable = sorted({r["trainable_params"] for r in rs})
        kept = sorted({len(r["kept_layers"]) if r["kept_layers"] is not None else r["num_layers"] for r in rs})
        out[config] = {
            "description": CONFIGS[config][1] if config in CONFIGS else config,
            "overrides": CONFIGS[config][0] if config in CONFIGS else None,
            "n": len(rs), "seeds": [r["seed"] for r in rs],
            "trainable_params": statistics.fmean(r["trainable_params"] for r in rs),
            "trainable_params_range": [trainable[0], trainable[-1]],
            "plain_lora_params": rs[0]["plain_lora_params"],
            "kept_layers_count_range": [kept[0], kept[-1]] if None not in kept else None,
            "eval_accuracy": _stats([r["eval_accuracy"] for r in rs]),
            "eval_loss": _stats([r["eval_loss"] for r in rs]),
            "wall_s": _stats([r["wall_s_all_attempts"] or r["wall_s_last_process"] for r in rs]),
        }
    return out


def zero_shot(runs: list[dict]) -> dict | None:
    zs = [r["zero_shot"] for r in runs if r.get("zero_shot")]
    if not zs:
        return None
    acc = [z.get("eval_accuracy") for z in zs if z.get("eval_accuracy") is not None]
    loss = [z.get("eval_loss") for z in zs if z.get("eval_loss") is not None]
    identical = (not acc or max(acc) - min(acc) == 0) and (not loss or max(loss) - min(loss) <= 1e-6 * abs(loss[0]))
    return {"eval_accuracy": acc[0] if acc else None, "eval_loss": loss[0] if loss else None, "n_runs": len(zs),
            "identical": identical, "accuracy_range": [min(acc), max(acc)] if acc else None,
            "loss_range": [min(loss), max(loss)] if loss else None}


def settings_text(rs: dict) -> str:
    parts = []
    for key, v in rs.items():
        if key == "data.max_eval_examples" and v is None:
            v = "null (all 320)"
        parts.append(f"{key}={v}" if not isinstance(v, dict) else f"**{key} differs between runs: {v['MIXED']}**")
    return ", ".join(parts)


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}"


def markdown(results: dict, expected_seeds: int | None = None) -> str:
    table, zs = results["table"], results["zero_shot"]
    lines = []
    if results.get("run_settings"):
        lines.append("Settings (from the runs' config.yaml): " + settings_text(results["run_settings"]) + ".")
        lines.append("")
    lines += ["| config | trainable params (% of plain) | kept layers | accuracy % mean ± std (min-max) "
              "| eval loss mean ± std | n seeds | wall min/run |",
              "|---|---|---|---|---|---|---|"]
    if zs:
        flag = "" if zs["identical"] else " **(differs between runs!)**"
        acc_txt = (f"{_pct(zs['eval_accuracy'])}{flag}" if zs["identical"]
                   else f"{_pct(zs['accuracy_range'][0])}-{_pct(zs['accuracy_range'][1])}{flag}")
        loss_txt = (f"{zs['eval_loss']:.4f}" if zs["identical"] and zs["eval_loss"] is not None
                    else f"{zs['loss_range'][0]:.4f}-{zs['loss_range'][1]:.4f}" if zs["loss_range"] else "n/a")
        lines.append(f"| zero-shot (base model) | 0 | 0 | {acc_txt} | {loss_txt} | (from {zs['n_runs']} runs) | - |")
    for config, row in table.items():
        lo, hi = row["trainable_params_range"]
        trainable = f"{lo:,}" if lo == hi else f"{lo:,}-{hi:,}"
        pct = f"{100 * row['trainable_params'] / row['plain_lora_params']:.1f}%" if row["plain_lora_params"] else "?"
        k = row["kept_layers_count_range"]
        kept = "?" if k is None else (str(k[0]) if k[0] == k[1] else f"{k[0]}-{k[1]}")
        a, lo_ = row["eval_accuracy"], row["eval_loss"]
        if a["mean"] is None:
            acc = "n/a"
        else:
            acc = f"{_pct(a['mean'])} ± {_pct(a['std'])} ({_pct(a['min'])}-{_pct(a['max'])})"
        loss = "n/a" if lo_["mean"] is None else (
            f"{lo_['mean']:.4f} ± {lo_['std']:.4f}" if lo_["std"] is not None else f"{lo_['mean']:.4f} ± n/a")
        n = f"{row['n']}" + (f" of {expected_seeds}" if expected_seeds and row["n"] < expected_seeds else "")
        wall = f"{row['wall_s']['mean'] / 60:.1f}" if row["wall_s"]["mean"] is not None else "?"
        lines.append(f"| {config} | {trainable} ({pct}) | {kept} | {acc} | {loss} | {n} | {wall} |")
    return "\n".join(lines)


# (config, against): differences paired by seed. A seed fixes the data every configuration
# sees (the sampling subset, the order of the batches), so a paired difference removes what
# the seeds change for all configurations alike (seed 3 is harder for most of them).
PAIRS = [("T0.9", "plain"), ("budget0.5", "plain"), ("budget0.5", "budget0.5_random"), ("budget0.5", "share_all"),
         ("budget0.5", "share_all_scale_scalar"), ("share_all_scale_scalar", "share_all"), ("share_all", "plain"),
         ("budget0.5_random", "share_all"), ("budget0.5", "share_all_r120"), ("share_all_r120", "plain"),
         ("module_budget0.5", "budget0.5"), ("budget0.5_rankstop", "budget0.5"),
         ("budget0.5_rankstop", "budget0.5_random"), ("T0.9", "T0.9_random"),
         ("T0.9", "T0.9_bottom"),
         ("T0.9", "T0.9_param_norm"), ("T0.9", "T0.9_grad_norm"), ("T0.9", "T0.9_kept_only"),
         ("T0.8_scale_scalar", "T0.8"), ("T0.9_scale_scalar", "T0.9"), ("T0.9_scale_vector", "T0.9"),
         ("T0.95_scale_scalar", "T0.95"), ("budget0.5_scale_scalar", "budget0.5"), ("allora", "plain"),
         ("allora", "allora_control"), ("allora_control", "plain"), ("allora_T0.9", "T0.9")]


def paired_markdown(results: dict) -> str:
    """Accuracy and eval-loss differences per seed for PAIRS (both configurations finished)."""
    by = {(r["config"], r["seed"]): r for r in results["runs"]}
    lines = ["| config - against | accuracy points, per seed | mean ± sd | eval loss, per seed | mean ± sd "
             "| seeds with lower loss |", "|---|---|---|---|---|---|"]

    def mean_sd(xs: list[float], digits: int) -> str:  # the spread of the paired differences (sample sd)
        sd = f" ± {statistics.stdev(xs):.{digits}f}" if len(xs) > 1 else ""
        return f"{statistics.fmean(xs):+.{digits}f}{sd}"

    for a, b in PAIRS:
        seeds = sorted(s for c, s in by if c == a and (b, s) in by)
        if not seeds:
            continue
        acc = [100 * (by[a, s]["eval_accuracy"] - by[b, s]["eval_accuracy"]) for s in seeds]
        loss = [by[a, s]["eval_loss"] - by[b, s]["eval_loss"] for s in seeds]
        lines.append(f"| {a} - {b} | {' / '.join(f'{x:+.1f}' for x in acc)} | {mean_sd(acc, 2)} "
                     f"| {' / '.join(f'{x:+.4f}' for x in loss)} | {mean_sd(loss, 4)} "
                     f"| {sum(x < 0 for x in loss)} of {len(seeds)} |")
    return "\n".join(lines)


def plot(results: dict, path: Path, expected_seeds: int | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table, zs = results["table"], results["zero_shot"]
    fig, axes = plt.subplots(1, 2, figsize=(14, 6))
    families = {"plain": ("black", "s"), "T0.": ("tab:blue", "o"), "budget": ("tab:orange", "D"),
                "_scale_": ("tab:purple", "^"), "_random": ("tab:gray", "x"), "_bottom": ("tab:brown", "v"),
                "_kept_only": ("tab:red", "P"), "_param_norm": ("tab:green", "<"), "_grad_norm": ("tab:olive", ">"),
                "allora": ("tab:pink", "h")}

    def style(config: str) -> tuple[str, str]:
        chosen = ("tab:cyan", "*")
        for key, st in families.items():  # later keys (ablations) override the T / budget family
            if key in config:
                chosen = st
        return chosen

    for ax, metric, label in ((axes[0], "eval_accuracy", "eval accuracy (%)"), (axes[1], "eval_loss", "eval loss")):
        scale = 100.0 if metric == "eval_accuracy" else 1.0
        for config, row in table.items():
            m = row[metric]
            if m["mean"] is None:
                continue
            color, marker = style(config)
            x = row["trainable_params"]
            std = (m["std"] or 0.0) * scale
            ax.errorbar([x], [m["mean"] * scale], yerr=[std], fmt=marker, color=color, capsize=4, markersize=8,
                        mfc="none" if row["n"] < (expected_seeds or 0) else color)
            tag = config + (f" (n={row['n']})" if expected_seeds and row["n"] < expected_seeds else "")
            ax.annotate(tag, (x, m["mean"] * scale), textcoords="offset points", xytext=(6, 4), fontsize=7)
        if zs:
            z = zs[metric]
            top = max(row[metric]["mean"] for row in table.values() if row[metric]["mean"] is not None)
            if z is not None and (metric == "eval_accuracy" or z < 3 * top):
                ax.axhline(z * scale, color="gray", linestyle="--", linewidth=1,
                           label=f"zero-shot {z * scale:.1f}" + ("" if zs["identical"] else " (differs!)"))
                ax.legend(loc="best", fontsize=8)
            elif z is not None:
                ax.set_title(f"(zero-shot eval loss {z:.2f}, off the scale)", fontsize=8)
        ax.set_xlabel("trainable parameters")
        ax.set_ylabel(label + " - mean ± std over seeds")
        ax.grid(alpha=0.3)
        ax.margins(x=0.08)
        ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v / 1000:.0f}k"))
    rs = dict(results.get("run_settings") or {})
    rs.pop("model.path", None)
    fig.suptitle("SmolLM2-135M-Instruct, WordNet definition -> category: quality vs trainable parameters "
                 f"(hollow: fewer than {expected_seeds} seeds)\n" + settings_text(rs), fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_results(args: argparse.Namespace) -> dict:
    settings = {"overrides": settings_overrides(args), "steps": args.steps, "max_eval_examples": args.eval,
                "extra": list(args.set), "seeds": args.seeds, "configs": args.configs, "out": str(args.out),
                "command": shlex.join([sys.executable, *sys.argv]),
                "configs_overrides": {c: CONFIGS[c][0] for c in args.configs}}
    prev = {}
    if args.results.exists():
        try:
            prev = json.loads(args.results.read_text()).get("settings") or {}
        except (json.JSONDecodeError, OSError):
            pass
    if args.report and prev.get("out") == settings["out"]:
        settings = {**prev, "report_command": settings["command"]}  # keep the last run's invocation
    results = gather(args.out, settings)
    if args.reuse is not None:
        results = with_reused_runs(results, args.reuse, args.configs)
    args.results.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.results.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(results, indent=2))
    tmp.replace(args.results)
    return results


def with_reused_runs(results: dict, path: Path, configs: list[str]) -> dict:
    """``results`` plus the finished runs of ``configs`` recorded in an earlier results file
    (``--reuse``) for the (config, seed) pairs not run under --out, each marked with the file
    it came from. Only runs whose settings equal the new runs' are taken: a grid mixed from
    other settings would not be comparable (the report warns of mixed settings as well)."""
    def shared_settings(run: dict) -> str:  # what every config shares (the lr and the sampling stage may differ)
        return json.dumps({k: v for k, v in run["settings"].items()
                           if k != "train.lr" and not k.startswith("loradrop.sampl")}, sort_keys=True)

    present = {(r["config"], r["seed"]) for r in results["runs"]}
    ran = {shared_settings(r) for r in results["runs"]}
    reused = []
    for r in json.loads(path.read_text())["runs"]:
        if r["config"] not in configs or (r["config"], r["seed"]) in present:
            continue
        if ran and shared_settings(r) not in ran:
            raise SystemExit(f"--reuse {path}: {r['config']} seed {r['seed']} ran with other settings "
                             f"({shared_settings(r)}) than the runs under --out ({sorted(ran)[0]})")
        reused.append({**r, "from": str(path.relative_to(HERE) if path.is_relative_to(HERE) else path)})
    runs = results["runs"] + reused
    order = {c: i for i, c in enumerate(CONFIGS)}
    runs.sort(key=lambda r: (order.get(r["config"], len(order)), str(r["seed"])))
    return {**results, "runs": runs, "table": aggregate(runs), "zero_shot": zero_shot(runs),
            "run_settings": common_settings(runs), "reused_from": str(path)}


def report(args: argparse.Namespace) -> None:
    results = write_results(args)
    expected = len(args.seeds)
    print(markdown(results, expected))
    print("\nPaired by seed (config minus against; seeds " + " / ".join(str(s) for s in args.seeds) + "):\n")
    print(paired_markdown(results))
    zs = results["zero_shot"]
    if zs and not zs["identical"]:
        print(f"\nWARNING: zero-shot differs between runs: accuracy {zs['accuracy_range']}, loss {zs['loss_range']}")
    rs = results.get("run_settings") or {}
    if any(isinstance(v, dict) for v in rs.values()):
        print("\nWARNING: the runs under --out were made with different settings (see the line above the table)")
    if results["runs"]:
        plot(results, args.plot, expected)
        print(f"\nresults: {args.results}\nplot: {args.plot}")
    else:
        print(f"\nno finished runs under {args.out}; results: {args.results}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS), metavar="CONFIG",
                   help="subset of: " + " ".join(CONFIGS))
    p.add_argument("--seeds", nargs="+", type=int, default=DEFAULT_SEEDS)
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS, help="train.max_steps of the main stage (default 50)")
    p.add_argument("--eval", type=int, default=None,
                   help="data.max_eval_examples (default: not set, all 320 eval examples)")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="extra dotted overrides for every run (e.g. loradrop.sampling_steps=2)")
    p.add_argument("--out", type=Path, default=HERE / "bench" / "out" / "quality", help="run directories")
    p.add_argument("--results", type=Path, default=HERE / "bench" / "results" / "quality.json")
    p.add_argument("--plot", type=Path, default=HERE / "bench" / "results" / "quality.png")
    p.add_argument("--reuse", type=Path, default=None, metavar="RESULTS_JSON",
                   help="also report the --configs runs recorded in this earlier results file (e.g. "
                        "bench/results/quality.json) for the (config, seed) pairs not run under --out")
    p.add_argument("--dry-run", action="store_true", help="print each run's command and state, run nothing")
    p.add_argument("--report", action="store_true", help="only gather results, print the table, write the plot")
    args = p.parse_args(argv)
    args.out = args.out.resolve()

    if args.report:
        report(args)
        return

    # Seed-major: a grid stopped part-way has every config at the first seeds.
    grid = [(c, s) for s in args.seeds for c in args.configs]
    if args.dry_run:
        todo = 0
        for c, s in grid:
            st = status(run_dir(args.out, c, s))
            todo += st != "done"
            print(f"# {c} seed {s}: {st}\n{shlex.join(command(args, c, s))}")
        scale = (args.steps + 10) / (DEFAULT_STEPS + 10)
        print(f"\n{len(grid)} runs, {todo} to do; about {todo * MINUTES_PER_RUN * scale / 60:.1f} h at "
              f"{MINUTES_PER_RUN * scale:.1f} min/run (2-core CPU, default model; the master port is chosen per run)")
        return

    args.out.mkdir(parents=True, exist_ok=True)
    lock = open(args.out / ".lock", "w")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise SystemExit(f"another bench/quality.py is running on {args.out}") from None

    def on_term(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_term)
    failed, done_now, walls = [], 0, []
    todo = [(c, s) for c, s in grid if not (run_dir(args.out, c, s) / "summary.json").exists()]
    print(f"{len(grid)} runs in the grid, {len(grid) - len(todo)} already done, {len(todo)} to run", flush=True)
    for i, (c, s) in enumerate(todo):
        t0 = time.perf_counter()
        try:
            ok = run_one(args, c, s)
        except KeyboardInterrupt as e:
            write_results(args)
            raise SystemExit(f"\nstopped ({e or 'Ctrl-C'}) during {c} seed {s}; run the same command again to "
                             "continue from its last checkpoint") from None
        walls.append(time.perf_counter() - t0)
        done_now += ok
        if not ok:
            failed.append(f"{c}/seed{s}")
        write_results(args)
        left = len(todo) - i - 1
        if left:
            print(f"[{i + 1}/{len(todo)}] about {left * statistics.fmean(walls) / 60:.0f} min left", flush=True)
    print()
    report(args)
    if failed:
        raise SystemExit(f"\n{len(failed)} runs failed: {' '.join(failed)} (rerun to retry; logs next to each run dir)")


if __name__ == "__main__":
    main()
