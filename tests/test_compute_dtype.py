"""``lora.compute_dtype=bfloat16``: the LoRA matmuls in the base's bf16, the adapter
parameters, their gradients and the tied shared LoRA's sum over its uses in fp32.

One peft LoRA layer and the tied shared LoRA in one process against references written from
the definition (fp64), and real 2-rank ZeRO-3 runs of the CLI (both stages, the importance
recorder, a tied shared LoRA, ALLoRA, LoRAPrune) with fp32 against bf16 compute.

Tolerances, stated (docs/METHODS.md#precision-on-gpus):
* one layer's output and weight gradients: within bf16 rounding of the fp64 reference, relative
  to the tensor's largest value: ``BF16_REL`` (bf16 keeps 8 bits: 2^-8 = 0.4% per rounding, a
  few roundings on the way);
* the 2-rank runs (6 main steps of the tiny bf16 model): every logged loss within
  ``RUN_LOSS_ATOL`` of the fp32-compute run's and the trained adapter within ``RUN_ADAPTER_REL``
  (``||a - b|| / ||a||``); the same selection; LoRAPrune's masks prune as much, and differ in at
  most ``RUN_MASK_FLIPS`` of their entries (near-equal scores of the random tiny model can swap).
  Measured (2026-12, this CPU): losses within 7e-4, adapters within 1.1%, one MLP channel swapped.
"""

import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import assert_adapter_reproduces_run, finished_run_args, run_ranks_many
from loradrop_ds.config import ConfigError, LoraConfig, load_config

BF16_REL = 2e-2
RUN_LOSS_ATOL = 0.01
RUN_ADAPTER_REL = 0.05
RUN_MASK_FLIPS = 0.02
R, ALPHA = 4, 8.0


def lora_model(tiny_model, compute_dtype: str, dropout: float = 0.0, modules=("q_proj",), num_layers=None):
    """The tiny model in bf16 (``num_layers``: a fresh random one of that depth) with LoRA by
    ``lora.add_lora``, every B random (B starts at zero; a zero B would hide the branch)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from loradrop_ds.lora import add_lora

    if num_layers is None:
        base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.bfloat16)
    else:
        config = AutoConfig.from_pretrained(tiny_model)
        config.num_hidden_layers = num_layers
        torch.manual_seed(0)
        base = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    cfg = LoraConfig(r=R, alpha=ALPHA, dropout=dropout, target_modules=list(modules), compute_dtype=compute_dtype)
    return add_lora(base.requires_grad_(False), cfg, seed=0), cfg


def randomise_b(model, seed: int = 1) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """Largest elementwise error relative to the reference's largest value."""
    return float((got.double() - want).abs().max() / want.abs().max())


def saved_for_backward(fn, x: torch.Tensor) -> list[tuple[torch.dtype, tuple, bool]]:
    """(dtype, shape, is x itself) of every tensor autograd saves while ``fn(x)`` runs."""
    saved = []

    def pack(t):
        saved.append((t.dtype, tuple(t.shape), t.untyped_storage().data_ptr() == x.untyped_storage().data_ptr()))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn(x)
    return saved, out


