#!/usr/bin/env python
"""How early the LoRA-drop selection settles: a long fixed sampling stage against
``loradrop.sampling_steps=auto``.

    .venv/bin/python bench/auto_sampling.py [--fixed-steps 40] [--seeds 1 2 3] [--out DIR]
        [--override loradrop.param_budget=0.5 ...]   (settings added to every run)

For each seed, two runs of the embedded default (SmolLM2-135M-Instruct, WordNet task, 2
ranks, ZeRO-3) through the real CLI, both with the default checks (every
``loradrop.auto_check_every`` = 2 steps, settled after ``auto_patience`` = 3 unchanged
checks): a fixed stage of ``--fixed-steps`` sampling steps, whose ``selection.json`` holds the
selection at every check, and an ``auto`` stage. The main stage is cut to one step and the
eval set to 16 examples: only the selection matters here. Both runs see the same data in
the same order, so the auto run's checks repeat the first checks of the fixed run.

Reported per seed: the step at which auto stopped, whether it kept the same items as the
fixed stage's final selection, the first check from which the fixed run's selection never
changed again, and the rank correlation of each check's scores with the final ones.
Target (issue 9): the same selection as the long fixed stage in at most half its steps.
Results: bench/results/auto_sampling.json and a Markdown table on stdout.

    .venv/bin/python bench/auto_sampling.py --replay 3 4 5 6 [--results FILE]
        [--rule ranking --min-correlation 0.99 0.995]

replays a stopping rule (``loradrop_ds.importance.sampling_settled``, the function the CLI
calls; ``--rule`` is ``loradrop.auto_stop``) with other ``auto_patience`` (and, for the
ranking rule, ``auto_min_rank_correlation``) values on the fixed runs' recorded checks, without
training: an auto run sees the same data in the same order, so its checks are the fixed run's
first checks (the replay at the patience the auto runs used must reproduce their stop steps;
it says so). A rule that has not settled by the fixed run's last check is reported as such.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import socket
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parents[1]
COMMON = ["train.max_steps=1", "train.warmup_steps=0", "data.max_eval_examples=16", "train.save_every=0",
          "resume=never"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(out_dir: Path, overrides: list[str]) -> dict:
    if (out_dir / "summary.json").exists():  # resumable at the granularity of whole runs
        print(f"done already: {out_dir}", flush=True)
    else:
        if out_dir.exists():
            os.rename(out_dir, out_dir.with_name(f"{out_dir.name}.unfinished-{int(time.time())}"))
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(free_port()), "launch/train.py", f"output_dir={out_dir}", *COMMON, *overrides]
        print("$", shlex.join(cmd), flush=True)
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        with open(out_dir.with_suffix(".log"), "w") as log:
            subprocess.run(cmd, cwd=HERE, stdout=log, stderr=subprocess.STDOUT, check=True)
    selection = json.loads((out_dir / "selection.json").read_text())
    summary = json.loads((out_dir / "summary.json").read_text())
    return {"kept": sorted(selection["kept"], key=int), "history": selection["history"],
            "sampling_steps": summary["sampling"]["steps"], "settled": summary["sampling"].get("settled"),
            "sampling_seconds": summary["sampling"]["seconds_this_process"]}


def stable_from(history: list[dict], final: list[str]) -> int | None:
    """The first check step from which every later check kept exactly ``final``."""
    step = None
    for h in history:
        if h["kept"] is not None and sorted(h["kept"], key=int) == final:
            step = step if step is not None else h["step"]
        else:
            step = None
    return step


def replay(results: dict, patiences: list[int], rule: str = "kept_set", correlations: tuple[float, ...] = (0.99,)) -> None:
    """The auto rule (``loradrop_ds.importance.sampling_settled``, the function the CLI calls)
    at each patience (and, for ``ranking``, each minimum correlation) on the fixed runs'
    recorded checks (every auto_check_every = 2 steps)."""
    from loradrop_ds.config import LoraDropConfig
    from loradrop_ds.importance import sampling_settled

    runs = results["runs"]
    if rule == "ranking" and any(h.get("scores") is None and h["kept"] is not None for r in runs
                                 for h in r["fixed"]["history"]):
        raise SystemExit(f"{results['command']}: its checks kept no scores (runs older than the scores in "
                         "selection.json): rerun it to replay the ranking rule")
    # The settings the auto runs used (the config defaults unless the results' overrides set them).
    ran = {"auto_patience": LoraDropConfig.auto_patience, "auto_stop": LoraDropConfig.auto_stop,
           "auto_min_rank_correlation": LoraDropConfig.auto_min_rank_correlation}
    for o in results.get("overrides", []):
        key, _, value = o.partition("=")
        if key.startswith("loradrop.") and key[9:] in ran:
            ran[key[9:]] = type(ran[key[9:]])(value)
    print(f"replayed {rule} on {results['command']} (its auto runs: {ran})\n")
    half = results["fixed_steps"] // 2
    print(f"| patience | {'min. rank correlation | ' if rule == 'ranking' else ''}"
          + " | ".join(f"seed {r['seed']}: stop step, same as fixed {results['fixed_steps']}" for r in runs)
          + f" | all same, by step {half}? |")
    print("|---|" + ("---|" if rule == "ranking" else "") + "---|" * len(runs) + "---|")
    for patience in patiences:
        for rho in correlations if rule == "ranking" else (None,):
            cells, ok = [], True
            for r in runs:
                history = [h for h in r["fixed"]["history"] if h["kept"] is not None]
                stop = next((i for i in range(len(history))
                             if sampling_settled(history[:i + 1], rule, patience, rho if rho is not None else 1.0)), None)
                if stop is None:
                    cells.append(f"not settled by {history[-1]['step']}")
                    ok = False
                    continue
                step = history[stop]["step"]
                same = sorted(history[stop]["kept"], key=int) == r["fixed"]["kept"]
                ok = ok and same and step <= half
                real = r["auto"]["sampling_steps"] if "auto" in r and (patience, rule, rho) == (
                    ran["auto_patience"], ran["auto_stop"], ran["auto_min_rank_correlation"] if rule == "ranking"
                    else None) else None
                check = "" if real is None else (" (= the auto run)" if real == step else f" (auto run: {real}!)")
                cells.append(f"{step}, {'yes' if same else 'no'}{check}")
            print(f"| {patience} | {'' if rho is None else f'{rho} | '}" + " | ".join(cells)
                  + f" | {'yes' if ok else 'no'} |")
    if rule == "ranking":  # why: each check's Spearman with the one before, and whether it kept the final set
        from loradrop_ds.importance import rank_correlation

        print("\nPer check (step: Spearman with the check before; * = kept the fixed run's final set):")
        for r in runs:
            history = [h for h in r["fixed"]["history"] if h["kept"] is not None]
            cells = [f"{h['step']}{'*' if sorted(h['kept'], key=int) == r['fixed']['kept'] else ''}: "
                     + (f"{rank_correlation(b['scores'], h['scores']):.4f}" if b is not None else "-")
                     for b, h in zip([None, *history], history, strict=False)]
            print(f"- seed {r['seed']}: " + ", ".join(cells))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fixed-steps", type=int, default=40)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--out", type=Path, default=HERE / "bench" / "out" / "auto_sampling")
    parser.add_argument("--results", type=Path, default=HERE / "bench" / "results" / "auto_sampling.json")
    parser.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                        help="a setting added to every run, e.g. loradrop.param_budget=0.5 (repeatable)")
    parser.add_argument("--fixed-only", action="store_true",
                        help="run (or reuse) only the fixed stages, the data --replay needs, and write --results")
    parser.add_argument("--replay", type=int, nargs="+", metavar="PATIENCE",
                        help="only replay the stopping rule at these auto_patience values on --results")
    parser.add_argument("--rule", choices=["kept_set", "ranking"], default="kept_set",
                        help="the rule --replay replays (loradrop.auto_stop)")
    parser.add_argument("--min-correlation", type=float, nargs="+", default=[0.99], metavar="RHO",
                        help="--rule ranking: the loradrop.auto_min_rank_correlation values to replay")
    args = parser.parse_args(argv)
    if args.replay:
        replay(json.loads(args.results.read_text()), args.replay, args.rule, tuple(args.min_correlation))
        return
    rows = []
    for seed in args.seeds:
        fixed = run(args.out / f"fixed{args.fixed_steps}_seed{seed}",
                    [f"seed={seed}", f"loradrop.sampling_steps={args.fixed_steps}", *args.override])
        row = {"seed": seed, "fixed": fixed, "fixed_stable_from": stable_from(fixed["history"], fixed["kept"])}
        if not args.fixed_only:
            auto = run(args.out / f"auto_seed{seed}", [f"seed={seed}", "loradrop.sampling_steps=auto", *args.override])
            row.update(auto=auto, same_selection=auto["kept"] == fixed["kept"])
        rows.append(row)
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps({"command": shlex.join(["python", "bench/auto_sampling.py",
                                                               *(argv if argv is not None else sys.argv[1:])]),
                                        "fixed_steps": args.fixed_steps, "overrides": args.override, "runs": rows},
                                       indent=2))
    if args.fixed_only:
        print(f"fixed runs only: {args.results}; replay a rule on them with --replay")
        return
    print(f"\n| seed | auto stopped at (settled?) | kept by auto | kept by fixed {args.fixed_steps} | same | "
          "fixed run's selection final from step | fixed run: kept layers at each check | "
          "fixed run: rank corr. with its final scores at steps 2 / 10 / 20 |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        fixed, auto = r["fixed"], r["auto"]
        corr = {h["step"]: h["rank_correlation"] for h in fixed["history"]}
        print(f"| {r['seed']} | {auto['sampling_steps']} ({'yes' if auto['settled'] else 'no: auto_max_steps'}) "
              f"| {len(auto['kept'])} | {len(fixed['kept'])} | {'yes' if r['same_selection'] else 'no'} "
              f"| {r['fixed_stable_from']} | {' '.join(str(len(h['kept'])) if h['kept'] else '-' for h in fixed['history'])} "
              f"| {' / '.join(f'{corr[s]:.3f}' if corr.get(s) is not None else 'n/a' for s in (2, 10, 20))} |")


if __name__ == "__main__":
    main()
