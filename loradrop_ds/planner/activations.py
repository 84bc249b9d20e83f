"""Activation memory of one micro-batch: every storage a LLaMA decoder layer with a frozen base
and LoRA saves for backward (Korthikanti et al. 2022's method, each term read from the
transformers / peft / DeepSpeed / Liger forward code), the head and the loss, the backward's
workspace, and the peak with and without activation checkpointing.

Counted as the run really executes under ZeRO-3, and checked against it: tests/test_planner.py
runs the project's own path (zero.Init, peft, the DeepSpeed engine) on one CPU rank and compares
these figures with the storages autograd saves and with the allocator's peak."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional

from .run_spec import RunSpec
from .units import DTYPE_BYTES

# The input each Linear of a LLaMA decoder layer reads: the storages several of them share.
LINEAR_INPUTS = {"q_proj": "attention input", "k_proj": "attention input", "v_proj": "attention input",
                 "o_proj": "attention output", "gate_proj": "mlp input", "up_proj": "mlp input",
                 "down_proj": "mlp product"}


def _mask_bytes_per_element(spec: RunSpec) -> int:
    """Bytes of a dropout mask element. On CUDA, dropout uses the fused ``native_dropout``
    kernel and saves a bool mask (ATen Dropout.cpp ``is_fused_kernel_acceptable``); on CPU
    it multiplies by a noise tensor of the input's dtype and saves that (``_dropout_impl``)."""
    return 1 if spec.device == "cuda" else DTYPE_BYTES[spec.compute_dtype]


def _input_widths(spec: RunSpec) -> dict[str, int]:
    model = spec.model
    return {"attention input": model.hidden_size, "attention output": model.num_heads * model.head_dim,
            "mlp input": model.hidden_size, "mlp product": model.intermediate_size}


def _norm_bytes(spec: RunSpec) -> int:
    """One RMSNorm's saved bytes per token. transformers' LlamaRMSNorm: ``hidden.to(float32)``,
    saved by ``pow`` and ``mul`` (4 h; the input itself when it already is fp32), and the fp32
    ``rsqrt`` (4). Liger's LigerRMSNormFunction (ops/rms_norm.py, 0.8.5): the input X as it
    comes (a h) and the fp32 RSTD (4)."""
    h = spec.model.hidden_size
    return (DTYPE_BYTES[spec.dtype] * h if spec.liger else 4 * h) + 4


def norm_saves_layer_input(spec: RunSpec) -> bool:
    """Whether the input RMSNorm's saved tensor is the layer's input itself (Liger saves X as is;
    transformers' fp32 cast is a no-op on an fp32 base). Under checkpointing that storage is the
    one torch.utils.checkpoint keeps, so the recomputed layer does not hold it twice."""
    return spec.liger or DTYPE_BYTES[spec.dtype] == 4


