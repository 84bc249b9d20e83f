"""2-rank sampling statistics under ZeRO-3: all-reduce, selection broadcast and the
agreement check.

torchrun --nproc_per_node 2 tests/workers/stats.py MODEL_DIR OUT_DIR
Rank r records the LoRA outputs of its own batch; rank 0 writes the all-reduced sums,
the broadcast selection, and whether a tampered selection was refused on each rank."""

import dataclasses
import sys

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from loradrop_ds import distributed
from loradrop_ds.distributed import SelectionMismatchError
from loradrop_ds.engine import create_engine, lr_lambda
from loradrop_ds.importance import compute_selection
from loradrop_ds.lora import ImportanceRecorder, add_lora
from loradrop_ds.model import load_model, load_tokenizer
from workers.common import ds_config_for, randomize_lora_b, rank_batches, tiny_config

PER_RANK = 3


def main(model_dir: str, out_dir: str) -> None:
    info = distributed.init_distributed()
    cfg = tiny_config(model_dir, f"train.micro_batch_size={PER_RANK}")
    ds_config = ds_config_for(cfg, info.world_size)
    model, _hf = load_model(cfg.model, ds_config, "cpu")
    model = add_lora(model, cfg.lora, cfg.seed)
    randomize_lora_b(model, seed=3)
    engine = create_engine(model, ds_config, 1e-3, 0.0, lr_factor=lr_lambda("constant", 0, 1, 1.0))
    recorder = ImportanceRecorder(engine.module, cfg.lora.target_modules, info.device)
    batch = rank_batches(cfg, load_tokenizer(model_dir), PER_RANK, info.world_size)[info.rank]
    with recorder.recording(batch["attention_mask"]):
        out = engine(**batch)
    engine.backward(out.loss)  # backward must not add to the statistics
    recorder.remove()
    with torch.no_grad():
        engine(**batch)  # hooks removed: no effect
    local = recorder.stats
    total = distributed.all_reduce_stats(local, info.device)

    # As the CLI does: rank 0 selects, the exchange of outcomes carries it to every rank.
    selection = distributed.run_on_every_rank(
        info, "selection", lambda: compute_selection(total, 0.6, "layer") if info.is_main else None, gather=True)[0]
    distributed.check_selection_agreement(selection, info)  # all agree: passes

    tampered = selection
    if info.rank == 1:  # one rank believes in another selection
        tampered = dataclasses.replace(selection, kept=selection.kept[:-1] or selection.shared[:1])
    try:
        distributed.check_selection_agreement(tampered, info)
        refused = 0
    except SelectionMismatchError:
        refused = 1
    refused_all = torch.tensor([refused])
    dist.all_reduce(refused_all)
    if info.is_main:
        save_file({"sq_norm_sums": total.sq_norm_sums, "token_counts": total.token_counts,
                   "local_sq_norm_sums": local.sq_norm_sums.cpu(), "refused_ranks": refused_all},
                  f"{out_dir}/stats.safetensors")
        with open(f"{out_dir}/selection.json", "w") as f:
            f.write(selection.to_json())
    distributed.exit_process(0)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
