#!/usr/bin/env python
"""Checkpoint bytes, file by file, at 1, 2 and 4 ranks, and host RAM on resume at another
number of ranks, for the code in a checkout: run once on the code before the optimizer state
was stored once and once after, into the same JSON (issue 19; docs/CHECKPOINTS.md).

    git worktree add --detach /tmp/ckpt_before 1d521a3        # the code before (ds/ + full_state.pt)
    .venv/bin/python bench/checkpoint_bytes.py bytes --repo /tmp/ckpt_before --label before
    .venv/bin/python bench/checkpoint_bytes.py bytes --repo . --label after
    .venv/bin/python bench/checkpoint_bytes.py rss --repo /tmp/ckpt_before --label before
    .venv/bin/python bench/checkpoint_bytes.py rss --repo . --label after
    .venv/bin/python bench/checkpoint_bytes.py older --before /tmp/ckpt_before     # an older checkpoint resumes
    .venv/bin/python bench/checkpoint_bytes.py table                              # the tables in docs/CHECKPOINTS.md

Every run is ``torchrun --nproc_per_node N REPO/launch/train.py`` with REPO's own library (its
train.py puts its checkout first on ``sys.path``), CPU, fp32, in ``--work`` (kept between the
commands: ``rss`` resumes the runs ``bytes`` wrote, from the same ``--label``).

``bytes``: each run trains 2 sampling steps and 2 main steps (tiny: 4, a checkpoint every 2)
and keeps every checkpoint. Models: the tests' tiny LLaMA (4 layers, hidden 64, LoRA r = 8 on
q/v/up) and the default recipe (SmolLM2-135M, r = 8 on q/k/v/o), each with the LoRA parameters
resident on every rank (ds_configs/zero3.json: persistence threshold "auto", at least the
largest LoRA matrix) and partitioned (ds_configs/zero3_tiny.json: threshold 0); tiny on 1, 2
and 4 ranks, default on 1 and 2. The global batch is the same on every number of ranks
(micro-batch 4 x grad_accum 4 / ranks), so the runs are the same run. Recorded: every file of
every checkpoint with its size.

``rss``: the default recipe's runs on 2 and 1 ranks (resident) resumed 2 -> 1, 1 -> 2 and
2 -> 4 ranks from their last main-stage checkpoint; also plain LoRA with r = 64 on all seven
projections (every layer: 19.5 M trainable elements, 234 MB of fp32 master and moments), where
the difference shows above the noise. Each resume runs in processes of its own
(``_resume_worker``): ``run_checkpoint.restore_engine`` is wrapped to record each rank's RSS
before it (``VmRSS``), the high-water mark reset there (``/proc/self/clear_refs``), and the
peak during it (``VmHWM``): the host RAM the restore itself takes, on top of the model and
engine.

``older``: a checkpoint written by the code before (``full_state.pt`` + ``ds/``, tiny model,
2 ranks, step 2 of 4) resumed by this checkout's code on 2 ranks and on 1 (``resume=PATH``):
its final adapter against the uninterrupted run's (the same number of ranks: 1e-6, and whether
bit for bit; 1 rank: 1e-5, gradients reduced in another order).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
RESULTS = REPO / "bench" / "results" / "checkpoint_bytes.json"
CONFIGS = {"resident": "ds_configs/zero3.json", "partitioned": "ds_configs/zero3_tiny.json"}
# Plain LoRA (every layer kept), so that the main stage's checkpoint holds all of it.
LARGE_LORA = ["lora.r=64", "lora.alpha=128", "loradrop.enabled=false",
              "lora.target_modules=[q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj]"]
RSS_VARIANTS = {"r8": [], "r64-all7-plain": LARGE_LORA}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(repo: Path, script: Path, args: list[str], ranks: int, log: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("PYTHONPATH", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={ranks}", f"--master_port={free_port()}",
           str(script), *args]
    start = time.time()
    with open(log, "w") as f:
        proc = subprocess.run(cmd, cwd=repo, env=env, stdout=f, stderr=subprocess.STDOUT)
    print(f"  {ranks} ranks, {time.time() - start:.0f} s: {' '.join(args)[-150:]}", flush=True)
    if proc.returncode != 0:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}; see {log}")


def run_args(model: str, tiny: Path, out: Path, config: str, ranks: int, extra: list[str] = ()) -> list[str]:
    common = [f"output_dir={out}", f"deepspeed={CONFIGS[config]}", "train.micro_batch_size=4",
              f"train.grad_accum={4 // ranks}", "train.keep_last=100", "data.max_eval_examples=8",
              "train.warmup_steps=1", "loradrop.sampling_steps=2"]
    if model == "tiny":
        return [f"model.path={tiny}", *common, "train.max_steps=4", "train.save_every=2", "loradrop.sample_ratio=0.05",
                "loradrop.threshold=0.6", "lora.target_modules=[q_proj,v_proj,up_proj]", *extra]
    return ["--config", "recipes/default.yaml", *common, "train.max_steps=2", *extra]


def copy_unfinished(run: Path, to: Path) -> None:
    """A copy of a finished run as if killed after its last checkpoint: without its final
    adapter/ and summary.json (the checkpoints keep theirs)."""
    shutil.copytree(run, to, ignore=lambda d, names: [n for n in names if Path(d) == run and
                                                      n in ("adapter", "summary.json")])


def checkpoint_files(run: Path) -> dict:
    return {c.name: {str(p.relative_to(c)): p.stat().st_size for p in sorted(c.rglob("*")) if p.is_file()}
            for c in sorted((run / "checkpoints").iterdir()) if not c.name.startswith(".")}


def save_results(label: str, key: str, value: dict, out: Path) -> None:
    results = json.loads(out.read_text()) if out.is_file() else {}
    results.setdefault(label, {}).setdefault(key, {}).update(value)
    results.setdefault("machine", {}).update({"python": platform.python_version(), "cpus": os.cpu_count(),
                                              "date": time.strftime("%Y-%m-%d")})
    out.write_text(json.dumps(results, indent=1, sort_keys=True))


def tiny_model(work: Path) -> Path:
    from tiny import make_tiny_llama

    path = work / "tiny_llama"
    if not (path / "config.json").is_file():
        make_tiny_llama(path, num_layers=4)
    return path


def cmd_bytes(args: argparse.Namespace) -> None:
    repo, work = Path(args.repo).resolve(), Path(args.work)
    tiny = tiny_model(work)
    runs = [("tiny", c, r) for c in CONFIGS for r in (1, 2, 4)] + [("default", c, r) for c in CONFIGS for r in (1, 2)]
    for model, config, ranks in runs:
        if args.only and model not in args.only:
            continue
        out = work / args.label / f"{model}-{config}-{ranks}"
        if not (out / "summary.json").is_file():
            shutil.rmtree(out, ignore_errors=True)
            out.parent.mkdir(parents=True, exist_ok=True)
            torchrun(repo, repo / "launch" / "train.py", run_args(model, tiny, out, config, ranks), ranks,
                     out.parent / f"{out.name}.log")
        save_results(args.label, "bytes", {f"{model}/{config}/{ranks}": checkpoint_files(out)}, Path(args.out))


def cmd_rss(args: argparse.Namespace) -> None:
    repo, work = Path(args.repo).resolve(), Path(args.work)
    tiny = tiny_model(work)
    for lora, extra in ((name, RSS_VARIANTS[name]) for name in args.variants):
        sources = {}
        for ranks in (2, 1):
            if lora == "r8":
                sources[ranks] = work / args.label / f"default-resident-{ranks}"
            else:
                sources[ranks] = work / args.label / f"default-resident-{ranks}-{lora}"
                if not (sources[ranks] / "summary.json").is_file():
                    shutil.rmtree(sources[ranks], ignore_errors=True)
                    torchrun(repo, repo / "launch" / "train.py",
                             run_args("default", tiny, sources[ranks], "resident", ranks, extra), ranks,
                             sources[ranks].parent / f"{sources[ranks].name}.log")
                save_results(args.label, "bytes", {f"default-{lora}/resident/{ranks}": checkpoint_files(sources[ranks])},
                             Path(args.out))
            if not (sources[ranks] / "summary.json").is_file():
                raise SystemExit(f"{sources[ranks]} is not a finished run: run `bytes` with --label {args.label} first")
        for before, after in ((2, 1), (1, 2), (2, 4)):
            run = work / args.label / f"resume-{lora}-{before}to{after}"
            shutil.rmtree(run, ignore_errors=True)
            copy_unfinished(sources[before], run)
            for old in sorted((run / "checkpoints").glob("sampling-*")):  # keep the main stage's newest only
                shutil.rmtree(old)
            report = run.parent / f"{run.name}.rss"
            torchrun(repo, Path(__file__).resolve(),
                     ["_resume_worker", str(repo), str(report), *run_args("default", tiny, run, "resident", after, extra)],
                     after, run.parent / f"{run.name}.log")
            ranks = [json.loads(Path(f"{report}.rank{r}").read_text()) for r in range(after)]
            save_results(args.label, "rss", {f"default-{lora}/{before}->{after}": ranks}, Path(args.out))
            shutil.rmtree(run)


def _resume_worker(repo: str, report: str, argv: list[str]) -> None:
    """One rank of a resume with ``restore_engine`` measured (under torchrun)."""
    import re
    import runpy

    sys.path.insert(0, repo)
    from loradrop_ds import distributed
    from loradrop_ds import run_checkpoint as ckpt

    assert Path(ckpt.__file__).resolve().is_relative_to(Path(repo).resolve()), ckpt.__file__

    def status(key: str) -> int:
        return int(re.search(rf"{key}:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1)) * 1024

    restore = ckpt.restore_engine

    def measured(*a, **k):
        before = status("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")  # the high-water mark back to the RSS now
        start = time.time()
        restore(*a, **k)
        record = {"rank": int(os.environ.get("RANK", 0)), "rss_before": before, "peak": status("VmHWM"),
                  "rss_after": status("VmRSS"), "seconds": round(time.time() - start, 3)}
        record["peak_increase"] = record["peak"] - before
        Path(f"{report}.rank{record['rank']}").write_text(json.dumps(record))

    ckpt.restore_engine = measured
    train = runpy.run_path(str(Path(repo) / "launch" / "train.py"), run_name="bench_resume")
    code = train["run_cli"](argv)
    distributed.exit_process(code)


def cmd_older(args: argparse.Namespace) -> None:
    """An older checkpoint resumed by this checkout's code: same ranks exactly, 1 rank to rounding."""
    import torch
    from safetensors.torch import load_file

    before, work = Path(args.before).resolve(), Path(args.work)
    tiny = tiny_model(work)
    source = work / "older" / "written-before"
    if not (source / "summary.json").is_file():
        shutil.rmtree(source, ignore_errors=True)
        source.parent.mkdir(parents=True, exist_ok=True)
        torchrun(before, before / "launch" / "train.py",
                 run_args("tiny", tiny, source, "partitioned", 2, ["lora.dropout=0.0"]), 2, source.parent / "before.log")
    reference = load_file(source / "adapter" / "adapter_model.safetensors")
    results = {}
    for ranks, rtol in ((2, 1e-6), (1, 1e-5)):
        run = work / "older" / f"resumed-{ranks}"
        shutil.rmtree(run, ignore_errors=True)
        copy_unfinished(source, run)
        checkpoint = run / "checkpoints" / "main-step0000002"
        assert (checkpoint / "full_state.pt").is_file() and (checkpoint / "ds").is_dir(), "not an older checkpoint"
        for newer in ("main-step0000004",):
            shutil.rmtree(run / "checkpoints" / newer)
        torchrun(REPO, REPO / "launch" / "train.py",
                 run_args("tiny", tiny, run, "partitioned", ranks, ["lora.dropout=0.0", f"resume={checkpoint}"]), ranks,
                 run.parent / f"resumed-{ranks}.log")
        got = load_file(run / "adapter" / "adapter_model.safetensors")
        # As the tests' torch.testing.assert_close(rtol, atol=1e-6): |a - b| <= 1e-6 + rtol |b|.
        worst = max(float(((got[k] - v).abs() - 1e-6).clamp_min(0).div(v.abs().clamp_min(1e-30)).max())
                    for k, v in reference.items())
        exact = all(torch.equal(got[k], v) for k, v in reference.items())
        results[f"2->{ranks}"] = {"bit_exact": exact, "worst_relative_beyond_atol_1e-6": worst, "rtol": rtol,
                                  "max_abs_difference": max(float((got[k] - v).abs().max()) for k, v in reference.items()),
                                  "within": got.keys() == reference.keys() and worst <= rtol}
        print(f"  older checkpoint resumed on {ranks} ranks: {results[f'2->{ranks}']}")
    save_results("after", "older_checkpoint_resumes", results, Path(args.out))
    if not all(r["within"] for r in results.values()):
        raise SystemExit(f"an older checkpoint did not resume to the uninterrupted run: {results}")