def test_bfloat16_needs_a_bfloat16_base():
    with pytest.raises(ConfigError, match="lora.compute_dtype=bfloat16 .* model.dtype is float32: set "
                                          "model.dtype=bfloat16 or lora.compute_dtype=float32"):
        load_config(None, ["lora.compute_dtype=bfloat16"])
    assert load_config(None, ["lora.compute_dtype=bfloat16", "model.dtype=bfloat16"]).lora.compute_dtype == "bfloat16"


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_one_lora_layer_runs_in_bf16_with_fp32_parameters_and_gradients(tiny_model, dropout):
    """peft's LoRA Linear on a bf16 base: with bf16 compute no fp32 tensor the size of the
    input is saved for backward (with fp32 compute, peft's up-cast copy is), the parameters and
    their gradients are fp32, and output and gradients match ``y = W x + scaling B A x`` in fp64
    to bf16 rounding. Also the saved tensors per token, for the memory planner (docs/PLANNER.md)."""
    from loradrop_ds.lora import ADAPTER, InputDtypeLinear, lora_layers

    per_mode = {}
    for mode in ("float32", "bfloat16"):
        model, cfg = lora_model(tiny_model, mode, dropout)
        randomise_b(model)
        layer = lora_layers(model, ["q_proj"])[(1, "q_proj")]
        lin_a, lin_b = layer.lora_A[ADAPTER], layer.lora_B[ADAPTER]
        assert (type(lin_a) is InputDtypeLinear) == (mode == "bfloat16")
        x = torch.randn(2, 6, 64, generator=torch.Generator().manual_seed(2)).bfloat16().requires_grad_(True)
        if dropout:
            torch.manual_seed(3)
        saved, y = saved_for_backward(layer, x)
        per_token = [(dtype, shape[-1], is_x) for dtype, shape, is_x in saved if shape[:-1] in ((2, 6), (12,))]
        per_mode[mode] = per_token
        assert y.dtype == torch.bfloat16
        assert lin_a.weight.dtype == lin_b.weight.dtype == torch.float32
        grad_out = torch.randn(y.shape, generator=torch.Generator().manual_seed(4)).bfloat16()
        y.backward(grad_out)
        assert lin_a.weight.grad.dtype == lin_b.weight.grad.dtype == torch.float32
        if dropout:
            continue  # the reference below has no dropout mask; the saved tensors are what this case checks
        # The reference, fp64, from the definition.
        w = layer.base_layer.weight.double()
        a, b, x64, g = lin_a.weight.detach().double(), lin_b.weight.detach().double(), x.detach().double(), grad_out.double()
        scaling = ALPHA / R
        h = x64 @ a.T
        want_y = x64 @ w.T + scaling * h @ b.T
        want_db = scaling * g.reshape(-1, b.shape[0]).T @ h.reshape(-1, R)
        want_da = scaling * (g @ b).reshape(-1, R).T @ x64.reshape(-1, 64)
        assert relative_error(y, want_y) < BF16_REL
        assert relative_error(lin_b.weight.grad, want_db) < BF16_REL
        assert relative_error(lin_a.weight.grad, want_da) < BF16_REL
        assert relative_error(x.grad, g @ w + scaling * (g @ b) @ a) < BF16_REL
    # Per token, in the order autograd saves them (A's input, its dropout mask, A's output):
    fp32_copy = (torch.float32, 64, False)
    if dropout == 0:
        assert per_mode["float32"] == [fp32_copy, (torch.float32, R, False)]  # peft's up-cast copy of x, A x
        assert per_mode["bfloat16"] == [(torch.bfloat16, 64, True), (torch.bfloat16, R, False)]  # x itself, A x
    else:  # CPU dropout saves a noise tensor of x's dtype (a bool mask on CUDA), then its output
        assert per_mode["float32"] == [fp32_copy, fp32_copy, (torch.float32, R, False)]
        assert per_mode["bfloat16"] == [(torch.bfloat16, 64, False)] * 2 + [(torch.bfloat16, R, False)]


