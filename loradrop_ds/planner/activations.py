"""Activation memory of one micro-batch: the bytes per token a LLaMA decoder layer with a frozen
base and LoRA saves for backward (Korthikanti et al. 2022's method, each term from the
transformers / peft forward code), the backward's workspace, and the peak with and without
activation checkpointing."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from .run_spec import RunSpec
from .units import DTYPE_BYTES


def _mask_bytes_per_element(spec: RunSpec) -> int:
    """Bytes of a dropout mask element. On CUDA, dropout uses the fused ``native_dropout``
    kernel and saves a bool mask (ATen Dropout.cpp ``is_fused_kernel_acceptable``); on CPU
    it multiplies by a noise tensor of the input's dtype and saves that (``_dropout_impl``)."""
    return 1 if spec.device == "cuda" else DTYPE_BYTES[spec.lora_dtype]


# Inputs that several LoRA modules of a LLaMA layer share (when nothing copies them).
_SHARED_INPUT = {"q_proj": "attention input", "k_proj": "attention input", "v_proj": "attention input",
                 "o_proj": "attention output", "gate_proj": "mlp input", "up_proj": "mlp input",
                 "down_proj": "mlp product"}


def lora_activation_bytes_per_token(spec: RunSpec) -> int:
    """Bytes per token that the LoRA modules of one layer save (peft lora.Linear.forward:
    ``lora_B(lora_A(dropout(x_cast))) * scaling``, where ``x_cast = x.to(lora_A.weight.dtype)``).

    A and B are trainable, so each saves its input: A the dropout output (or the cast input,
    without dropout), B the rank-r output of A. Dropout also saves its mask. Every module
    casts and drops out its own copy; only when there is neither a cast nor dropout do
    modules share their saved input, and then the attention output is the one flash/sdpa
    already saves.
    """
    a, lb = DTYPE_BYTES[spec.dtype], DTYPE_BYTES[spec.lora_dtype]
    total = 0
    shared_inputs: dict[str, int] = {}
    for module in spec.target_modules:
        in_features, _ = spec.model.target_shapes[module]
        total += spec.lora_r * lb  # A's output, saved by B
        if spec.lora_dropout > 0:
            total += (lb + _mask_bytes_per_element(spec)) * in_features
        elif lb != a:
            total += lb * in_features  # the cast copy, one per module
        else:
            shared_inputs[_SHARED_INPUT.get(module, module)] = a * in_features
    if spec.attn_implementation != "eager":
        shared_inputs.pop("attention output", None)  # the flash/sdpa output itself
    return total + sum(shared_inputs.values())


def layer_activation_bytes_per_token(spec: RunSpec) -> int:
    """Bytes per token one LLaMA decoder layer saves for backward, base frozen, LoRA on
    ``target_modules`` (Korthikanti et al. 2022's method; each term from the forward code).
    A frozen linear saves nothing for its own backward (its input gradient needs only the
    weight), so unlike the paper's 34 s b h the base matmuls' inputs do not appear.

    * RMSNorm x2 (LlamaRMSNorm.forward): the fp32 copy of the input, saved by ``pow`` and
      ``mul`` (4 h), and ``rsqrt`` per token (4).
    * Attention (flash-attn / sdpa): query, key, value, output and the fp32 log-sum-exp per
      head; no s x s matrix. sdpa and eager get a mask (every batch here has padding or
      packed position ids), so transformers repeats key/value to all heads
      (``use_gqa_in_sdpa`` needs mask None) and the float mask is saved (a * s per token).
      eager also saves the fp32 softmax and its cast: (4 + a) * heads * s per token.
    * SwiGLU MLP: ``silu`` saves its input, ``mul`` saves both factors: 3 a f.
    * LoRA: ``lora_activation_bytes_per_token``.
    """
    model, a = spec.model, DTYPE_BYTES[spec.dtype]
    h, f = model.hidden_size, model.intermediate_size
    q_width = model.num_heads * model.head_dim
    kv_width = model.num_kv_heads * model.head_dim if spec.attn_implementation == "flash_attention_2" else q_width
    norms = 2 * (4 * h + 4)
    attention = a * (2 * q_width + 2 * kv_width) + 4 * model.num_heads
    if spec.attn_implementation != "flash_attention_2":
        attention += a * spec.seq_len
    if spec.attn_implementation == "eager":
        attention += (4 + a) * model.num_heads * spec.seq_len
    mlp = 3 * a * f
    return norms + attention + mlp + lora_activation_bytes_per_token(spec)