def mb(n: float) -> str:
    return f"{n / 1e6:.2f}" if n >= 1e5 else f"{n / 1e6:.3f}"


def group(rel: str) -> str:
    """Files named per rank as one row."""
    import re

    return re.sub(r"zero_pp_rank_\d+_", "zero_pp_rank_<R>_", re.sub(r"rank\d+\.", "rank<R>.", rel))


def stage_files(checkpoints: dict, stage: str) -> dict:
    """The stage's last checkpoint's files."""
    names = [n for n in checkpoints if n.startswith(stage)]
    return checkpoints[max(names)] if names else {}


def cmd_table(args: argparse.Namespace) -> None:
    """Markdown tables: totals per model, placement, stage and ranks; files of the main stage."""
    results = json.loads(Path(args.out).read_text())
    runs = sorted({k for label in ("before", "after") for k in results.get(label, {}).get("bytes", {})})
    keys = sorted({k.rsplit("/", 1)[0] for k in runs})
    print("| model, LoRA placement | stage | before: MB at 1 / 2 / 4 ranks | after: MB at 1 / 2 / 4 ranks |")
    print("|---|---|---|---|")
    for key in keys:
        for stage in ("sampling", "main"):
            cells = []
            for label in ("before", "after"):
                got = results.get(label, {}).get("bytes", {})
                cells.append(" / ".join(mb(sum(stage_files(got[f"{key}/{r}"], stage).values()))
                                        if stage_files(got.get(f"{key}/{r}", {}), stage) else "-" for r in (1, 2, 4)))
            if cells != ["- / - / -"] * 2:
                print(f"| {key.replace('/', ', ')} | {stage} | {cells[0]} | {cells[1]} |")
    for key in keys:
        cols = [(label, r) for label in ("before", "after") for r in (1, 2, 4)
                if f"{key}/{r}" in results.get(label, {}).get("bytes", {})]
        files = {(label, r): stage_files(results[label]["bytes"][f"{key}/{r}"], "main") for label, r in cols}
        rows = sorted({group(rel) for f in files.values() for rel in f})
        print(f"\n{key.replace('/', ', ')}, main stage, MB per file (per-rank files: each, x ranks)\n")
        print("| file | " + " | ".join(f"{label} {r}" for label, r in cols) + " |")
        print("|---|" + "---|" * len(cols))
        for row in rows:
            cells = []
            for col in cols:
                sizes = [size for rel, size in files[col].items() if group(rel) == row]
                cells.append("" if not sizes else mb(max(sizes)) + (f" x {len(sizes)}" if group(row) != row or
                                                                     "<R>" in row else ""))
            print(f"| `{row}` | " + " | ".join(cells) + " |")
    for label in ("before", "after"):
        if "rss" not in results.get(label, {}):
            continue
        print(f"\nresume, {label}: MB per rank, RSS before the restore + peak increase during it (seconds)\n")
        for key, ranks in sorted(results[label]["rss"].items()):
            print(f"- {key}: " + "; ".join(f"rank {r['rank']}: {mb(r['rss_before'])} + {mb(r['peak_increase'])} "
                                          f"({r['seconds']:.1f} s)" for r in ranks))


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "_resume_worker":
        _resume_worker(argv[1], argv[2], argv[3:])
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=("bytes", "rss", "older", "table"))
    parser.add_argument("--repo", default=str(REPO), help="the checkout whose code runs (default: this one)")
    parser.add_argument("--before", help="older: the checkout of the code before")
    parser.add_argument("--label", default="after")
    parser.add_argument("--work", default="/tmp/checkpoint_bytes_bench")
    parser.add_argument("--only", nargs="*", help="bytes: only these models (tiny, default)")
    parser.add_argument("--variants", nargs="*", default=list(RSS_VARIANTS), help="rss: the LoRA sizes")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args(argv)
    Path(args.work).mkdir(parents=True, exist_ok=True)
    {"bytes": cmd_bytes, "rss": cmd_rss, "older": cmd_older, "table": cmd_table}[args.command](args)


if __name__ == "__main__":
    main()
