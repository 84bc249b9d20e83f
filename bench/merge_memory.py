#!/usr/bin/env python
"""Peak memory and wall time of ``--format merged``: the whole-model merge the export used
to do against the shard-by-shard merge, on random LLaMAs of a few hundred MB.

    .venv/bin/python bench/merge_memory.py [--layers 8 16] [--hidden 1024] [--shard-size 64MB]
                                           [--repeats 2] [--out bench/results/merge_memory.json]

For each ``--layers`` value, builds in a temporary directory a random fp32 LLaMA (the tests'
SentencePiece tokenizer, GQA, width ``--hidden``: 382 MB at 8 layers, 760 MB at 16) saved in
safetensors shards of at most ``--shard-size``, and a LoRA-drop run directory whose adapter
(r = 16 on all seven projections) has own LoRAs in the top half of the layers and one shared
LoRA per module type (written under every layer that uses it, as a run writes it) in the
others. Then merges it in a fresh process per method and repeat:

* ``whole_model``: the merged export as it was (``loradrop_ds/export.py`` at commit 2bf6db5):
  load the whole base, peft ``merge_and_unload``, ``save_pretrained(max_shard_size=...)``;
* ``shard_by_shard``: ``loradrop_ds.export.export(..., "merged")`` as it is now.

Both write shards of ``--shard-size``. Peak RSS is the child's ``VmHWM`` minus its ``VmRSS``
once every library is imported (the high-water mark is reset there through
``/proc/self/clear_refs``), so it counts the merge, not the imports; the allocator runs with
its defaults, as for a user (the memory test in ``tests/test_export_merge.py`` pins glibc's
mmap threshold instead, to measure what the merge holds without the heap's fragmentation).
The two outputs are compared tensor by tensor. The tests build their models with the
functions here. Nothing else should run meanwhile.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

METHODS = ("whole_model", "shard_by_shard")


def make_random_llama(out_dir: Path, num_layers: int, hidden: int, shard_size: str, dtype: str = "float32",
                      seed: int = 0) -> Path:
    """A random LLaMA (GQA: hidden/128 heads, half as many KV heads; MLP width 2.75 x hidden)
    with the tests' tokenizer, saved as safetensors in shards of at most ``shard_size``."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from tiny import make_tokenizer

    out_dir = Path(out_dir)
    make_tokenizer(out_dir)
    tokenizer = AutoTokenizer.from_pretrained(out_dir)
    heads = max(4, hidden // 128)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=hidden * 11 // 4,
        num_hidden_layers=num_layers, num_attention_heads=heads, num_key_value_heads=heads // 2,
        max_position_embeddings=256, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(getattr(torch, dtype))
    model.save_pretrained(out_dir, max_shard_size=shard_size)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def write_loradrop_run(base_dir: Path, run_dir: Path, target_modules: list[str], kept_layers: list[int],
                       r: int = 4, alpha: int = 16, use_rslora: bool = False, alpha_pattern: dict | None = None,
                       seed: int = 0) -> Path:
    """A run directory as ``launch/export.py`` reads it (``adapter/`` and ``config.yaml``)
    whose adapter is LoRA-drop's: own LoRAs in ``kept_layers``, one shared LoRA per module
    type in every other layer (tied with ``loradrop_ds.lora.tie_shared_lora``, so saving
    writes it under each layer that uses it), every A and B random (B is not zero)."""
    import torch
    import yaml
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from loradrop_ds.lora import tie_shared_lora

    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(r=r, lora_alpha=alpha, target_modules=target_modules, bias="none",
                                            use_rslora=use_rslora, alpha_pattern=alpha_pattern or {},
                                            task_type="CAUSAL_LM"))
    plan = {(layer, m): layer in kept_layers for layer in range(base.config.num_hidden_layers) for m in target_modules}
    tie_shared_lora(model, plan, train_shared=True)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():  # a shared parameter is listed once
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) / param.shape[-1] ** 0.5)
    model.save_pretrained(run_dir / "adapter")
    (run_dir / "config.yaml").write_text(yaml.safe_dump({
        "model": {"path": str(base_dir)},
        "lora": {"r": r, "alpha": alpha, "dropout": 0.0, "target_modules": target_modules},
    }))
    return run_dir


