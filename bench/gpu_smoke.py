#!/usr/bin/env python
"""GPU smoke test of the whole CLI at 70B layer widths (run by bench/gpu_smoke.sh).

    python bench/gpu_smoke.py [--out DIR] [--tiny]

On one GPU (target: under 8 minutes on an H100):

1. A random LLaMA with Llama-3-70B's layer widths (hidden 8192, intermediate 28672,
   64 heads / 8 KV heads, vocab 128256) and 4 layers, saved as bf16 safetensors, with a
   small SentencePiece tokenizer; instruction data whose prompts fill 2048 tokens.
2. LoRA-drop through ``launch/train.py`` in bf16 with activation checkpointing and
   sequences of 2048: killed with SIGKILL in the main stage, resumed, finished; the
   adapter reloaded in plain transformers + peft against the trained model's logits.
3. Plain LoRA on the same config: main-stage step time and peak memory against
   LoRA-drop's main stage.
4. What happens with ``model.dtype=float16`` and with fp32 + flash_attention_2 (both must
   be refused before loading, exit code 2, with the fix in the message).

Results go to ``OUT/gpu_smoke.json`` (with the card's name). ``--tiny`` runs the same flow
with a tiny model on whatever device there is (CPU here): it checks the script, not the GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

WIDTHS = {"hidden_size": 8192, "intermediate_size": 28672, "num_attention_heads": 64, "num_key_value_heads": 8,
          "vocab_size": 128256, "num_hidden_layers": 4}
TINY_WIDTHS = {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2,
               "vocab_size": 1024, "num_hidden_layers": 4}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_model(out: Path, widths: dict, device: str) -> None:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from tiny import make_tokenizer

    make_tokenizer(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    config = LlamaConfig(**widths, max_position_embeddings=4096, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False, rope_theta=500000.0)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(out, safe_serialization=True, max_shard_size="5GB")
    tokenizer.save_pretrained(out)
    del model
    if device == "cuda":
        torch.cuda.empty_cache()


def make_data(out: Path, tokens: int) -> None:
    """WordNet rows whose prompt is many definitions joined, so every row fills ``tokens``
    (prompts are cut from the left to data.max_seq_len)."""
    rows = [json.loads(line) for line in (REPO / "data/wordnet_categories/train.jsonl").read_text().splitlines()]
    per_example = max(1, tokens // 16)  # more than 16 tokens per definition with the small tokenizer
    out.mkdir(parents=True, exist_ok=True)
    for split, count, offset in (("train", 96, 0), ("eval", 8, 2000)):
        with open(out / f"{split}.jsonl", "w") as f:
            for i in range(count):
                start = offset + i * 7
                context = " ".join(r["definition"] for r in (rows * 2)[start:start + per_example])
                f.write(json.dumps({"definition": context, "category": rows[(offset + i) % len(rows)]["category"]})
                        + "\n")


def cli(args: list[str], env_extra: dict | None = None, timeout: int = 420) -> tuple[int, str, float]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=1", f"--master_port={free_port()}",
           str(REPO / "launch" / "train.py"), *args]
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1", **(env_extra or {}))
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    return proc.returncode, proc.stdout + proc.stderr, time.perf_counter() - start


def main_stage_numbers(run_dir: Path) -> dict:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    main = [r for r in records if r.get("stage") == "main" and "loss" in r]
    steps = [r["seconds_per_step"] for r in main[2:]] or [r["seconds_per_step"] for r in main]
    return {"median_step_s": statistics.median(steps), "peak_memory_gib": max(r["peak_memory_gib"] for r in main),
            "tokens_per_s": statistics.median(r["tokens_per_s_per_rank"] for r in main[2:] or main),
            "losses": [r["loss"] for r in main]}


def compare_reloaded_adapter(model_dir: Path, run_dir: Path, device: str) -> float:
    """Max |logit difference| between plain peft on the bf16 base and the trained model."""
    import torch
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    probe = load_file(run_dir / "probe_logits.safetensors")
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16, attn_implementation="sdpa").to(device)
    model = PeftModel.from_pretrained(base, run_dir / "adapter").eval()
    with torch.no_grad():
        logits = model(input_ids=probe["input_ids"].to(device),
                       attention_mask=probe["attention_mask"].to(device)).logits.float().cpu()
    mask = probe["attention_mask"].bool()
    diff = float((logits[mask] - probe["logits"][mask]).abs().max())
    del model, base
    if device == "cuda":
        torch.cuda.empty_cache()
    return diff


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    parser.add_argument("--work", type=Path, default=Path("/tmp/loradrop_gpu_smoke"))
    parser.add_argument("--tiny", action="store_true", help="a tiny model on any device (checks the script)")
    args = parser.parse_args()
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device != "cuda" and not args.tiny:
        print("gpu_smoke: no CUDA device; use --tiny to check the script on CPU", file=sys.stderr)
        return 2
    started = time.perf_counter()
    report: dict = {"device": torch.cuda.get_device_name(0) if device == "cuda" else platform.processor() or "cpu",
                    "torch": torch.__version__, "tiny": args.tiny, "python": platform.python_version()}
    for name in ("deepspeed", "transformers", "peft", "flash_attn"):
        try:
            report[name] = __import__(name).__version__
        except ImportError:
            report[name] = None
    print(json.dumps(report), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    result_file = args.out / ("gpu_smoke_tiny.json" if args.tiny else "gpu_smoke.json")

    def save() -> None:  # after every part: a run cut short still reports what it reached
        result_file.write_text(json.dumps(report, indent=2))

    work = args.work
    subprocess.run(["rm", "-rf", str(work)], check=True)
    model_dir, data_dir = work / "model", work / "data"
    t = time.perf_counter()
    make_model(model_dir, TINY_WIDTHS if args.tiny else WIDTHS, device)
    seq = 256 if args.tiny else 2048
    make_data(data_dir, seq)
    report["setup_s"] = time.perf_counter() - t
    save()

    common = [f"model.path={model_dir}", "model.dtype=bfloat16", "model.gradient_checkpointing=true",
              f"data.train_file={data_dir}/train.jsonl", f"data.eval_file={data_dir}/eval.jsonl",
              f"data.max_seq_len={seq}", "data.label_field=null", "train.micro_batch_size=1", "train.grad_accum=1",
              "train.warmup_steps=1",
              "train.lr=1e-3", "train.log_every=1", "lora.r=16", "lora.alpha=32", "lora.dropout=0.05",
              "lora.target_modules=[q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj]",
              "loradrop.sampling_steps=4", "loradrop.sample_ratio=0.1", "loradrop.threshold=0.5",
              "train.save_probe_logits=true", "dist.timeout_minutes=10"]
    if args.tiny:
        common.append("deepspeed=ds_configs/zero3_tiny.json")

    # LoRA-drop, killed in the main stage, resumed.
    drop = work / "drop"
    steps = ["train.max_steps=8", "train.save_every=4"]
    code, log, secs = cli([*common, *steps, f"output_dir={drop}"], {"LORADROP_TEST_SIGKILL_AT": "main:6"})
    report["drop_killed"] = {"exit": code, "seconds": secs, "adapter_written": (drop / "adapter").exists()}
    code, log, secs = cli([*common, *steps, f"output_dir={drop}"])
    save()
    resumed = "resuming from" in log and "main-step0000004" in log
    report["drop_resumed"] = {"exit": code, "seconds": secs, "resumed_from_step_4": resumed}
    if code != 0:
        report["drop_resumed"]["log_tail"] = log[-3000:]
    else:
        report["drop"] = main_stage_numbers(drop)
        summary = json.loads((drop / "summary.json").read_text())
        report["drop"].update({k: summary.get(k) for k in ("trainable_params", "plain_lora_params", "kept_layers",
                                                           "rebuild_seconds")})
        report["drop"]["reloaded_max_abs_logit_diff"] = compare_reloaded_adapter(model_dir, drop, device)

    save()

    # Plain LoRA, same config.
    plain = work / "plain"
    code, log, secs = cli([*common, "train.max_steps=8", "train.save_every=0", "loradrop.enabled=false",
                           f"output_dir={plain}"])
    report["plain"] = {"exit": code, "seconds": secs}
    if code == 0:
        report["plain"].update(main_stage_numbers(plain))
        if "drop" in report:
            report["drop_main_speed_vs_plain"] = report["plain"]["median_step_s"] / report["drop"]["median_step_s"]

    save()

    # Refusals, before any weights load.
    for name, extra in (("fp16", ["model.dtype=float16"]),
                        ("fp32_flash_attn", ["model.dtype=float32", "model.attn_implementation=flash_attention_2"])):
        code, log, secs = cli([*common, *extra, f"output_dir={work / name}"])
        lines = [line for line in log.splitlines() if line.startswith("error: ")]
        report[name] = {"exit_code_reported": "exitcode  : 2" in log or code == 2, "seconds": secs,
                        "message": lines[-1] if lines else log[-1000:]}

    report["total_s"] = time.perf_counter() - started
    save()
    print(json.dumps(report, indent=2))
    ok = (report["drop_resumed"]["exit"] == 0 and report["drop_resumed"]["resumed_from_step_4"]
          and report["plain"]["exit"] == 0 and report["fp16"]["exit_code_reported"]
          and report["fp32_flash_attn"]["exit_code_reported"])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
