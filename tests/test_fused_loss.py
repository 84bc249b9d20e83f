"""The fused linear cross-entropy (``model.liger``'s loss; loradrop_ds.fused_loss) with its
plain-torch kernel, the twin of Liger's: against the cross-entropy written from its
definition, on a plain model against transformers' own loss, and under real ZeRO-3 on 2
ranks against a single-process fp32 reference of plain transformers + peft. Liger's Triton
kernels themselves need a GPU (docs/METHODS.md says what was run where)."""

import functools

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, run_ranks
from loradrop_ds.fused_loss import (
    FusedLMLoss,
    attach_fused_loss,
    chunked_linear_cross_entropy,
    default_chunk_tokens,
)
from workers.common import randomize_lora_b, rank_batches, tiny_config


def definition_loss(hidden, weight, target):
    """Mean over the tokens with a target (not -100) of log(sum_v exp(h.w_v)) - h.w_target,
    token by token, in fp32."""
    terms = []
    for h, t in zip(hidden.float(), target.tolist(), strict=True):
        if t != -100:
            logits = weight.float() @ h
            terms.append(torch.log(torch.exp(logits - logits.max()).sum()) + logits.max() - logits[t])
    return torch.stack(terms).mean()


def _inputs(tokens=23, hidden=8, vocab=40, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(tokens, hidden, generator=gen).to(dtype).requires_grad_(True)
    w = torch.randn(vocab, hidden, generator=gen).to(dtype)
    target = torch.randint(0, vocab, (tokens,), generator=gen)
    target[::3] = -100  # prompt and padding tokens carry no loss
    return h, w, target


@pytest.mark.parametrize("chunk", [1, 4, 7, 23, None])
def test_chunked_loss_and_gradient_equal_the_definition(chunk):
    h, w, target = _inputs()
    loss = chunked_linear_cross_entropy(h, w, target, chunk_tokens=chunk)
    (loss * 0.37).backward()  # a scaled loss (gradient accumulation): the saved gradient is scaled
    grad = h.grad.clone()
    h.grad = None
    ref = definition_loss(h, w, target)
    (ref * 0.37).backward()
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grad, h.grad, rtol=1e-5, atol=1e-7)
    assert grad[::3].abs().max() == 0 and grad[1::3].abs().min() > 0  # only tokens with a target get one


def test_bfloat16_follows_the_upcast_of_transformers_loss():
    """bf16 hidden states and weight: logits formed in bf16 and the loss in fp32, as
    transformers' ForCausalLMLoss does after a bf16 lm_head (logits.float())."""
    h, w, target = _inputs(tokens=64, hidden=32, vocab=300, dtype=torch.bfloat16)
    loss = chunked_linear_cross_entropy(h, w, target, chunk_tokens=8)
    loss.backward()
    grad = h.grad.clone()
    h.grad = None
    ref = torch.nn.functional.cross_entropy((h @ w.t()).float(), target, ignore_index=-100)
    ref.backward()
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)
    assert grad.dtype == torch.bfloat16
    torch.testing.assert_close(grad, h.grad, rtol=2e-2, atol=1e-4)  # one bf16 rounding of the same products


def test_default_chunk_is_liger_size():
    """ceil(vocab / hidden) chunks, rounded up to a power of two (liger-kernel 0.8.5)."""
    assert default_chunk_tokens(4096, 128256, 4096) == 128  # 32 chunks of 128 tokens for Llama-3-8B
    assert default_chunk_tokens(2048, 49152, 576) == 32  # SmolLM2: 86 chunks -> 24 tokens -> 32
    assert default_chunk_tokens(3, 600, 64) == 1


def test_a_trainable_head_is_refused():
    h, w, target = _inputs()
    with pytest.raises(ValueError, match="weight must be frozen"):
        chunked_linear_cross_entropy(h, w.requires_grad_(True), target)


def test_the_loss_module_shifts_labels_by_one():
    """FusedLMLoss on [batch, seq, hidden]: position s predicts label s + 1, each row's last
    position predicts nothing; the mean is over every predicted token of the batch."""
    gen = torch.Generator().manual_seed(1)
    head = torch.nn.Linear(6, 30, bias=False)
    head.weight.requires_grad_(False)
    hidden = torch.randn(2, 5, 6, generator=gen)
    labels = torch.randint(0, 30, (2, 5), generator=gen)
    labels[0, :2] = -100  # a prompt
    labels[1, 3:] = -100  # padding
    fused = FusedLMLoss(head, functools.partial(chunked_linear_cross_entropy, chunk_tokens=3))
    pairs = [(hidden[b, s], labels[b, s + 1]) for b in range(2) for s in range(4) if labels[b, s + 1] != -100]
    assert len(pairs) == 3 + 2
    ref = definition_loss(torch.stack([h for h, _ in pairs]), head.weight, torch.stack([t for _, t in pairs]))
    torch.testing.assert_close(fused(hidden, labels), ref, rtol=1e-6, atol=1e-6)


