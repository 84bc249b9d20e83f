"""The causal-LM loss without the logits: the training forward of a LlamaForCausalLM that
takes the loss from the final hidden states and the LM head's weight, token chunk by token
chunk, instead of forming the ``[tokens, vocab]`` logits (``model.liger``).

The kernel is pluggable. On CUDA it is Liger's fused linear cross-entropy
(``loradrop_ds.liger``); :func:`chunked_linear_cross_entropy` here is its plain-torch twin,
the same algorithm in torch ops, which the CPU tests run under real ZeRO-3. It is not a
setting: on CPU the logits of a LoRA-drop model are small, and ``model.liger`` means Liger.

**ZeRO-3.** The loss reads ``lm_head.weight`` outside ``lm_head``'s forward, where ZeRO-3
holds only this rank's shard. The read happens in a module of its own (:class:`FusedLMLoss`,
a child of the causal LM with no parameters) that has the weight registered as an external
parameter (``deepspeed.zero.register_external_parameter``, DeepSpeed 0.19.8
``runtime/zero/partition_parameters.py``): its pre-forward hook gathers the weight with the
module's own parameters (``partitioned_param_coordinator.iter_params`` chains
``ds_external_parameters``), its post-forward hook releases it
(``release_sub_module``; an explicitly registered parameter has ``is_external_param=False``,
so it is released like an own one). So the whole weight lives for the loss only.

Where the read happens is what matters. DeepSpeed 0.19.8 also registers by itself a
partitioned parameter read during a forward, on the innermost module in forward
(``parameter_offload.ZeROOrderedDict.__getitem__``): here that is this module, and the
2-rank test passes without the explicit registration; the registration is the documented
API and does not rely on that discovery (skipped under torch.compile, and its first gather
bypasses the coordinator's count of live parameters). Liger's own ``lce_forward`` reads the
weight in the causal LM's forward: it is attached there, gathered at the start of every
forward and held through it and into the backward (a scratch run of the 2-rank test with the
registration on the causal LM: whole while the last decoder layer runs, both ways), vocab x
hidden x 2 bytes: 1 GiB for Llama-3-8B, 2 GiB for 70B. The module's backward hooks gather
the weight once more at the start of the loss's backward (``fetch_sub_module`` fetches every
parameter of a module, external ones included) although neither kernel reads it there (both
compute the hidden states' gradient in the forward); it is released when the hidden states'
gradient is out. The plain path gathers ``lm_head`` in its backward too: the same traffic.
Tied embeddings (SmolLM2) need nothing more: the registered parameter is the embedding's,
and DeepSpeed counts the modules holding it (``ds_active_sub_modules``). Same on CUDA/NCCL.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .data import IGNORE_INDEX

FUSED_LOSS_MODULE = "fused_lm_loss"  # the child module's name inside the causal LM

# (hidden [tokens, hidden], weight [vocab, hidden], targets [tokens], ignore_index) -> mean loss
LinearCrossEntropy = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int], torch.Tensor]


def default_chunk_tokens(tokens: int, vocab: int, hidden: int) -> int:
    """Liger's chunk size (``fused_linear_cross_entropy_forward``, liger-kernel 0.8.5): the
    tokens split into ceil(vocab / hidden) chunks, rounded up to a power of two, so one
    chunk's logits hold about as many elements as the hidden states."""
    chunks = -(-vocab // hidden)
    per_chunk = -(-tokens // chunks)
    return max(1, min(1 << (per_chunk - 1).bit_length(), tokens))


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Liger's algorithm in torch ops: in the forward, per chunk, the logits in fp32, the
    loss, and the hidden states' gradient (softmax - one-hot, over the valid tokens); only
    that gradient is kept for the backward, which scales it."""

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, ignore_index: int,
                chunk_tokens: int) -> torch.Tensor:
        valid = target != ignore_index
        count = valid.sum().to(torch.float32)
        grad_hidden = torch.zeros_like(hidden) if ctx.needs_input_grad[0] else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk_tokens):
            end = min(start + chunk_tokens, hidden.shape[0])
            # As transformers' ForCausalLMLoss: the logits in the model's dtype, then fp32.
            logits = (hidden[start:end] @ weight.t()).float()
            keep = valid[start:end]
            safe_target = torch.where(keep, target[start:end], 0)
            lse = torch.logsumexp(logits, dim=-1)
            picked = logits.gather(1, safe_target[:, None])[:, 0]
            total += ((lse - picked) * keep).sum()
            if grad_hidden is not None:
                probs = logits.sub_(lse[:, None]).exp_()  # softmax, in place: one chunk of fp32 logits alive
                probs[torch.arange(end - start, device=probs.device), safe_target] -= 1.0
                probs *= (keep.to(torch.float32) / count)[:, None]
                grad_hidden[start:end] = probs.to(hidden.dtype) @ weight
        ctx.save_for_backward(grad_hidden)
        return total / count

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple:
        (grad_hidden,) = ctx.saved_tensors
        return grad_hidden * grad_output.to(grad_hidden.dtype), None, None, None, None


def chunked_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor,
                                 ignore_index: int = IGNORE_INDEX, chunk_tokens: Optional[int] = None) -> torch.Tensor:
    """Mean cross-entropy of ``hidden @ weight.T`` against ``target`` over the tokens whose
    target is not ``ignore_index`` (``F.cross_entropy``'s ``mean``), without the full logits:
    ``chunk_tokens`` rows at a time (default: Liger's size). The weight must be frozen (the
    LM head is in LoRA training); the hidden states get their gradient."""
    if weight.requires_grad:
        raise ValueError("chunked_linear_cross_entropy: the LM head's weight must be frozen (no gradient for it)")
    chunk = chunk_tokens or default_chunk_tokens(hidden.shape[0], weight.shape[0], weight.shape[1])
    return _ChunkedLinearCrossEntropy.apply(hidden, weight, target, ignore_index, chunk)


def shifted_targets(labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Position t predicts token t + 1: each row's labels moved left by one, the last
    position ``ignore_index`` (transformers' ForCausalLMLoss, 5.x), flattened."""
    return F.pad(labels, (0, 1), value=ignore_index)[..., 1:].reshape(-1)


class FusedLMLoss(nn.Module):
    """The causal-LM loss from the final hidden states and the LM head's weight, by
    ``kernel``. No parameters of its own; under ZeRO-3 the head's weight is registered as
    its external parameter (see the module docstring), so it is whole here and only here."""

    def __init__(self, lm_head: nn.Linear, kernel: LinearCrossEntropy):
        super().__init__()
        if getattr(lm_head, "bias", None) is not None:
            raise ValueError("the fused loss takes an LM head without bias (LLaMA's)")
        self._head = (lm_head,)  # in a tuple: a module attribute would make it a second child (hooked twice)
        self.kernel = kernel
        weight = lm_head.weight
        if hasattr(weight, "ds_id"):  # partitioned by ZeRO-3
            import deepspeed

            deepspeed.zero.register_external_parameter(self, weight)

    def forward(self, hidden_states: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        weight = self._head[0].weight
        hidden = hidden_states.reshape(-1, hidden_states.shape[-1])
        return self.kernel(hidden, weight, shifted_targets(labels).to(hidden.device), IGNORE_INDEX)


def _fused_loss_forward(self: nn.Module, input_ids: Optional[torch.Tensor] = None,
                        attention_mask: Optional[torch.Tensor] = None, position_ids: Optional[torch.Tensor] = None,
                        inputs_embeds: Optional[torch.Tensor] = None, labels: Optional[torch.Tensor] = None,
                        **kwargs: Any) -> Any:
    """LlamaForCausalLM.forward (transformers 5.x), but in training with labels the loss
    comes from :class:`FusedLMLoss` and ``logits`` is None. Without labels (evaluation) or
    in eval mode it is the class's own forward, logits included."""
    if labels is None or not self.training:
        return type(self).forward(self, input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                  inputs_embeds=inputs_embeds, labels=labels, **kwargs)
    from transformers.modeling_outputs import CausalLMOutputWithPast

    # The class's forward passes these to its loss; the training loop passes none of them.
    given = [k for k in ("num_items_in_batch", "shift_labels") if kwargs.pop(k, None) is not None]
    if kwargs.pop("logits_to_keep", 0) not in (0, None):
        given.append("logits_to_keep")
    if given:
        raise ValueError(f"the fused loss does not take {', '.join(given)}")
    kwargs.pop("return_dict", None)  # always a CausalLMOutputWithPast
    outputs = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         inputs_embeds=inputs_embeds, **kwargs)
    loss = getattr(self, FUSED_LOSS_MODULE)(outputs.last_hidden_state, labels)
    return CausalLMOutputWithPast(loss=loss, logits=None, hidden_states=outputs.hidden_states,
                                  attentions=outputs.attentions)


def attach_fused_loss(model: nn.Module, kernel: LinearCrossEntropy) -> nn.Module:
    """Give a causal LM (LlamaForCausalLM, before peft wraps it) the fused loss: a
    :class:`FusedLMLoss` child named ``fused_lm_loss`` and an instance forward that uses it
    in training. Call after the model is built (under ZeRO-3: partitioned) and before its
    engine: DeepSpeed hooks the modules it finds then. Parameters and state-dict keys are
    unchanged; the attachment survives peft's wrap and ``unload`` (lora.strip_lora)."""
    if hasattr(model, FUSED_LOSS_MODULE):
        raise ValueError("the fused loss is already attached to this model")
    if not isinstance(getattr(model, "lm_head", None), nn.Linear) or not hasattr(model, "model"):
        raise ValueError(f"the fused loss needs a causal LM with .model and an nn.Linear .lm_head, not "
                         f"{type(model).__name__}")
    model.add_module(FUSED_LOSS_MODULE, FusedLMLoss(model.lm_head, kernel))
    model.forward = _fused_loss_forward.__get__(model)
    return model
