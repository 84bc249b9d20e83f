"""ALLoRA (``lora.variant=allora``) against a reference written from the paper's rule: an
autograd Function over the full BA (Listing 1 of Huang & Balestriero), in one process
without DeepSpeed; a 2-rank ZeRO-3 step; the CLI's adapter in plain peft."""

import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, assert_adapter_reproduces_run, finished_run_args, run_ranks
from loradrop_ds.allora import row_factors
from workers.allora_step import ALLORA
from workers.common import TIED_KEPT_LAYERS as KEPT
from workers.common import hand_selection, randomize_lora_b, rank_batches, tiny_config

ETA2 = 4.0


class PaperALLoRA(torch.autograd.Function):
    """``out = x A^T B^T``; backward: ``acc_i = 1 / sqrt(||(BA)_i||_2 + 1/eta^2)`` from the
    full BA, ``grad_A = ((g * acc) B)^T x``, ``grad_B = (g * acc)^T (x A^T)``, ``grad_x = g B A``."""

    @staticmethod
    def forward(ctx, x, a, b):
        ctx.save_for_backward(x, a, b)
        return x @ a.T @ b.T

    @staticmethod
    def backward(ctx, g):
        x, a, b = ctx.saved_tensors
        full = b @ a
        acc = 1.0 / torch.sqrt(torch.linalg.vector_norm(full, dim=1) + 1.0 / ETA2)
        gs = (g * acc).reshape(-1, b.shape[0])
        x2 = x.reshape(-1, a.shape[1])
        return g @ full, (gs @ b).T @ x2, gs.T @ (x2 @ a.T)