def test_attached_model_trains_as_transformers_and_evaluates_with_logits(tiny_model):
    """On a plain model (no DeepSpeed): in training with labels the loss and LoRA gradients
    are transformers' own and no logits are formed; without labels, and in eval mode, the
    class's forward gives logits; parameters and state-dict keys are unchanged; the
    attachment survives peft's unload (the main stage's rebuild on the same base)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    models = []
    for fused in (True, False):
        model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
        model.requires_grad_(False)
        if fused:
            keys = set(model.state_dict())
            attach_fused_loss(model, functools.partial(chunked_linear_cross_entropy, chunk_tokens=5))
            assert set(model.state_dict()) == keys
            with pytest.raises(ValueError, match="already attached"):
                attach_fused_loss(model, chunked_linear_cross_entropy)
        torch.manual_seed(0)
        model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"], lora_dropout=0.0))
        randomize_lora_b(model, seed=3)
        models.append(model.train())
    fused, plain = models
    cfg = tiny_config(str(tiny_model))
    from loradrop_ds.model import load_tokenizer

    batch = rank_batches(cfg, load_tokenizer(str(tiny_model)), per_rank=3, world=1)[0]
    out, ref = fused(**batch), plain(**batch)
    assert out.logits is None and ref.logits is not None
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-6, atol=1e-6)
    out.loss.backward()
    ref.loss.backward()
    grads = {n: p.grad for n, p in fused.named_parameters() if p.requires_grad}
    assert len(grads) == 3 * 4 * 2
    for n, p in plain.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(grads[n], p.grad, rtol=1e-5, atol=1e-7, msg=lambda m, n=n: f"{n}: {m}")
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with torch.no_grad():
        torch.testing.assert_close(fused(**inputs).logits, plain(**inputs).logits, rtol=0, atol=0)
        fused.eval()
        assert fused(**batch).logits is not None  # eval mode with labels: the class's forward
    base = fused.unload()
    assert hasattr(base, "fused_lm_loss") and base.train()(**batch).logits is None


def reference_run(model_dir, batches, lora_seed, b_seed, steps, lr):
    """Plain transformers + peft, one process, fp32, transformers' own loss (the logits
    formed): each step the mean of every rank's micro-batch loss (DeepSpeed averages the
    gradients over ranks), torch AdamW. Losses per step and rank, the first step's
    gradients, LoRA after the last step, rank 0's first batch's logits before and after."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    cfg = tiny_config(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.requires_grad_(False)
    torch.manual_seed(lora_seed)  # the initialisation add_lora draws
    model = get_peft_model(model, PeftLoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=0.0,
                                                 target_modules=cfg.lora.target_modules, task_type="CAUSAL_LM"))
    randomize_lora_b(model, seed=b_seed)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0,
                            betas=(0.9, 0.999), eps=1e-8)
    probe = {k: batches[0][0][k] for k in ("input_ids", "attention_mask")}
    with torch.no_grad():
        before = model(**probe).logits
    losses, grads = [], None
    for step in range(steps):
        per_rank = [model(**b).loss for b in batches[step]]
        (sum(per_rank) / len(per_rank)).backward()
        if grads is None:
            grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        opt.step()
        opt.zero_grad()
        losses.append([float(loss) for loss in per_rank])
    with torch.no_grad():
        after = model(**probe).logits
    params = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
    return losses, grads, params, before, after


def _compare(out_dir, part, ref):
    losses, grads, params = ref[:3]
    meta = torch.load(out_dir / f"{part}.pt", weights_only=True)
    saved = load_file(out_dir / f"{part}.safetensors")
    got_grads = {k.removeprefix("grad."): v for k, v in saved.items() if k.startswith("grad.")}
    got_params = {k.removeprefix("param."): v for k, v in saved.items() if k.startswith("param.")}
    for step, (got, want) in enumerate(zip(meta["losses"], losses, strict=True)):
        assert got == pytest.approx(want, rel=1e-5), (part, step)
    assert set(got_grads) == set(grads) and len(grads) == 3 * 4 * 2
    for n, g in grads.items():
        assert g.abs().sum() > 0
        torch.testing.assert_close(got_grads[n], g, rtol=1e-5, atol=1e-7, msg=lambda m, n=n: f"{part} {n}: {m}")
    assert set(got_params) == set(params)
    for n, p in params.items():  # Adam amplifies rounding where |g| ~ eps: absolute 1e-6 at lr 1e-3
        torch.testing.assert_close(got_params[n], p, rtol=1e-5, atol=1e-6, msg=lambda m, n=n: f"{part} {n}: {m}")
    return meta


