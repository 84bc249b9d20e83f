"""What one training micro-batch really holds on the project's own ZeRO-3 path, for the memory
planner's calibration (tests/test_planner.py).

torchrun --nproc_per_node 1 tests/workers/activation_memory.py MODEL_DIR CASES_JSON OUT_JSON

CASES_JSON: ``[{"overrides": [...], "memory_efficient_linear": bool, "shapes": [[micro, seq], ...]}]``.
For each case the model is loaded as a run loads it (``model.load_model`` under HfDeepSpeedConfig,
so zero.Init partitions it; ``lora.add_lora``; ``engine.create_engine`` on the resolved DeepSpeed
config with ``memory_efficient_linear`` set as given), one warm-up step runs, and then, for each
(micro-batch, sequence length), one forward and backward of random tokens (the first row padded,
so attention gets a mask), after a warm-up step, is measured two ways:

* ``saved``: the bytes of the distinct storages autograd saves during the forward (a
  ``saved_tensors_hooks`` pack hook; parameters and gathered parameter data left out, as the
  planner counts them elsewhere). With checkpointing, torch.utils.checkpoint's saved inputs are
  seen by the hook too (``_CheckpointFrame.save_inputs`` saves them through ``_make_saved_tensor``).
* ``peak``: the CPU allocator's peak of bytes allocated during forward and backward, above what
  was allocated when they began, from the profiler's allocation records (``profile_memory``:
  c10's ProfiledCPUMemoryReporter reports every CPU allocation and free with its running total).
  The analogue of ``torch.cuda.max_memory_allocated`` less the memory allocated before the step.

DeepSpeed's ``memory_efficient_linear`` replaces ``torch.nn.functional.linear`` for the rest of the
process once any zero.Init enables it (partition_parameters.py ``_enable_mem_efficient_linear``:
"This will persist unless manually reset"), so cases without it must come first; each result
records which linear ran. Also recorded: the dtype of the LoRA A inputs (``lora.compute_dtype``).
"""

import json
import sys

import torch
from torch.autograd.profiler import profile

from loradrop_ds import distributed
from loradrop_ds.config import load_config
from loradrop_ds.deepspeed_private import release_engine
from loradrop_ds.engine import create_engine, lr_lambda
from loradrop_ds.lora import ADAPTER, add_lora
from loradrop_ds.model import load_model
from workers.common import ds_config_for


def allocation_records(prof) -> list[tuple[int, int, int]]:
    """(time, bytes allocated (+) or freed (-), running total) of every CPU allocation, in order."""
    records = []

    def walk(nodes):
        for node in nodes:
            fields = node.extra_fields
            if type(fields).__name__ == "_ExtraFields_Allocation" and fields.device.type == "cpu":
                records.append((node.start_time_ns, fields.alloc_size, fields.total_allocated))
            walk(node.children)

    walk(prof.kineto_results.experimental_event_tree())
    return sorted(records)


def padded_batch(vocab: int, micro: int, seq: int, generator: torch.Generator) -> dict:
    """Random tokens with the first row's last 3 padded, so attention gets a mask."""
    ids = torch.randint(0, vocab, (micro, seq), generator=generator)
    mask = torch.ones_like(ids)
    mask[0, -3:] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def measure(engine, batch: dict) -> dict:
    params = list(engine.module.parameters())
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        parameter_data = {p.untyped_storage().data_ptr() for p in params}
        if not isinstance(t, torch.nn.Parameter) and storage.data_ptr() not in parameter_data:
            storages.setdefault(storage.data_ptr(), storage.nbytes())
        return t

    with profile(profile_memory=True, use_kineto=True) as prof:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = engine(**batch)
        engine.backward(out.loss)
    records = allocation_records(prof)
    start = records[0][2] - records[0][1]
    return {"saved": sum(storages.values()), "peak": max(total for _, _, total in records) - start}


def measure_case(case: dict, model_dir: str, device_type: str, world_size: int) -> dict:
    cfg = load_config(None, [f"model.path={model_dir}", *case["overrides"]])
    ds = ds_config_for(cfg, world_size)
    ds["zero_optimization"]["memory_efficient_linear"] = case["memory_efficient_linear"]
    model, hf_ds = load_model(cfg.model, ds, device_type)
    model = add_lora(model, cfg.lora, cfg.seed)
    engine = create_engine(model, ds, 1e-3, 0.0, lr_lambda("constant", 0, 1, 1.0))
    engine.train()
    lora_input_dtypes = set()
    for name, module in engine.module.named_modules():
        if name.endswith(f"lora_A.{ADAPTER}"):
            module.register_forward_pre_hook(lambda _m, args: lora_input_dtypes.add(str(args[0].dtype)))
    vocab = engine.module.get_output_embeddings().out_features
    generator = torch.Generator().manual_seed(0)
    # A warm-up step: DeepSpeed records its module trace in the first (measured: its peak is
    # about 1% above the next steps', which agree to the byte).
    engine.backward(engine(**padded_batch(vocab, *min(case["shapes"]), generator)).loss)
    engine.step()
    measured = []
    for micro, seq in case["shapes"]:
        batch = padded_batch(vocab, micro, seq, generator)
        measured.append({"micro_batch_size": micro, "seq_len": seq, **measure(engine, batch)})
        engine.step()
    release_engine(engine)
    del model, hf_ds
    return {**case, "measured": measured, "lora_input_dtypes": sorted(lora_input_dtypes),
            "linear": torch.nn.functional.linear.__name__}


def main(model_dir: str, cases_file: str, out_file: str) -> None:
    info = distributed.init_distributed()
    results = [measure_case(case, model_dir, info.device.type, info.world_size) for case in json.load(open(cases_file))]
    if info.is_main:
        with open(out_file, "w") as f:
            json.dump(results, f, indent=1)
    distributed.exit_process(0)


if __name__ == "__main__":
    main(*sys.argv[1:4])