def layer_saved_tensors(spec: RunSpec, input_requires_grad: bool = True) -> dict[str, int]:
    """Bytes per token of every storage one decoder layer saves for backward, by name; storages
    that several ops save (a shared input) appear once.

    ``input_requires_grad`` is False for the first layer: the embedding is frozen and nothing
    makes its output require a gradient (transformers' ``enable_input_require_grads`` is not
    called), so ops on the layer's input alone save nothing: the input RMSNorm, the frozen q/k/v
    and the attention-input dropout masks. The LoRA A of q/k/v still saves its input (for A's own
    weight gradient).

    * RMSNorm x2: ``_norm_bytes``.
    * Attention (flash-attn / sdpa): query, key, value, output and the fp32 log-sum-exp per head;
      no s x s matrix. sdpa gets a mask (every batch here has padding or packed position ids), so
      transformers repeats key/value to all heads (``use_gqa_in_sdpa`` needs mask None) and the
      kernel saves the mask it converted to the query's dtype (a s). The output is what o_proj
      reads: flash-attn and the sdpa kernels return it in [b, s, heads, d] layout, so
      ``transpose(1, 2).contiguous()`` copies nothing (measured on CPU). eager (key/value
      repeated too) saves query, key, value, the fp32 softmax and its cast, (4 + a) heads s, and
      its ``matmul`` output is copied for o_proj. RoPE (transformers' or Liger's) saves only
      cos/sin, shared by every layer (not counted).
    * SwiGLU MLP: ``silu`` saves its input and ``mul`` both factors: 3 a f. Liger's
      LigerSiLUMulFunction saves the two factors only (2 a f) and recomputes silu in backward.
    * Frozen Linears, with ``memory_efficient_linear`` (DeepSpeed's LinearFunctionForZeroStage3):
      each saves its input when that input requires a gradient: the attention input, the mlp
      input and the mlp product (the attention output is the kernel's saved output). Without it
      torch's linear saves only the weight (a parameter, not counted here).
    * LoRA (peft lora.Linear: ``lora_B(lora_A(dropout(x.to(compute dtype)))) * scaling``): B saves
      A's rank-r output; with dropout, the dropout output (saved by A) and its mask; without
      dropout but with a cast (fp32 compute on a bf16 base), the cast copy, one per module; with
      neither, A saves x itself, the storage the frozen Linear reads.
    """
    model, a, c = spec.model, DTYPE_BYTES[spec.dtype], DTYPE_BYTES[spec.compute_dtype]
    widths = _input_widths(spec)
    q_width = model.num_heads * model.head_dim
    kv_width = model.num_kv_heads * model.head_dim if spec.attn_implementation == "flash_attention_2" else q_width
    saved: dict[str, int] = {}
    if input_requires_grad:
        saved["input norm"] = _norm_bytes(spec)
    saved["post-attention norm"] = _norm_bytes(spec)
    if spec.attn_implementation == "eager":
        saved["attention q, k, v"] = a * (q_width + 2 * kv_width)
        saved["attention softmax (fp32 and cast)"] = (4 + a) * model.num_heads * spec.seq_len
    else:
        saved["attention q, k, v, output, log-sum-exp"] = a * (2 * q_width + 2 * kv_width) + 4 * model.num_heads
    if spec.attn_implementation == "sdpa":
        saved["attention mask (kernel's copy)"] = a * spec.seq_len
    saved["mlp"] = (2 if spec.liger else 3) * a * model.intermediate_size

    def linear_input(name: str) -> None:  # a Linear's input, saved as it is
        if name == "attention output" and spec.attn_implementation != "eager":
            return  # the attention kernel's saved output
        saved[name] = a * widths[name]

    if spec.zero.memory_efficient_linear:
        for name in ("attention input", "attention output", "mlp input", "mlp product"):
            if name != "attention input" or input_requires_grad:
                linear_input(name)
    for module in spec.target_modules:
        in_features, _ = spec.model.target_shapes[module]
        name = LINEAR_INPUTS[module]
        saved[f"{module}: LoRA A output"] = spec.lora_r * c
        if spec.lora_dropout > 0:
            saved[f"{module}: dropout output"] = c * in_features
            if input_requires_grad or name != "attention input":  # a mask only where a gradient flows back
                saved[f"{module}: dropout mask"] = _mask_bytes_per_element(spec) * in_features
        elif c != a:
            saved[f"{module}: cast input"] = c * in_features
        else:
            linear_input(name)
    return saved


def layer_activation_bytes_per_token(spec: RunSpec, input_requires_grad: bool = True) -> int:
    """Bytes per token one decoder layer saves for backward (``layer_saved_tensors``, summed)."""
    return sum(layer_saved_tensors(spec, input_requires_grad).values())


def lora_activation_bytes_per_token(spec: RunSpec) -> int:
    """The LoRA modules' share of a layer's saved bytes per token: the layer with LoRA less the
    layer without it (so a shared input counts for LoRA only where nothing else saves it)."""
    without = replace(spec, target_modules=())
    return layer_activation_bytes_per_token(spec) - layer_activation_bytes_per_token(without)


def lora_weight_cast_bytes_per_layer(spec: RunSpec) -> int:
    """Bytes per layer (not per token) of the adapters' weights cast to the compute dtype for
    each use, which autograd saves for the input gradient: A (r x in) and B (out x r) per module,
    when the LoRA matmuls run in another dtype than the adapters are stored in
    (``lora.compute_dtype=bfloat16`` over fp32 adapters)."""
    if spec.compute_dtype == spec.lora_dtype:
        return 0
    c = DTYPE_BYTES[spec.compute_dtype]
    return sum(c * spec.lora_r * (i + o) for i, o in (spec.model.target_shapes[m] for m in spec.target_modules))


def head_saved_bytes_per_token(spec: RunSpec) -> int:
    """The final RMSNorm's saved bytes, and lm_head's input where DeepSpeed's linear saves it
    (not with Liger's fused linear cross-entropy, which reads lm_head's weight itself)."""
    a = DTYPE_BYTES[spec.dtype]
    mel_input = a * spec.model.hidden_size if spec.zero.memory_efficient_linear and not spec.liger else 0
    return _norm_bytes(spec) + mel_input


