"""A 2-rank ZeRO-3 step with a tied shared LoRA against a single-process fp32
reference without DeepSpeed on the same data and initialisation."""

import json

import torch
from safetensors.torch import load_file

from conftest import REPO, run_ranks
from workers.common import TIED_KEPT_LAYERS as KEPT
from workers.common import randomize_lora_b, rank_batches, tiny_config


def reference_step(model_dir):
    """Plain transformers + peft in one process, fp32, no DeepSpeed, tied by hand: the
    shared layers 0 and 2 are given layer 0's A and B tensors here, without the
    project's tying code."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from loradrop_ds.model import load_tokenizer

    cfg = tiny_config(str(model_dir), "train.micro_batch_size=2")
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.requires_grad_(False)
    torch.manual_seed(cfg.seed)  # the initialisation the worker's add_lora draws
    model = get_peft_model(model, PeftLoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=0.0,
                                                 target_modules=cfg.lora.target_modules, task_type="CAUSAL_LM"))
    randomize_lora_b(model, seed=7)
    decoder = model.base_model.model.model.layers
    shared_layers = [i for i in range(len(decoder)) if i not in KEPT]
    for name in cfg.lora.target_modules:
        owner = decoder[shared_layers[0]].get_submodule(_module_path(name))
        for i in shared_layers[1:]:
            user = decoder[i].get_submodule(_module_path(name))
            user.lora_A["default"].weight = owner.lora_A["default"].weight
            user.lora_B["default"].weight = owner.lora_B["default"].weight
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0, betas=(0.9, 0.999), eps=1e-8)
    batches = rank_batches(cfg, load_tokenizer(str(model_dir)), per_rank=2, world=2)
    losses = [model(**b).loss for b in batches]
    (sum(losses) / len(losses)).backward()  # DeepSpeed averages gradients over ranks
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    opt.step()
    after = {n: p.detach().clone() for n, p in model.named_parameters(remove_duplicate=False) if "lora_" in n}
    return [float(loss.detach()) for loss in losses], grads, after


def _module_path(name: str) -> str:
    return f"mlp.{name}" if name in ("gate_proj", "up_proj", "down_proj") else f"self_attn.{name}"


def expected_trainable(model_dir, r: int, modules: list[str]) -> int:
    """From the layer shapes: r * (in + out) per LoRA, kept layers' own plus one shared."""
    config = json.loads((model_dir / "config.json").read_text())
    h, inter = config["hidden_size"], config["intermediate_size"]
    kv = config["num_key_value_heads"] * h // config["num_attention_heads"]
    shape = {"q_proj": (h, h), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (h, h),
             "gate_proj": (h, inter), "up_proj": (h, inter), "down_proj": (inter, h)}
    per_layer = sum(r * sum(shape[m]) for m in modules)
    return (len(KEPT) + 1) * per_layer


def test_tied_lora_step_matches_single_process_reference(tiny_model, tmp_path):
    run_ranks(REPO / "tests" / "workers" / "tied_step.py", [str(tiny_model), str(tmp_path)])
    grads = load_file(tmp_path / "grads.safetensors")
    params = load_file(tmp_path / "params.safetensors")
    meta = torch.load(tmp_path / "meta.pt", weights_only=True)

    ref_losses, ref_grads, ref_params = reference_step(tiny_model)
    assert meta["losses"] == [pytest_approx(loss) for loss in ref_losses]
    # Shared parameters are counted once: 2 kept layers x 3 modules + 1 shared LoRA per module.
    cfg = tiny_config(str(tiny_model))
    trainable = expected_trainable(tiny_model, cfg.lora.r, cfg.lora.target_modules)
    assert trainable == 3 * 8 * ((64 + 64) + (64 + 32) + (128 + 64))  # the tiny model's shapes, by hand
    assert meta["trainable"] == trainable
    assert meta["optimizer_numel"] >= trainable and meta["optimizer_numel"] - trainable < 64  # ZeRO pads partitions
    assert set(grads) == set(ref_grads)
    shared_a = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight"
    assert shared_a in grads and ref_grads[shared_a].abs().sum() > 0  # the shared LoRA trains
    for name, ref in ref_grads.items():
        torch.testing.assert_close(grads[name], ref, rtol=1e-5, atol=1e-7, msg=lambda m, name=name: f"{name}: {m}")
    assert set(params) == set(ref_params)
    # Adam's first step is lr * g / (|g| + eps): elements with |g| near eps amplify
    # float rounding, hence an absolute tolerance of 1e-6 at lr 1e-3.
    for name, ref in ref_params.items():
        torch.testing.assert_close(params[name], ref, rtol=1e-5, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")
    # The tie survives the step: layers 0 and 2 hold the same shared values.
    torch.testing.assert_close(params[shared_a], params[shared_a.replace("layers.0", "layers.2")], rtol=0, atol=0)


def pytest_approx(x):
    import pytest

    return pytest.approx(x, rel=1e-6)


def test_shared_lora_hooks_do_not_grow_with_the_number_of_layers_sharing_it(tmp_path_factory):
    """ZeRO-3 registers its hooks per module: a shared LoRA must cost each of its k uses
    what a kept LoRA costs, for k = 2 and k = 10 (DeepSpeed visits a module placed in k
    layers k times, which gave it 4k hooks all firing at each use: 4k^2 calls)."""
    from tiny import make_tiny_llama
    from workers.hooks import NUM_LAYERS

    model_dir = make_tiny_llama(tmp_path_factory.mktemp("tiny11"), num_layers=NUM_LAYERS, hidden=32)
    out = tmp_path_factory.mktemp("hooks")
    run_ranks(REPO / "tests" / "workers" / "hooks.py", [str(model_dir), str(out)])
    result = json.loads((out / "hooks.json").read_text())
    (per_kept,) = result["2"]["kept_lora_module_hooks"]
    assert per_kept >= 2  # DeepSpeed's forward pre/post hooks at least: the count is real
    for k in (2, 10):
        r = result[str(k)]
        assert r["kept_lora_module_hooks"] == [per_kept]
        assert r["shared_holder_hooks"] == [per_kept], (k, r)  # independent of k
        assert r["holders_per_shared_param"] == [k]  # one module per use, each registered once
        assert r["calls_per_forward_per_shared_param"] == [k * per_kept], (k, r)  # linear in k, not k^2
