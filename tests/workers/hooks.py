"""ZeRO-3 hooks on the shared LoRA, on 2 ranks, for k = 2 and k = 10 layers sharing it.

torchrun --nproc_per_node 2 tests/workers/hooks.py MODEL_DIR OUT_DIR
MODEL_DIR has 11 decoder layers; the first k share one LoRA per module type, the rest
keep their own. Rank 0 writes hooks.json: for each k, the hooks DeepSpeed registered on
the modules that hold a shared parameter and on kept LoRA modules, and how many hook calls
one forward makes per shared parameter (hooks on each holding module x its uses)."""

import json
import sys

from loradrop_ds import distributed
from loradrop_ds.deepspeed_private import release_engine
from loradrop_ds.engine import create_engine, lr_lambda
from loradrop_ds.importance import sharing_plan
from loradrop_ds.lora import build_main_lora, lora_layers
from loradrop_ds.model import load_model
from workers.common import ds_config_for, hand_selection, tiny_config

NUM_LAYERS = 11


def hooks(module) -> int:
    return len(module._forward_pre_hooks) + len(module._forward_hooks)


def count(engine, modules: list[str], k: int) -> dict:
    model = engine.module
    uses: dict[int, int] = {}
    for _, m in model.named_modules(remove_duplicate=False):
        uses[id(m)] = uses.get(id(m), 0) + 1
    layers = lora_layers(model, modules)
    shared = {id(layers[(0, m)].lora_A["default"].weight): m for m in modules}
    holders = {pid: {} for pid in shared}
    for _, m in model.named_modules(remove_duplicate=False):
        for p in m._parameters.values():
            if p is not None and id(p) in holders:
                holders[id(p)][id(m)] = m
    kept = [hooks(layers[(layer, m)].lora_A["default"]) for layer in range(k, NUM_LAYERS) for m in modules]
    return {
        "kept_lora_module_hooks": sorted(set(kept)),
        "shared_holder_hooks": sorted({hooks(m) for h in holders.values() for m in h.values()}),
        "calls_per_forward_per_shared_param": sorted({sum(hooks(m) * uses[i] for i, m in h.items())
                                                      for h in holders.values()}),
        "holders_per_shared_param": sorted({len(h) for h in holders.values()}),
    }


def main(model_dir: str, out_dir: str) -> None:
    info = distributed.init_distributed()
    cfg = tiny_config(model_dir)
    ds_config = ds_config_for(cfg, info.world_size)
    result = {}
    for k in (2, 10):
        base, hf = load_model(cfg.model, ds_config, "cpu")
        plan = sharing_plan(hand_selection(NUM_LAYERS, cfg.lora.target_modules, list(range(k, NUM_LAYERS))))
        model, users = build_main_lora(base, cfg.lora, cfg.seed, plan, train_shared=True)
        assert all(len(v) == k for v in users.values()), users
        engine = create_engine(model, ds_config, 1e-3, 0.0, lr_lambda("constant", 0, 1, 1.0))
        result[k] = count(engine, cfg.lora.target_modules, k)
        del model, base
        release_engine(engine)
        del engine, hf
    if info.is_main:
        with open(f"{out_dir}/hooks.json", "w") as f:
            json.dump(result, f)
    distributed.exit_process(0)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
