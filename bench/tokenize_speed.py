#!/usr/bin/env python
"""What the data path costs for 100k examples: tokenising into the Arrow cache (cold), reading
it back (warm: what every later run and every other rank pays), and what a rank holds.

    .venv/bin/python bench/tokenize_speed.py [--rows 100000] [--num-proc 1 2] [--out FILE]

The data: Alpaca-format rows built from the shipped WordNet task (instruction = a fixed
question, input = a definition, output = its category), repeated with their row number
appended to the input so no two rows are equal; about 100 tokens each. The tokenizer: the
embedded default model's (SmolLM2's BPE), prepared by scripts/setup.sh. Each cold run gets
an empty cache directory. ``before``: the previous data path (every rank tokenising every
row in one Python thread into Python lists, Example objects), run from the old data.py in
git (commit a16bc89) on the same rows, for comparison.
"""

from __future__ import annotations

import argparse
import gc
import json
import resource
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def make_rows(path: Path, n: int) -> None:
    base = [json.loads(line) for line in (REPO / "data/wordnet_categories/train.jsonl").read_text().splitlines()]
    with open(path, "w") as f:
        for i in range(n):
            r = base[i % len(base)]
            f.write(json.dumps({"instruction": "Which WordNet category does this definition belong to?",
                                "input": f"{r['definition']} (#{i})", "output": r["category"]}) + "\n")


def old_data_module() -> types.ModuleType:
    """loradrop_ds/data.py as of commit a16bc89, importable beside the new one."""
    source = subprocess.run(["git", "show", "a16bc89:loradrop_ds/data.py"], cwd=REPO, capture_output=True, text=True,
                            check=True).stdout
    module = types.ModuleType("loradrop_ds.data_before")
    module.__package__ = "loradrop_ds"
    sys.modules[module.__name__] = module  # dataclasses look their module up there
    exec(compile(source, "data_before.py", "exec"), module.__dict__)  # noqa: S102 - our own file from git
    return module


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--num-proc", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "tokenize_speed.json"))
    args = parser.parse_args()

    import datasets

    from loradrop_ds import data as data_lib
    from loradrop_ds.config import DataConfig
    from loradrop_ds.model import load_tokenizer, prepare_builtin_model

    datasets.disable_progress_bars()
    tokenizer = load_tokenizer(str(prepare_builtin_model("smollm2-135m-instruct")))
    cfg = DataConfig(format="alpaca", label_field=None, max_seq_len=256)
    results: dict = {"command": " ".join([".venv/bin/python", "bench/tokenize_speed.py", *sys.argv[1:]]),
                     "rows": args.rows, "machine": "2 CPU cores (the project's CPU machine)", "runs": []}
    with tempfile.TemporaryDirectory() as tmp:
        rows_file = Path(tmp) / "alpaca.jsonl"
        make_rows(rows_file, args.rows)
        results["file_mib"] = rows_file.stat().st_size / 2**20
        datasets.load_dataset("json", data_files=str(rows_file), split="train")  # JSON -> Arrow once, outside timings
        for num_proc in args.num_proc:
            cache = Path(tmp) / f"cache{num_proc}"
            cold_cfg = DataConfig(**{**cfg.__dict__, "num_proc": num_proc})
            start = time.perf_counter()
            tokenized, entry = data_lib.prepare_tokenized(str(rows_file), "data.train_file", tokenizer, cold_cfg, cache,
                                                          build=True)
            cold = time.perf_counter() - start
            gc.collect()
            before = rss_mib()
            start = time.perf_counter()
            warm, _ = data_lib.prepare_tokenized(str(rows_file), "data.train_file", tokenizer, cold_cfg, cache,
                                                 build=False)
            lengths = warm.lengths
            warm_s = time.perf_counter() - start
            held = rss_mib() - before
            tokens = int(lengths.sum())
            results["runs"].append({"path": "arrow cache", "num_proc": num_proc, "cold_seconds": round(cold, 2),
                                    "warm_seconds": round(warm_s, 2), "tokens": tokens,
                                    "rows_per_second_cold": round(args.rows / cold),
                                    "cache_mib": round(sum(p.stat().st_size for p in entry.rglob("*") if p.is_file())
                                                       / 2**20, 1),
                                    "rss_growth_mib_warm_read": round(held, 1)})
            print(results["runs"][-1], flush=True)
            del tokenized, warm
        old = old_data_module()
        gc.collect()
        before = rss_mib()
        start = time.perf_counter()
        records = old.load_records(str(rows_file), "data.train_file")
        tokenized = old.tokenize_records(records, tokenizer, cfg_for_old(cfg), "data.train_file")
        old_s = time.perf_counter() - start
        results["runs"].append({"path": "before (a16bc89: Python lists on every rank)", "num_proc": 1,
                                "cold_seconds": round(old_s, 2), "warm_seconds": round(old_s, 2),
                                "rows_per_second_cold": round(args.rows / old_s),
                                "rss_growth_mib_held": round(rss_mib() - before, 1),
                                "tokens": sum(len(e.input_ids) for e in tokenized.examples)})
        print(results["runs"][-1], flush=True)
    results["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {args.out}")


def cfg_for_old(cfg):
    """The old path had only format strings: the Alpaca prompt as a template, no input-less rows here."""
    from loradrop_ds.config import DataConfig
    from loradrop_ds.data import ALPACA_PROMPT

    return DataConfig(prompt_template=ALPACA_PROMPT, response_template="{output}", label_field=None,
                      max_seq_len=cfg.max_seq_len)


if __name__ == "__main__":
    main()