def reference_grads(model_dir, lora_weights: dict, batches: list[dict]) -> tuple[dict, torch.Tensor]:
    """Plain transformers; every target Linear gets ``+ PaperALLoRA(x, A, B)`` with leaf A
    and B tensors made from ``lora_weights`` (peft names; a tied LoRA is one leaf shared
    by its layers). Gradients of the mean of the batches' losses, by peft name, and the
    input embeddings' gradient of the first batch."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).requires_grad_(False)
    leaves: dict[int, torch.Tensor] = {}  # one leaf per distinct storage: tied LoRAs share theirs
    names: dict[str, torch.Tensor] = {}
    for name, w in lora_weights.items():
        key = w.untyped_storage().data_ptr()
        names[name] = leaves.setdefault(key, w.detach().clone().requires_grad_(True))
    for name, module in model.named_modules():
        peft_name = f"base_model.model.{name}.lora_A.default.weight"
        if peft_name in names:
            a, b = names[peft_name], names[peft_name.replace("lora_A", "lora_B")]
            module.register_forward_hook(lambda _m, args, out, a=a, b=b: out + PaperALLoRA.apply(args[0], a, b))
    embeds = [model.get_input_embeddings()(batch["input_ids"]).detach().requires_grad_(True) for batch in batches]
    losses = [model(inputs_embeds=e, attention_mask=bt["attention_mask"], labels=bt["labels"]).loss
              for e, bt in zip(embeds, batches, strict=True)]
    (sum(losses) / len(losses)).backward()
    return {n: t.grad for n, t in names.items()}, embeds[0].grad


def our_model(model_dir, plan=None):
    from transformers import AutoModelForCausalLM

    from loradrop_ds.lora import build_main_lora

    cfg = tiny_config(str(model_dir), *ALLORA)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).requires_grad_(False)
    model, _ = build_main_lora(base, cfg.lora, cfg.seed, None, True)
    randomize_lora_b(model, seed=7, scale=0.5)
    if plan is not None:
        from loradrop_ds.lora import tie_shared_lora

        tie_shared_lora(model, plan, train_shared=True)
    return cfg, model


def test_row_factors_from_the_gram_matrix_equal_the_full_ba():
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(4, 48, generator=gen), torch.randn(40, 4, generator=gen)
    want = 1.0 / torch.sqrt(torch.linalg.vector_norm(b @ a, dim=1) + 1.0 / ETA2)
    torch.testing.assert_close(row_factors(a, b, ETA2), want, rtol=1e-5, atol=0.0)


@pytest.mark.parametrize("tied", [False, True])
def test_gradients_equal_the_papers_rule(tiny_model, tied):
    from loradrop_ds.importance import sharing_plan
    from loradrop_ds.model import load_tokenizer

    plan = sharing_plan(hand_selection(4, ["q_proj", "v_proj", "down_proj"], KEPT)) if tied else None
    cfg, model = our_model(tiny_model, plan)
    weights = dict(model.named_parameters(remove_duplicate=False))
    lora = {n: p for n, p in weights.items() if "lora_" in n}
    batches = rank_batches(cfg, load_tokenizer(str(tiny_model)), per_rank=2, world=2)
    want, want_embeds = reference_grads(tiny_model, lora, batches)

    model.train()
    embeds = model.get_input_embeddings()(batches[0]["input_ids"]).detach().requires_grad_(True)
    losses = [model(inputs_embeds=embeds, attention_mask=batches[0]["attention_mask"], labels=batches[0]["labels"]).loss,
              model(**batches[1]).loss]
    (sum(losses) / 2).backward()
    for name, p in lora.items():
        torch.testing.assert_close(p.grad, want[name], rtol=1e-4, atol=1e-7, msg=lambda m, n=name: f"{n}: {m}")
    torch.testing.assert_close(embeds.grad, want_embeds, rtol=1e-4, atol=1e-7)
    # A control: plain LoRA's gradients (factor 1) differ, so the check above can fail.
    factors = torch.cat([row_factors(lora[n].detach(), lora[n.replace("lora_A", "lora_B")].detach(), ETA2)
                         for n in lora if "lora_A" in n])
    assert factors.max() / factors.min() > 1.3 and (factors - 1.0).abs().max() > 0.2


def test_two_rank_zero3_step_equals_the_reference(tiny_model, tmp_path):
    from loradrop_ds.model import load_tokenizer

    run_ranks(REPO / "tests" / "workers" / "allora_step.py", [str(tiny_model), str(tmp_path)])
    before, grads = load_file(tmp_path / "before.safetensors"), load_file(tmp_path / "grads.safetensors")
    # The worker tied layers 0 and 2 (saved once, under layer 0's names): the reference's
    # layer 2 uses the very same tensors, so they become one leaf there.
    lora = dict(before)
    lora.update({n.replace("layers.0.", "layers.2."): w for n, w in before.items() if "layers.0." in n})
    cfg = tiny_config(str(tiny_model), *ALLORA)
    batches = rank_batches(cfg, load_tokenizer(str(tiny_model)), per_rank=2, world=2)
    want, _ = reference_grads(tiny_model, lora, batches)
    assert set(grads) <= set(want) and len(grads) == 3 * 3 * 2  # 2 kept layers + 1 shared, 3 modules, A and B
    for name, g in grads.items():
        torch.testing.assert_close(g, want[name], rtol=1e-4, atol=1e-7, msg=lambda m, n=name: f"{n}: {m}")


def test_cli_run_exports_a_plain_peft_adapter_with_scaling_one(tiny_model, tmp_path):
    out = tmp_path / "run"
    run_ranks(REPO / "launch" / "train.py",
              finished_run_args(tiny_model, out, "lora.variant=allora", "lora.dropout=0.0", "lora.alpha=8"))
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["lora_alpha"] == config["r"] == 8 and config["lora_dropout"] == 0.0
    assert_adapter_reproduces_run(tiny_model, out)


@pytest.mark.parametrize(("overrides", "message"), [
    (["lora.variant=allora"], "set lora.dropout=0 lora.alpha=8"),
    (["lora.variant=allora", "lora.dropout=0", "lora.alpha=8", "loradrop.shared_scale=scalar"],
     "set loradrop.shared_scale=none"),
    (["lora.variant=allora", "lora.dropout=0", "lora.alpha=8", "loradrop.selection=grad_norm"],
     "choose another selection"),
    (["lora.allora_eta2=0"], "lora.allora_eta2 must be > 0"),
])
def test_allora_settings_that_cannot_work_are_named(overrides, message):
    from loradrop_ds import config as config_lib

    with pytest.raises(config_lib.ConfigError, match=message):
        config_lib.load_config(None, overrides)
