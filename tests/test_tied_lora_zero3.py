"""A 2-rank ZeRO-3 step with a tied shared LoRA against a single-process fp32
reference without DeepSpeed on the same data and initialisation."""

import torch
from safetensors.torch import load_file

from conftest import REPO, run_ranks
from workers.common import TIED_KEPT_LAYERS as KEPT
from workers.common import hand_selection, randomize_lora_b, rank_batches, tiny_config


def reference_step(model_dir):
    from transformers import AutoModelForCausalLM

    from loradrop_ds.importance import sharing_plan
    from loradrop_ds.lora import add_lora, tie_shared_lora
    from loradrop_ds.model import load_tokenizer

    cfg = tiny_config(str(model_dir), "train.micro_batch_size=2")
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.requires_grad_(False)
    model = add_lora(model, cfg.lora, cfg.seed)
    randomize_lora_b(model, seed=7)
    tie_shared_lora(model, sharing_plan(hand_selection(4, cfg.lora.target_modules, KEPT)), train_shared=True)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0, betas=(0.9, 0.999), eps=1e-8)
    batches = rank_batches(cfg, load_tokenizer(str(model_dir)), per_rank=2, world=2)
    losses = [model(**b).loss for b in batches]
    (sum(losses) / len(losses)).backward()  # DeepSpeed averages gradients over ranks
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    opt.step()
    after = {n: p.detach().clone() for n, p in model.named_parameters(remove_duplicate=False) if "lora_" in n}
    return [float(loss.detach()) for loss in losses], grads, after, sum(p.numel() for p in params)


def test_tied_lora_step_matches_single_process_reference(tiny_model, tmp_path):
    run_ranks(REPO / "tests" / "workers" / "tied_step.py", [str(tiny_model), str(tmp_path)])
    grads = load_file(tmp_path / "grads.safetensors")
    params = load_file(tmp_path / "params.safetensors")
    meta = torch.load(tmp_path / "meta.pt", weights_only=True)

    ref_losses, ref_grads, ref_params, ref_unique = reference_step(tiny_model)
    assert meta["losses"] == [pytest_approx(loss) for loss in ref_losses]
    # Shared parameters are counted once: 2 kept layers x 3 modules + 1 shared LoRA per module.
    assert meta["trainable"] == ref_unique
    assert meta["optimizer_numel"] >= ref_unique and meta["optimizer_numel"] - ref_unique < 64  # ZeRO pads partitions
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