def backward_workspace_bytes_per_token(spec: RunSpec) -> int:
    """Gradients alive at once while one layer's backward runs: in the SwiGLU MLP the
    gradients of the product, of silu(gate) and of up (3 a f), plus the LoRA branch's input
    gradient in the adapter dtype before it joins the base one (lb * widest LoRA input)."""
    a, lb = DTYPE_BYTES[spec.dtype], DTYPE_BYTES[spec.lora_dtype]
    widest = max(in_features for in_features, _ in spec.model.target_shapes.values())
    return 3 * a * spec.model.intermediate_size + lb * widest


@dataclass(frozen=True)
class Activations:
    """Activation bytes of one micro-batch at its peak, and the parts of that peak."""

    tokens: int
    stored_layers: int  # what the forward keeps per layer (all of it, or the checkpointed inputs)
    recomputed_layer: int  # one layer's saved tensors, rebuilt in backward (checkpointing only)
    workspace: int  # gradients of the layer being back-propagated
    head: int  # final norm + the logits the training loop holds through backward
    loss: int  # the fp32 loss: log-softmax output and its backward's gradients

    @property
    def peak(self) -> int:
        return self.stored_layers + self.head + max(self.loss, self.recomputed_layer + self.workspace)


def activation_estimate(spec: RunSpec, checkpointing: Optional[bool] = None) -> Activations:
    """Peak activation bytes of one micro-batch of ``micro_batch_size x seq_len`` tokens
    (with packing every row is full; without, rows pad to the longest in the batch, so this
    is an upper bound).

    * Without checkpointing every layer keeps its saved tensors to the end of the forward.
    * With (non-reentrant) checkpointing, torch.utils.checkpoint keeps only each layer's
      input hidden states (a h per token) and rebuilds one layer's tensors at a time in
      backward (Korthikanti et al. 2022: full recomputation stores 2 s b h bytes per layer
      in 16-bit).
    * Head: the final RMSNorm's fp32 copy (4 h) and the logits (a V), which the training
      loop holds through backward (``out = engine(**batch)`` in training.TrainingStage).
    * Loss (transformers loss_utils.ForCausalLMLoss): logits upcast to fp32, cross_entropy =
      log_softmax (saves its fp32 output, 4 V) + nll; its backward makes two fp32 gradients
      of that size: 12 V per token at the loss's backward, when every stored layer is alive.
    """
    ckpt = spec.gradient_checkpointing if checkpointing is None else checkpointing
    model, a, tokens = spec.model, DTYPE_BYTES[spec.dtype], spec.tokens_per_micro_batch
    layer = layer_activation_bytes_per_token(spec) * tokens
    mask = a * spec.seq_len * tokens if spec.attn_implementation != "flash_attention_2" else 0
    if ckpt:
        stored = model.num_layers * a * model.hidden_size * tokens + mask
        recomputed = layer
    else:
        stored, recomputed = model.num_layers * layer, 0
    head = (4 * model.hidden_size + 4) * tokens + a * model.vocab_size * tokens
    return Activations(tokens=tokens, stored_layers=stored, recomputed_layer=recomputed,
                       workspace=backward_workspace_bytes_per_token(spec) * tokens, head=head,
                       loss=12 * model.vocab_size * tokens)