def test_fused_loss_under_zero3_equals_transformers_loss(tiny_model, tmp_path_factory):
    """2 ranks, ZeRO-3 partitioning every parameter (the LM head included), the fused loss
    in 5-token chunks: losses, gradients, adapter after 3 steps and the evaluation logits
    equal transformers' own path in one process; lm_head's forward never runs in training
    and its weight is not whole while the decoder layers run (forward or backward), so the
    gather is scoped to the loss; the same after the rebuild on the same base, and with an
    LM head tied to the input embedding (SmolLM2)."""
    from tiny import make_tiny_llama
    from workers.fused_loss_step import LR, PER_RANK, STEPS

    tied_dir = make_tiny_llama(tmp_path_factory.mktemp("tiny_tied"), tied=True)
    out = tmp_path_factory.mktemp("fused_loss")
    run_ranks(REPO / "tests" / "workers" / "fused_loss_step.py", [str(tiny_model), str(tied_dir), str(out)])

    from loradrop_ds.model import load_tokenizer

    cfg = tiny_config(str(tiny_model), f"train.micro_batch_size={PER_RANK}")
    flat = rank_batches(cfg, load_tokenizer(str(tiny_model)), PER_RANK, 2 * STEPS)
    batches = [flat[s * 2:(s + 1) * 2] for s in range(STEPS)]

    ref = reference_run(tiny_model, batches, cfg.seed, 7, STEPS, LR)
    meta = _compare(out, "untied", ref)
    assert meta["attached"] == "FusedLMLoss"
    mask = batches[0][0]["attention_mask"].bool()
    torch.testing.assert_close(meta["eval_before"][mask], ref[3][mask], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(meta["eval_after"][mask], ref[4][mask], rtol=1e-5, atol=1e-5)
    assert (ref[4] - ref[3])[mask].abs().max() > 1e-4  # training changed the logits
    assert meta["train_head_calls"] == 0 and meta["eval_head_calls"] == 1
    assert meta["forward_status"] == ["NOT_AVAILABLE"] * (STEPS + 1)  # 3 steps and the last evaluation
    assert meta["backward_status"] == ["NOT_AVAILABLE"] * STEPS

    _compare(out, "rebuilt", reference_run(tiny_model, batches, cfg.seed + 1, 8, 1, LR))
    tied = _compare(out, "tied", reference_run(tied_dir, batches, cfg.seed, 9, 2, LR))
    assert tied["tied"]


def test_liger_patches_a_llama_model_in_place(tiny_model, monkeypatch):
    """Where liger-kernel imports (the `liger` extra; its Triton kernels need a GPU to run, its
    patching does not): apply_liger on a built model binds Liger's RMSNorm and SwiGLU forwards
    to the model's own modules (state-dict keys unchanged: the checkpoint loads as before),
    replaces RoPE in transformers' modeling_llama, attaches the fused loss, and all of it
    survives peft's wrap and unload (the main stage's rebuild on the same base)."""
    try:
        import liger_kernel.transformers  # noqa: F401
    except Exception as e:  # noqa: BLE001 (triton may fail in many ways)
        pytest.skip(f"liger-kernel does not import here ({type(e).__name__}); CI does not install the `liger` extra")
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    from transformers.models.llama import modeling_llama

    from loradrop_ds.liger import apply_liger, liger_linear_cross_entropy

    for name in ("apply_rotary_pos_emb", "LlamaRMSNorm", "LlamaMLP"):  # liger replaces them process-wide:
        monkeypatch.setattr(modeling_llama, name, getattr(modeling_llama, name))  # restored after this test
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    keys = list(model.state_dict())
    apply_liger(model)
    assert list(model.state_dict()) == keys
    assert model.fused_lm_loss.kernel is liger_linear_cross_entropy
    assert modeling_llama.apply_rotary_pos_emb.__name__ == "liger_rotary_pos_emb"
    base = get_peft_model(model, LoraConfig(r=4, target_modules=["gate_proj", "down_proj"])).unload()
    assert base is model and base.forward.__func__.__name__ == "_fused_loss_forward"
    names = [m._get_name() for m in (base.model.norm, *(x for layer in base.model.layers
                                                         for x in (layer.input_layernorm, layer.mlp)))]
    assert names == ["LigerRMSNorm"] + ["LigerRMSNorm", "LigerSwiGLUMLP"] * len(base.model.layers)
    assert modeling_llama.LlamaRMSNorm.__name__ == "LigerRMSNorm"  # and for later builds (restored by monkeypatch)