def test_activation_checkpointing_recomputes_the_bf16_branch_exactly(tiny_model):
    """Non-reentrant activation checkpointing (model.gradient_checkpointing, as model.py turns it
    on) recomputes the bf16 LoRA branch, weight casts, dropout and the importance recorder's
    gradient taps included: the LoRA gradients and the recorded statistics equal the run without
    recomputation exactly."""
    from loradrop_ds.lora import ADAPTER, ImportanceRecorder, lora_layers

    results = []
    for checkpointing in (False, True):
        model, _ = lora_model(tiny_model, "bfloat16", dropout=0.1, modules=("q_proj", "v_proj", "up_proj"))
        randomise_b(model)
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        recorder = ImportanceRecorder(model, ["q_proj", "v_proj", "up_proj"], "cpu", record_grads=True)
        calls = []
        lora_a = lora_layers(model, ["q_proj"])[(0, "q_proj")].lora_A[ADAPTER]
        lora_a.register_forward_hook(lambda *_, calls=calls: calls.append(1))
        ids = torch.randint(3, 100, (2, 12), generator=torch.Generator().manual_seed(6))
        torch.manual_seed(7)
        with recorder.recording(torch.ones(2, 12)):  # the forward only, as training.py records
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        assert len(calls) == (2 if checkpointing else 1)  # recomputed in the backward
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        assert grads and all(g.dtype == torch.float32 for g in grads.values())
        results.append((grads, recorder.stats.sq_norm_sums.clone(), recorder.stats.grad_sq_sums.clone()))
    (grads, sq, grad_sq), (grads_ckpt, sq_ckpt, grad_sq_ckpt) = results
    assert sq.dtype == grad_sq.dtype == torch.float64 and bool((sq > 0).all()) and bool((grad_sq > 0).all())
    assert grads.keys() == grads_ckpt.keys() and all(torch.equal(grads[n], grads_ckpt[n]) for n in grads)
    assert torch.equal(sq, sq_ckpt) and torch.equal(grad_sq, grad_sq_ckpt)


def cast_nodes_of(output: torch.Tensor, weight: torch.Tensor, depth: int = 6) -> list:
    """The autograd nodes of ``weight.to(...)`` (``ToCopyBackward0`` whose input is ``weight``'s
    ``AccumulateGrad``) within ``depth`` steps of ``output``'s graph."""
    found, frontier = [], [output.grad_fn]
    for _ in range(depth):
        frontier = [n for node in frontier if node is not None for n, _ in node.next_functions if n is not None]
        for node in frontier:
            if node.name() == "ToCopyBackward0" and getattr(node.next_functions[0][0], "variable", None) is weight:
                found.append(node)
    return found


def test_tied_shared_lora_sums_its_uses_in_fp32(tiny_model):
    """One LoRA tied over 23 layers of a bf16 model (layer 0 keeps its own), bf16 compute.
    Each use's weight gradient leaves its bf16 matmul in bf16 and its cast's backward hands it
    to the fp32 leaf in fp32; autograd adds the uses there, once per backward (what DeepSpeed's
    ZeRO-3 hook, register_post_accumulate_grad_hook, sees: one fp32 gradient). The leaf's
    gradient is the fp32 sum of the per-use gradients (to fp32 rounding), not a bf16 sum of them
    (as bf16-stored adapters would add them), and matches the fp64 reference of the definition
    to bf16 rounding."""
    from loradrop_ds.importance import sharing_plan
    from loradrop_ds.lora import ADAPTER, build_main_lora, lora_layers
    from workers.common import hand_selection

    layers = 24
    model, cfg = lora_model(tiny_model, "bfloat16", num_layers=layers)
    base = model.unload()
    model, users = build_main_lora(base, cfg, 0, sharing_plan(hand_selection(layers, ["q_proj"], [0])), True)
    assert users == {"q_proj": list(range(1, layers))}
    randomise_b(model)
    loras = lora_layers(model, ["q_proj"])
    shared_a, shared_b = loras[(1, "q_proj")].lora_A[ADAPTER].weight, loras[(1, "q_proj")].lora_B[ADAPTER].weight
    assert all(loras[(i, "q_proj")].lora_A[ADAPTER].weight is shared_a for i in users["q_proj"])

    seen, per_use_db, accumulated = {}, [], []

    def capture(layer):
        def hook(module, inputs, output):
            seen[layer] = {"x": inputs[0].detach()}
            output.register_hook(lambda g: seen[layer].__setitem__("g", g.detach()))
            lora_b_out = module.lora_B[ADAPTER].forward_output
            for node in cast_nodes_of(lora_b_out, shared_b):
                node.register_prehook(lambda grads: per_use_db.append(grads[0].detach()))
        return hook

    def keep_output(module, inputs, output):
        module.forward_output = output

    handles = [loras[(i, "q_proj")].register_forward_hook(capture(i)) for i in users["q_proj"]]
    handles += [loras[(i, "q_proj")].lora_B[ADAPTER].register_forward_hook(keep_output) for i in users["q_proj"]]
    handles += [p.register_post_accumulate_grad_hook(lambda p, which=which: accumulated.append((which, p.grad.dtype)))
                for which, p in (("A", shared_a), ("B", shared_b))]
    ids = torch.randint(3, 100, (4, 16), generator=torch.Generator().manual_seed(5))
    model(input_ids=ids, labels=ids).loss.backward()
    for h in handles:
        h.remove()
    assert sorted(accumulated) == [("A", torch.float32), ("B", torch.float32)]  # once each, fp32

    # What arrived at the leaf: one bf16 gradient per use, added up in fp32.
    assert len(per_use_db) == len(users["q_proj"]) and {g.dtype for g in per_use_db} == {torch.bfloat16}
    exact_sum = torch.stack([g.double() for g in per_use_db]).sum(0)
    bf16_sum = per_use_db[0]
    for g in per_use_db[1:]:  # in the order the backward produced them
        bf16_sum = bf16_sum + g
    assert relative_error(shared_b.grad, exact_sum) < 1e-6
    assert relative_error(bf16_sum, exact_sum) > 1e-4  # what a bf16 sum would have lost

    # Against the definition, fp64: the gradient of B summed over the uses, and of A.
    scaling = ALPHA / R
    a, b = shared_a.detach().double(), shared_b.detach().double()
    want_da, want_db = torch.zeros_like(a), torch.zeros_like(b)
    for layer in users["q_proj"]:
        x64 = seen[layer]["x"].double().reshape(-1, a.shape[1])
        g64 = seen[layer]["g"].double().reshape(-1, b.shape[0])
        want_db += scaling * g64.T @ (x64 @ a.T)
        want_da += scaling * (g64 @ b).T @ x64
    assert relative_error(shared_b.grad, want_db) < BF16_REL
    assert relative_error(shared_a.grad, want_da) < BF16_REL