def liger_loss_chunk_tokens(spec: RunSpec) -> int:
    """Rows of logits Liger's fused linear cross-entropy materialises at a time
    (ops/fused_linear_cross_entropy.py, 0.8.5, ``chunk_mem_const`` 1): the next power of two of
    ceil(BT / ceil(V / H)), at most BT."""
    tokens, vocab, hidden = spec.tokens_per_micro_batch, spec.model.vocab_size, spec.model.hidden_size
    inc_factor = -(-vocab // hidden)
    chunk = 1 << max(0, (-(-tokens // inc_factor) - 1).bit_length())
    return min(chunk, tokens)


def backward_workspace_bytes_per_token(spec: RunSpec) -> int:
    """What one layer's backward holds beyond the layer's saved tensors, at its widest point, the
    MLP: the incoming gradient of the hidden states (a h), the gradient of down_proj's output on
    its two branches (with LoRA there: the frozen branch's copy in the base dtype, a h when the
    LoRA computes in another dtype, and the LoRA branch's, scaled, c h), plus the larger of two
    moments (measured on CPU by the allocator's records, tests/test_planner.py).

    * The MLP's backward. The down_proj step: the LoRA branch's input gradient, the frozen
      Linear's and their sum (3 a f; a f without LoRA on down_proj); the mul step: the product's
      gradient and the two factors' (3 a f; Liger's SwiGLU backward writes them into its saved
      inputs: a f); with dropout on down_proj's LoRA, the dropout's gradient while A's input
      gradient is alive (c f and the dropout output not yet freed). Less what down_proj saved,
      freed by then.
    * With checkpointing, the recomputation of down_proj's forward (torch.utils.checkpoint rebuilds
      the layer when its first saved tensor is unpacked, down_proj's LoRA B input): every saved
      tensor of the layer exists again and the forward's own temporaries are alive too: the mlp
      input and the product (each unless saved anyway), the residual (unless the post-attention
      norm saved it as is), down_proj's frozen output (a h), with dropout on a cast its cast
      input (c f), and with DeepSpeed's linear LoRA B's output (c h). The recomputation stops
      (``_StopRecomputationError``) at the save of the last saved tensor: torch's mm saves its
      inputs before it computes, DeepSpeed's autograd.Function after.
    """
    a, c = DTYPE_BYTES[spec.dtype], DTYPE_BYTES[spec.compute_dtype]
    h, f = spec.model.hidden_size, spec.model.intermediate_size
    saved = layer_saved_tensors(spec)
    down_saves = sum(v for k, v in saved.items() if k.startswith("down_proj:")) + saved.get("mlp product", 0)
    down_lora = "down_proj" in spec.target_modules
    down_step = (3 if down_lora else 1) * a * f
    mul_step = (1 if spec.liger else 3) * a * f
    dropout_step = c * f + down_saves if down_lora and spec.lora_dropout > 0 else 0
    moment = max(down_step, mul_step, dropout_step) - down_saves
    if spec.gradient_checkpointing:
        recompute = (0 if "mlp input" in saved else a * h) + (0 if "mlp product" in saved else a * f)
        recompute += (0 if norm_saves_layer_input(spec) else a * h) + a * h
        recompute += c * f if down_lora and spec.lora_dropout > 0 and c != a else 0
        # DeepSpeed's linear is an autograd.Function: it saves after computing its output, so the
        # recomputation stops after LoRA B's output (c h); torch's mm saves its inputs first.
        recompute += c * h if down_lora and spec.zero.memory_efficient_linear else 0
        moment = max(moment, recompute)
    output_grads = ((a * h if c != a else 0) + c * h) if down_lora else 0
    return a * h + output_grads + moment


@dataclass(frozen=True)
class Activations:
    """Activation bytes of one micro-batch at its peak, and the parts of that peak."""

    tokens: int
    stored_layers: int  # what the forward keeps per layer (all of it, or the checkpointed inputs)
    mask: int  # the model's attention mask, alive through the step (sdpa, eager)
    recomputed_layer: int  # one layer's saved tensors, rebuilt in backward (checkpointing only)
    workspace: int  # gradients of the layer being back-propagated
    head_saved: int  # final norm, lm_head's input (DeepSpeed's linear), the fused loss's saved gradient
    logits: int  # the logits the training loop holds through backward (none with Liger's fused loss)
    loss_saved: int  # what the loss saves for backward
    loss: int  # the loss at its peak, its saved tensors included

    @property
    def saved(self) -> int:
        """What autograd holds at the end of the forward (with checkpointing: the checkpointed
        inputs): the figure tests/test_planner.py measures with a saved-tensors hook."""
        return self.stored_layers + self.head_saved + self.loss_saved

    @property
    def head(self) -> int:
        return self.head_saved + self.logits

    @property
    def peak(self) -> int:
        """The larger of the loss's peak (the head's saved tensors alive) and a layer's backward
        (the head's saved tensors freed by then, the logits still held)."""
        return (self.stored_layers + self.mask + self.logits
                + max(self.head_saved + self.loss, self.recomputed_layer + self.workspace))


def activation_estimate(spec: RunSpec, checkpointing: Optional[bool] = None) -> Activations:
    """Peak activation bytes of one micro-batch of ``micro_batch_size x seq_len`` tokens
    (with packing every row is full; without, rows pad to the longest in the batch, so this
    is an upper bound).

    * Without checkpointing every layer keeps its saved tensors to the end of the forward
      (the first with its input carrying no gradient: ``layer_saved_tensors``).
    * With (non-reentrant) checkpointing, torch.utils.checkpoint keeps only each layer's
      input hidden states (a h per token; ``_CheckpointFrame.save_inputs``) and rebuilds one
      layer's tensors at a time in backward (Korthikanti et al. 2022: full recomputation
      stores 2 s b h bytes per layer in 16-bit).
    * The model's attention mask (transformers' masking_utils): sdpa's is bool (s bytes per
      token), eager's is in the model dtype (a s); flash-attn has none.
    * Head: the final RMSNorm's saved tensors, lm_head's input (DeepSpeed's linear), and the
      logits (a V), which the training loop holds through backward (``out = engine(**batch)``
      in training.TrainingStage).
    * Loss (transformers loss_utils.ForCausalLMLoss): logits upcast to fp32, cross_entropy =
      log_softmax (saves its fp32 output, 4 V) + nll (saves the int64 targets, 8); its backward
      makes two fp32 gradients of that size: 12 V + 8 per token at the loss's backward, when
      every stored layer is alive.
    * Liger's fused linear cross-entropy instead: no logits; in the forward it computes the
      hidden states' gradient (a h, saved for backward) chunk by chunk, with one chunk of
      logits (``liger_loss_chunk_tokens`` x V, model dtype) and the fp32 per-token loss alive.
    """
    ckpt = spec.gradient_checkpointing if checkpointing is None else checkpointing
    spec = replace(spec, gradient_checkpointing=ckpt)  # the workspace depends on it too
    model, a, tokens = spec.model, DTYPE_BYTES[spec.dtype], spec.tokens_per_micro_batch
    h, vocab, layers = model.hidden_size, model.vocab_size, model.num_layers
    casts = lora_weight_cast_bytes_per_layer(spec)
    full = layer_activation_bytes_per_token(spec) * tokens + casts
    first = layer_activation_bytes_per_token(spec, input_requires_grad=False) * tokens + casts
    if ckpt:
        stored = layers * a * h * tokens
        recomputed = full - (a * h * tokens if norm_saves_layer_input(spec) else 0)
    else:
        stored, recomputed = (layers - 1) * full + first, 0
    mask = {"sdpa": spec.seq_len, "eager": a * spec.seq_len}.get(spec.attn_implementation, 0) * tokens
    head_saved = head_saved_bytes_per_token(spec) * tokens
    if spec.liger:
        head_saved += a * h * tokens  # the hidden states' gradient, computed in the forward
        logits, loss_saved = 0, 0
        loss = liger_loss_chunk_tokens(spec) * vocab * a + (4 + 1) * tokens  # a chunk of logits, fp32 loss, target mask
    else:
        logits, loss_saved, loss = a * vocab * tokens, (4 * vocab + 8) * tokens, (12 * vocab + 8) * tokens
    return Activations(tokens=tokens, stored_layers=stored, mask=mask, recomputed_layer=recomputed,
                       workspace=backward_workspace_bytes_per_token(spec) * tokens, head_saved=head_saved,
                       logits=logits, loss_saved=loss_saved, loss=loss)