def merge_whole_model(run_dir: Path, out_dir: Path, max_shard_size: str) -> None:
    """The merged export before this change, as it was in ``_write_merged``."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from loradrop_ds.export import open_source, resolve_base_model

    src = open_source(run_dir)
    base_dir = resolve_base_model(src, None)
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype="auto")
    merged = PeftModel.from_pretrained(base, src.adapter_dir).merge_and_unload()
    merged.save_pretrained(out_dir, safe_serialization=True, max_shard_size=max_shard_size)
    AutoTokenizer.from_pretrained(base_dir).save_pretrained(out_dir)


def _proc_status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def child(method: str, run_dir: Path, out_dir: Path, max_shard_size: str) -> None:
    """Runs in a fresh process: import everything either method uses, reset the RSS
    high-water mark, merge, print the measurement as JSON on the last line."""
    import peft  # noqa: F401
    import safetensors.torch  # noqa: F401
    import torch  # noqa: F401
    import transformers  # noqa: F401
    from peft.tuners.tuners_utils import check_target_module_exists  # noqa: F401
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer  # noqa: F401
    from transformers.models.llama import modeling_llama  # noqa: F401

    from loradrop_ds.export import export

    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS (Linux >= 4.0)
    after_imports = _proc_status_kib("VmRSS") * 1024
    start = time.perf_counter()
    if method == "whole_model":
        merge_whole_model(run_dir, out_dir, max_shard_size)
    else:
        export(run_dir, out_dir, "merged", max_shard_size=max_shard_size)
    wall = time.perf_counter() - start
    peak = _proc_status_kib("VmHWM") * 1024
    print(json.dumps({"method": method, "rss_after_imports_bytes": after_imports, "peak_rss_bytes": peak,
                      "peak_rss_over_imports_bytes": peak - after_imports, "wall_s": round(wall, 2)}))


def measure_merge(method: str, run_dir: Path, out_dir: Path, max_shard_size: str, extra_env: dict | None = None) -> dict:
    """Merge in a fresh process (one BLAS thread, as on a busy machine) and return its measurement."""
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]), **(extra_env or {}))
    proc = subprocess.run([sys.executable, __file__, "--child", method, str(run_dir), str(out_dir), max_shard_size],
                          env=env, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        raise RuntimeError(f"{method} merge failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def shard_sizes(model_dir: Path) -> list[int]:
    return sorted(p.stat().st_size for p in Path(model_dir).glob("*.safetensors"))


def max_abs_difference(dir_a: Path, dir_b: Path) -> float:
    """The largest absolute difference between the tensors of two model directories (which
    must hold the same names, shapes and dtypes)."""
    from safetensors.torch import load_file

    def tensors(d):
        out = {}
        for p in sorted(Path(d).glob("*.safetensors")):
            out.update(load_file(p))
        return out

    a, b = tensors(dir_a), tensors(dir_b)
    if a.keys() != b.keys():
        raise AssertionError(f"different tensors: {sorted(a.keys() ^ b.keys())[:5]}")
    worst = 0.0
    for name in a:
        if a[name].dtype != b[name].dtype or a[name].shape != b[name].shape:
            raise AssertionError(f"{name}: {a[name].dtype} {tuple(a[name].shape)} vs {b[name].dtype} {tuple(b[name].shape)}")
        worst = max(worst, (a[name].double() - b[name].double()).abs().max().item())
    return worst


def bench_model(tmp: Path, layers: int, hidden: int, shard_size: str, repeats: int) -> dict:
    """Build one random model and its LoRA-drop run under ``tmp``, merge it both ways ``repeats`` times."""
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    kept = list(range(layers // 2, layers))
    base = make_random_llama(tmp / "base", layers, hidden, shard_size)
    run = write_loradrop_run(base, tmp / "run", targets, kept_layers=kept, r=16, alpha=32)
    runs = []
    for repeat in range(repeats):
        for method in METHODS:
            result = measure_merge(method, run, tmp / f"{method}-{repeat}", shard_size)
            result["output_shard_bytes_max"] = shard_sizes(tmp / f"{method}-{repeat}")[-1]
            runs.append(result)
            print(json.dumps(result), flush=True)
    base_shards = shard_sizes(base)
    return {
        "model": {"layers": layers, "hidden": hidden, "dtype": "float32", "bytes": sum(base_shards),
                  "base_shards": len(base_shards), "base_shard_bytes_max": base_shards[-1], "max_shard_size": shard_size},
        "adapter": {"targets": targets, "r": 16, "kept_layers": kept,
                    "bytes": (run / "adapter" / "adapter_model.safetensors").stat().st_size},
        "runs": runs,
        "max_abs_difference_whole_model_vs_shard_by_shard": max_abs_difference(tmp / "whole_model-0",
                                                                               tmp / "shard_by_shard-0"),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, nargs="+", default=[8, 16], help="one model per value")
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--shard-size", default="64MB", help="base and output shard size")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "merge_memory.json"))
    parser.add_argument("--child", nargs=4, metavar=("METHOD", "RUN", "OUT", "SHARD_SIZE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        method, run_dir, out_dir, size = args.child
        child(method, Path(run_dir), Path(out_dir), size)
        return 0

    models = []
    for layers in args.layers:
        with tempfile.TemporaryDirectory(prefix="merge_memory-") as tmp:
            models.append(bench_model(Path(tmp), layers, args.hidden, args.shard_size, args.repeats))
    report = {
        "command": " ".join([".venv/bin/python bench/merge_memory.py", *sys.argv[1:]]),
        "machine": f"{os.cpu_count()} CPU cores, {platform.machine()}, no GPU; child processes with OMP_NUM_THREADS=1",
        "peak_rss_measure": "VmHWM - VmRSS after imports (high-water mark reset after imports)",
        "models": models,
    }
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