@pytest.fixture(scope="module")
def dtype_runs(tiny_model, tmp_path_factory) -> dict:
    """2-rank ZeRO-3 runs of the CLI on the bf16 tiny model (zero3_tiny.json: every parameter
    partitioned), each with fp32 and bf16 LoRA compute, one after another in one set of rank
    processes: LoRA-drop (sampling with the importance recorder, dropout 0.1, the rebuild with a
    tied shared LoRA, the main stage), ALLoRA, LoRAPrune; and a bf16-compute recipe on an fp32
    base, refused."""
    root = tmp_path_factory.mktemp("compute_dtype")
    variants = {"loradrop": [],
                "allora": ["lora.variant=allora", "lora.dropout=0.0", "lora.alpha=8"],
                "prune": ["prune.target_sparsity=0.5", "prune.every=2", "prune.start_fraction=0.0",
                          "prune.end_fraction=0.7", "prune.exempt_first_fraction=0", "prune.exempt_last=false"]}
    names, argvs = [], []
    for variant, extra in variants.items():
        for dtype in ("float32", "bfloat16"):
            names.append(f"{variant}_{dtype}")
            argvs.append(finished_run_args(tiny_model, root / names[-1], "model.dtype=bfloat16", "train.save_every=0",
                                           f"lora.compute_dtype={dtype}", *extra))
    # The bf16 LoRA-drop run again from its sampling stage's last checkpoint, in another output_dir:
    # the main stage is rebuilt on a fresh read of the base (train.rebuild), as after a kill.
    names.append("resumed")
    argvs.append(finished_run_args(tiny_model, root / "resumed", "model.dtype=bfloat16", "train.save_every=0",
                                   "lora.compute_dtype=bfloat16",
                                   f"resume={root / 'loradrop_bfloat16' / 'checkpoints' / 'sampling-step0000004'}"))
    names.append("refused")
    argvs.append(finished_run_args(tiny_model, root / "refused", "lora.compute_dtype=bfloat16"))
    procs = run_ranks_many(argvs, root / "logs", check=False)
    return {name: (root / name, proc) for name, proc in zip(names, procs, strict=True)}


