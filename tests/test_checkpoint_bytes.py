"""The planner's checkpoint bytes (loradrop_ds/planner/checkpoint_bytes.py) on the default
recipe, worked out by hand from SmolLM2-135M's shapes, and what launch/plan.py prints. The
formula against measured checkpoints of the tiny model is in tests/test_resume_world_size.py."""

import dataclasses
import sys

from conftest import REPO
from loradrop_ds import planner
from loradrop_ds.config import load_config
from loradrop_ds.planner.checkpoint_bytes import checkpoint_bytes, stage_checkpoint_bytes

# SmolLM2-135M: hidden 576, 3 KV heads of 64 (k/v out 192), 30 layers; r = 8 on q/k/v/o:
# a layer's LoRA is 8 x ((576 + 576) + (576 + 192) + (576 + 192) + (576 + 576)) = 30,720 elements.
PER_LAYER = 8 * (1152 + 768 + 768 + 1152)


def default_spec(ranks, *overrides, kept_fraction=1.0):
    cfg = load_config(REPO / "recipes" / "default.yaml", list(overrides))
    return planner.plan_for_config(cfg, ranks, ranks, None, None, device="cpu", kept_fraction=kept_fraction).spec


def tensor_bytes(b, matrices):
    """The tensor data of the optimizer state and of the adapter: less the 8-byte length
    prefixes, the headers (an entry per tensor: 3 per trained matrix, 1 per adapter matrix)
    and adapter_config.json."""
    from loradrop_ds.planner import checkpoint_bytes as formula

    entry = formula.NAME_BYTES + formula.HEADER_ENTRY_BYTES
    trained, in_adapter = matrices
    return (b.optimizer_state - 8 - 3 * trained * (entry + 8),
            b.adapter - 8 - in_adapter * entry - formula.ADAPTER_CONFIG_BYTES)


def test_the_default_recipe_by_hand():
    # 8 matrices per layer (A and B of 4 modules); 12 bytes per element in the optimizer state
    # (fp32 master + 2 moments), 4 in the fp32 adapter.
    sampling = stage_checkpoint_bytes(default_spec(2), "sampling")
    assert tensor_bytes(sampling, (8 * 30, 8 * 30)) == (12 * 30 * PER_LAYER, 4 * 30 * PER_LAYER)
    # Half the layers kept: 15 own LoRAs and 1 shared are trained, stored once; the adapter
    # still has every layer's (the shared LoRA written under each layer that uses it).
    half = stage_checkpoint_bytes(default_spec(2, kept_fraction=0.5), "main")
    assert tensor_bytes(half, (8 * 16, 8 * 30)) == (12 * 16 * PER_LAYER, 4 * 30 * PER_LAYER)
    # A bf16 LoRA (peft keeps it fp32 on every base today: RunSpec.lora_dtype) would halve the
    # adapter, not the optimizer state (fp32 master and moments).
    bf16 = stage_checkpoint_bytes(dataclasses.replace(default_spec(2), lora_dtype="bfloat16"), "sampling")
    assert tensor_bytes(bf16, (8 * 30, 8 * 30)) == (12 * 30 * PER_LAYER, 2 * 30 * PER_LAYER)


def test_only_the_per_rank_bookkeeping_grows_with_the_ranks():
    one, eight = (checkpoint_bytes([1000, 2000], [1000, 2000], 4, ranks, sampling=True, num_layers=2, num_modules=1)
                  for ranks in (1, 8))
    assert (eight.optimizer_state, eight.adapter) == (one.optimizer_state, one.adapter)
    assert one.per_rank == eight.per_rank < 16_384
    # Beyond the per-rank files, only the manifest's lines for them.
    assert eight.total - one.total - 7 * one.per_rank == eight.small_files - one.small_files < 7 * 2 * 100
    assert one.on_disk(2) == 3 * one.total  # keep_last 2, plus the one being written


def test_plan_prints_the_checkpoint_bytes_before_the_verdict(capsys):
    sys.path.insert(0, str(REPO / "launch"))
    import plan as plan_cli

    assert plan_cli.main(["--config", str(REPO / "recipes" / "default.yaml"), "--cpu", "--gpus-per-node", "2",
                          "--host-mem", "64GB", "train.keep_last=4"]) == 0
    out = capsys.readouterr().out.rstrip().splitlines()
    assert out[-1].startswith("verdict: fits")
    largest = max(stage_checkpoint_bytes(default_spec(2, "train.keep_last=4"), s).total for s in ("sampling", "main"))
    rows = [line for line in out if line.startswith("  sampling:") or line.startswith("  main:")]
    assert len(rows) == 2 and all("per checkpoint = optimizer state" in r and "2 ranks x" in r for r in rows), out
    on_disk = next(line for line in out if line.startswith("  on disk:"))
    assert f"up to {5 * largest / (1 << 20):.0f} MiB with train.keep_last=4 (5 checkpoints" in on_disk, on_disk
