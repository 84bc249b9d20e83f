"""LoRA on the model: injection with peft, the sampling-stage importance recorder, and
the tied shared LoRA of the main stage."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from typing import Optional

import torch
from torch import nn

from .config import SHARED_SCALES, LoraConfig
from .importance import ImportanceStats
from .model import decoder_layers, parse_layer_key

ADAPTER = "default"


def add_lora(model: nn.Module, cfg: LoraConfig, seed: int) -> nn.Module:
    """Wrap ``model`` with a peft LoRA on ``cfg.target_modules`` of every decoder layer
    (with ``cfg.variant=allora``, ALLoRA's gradient rescaling on each: ``allora.py``; with
    ``cfg.compute_dtype=bfloat16``, the LoRA matmuls in the base's dtype:
    :func:`run_lora_in_input_dtype`). Every LoRA of a run is injected here, the main stage's
    after the rebuild included, so the setting holds in both stages.

    Seeding here makes the initialisation identical on every rank (DeepSpeed also
    broadcasts rank 0's values when it partitions the new parameters).
    """
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    torch.manual_seed(seed)
    peft_config = PeftLoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=list(cfg.target_modules),
        bias="none",
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, peft_config)
    if cfg.compute_dtype != "float32":  # config.validate: bfloat16 only on a bfloat16 base
        run_lora_in_input_dtype(model)
    if cfg.variant == "allora":  # hooks on every LoRA layer; the adapter stays a plain peft LoRA
        from .allora import apply_allora

        apply_allora(model, cfg.allora_eta2)
    return model


class InputDtypeLinear(nn.Linear):
    """A LoRA ``lora_A``/``lora_B`` Linear whose fp32 weight is cast to its input's dtype at
    every use, so the matmul runs in the input's (the base's) dtype while the parameter, its
    gradient and everything DeepSpeed keeps of it stay fp32. :func:`run_lora_in_input_dtype`
    gives the existing modules this class (same instance, parameters and hooks).

    ``torch.nn.functional.linear`` is looked up at call time, as ``nn.Linear.forward`` does, so
    ZeRO-3's replacement of it (``zero3_linear_wrap``, ``memory_efficient_linear``, installed by
    ``zero.Init``: DeepSpeed 0.19.8 ``partition_parameters.py``) still applies. It saves the bf16
    copy of the weight for the input gradient (r x (in + out) per use, nothing per token) and,
    that copy not being a ZeRO parameter, never gathers it again.

    The gradient (read in torch 2.13 and DeepSpeed 0.19.8): ``weight.to(bf16)``'s backward,
    ``ToCopyBackward0``, keeps only the source's dtype and device
    (``include/torch/csrc/autograd/generated/Functions.h``) and returns each use's weight gradient
    in fp32. For the tied shared LoRA, whose weight many layers use, autograd's ``InputBuffer``
    (``autograd/input_buffer.h``: it adds up every gradient arriving at a node before the node
    runs) therefore sums the uses in fp32, at the leaf, and ``AccumulateGrad`` runs once per
    backward with that sum. ZeRO-3's gradient hook (``stage3.create_reduce_and_remove_grad_hooks``
    -> ``utils/torch.register_grad_hook`` = ``register_post_accumulate_grad_hook``) thus sees one
    fp32 gradient per parameter per backward, as with fp32 compute; its per-module backward
    functions (``parameter_offload._pre_backward_module_hook``/``_post_backward_module_hook``)
    wrap the module's input and output tensors, not its weight, so the cast between weight and
    matmul changes nothing there (tests/test_compute_dtype.py). Each use's gradient is a bf16
    matmul's output, rounded to bf16 once (the kernels accumulate in fp32; on CUDA, cuBLAS may add
    split-K partial sums in bf16 unless ``torch.backends.cuda.matmul.
    allow_bf16_reduced_precision_reduction`` is off).

    Why not adapters stored in bf16 (with DeepSpeed's fp32 master copy): autograd would add the
    k uses of a shared LoRA in bf16, one rounding of the running sum per use (4e-3 relative error
    over 23 uses in the test, against 1e-8 for the fp32 sum), and the parameter dtype that ZeRO-3
    partitions, reduces, checkpoints and exports would change; the per-use cast changes none of it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return nn.functional.linear(x, self.weight.to(x.dtype), bias)


def run_lora_in_input_dtype(model: nn.Module) -> int:
    """``lora.compute_dtype=bfloat16``: every peft LoRA layer of ``model`` runs its adapter in
    the dtype of the layer's input (the base's bf16) instead of casting the input up to the
    adapter's fp32 (peft 0.21.2 ``tuners/lora/layer.py`` ``Linear.forward`` calls
    ``self._cast_input_dtype(x, lora_A.weight.dtype)``, which returns x unchanged when the
    layer's ``cast_input_dtype_enabled`` is false: ``tuners_utils.BaseTunerLayer``). Its
    dropout, both matmuls, the scaling and the sum with the base output then run in bf16,
    and the LoRA saves no fp32 copy of its input for the backward. The adapter parameters
    stay fp32 (:class:`InputDtypeLinear`). Call before ``deepspeed.initialize``. Returns the
    number of LoRA layers changed."""
    from peft.tuners.lora import LoraLayer

    count = 0
    for name, layer in model.named_modules():
        if not isinstance(layer, LoraLayer):
            continue
        for linear in (*layer.lora_A.values(), *layer.lora_B.values()):
            if type(linear) not in (nn.Linear, InputDtypeLinear):
                raise ValueError(f"lora.compute_dtype=bfloat16 supports LoRA on Linear layers; {name} has a "
                                 f"{type(linear).__name__} adapter")
            linear.__class__ = InputDtypeLinear
        layer.cast_input_dtype_enabled = False
        count += 1
    return count


def lora_layers(model: nn.Module, module_names: list[str]) -> dict[tuple[int, str], nn.Module]:
    """``{(layer index, module type): peft LoRA layer}`` for every target module."""
    from peft.tuners.lora import LoraLayer

    found: dict[tuple[int, str], nn.Module] = {}
    for name, module in model.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        key = parse_layer_key(name)
        if key is not None and not key.rest and key.module in module_names:
            found[(key.layer, key.module)] = module
    num_layers = len(decoder_layers(model))
    expected = {(i, mod) for i in range(num_layers) for mod in module_names}
    if set(found) != expected:
        missing = sorted(expected - set(found))[:5]
        raise ValueError(f"LoRA modules missing for (layer, module) {missing}")
    return found


class WeightGradTap(torch.autograd.Function):
    """Identity on a Linear's output whose backward hands that Linear's weight gradient for
    this micro-batch, ``g^T x`` (summed over tokens; padding positions carry no loss, so no
    gradient), to ``add(key, grad)``: the grad_norm recorder here and LoRAPrune's Pruner. Under
    ZeRO-3 a parameter's ``.grad`` is reduce-scattered (and, for a tied LoRA, summed over its
    uses) before anything could read it, so the per-use gradient is formed from activations.

    ``x`` is kept with ``save_for_backward``, so autograd owns it: without checkpointing it is
    the very tensor the Linear saved anyway (no extra memory), and under non-reentrant
    activation checkpointing it is dropped after the forward and recomputed for the backward
    like every other saved tensor. (A closure holding ``x`` until the backward would keep every
    LoRA input of the step alive: about 90 GB per GPU on the 70B recipe.) The tap must then be
    applied in the recomputed forward too, or the recomputation saves fewer tensors than the
    original and torch.utils.checkpoint refuses; the backward runs through the original
    forward's graph only, so each micro-batch is counted once."""

    @staticmethod
    def forward(ctx, output, x, add, key):
        ctx.save_for_backward(x)
        ctx.add, ctx.key = add, key
        return output.view_as(output)

    @staticmethod
    def backward(ctx, grad_out):
        (x,) = ctx.saved_tensors
        ctx.add(ctx.key, torch.einsum("...o,...i->oi", grad_out.float(), x.float()))
        return grad_out, None, None, None


class ImportanceRecorder:
    """Forward hooks that add up ``||scaling * B(A(x))||^2`` per (layer, module).

    Only forwards run inside :meth:`recording` count toward the output norms, and only at
    the positions of real tokens (``token_mask``). Activation checkpointing recomputes
    forwards during backward; those happen outside ``recording`` and are not counted twice. The sums
    stay on the accelerator (no host sync per hook); call :meth:`remove` after the
    sampling stage so the main stage pays nothing.

    With ``record_grads`` (the ``grad_norm`` baseline) it also adds, per micro-batch, the
    squared Frobenius norm of the LoRA weights' gradient, ``||dL/dA||^2 + ||dL/dB||^2``,
    to ``stats.grad_sq_sums``. The gradients are formed from activations in the backward of
    an identity autograd Function on each LoRA Linear's output (:class:`WeightGradTap`:
    ``dL/dB = g_y^T h`` at B's output y = B h, ``dL/dA = g_h^T x`` at A's output h = A x),
    because under ZeRO-3 a parameter's ``.grad`` is reduce-scattered away before anything
    could read it. The tap is applied in every grad-enabled forward, recomputations
    included, so that under (non-reentrant) activation checkpointing the recomputed forward
    saves the same tensors as the original; the backward runs through the original forward's
    graph only, so each micro-batch counts once.
    """

    def __init__(self, model: nn.Module, module_names: list[str], device: torch.device | str,
                 record_grads: bool = False):
        self.module_names = list(module_names)
        layers = lora_layers(model, self.module_names)
        num_layers = 1 + max(i for i, _ in layers)
        self.stats = ImportanceStats.zeros(num_layers, self.module_names, device=device)
        self._mask: Optional[torch.Tensor] = None
        self._handles = []
        for (layer, module_name), lora_layer in layers.items():
            col = self.module_names.index(module_name)
            scaling = float(lora_layer.scaling[ADAPTER])
            hook = self._make_hook(layer, col, scaling)
            self._handles.append(lora_layer.lora_B[ADAPTER].register_forward_hook(hook))
            if record_grads:
                for linear in (lora_layer.lora_A[ADAPTER], lora_layer.lora_B[ADAPTER]):
                    self._handles.append(linear.register_forward_hook(self._make_grad_hook(layer, col)))

    def _make_hook(self, layer: int, col: int, scaling: float):
        def hook(_module, _inputs, output):
            if self._mask is None:
                return
            # output = B(A(dropout(x))), [batch, seq, out]; the LoRA output is scaling * output.
            per_token = output.detach().float().pow(2).sum(dim=-1)
            sq = (per_token * self._mask).sum(dtype=torch.float64) * (scaling * scaling)
            self.stats.add(layer, col, sq, self._tokens)

        return hook

    def _make_grad_hook(self, layer: int, col: int):
        def hook(_module, inputs, output):
            if not torch.is_grad_enabled() or not output.requires_grad:
                return None  # evaluation
            return WeightGradTap.apply(output, inputs[0], self._add_grad_sq, (layer, col))

        return hook

    def _add_grad_sq(self, key: tuple[int, int], weight_grad: torch.Tensor) -> None:
        self.stats.grad_sq_sums[key] += weight_grad.pow(2).sum(dtype=torch.float64)

    @contextlib.contextmanager
    def recording(self, token_mask: torch.Tensor) -> Iterator[None]:
        """Count the forwards run inside this block; ``token_mask`` is [batch, seq]."""
        self._mask = token_mask.to(torch.float32)
        self._tokens = token_mask.sum().to(torch.float64)
        try:
            yield
        finally:
            self._mask = None
            self._tokens = None

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


def lora_param_scores(model: nn.Module, module_names: list[str]) -> torch.Tensor:
    """``[num_layers, num_modules]`` float64: ``||scaling * B A||_F^2`` of every LoRA (the
    ``param_norm`` baseline), from ``trace((B^T B)(A A^T))``, never forming BA. Under ZeRO-3
    each LoRA's weights are gathered for the computation (a collective: every rank calls
    this; outside ZeRO-3 the gather does nothing), so every rank gets the same result."""
    from .engine import gathered

    layers = lora_layers(model, list(module_names))
    num_layers = 1 + max(i for i, _ in layers)
    scores = torch.zeros(num_layers, len(module_names), dtype=torch.float64)
    for (layer, module_name), lora_layer in sorted(layers.items()):
        a, b = lora_layer.lora_A[ADAPTER].weight, lora_layer.lora_B[ADAPTER].weight
        with gathered([a, b]), torch.no_grad():
            a64, b64 = a.detach().double().cpu(), b.detach().double().cpu()
            value = torch.trace((b64.T @ b64) @ (a64 @ a64.T)) * float(lora_layer.scaling[ADAPTER]) ** 2
        scores[layer, module_names.index(module_name)] = value
    return scores


def tie_shared_lora(model: nn.Module, plan: dict[tuple[int, str], bool], train_shared: bool) -> dict[str, list[int]]:
    """Make every (layer, module) that the plan does not keep use one shared LoRA per
    module type.

    The shared LoRA is the A and B weights of the first shared layer; every other shared
    layer's ``lora_A``/``lora_B`` modules are kept but their ``weight`` becomes that same
    ``nn.Parameter``. Autograd adds the gradients of every use, the optimizer sees each
    parameter once, and ``state_dict`` writes it under every layer that uses it (the
    standard, materialised PEFT adapter). Must run before ``deepspeed.initialize`` so
    ZeRO-3 partitions each shared parameter once.

    Why the parameter and not the module: ZeRO-3 registers its four hooks on every module
    it visits, and its registration (``parameter_offload._register_deepspeed_module``,
    DeepSpeed 0.19.8) does not de-duplicate, so one ``nn.Linear`` placed in k layers got
    4k hooks, all firing at each of its k uses. Separate modules that share a parameter
    keep 4 hooks each, like a kept LoRA: a shared LoRA costs each of its uses what a kept
    one costs. With the "auto" persistence threshold (``engine.zero3_auto_values``) the
    shared weights also stay resident instead of being gathered at every use.

    Returns ``{module type: [layers sharing it]}``.
    """
    module_names = sorted({m for _, m in plan})
    layers = lora_layers(model, module_names)
    shared_users: dict[str, list[int]] = {}
    for (layer, module_name), keep in sorted(plan.items()):
        if keep:
            continue
        shared_users.setdefault(module_name, []).append(layer)
    for module_name, users in shared_users.items():
        owner = layers[(users[0], module_name)]
        shared_a, shared_b = owner.lora_A[ADAPTER].weight, owner.lora_B[ADAPTER].weight
        for layer in users[1:]:
            target = layers[(layer, module_name)]
            target.lora_A[ADAPTER].weight = shared_a
            target.lora_B[ADAPTER].weight = shared_b
        if not train_shared:
            shared_a.requires_grad_(False)
            shared_b.requires_grad_(False)
    return shared_users


def strip_lora(model: nn.Module) -> nn.Module:
    """The base model of a peft LoRA model, with every LoRA layer removed and nothing
    merged (peft's ``unload``): under ZeRO-3 its frozen parameters stay partitioned, so
    the main stage can be built on the sampling stage's base without reading it again.
    Call after the model's engine is released (``deepspeed_private.release_engine(keep_model=True)``)."""
    base = model.unload()
    # peft re-registers its input-embedding hook (for activation checkpointing) on the
    # next wrap; drop the old one so the rebuilt model has exactly the hooks of a fresh one.
    if hasattr(base, "disable_input_require_grads"):
        base.disable_input_require_grads()
    return base


def build_main_lora(base: nn.Module, cfg: LoraConfig, seed: int, plan: Optional[dict[tuple[int, str], bool]],
                    train_shared: bool, warm_state: Optional[dict[str, torch.Tensor]] = None,
                    shared_scale: str = "none") -> tuple[nn.Module, dict]:
    """The main stage's LoRA on ``base`` (fresh from disk, or the sampling stage's base
    after :func:`strip_lora`): fresh LoRA everywhere (seeded), kept LoRAs optionally
    warm-started from ``warm_state``, and, with a ``plan``, the shared LoRA tied in, each
    of its uses with its own learned gain when ``shared_scale`` is "scalar" or "vector"
    (:func:`add_shared_gains`). Returns ``(peft model, {module type: shared layers})``.
    ``shared_scale`` and its pairing with ``train_shared`` are checked with the recipe
    (``config.validate``), before any training."""
    model = add_lora(base, cfg, seed)
    shared_users: dict[str, list[int]] = {}
    if plan is not None:
        if warm_state is not None:
            warm_start_kept(model, warm_state, plan)
        shared_users = tie_shared_lora(model, plan, train_shared)
        add_shared_gains(model, shared_users, shared_scale)
    return model, shared_users


# ------------------------------------------------------- per-use gains of the shared LoRA

GAIN = "loradrop_gain"  # the gain's parameter name on a shared use's lora_A module
# Keys of ``adapter_io.gather_lora_state``'s result that are not PEFT weights (no "lora_" in
# them): the gains and the unscaled shared B, written next to the adapter in GAINS_FILE.
EXTRA_PREFIX = "loradrop."
GAINS_FILE = "loradrop_shared_scale.safetensors"


def _apply_gain(module: nn.Module, _inputs, output: torch.Tensor) -> torch.Tensor:
    """Forward hook on a shared use's ``lora_A``: ``A x`` ([..., r]) times its gain."""
    return output * getattr(module, GAIN).to(output.dtype)


def add_shared_gains(model: nn.Module, shared_users: dict[str, list[int]], shared_scale: str) -> dict:
    """Give every shared use (every (layer, module) in ``shared_users``) its own learned
    gain g, initialised to 1, so that use computes ``scaling * B diag(g) A x`` ("vector",
    g of size r) or ``g * scaling * B A x`` ("scalar"); kept LoRAs get none. Returns
    ``{(layer, module): gain parameter}`` ({} for "none").

    The gain is an fp32 ``nn.Parameter`` named :data:`GAIN` on that use's own ``lora_A``
    Linear (not shared: each use has its own module), applied by a forward hook on that
    module (``_apply_gain``). Must run before ``deepspeed.initialize``. Checked against
    DeepSpeed 0.19.8 (``runtime/zero/parameter_offload.py``, ``partitioned_param_coordinator.py``):

    * ``_convert_to_zero_parameters`` converts every not-yet-ZeRO parameter of the model
      (the gain included) when the engine is built, so ZeRO-3 partitions it with the
      module's other parameters (under the "auto" ``stage3_param_persistence_threshold``
      it is far below the threshold and stays resident; an explicit config such as
      ``ds_configs/zero3_tiny.json``, threshold 0, partitions it).
    * ``_register_deepspeed_module`` adds, per module, a forward pre-hook that fetches
      ``iter_params(module, recurse=False)`` (the module's direct parameters: ``weight``
      and the gain) and, after it, forward hooks that release them
      (``_post_forward_module_hook``) and that wrap the outputs in
      ``PreBackwardFunctionForModule`` (``_pre_backward_module_hook``). None uses
      ``prepend``; torch runs forward hooks in registration order, each later hook seeing
      the output an earlier one returned. Ours is registered first (here, before the
      engine), so it runs while the gain is gathered, and DeepSpeed's pre-backward
      function wraps the gained output: in backward it re-fetches the module's
      parameters (gain included) before the multiplication's and the Linear's backward
      read them, and the post-backward function on the inputs releases them after.
    """
    if shared_scale == "none" or not shared_users:
        return {}
    if shared_scale not in SHARED_SCALES:  # config.validate checks a recipe's; this, export.load_compact's sharing map
        raise ValueError(f"shared_scale must be one of {SHARED_SCALES}, got {shared_scale!r}")
    layers = lora_layers(model, sorted(shared_users))
    gains: dict[tuple[int, str], nn.Parameter] = {}
    for module_name, users in sorted(shared_users.items()):
        for layer in users:
            lora_a = layers[(layer, module_name)].lora_A[ADAPTER]
            if GAIN in lora_a._parameters:
                raise ValueError(f"layer {layer} {module_name} already has a shared-LoRA gain")
            size = shared_gain_numel(shared_scale, lora_a.out_features)
            gain = nn.Parameter(torch.ones(size, dtype=torch.float32, device=lora_a.weight.device))
            lora_a.register_parameter(GAIN, gain)
            lora_a.register_forward_hook(_apply_gain)
            gains[(layer, module_name)] = gain
    return gains


def shared_gain_numel(shared_scale: str, r: int) -> int:
    """The parameters of one shared use's gain (loradrop.shared_scale): none, one, or one per rank."""
    return {"none": 0, "scalar": 1, "vector": r}[shared_scale]


def scaled_b(b: torch.Tensor, gain: torch.Tensor) -> torch.Tensor:
    """``B diag(g)`` (column j times g[j]; a scalar gain scales all of B), in fp32, in B's dtype."""
    return (b.float() * gain.float()).to(b.dtype)


def bake_shared_gains(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``named_parameters`` copies of the LoRA tensors (``remove_duplicate=False``) to the
    materialised PEFT form: each shared use's gain baked into its own B
    (``B_layer = B_shared diag(g_layer)``, so plain peft computes exactly what the tied model
    with gains does) and the gain keys removed; the gains and the unscaled shared B are kept
    under :data:`EXTRA_PREFIX` keys (``loradrop.gain.{layer}.{module}``,
    ``loradrop.shared.{module}.lora_B.weight``) for the compact export. No gains: unchanged."""
    suffix = f".lora_A.{ADAPTER}.{GAIN}"
    if not any(k.endswith(suffix) for k in state):
        return state
    out = {k: v for k, v in state.items() if not k.endswith(suffix)}
    for key, gain in state.items():
        if not key.endswith(suffix):
            continue
        prefix = key[:-len(suffix)]  # the LoRA layer's module path
        b_key = f"{prefix}.lora_B.{ADAPTER}.weight"
        key = parse_layer_key(prefix)
        layer, module = key.layer, key.module
        out[b_key] = scaled_b(state[b_key], gain)
        out[f"{EXTRA_PREFIX}gain.{layer}.{module}"] = gain
        out.setdefault(f"{EXTRA_PREFIX}shared.{module}.lora_B.weight", state[b_key])
    return out


def warm_start_kept(model: nn.Module, warm_state: dict[str, torch.Tensor], plan: dict[tuple[int, str], bool]) -> None:
    """Copy sampling-stage LoRA weights (``gather_lora_state`` names) into the kept
    (layer, module) pairs of a fresh model; shared ones keep their fresh initialisation.
    Call before tying and before DeepSpeed partitions the model (plain copies)."""
    layers = lora_layers(model, sorted({m for _, m in plan}))
    names = {id(p): n for n, p in model.named_parameters(remove_duplicate=False)}
    with torch.no_grad():
        for key, keep in plan.items():
            if not keep:
                continue
            for ab in (layers[key].lora_A[ADAPTER], layers[key].lora_B[ADAPTER]):
                name = names[id(ab.weight)]
                if name not in warm_state:
                    raise KeyError(f"warm start: no sampling-stage weight for {name}")
                ab.weight.copy_(warm_state[name])


def adapter_as_module_state(adapter_dir) -> dict[str, torch.Tensor]:
    """A saved PEFT adapter's weights keyed like ``gather_lora_state`` (with the adapter name)."""
    from pathlib import Path

    from safetensors.torch import load_file

    weights = load_file(Path(adapter_dir) / "adapter_model.safetensors")
    return {re.sub(r"\.(lora_[AB])\.weight$", rf".\1.{ADAPTER}.weight", k): v for k, v in weights.items()}


def trainable_parameter_count(model: nn.Module) -> int:
    """Trainable elements, each shared parameter counted once (``parameters()`` dedups).
    Works under ZeRO-3, where a partitioned parameter's full size is ``ds_numel``."""
    return sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters() if p.requires_grad)