def stage_losses(out, stage: str) -> list[float]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if r.get("stage") == stage and "loss" in r]


@pytest.mark.parametrize("variant", ["loradrop", "allora", "prune"])
def test_two_rank_runs_with_bf16_compute_stay_close_to_fp32_compute(dtype_runs, variant):
    (ref, ref_proc), (out, proc) = dtype_runs[f"{variant}_float32"], dtype_runs[f"{variant}_bfloat16"]
    assert ref_proc.returncode == 0 and proc.returncode == 0, proc.stderr[-3000:]
    selection, ref_selection = (json.loads((d / "selection.json").read_text()) for d in (out, ref))
    assert selection["kept"] == ref_selection["kept"] and selection["shared"], selection  # a tied LoRA trained
    if variant == "prune":  # the same amount pruned; a choice between near-equal scores may flip
        masks, ref_masks = (load_file(d / "prune" / "masks.safetensors") for d in (out, ref))
        assert masks.keys() == ref_masks.keys()
        assert all(int(masks[k].sum()) == int(ref_masks[k].sum()) < masks[k].numel() for k in masks)
        flipped = sum(int((masks[k] != ref_masks[k]).sum()) for k in masks)
        assert flipped <= RUN_MASK_FLIPS * sum(m.numel() for m in masks.values()), flipped

    for stage, steps in (("sampling", 4), ("main", 6)):
        losses, ref_losses = stage_losses(out, stage), stage_losses(ref, stage)
        assert len(losses) == len(ref_losses) == steps
        diffs = [abs(a - b) for a, b in zip(losses, ref_losses, strict=True)]
        assert max(diffs) < RUN_LOSS_ATOL, (stage, diffs)
        # The setting took effect in both stages: the main stage starts afresh (seeded, no warm
        # start) on the same selection, so had the rebuild left it out the main losses would be equal.
        assert max(diffs) > 0, stage

    weights, ref_weights = (load_file(d / "adapter" / "adapter_model.safetensors") for d in (out, ref))
    assert weights.keys() == ref_weights.keys()
    assert {w.dtype for w in weights.values()} == {torch.float32}  # the exported adapter: same format
    num = sum(float((weights[k].double() - ref_weights[k].double()).pow(2).sum()) for k in weights)
    den = sum(float(w.double().pow(2).sum()) for w in ref_weights.values())
    assert (num / den) ** 0.5 < RUN_ADAPTER_REL

    summary, ref_summary = (json.loads((d / "summary.json").read_text()) for d in (out, ref))
    assert abs(summary["final"]["eval_loss"] - ref_summary["final"]["eval_loss"]) < RUN_LOSS_ATOL


def test_bf16_compute_run_reloads_in_plain_peft_and_resumes_exactly(tiny_model, dtype_runs):
    """The adapter of a bf16-compute run is a plain fp32 PEFT adapter: peft (which computes
    LoRA in fp32) reproduces the run's probe logits to bf16 precision. Resumed from its
    sampling checkpoint, the main stage (LoRA injected again, on a fresh base) ends with the
    same adapter as the uninterrupted run: the setting is applied again by the rebuild (an
    fp32-compute main stage would differ by about RUN_ADAPTER_REL)."""

    out, _ = dtype_runs["loradrop_bfloat16"]
    assert_adapter_reproduces_run(tiny_model, out, tol=0.05, dtype="bfloat16", rtol=0.02)

    resumed, proc = dtype_runs["resumed"]
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resum" in proc.stderr.lower()
    weights, want = (load_file(d / "adapter" / "adapter_model.safetensors") for d in (resumed, out))
    assert weights.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(weights[name], want[name], rtol=1e-6, atol=1e-7, msg=name)


def test_bf16_compute_on_an_fp32_base_is_refused_on_every_rank(dtype_runs):
    _, proc = dtype_runs["refused"]
    assert proc.returncode == 2
    assert "set model.dtype=bfloat16 or lora.compute_dtype=float32" in proc.stderr
