"""A 2-rank ZeRO-3 step with a tied shared LoRA against a single-process fp32
reference without DeepSpeed on the same data and initialisation; the same step with
torch's linear instead of DeepSpeed's (``memory_efficient_linear``), and with every decoder
layer a ZeRO-3 leaf module (what ``load_ds_config`` refuses)."""

import json

import pytest
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


@pytest.fixture(scope="module")
def tied_runs(tiny_model, tmp_path_factory):
    """The worker's three modes in one set of rank processes (``mel-off`` first: DeepSpeed's
    linear, once installed, stays for the process), each with a reduce bucket of 1 element,
    so every gradient is reduced as soon as the next one arrives: a reduction between two
    uses of the shared LoRA shows."""
    out = tmp_path_factory.mktemp("tied")
    run_ranks(REPO / "tests" / "workers" / "tied_step.py", [str(tiny_model), str(out), "mel-off", "default", "leaf"])
    return out


def _outputs(run_dir):
    return (load_file(run_dir / "grads.safetensors"), load_file(run_dir / "params.safetensors"),
            torch.load(run_dir / "meta.pt", weights_only=True))


SHARED_A = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight"


def test_tied_lora_step_matches_single_process_reference(tiny_model, tied_runs):
    grads, params, meta = _outputs(tied_runs / "default")
    assert meta["deepspeed_linear"] is True  # "auto" on 2 ranks without recomputation

    ref_losses, ref_grads, ref_params = reference_step(tiny_model)
    assert meta["losses"] == [pytest_approx(loss) for loss in ref_losses]
    # Shared parameters are counted once: 2 kept layers x 3 modules + 1 shared LoRA per module.
    cfg = tiny_config(str(tiny_model))
    trainable = expected_trainable(tiny_model, cfg.lora.r, cfg.lora.target_modules)
    assert trainable == 3 * 8 * ((64 + 64) + (64 + 32) + (128 + 64))  # the tiny model's shapes, by hand
    assert meta["trainable"] == trainable
    assert meta["optimizer_numel"] >= trainable and meta["optimizer_numel"] - trainable < 64  # ZeRO pads partitions
    assert set(grads) == set(ref_grads)
    shared_a = SHARED_A
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


def test_torch_linear_trains_exactly_as_deepspeeds(tiny_model, tied_runs):
    """memory_efficient_linear decides what autograd holds between forward and backward,
    not the numbers: the step with torch's F.linear gives the losses, gradients and updated
    parameters of the step with DeepSpeed's linear (and of the reference)."""
    grads, params, meta = _outputs(tied_runs / "mel-off")
    ds_grads, ds_params, ds_meta = _outputs(tied_runs / "default")
    assert meta["deepspeed_linear"] is False and ds_meta["deepspeed_linear"] is True  # each ran the linear it asked for
    assert meta["losses"] == [pytest_approx(loss) for loss in ds_meta["losses"]]
    assert grads.keys() == ds_grads.keys() and params.keys() == ds_params.keys()
    for name in ds_grads:
        torch.testing.assert_close(grads[name], ds_grads[name], rtol=1e-6, atol=1e-8, msg=lambda m, n=name: f"{n}: {m}")
    for name in ds_params:
        torch.testing.assert_close(params[name], ds_params[name], rtol=1e-6, atol=1e-7, msg=lambda m, n=name: f"{n}: {m}")
    _, ref_grads, _ = reference_step(tiny_model)
    for name, ref in ref_grads.items():
        torch.testing.assert_close(grads[name], ref, rtol=1e-5, atol=1e-7, msg=lambda m, n=name: f"{n}: {m}")


def test_leaf_modules_leave_the_shared_lora_without_its_gradient(tiny_model, tied_runs):
    """Why load_ds_config refuses leaf modules with a tied shared LoRA: with every decoder
    layer a leaf module, DeepSpeed files the shared parameter under layer 2 (the last shared
    layer registered) and reduces it when layer 2's backward ends. Autograd accumulates a
    parameter used twice once, after its last use (layer 0), so DeepSpeed finds no .grad
    then and reduces zeros; once the bucket is reduced, the real gradient lands in a .grad
    that nothing reduces. The optimizer's shared gradient is zero where the reference's is
    not; the kept layers' own LoRAs are right. A control: if a DeepSpeed release fixes this,
    this test says so, and the refusal (engine._refuse_leaf_modules_with_shared_lora) may go."""
    import deepspeed

    grads, _, meta = _outputs(tied_runs / "leaf")
    assert meta["leaf_modules"] == 4  # the 4 decoder layers
    _, ref_grads, _ = reference_step(tiny_model)
    shared = sorted(n for n in ref_grads if ".layers.0." in n or ".layers.2." in n)
    assert len(shared) == 6 and all(".layers.0." in n for n in shared)  # A and B of 3 modules, named after layer 0
    assert meta["unreduced"] == shared  # the real gradient: left in .grad after backward
    for name in shared:
        assert ref_grads[name].norm() > 0
        assert torch.count_nonzero(grads[name]) == 0, (
            f"{name}: deepspeed {deepspeed.__version__} reduces a shared parameter's gradient in leaf modules; "
            "check it against the reference and lift the refusal")
    for name in set(ref_grads) - set(shared):  # the kept layers 1 and 3
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-5, atol=1e-7, msg=lambda m, n=name: f"{n}: {m}")


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
