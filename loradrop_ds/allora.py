"""ALLoRA (Huang & Balestriero, arXiv 2410.09692) on peft's LoRA layers, ZeRO-3 included.

LoRA without dropout and without the alpha/r scaling (peft's scaling is 1: ``lora.alpha``
equals ``lora.r``), whose gradient reaching A and B is rescaled per output row i of the
update BA by ``1 / sqrt(||(BA)_i||_2 + 1/eta^2)`` (the plain, unsquared row norm; the
paper's eta^2 = 4 is ``lora.allora_eta2``). The gradient to the layer's input is not
rescaled. The row norms come from the r x r Gram matrix, ``||(BA)_i||^2 = B_i (A A^T)
B_i^T``; BA is never formed.

How it is wired, without touching peft's forward (so the adapter stays a plain peft LoRA):

* a forward pre-hook on ``lora_A`` keeps the layer input x and hands ``lora_A`` a detached
  copy, so the LoRA branch ``y = B(A(x.detach()))`` gives gradients to A and B only;
* a forward hook on ``lora_A`` keeps a copy of A's weight (r x in: small);
* a forward hook on ``lora_B`` computes the row factors from that copy and B's weight and
  returns ``_RowScaledGrad.apply(y, x, ...)``: the same values, whose backward passes
  ``g * factor`` back into the branch (so A's and B's gradients are the paper's) and
  ``g B A`` (unscaled) to x.

Under ZeRO-3 a module's parameters are gathered from its pre-forward hook until the
forward hooks DeepSpeed registered after ours have run (``parameter_offload.py``,
DeepSpeed 0.19.8: ``_register_deepspeed_module`` adds the fetch as a forward pre-hook and
the release as a forward hook, neither with ``prepend``; ours are registered before the
engine is built), so A and B are read where they are gathered anyway: no extra gather,
once per forward of the LoRA. The factors cost O(out r^2) per use, nothing per token. The
A and B saved for the backward are copies (r x (in + out) each): a view of a gathered
parameter would keep DeepSpeed's whole all-gather buffer of that module group alive until
the backward, after ZeRO-3 has released the parameter itself.

A shared LoRA (LoRA-drop's unselected layers) has one BA, so its row factors are the same
at every use: each use's gradient is rescaled by the same factors before autograd adds
them up. LoRA-drop's importance statistic stays the LoRA output, here without a scaling
factor.
"""

from __future__ import annotations

import torch
from torch import nn

from .lora import ADAPTER

_X = "_allora_input"  # the layer input a LoRA branch was given, from lora_A's pre-hook
_A = "_allora_a"  # the copy of A's weight, from lora_A's forward hook


def row_factors(a: torch.Tensor, b: torch.Tensor, eta2: float) -> torch.Tensor:
    """``1 / sqrt(||(BA)_i||_2 + 1/eta^2)`` for every output row i, in fp32, from the Gram
    matrix ``A A^T`` (A: r x in, B: out x r)."""
    a, b = a.float(), b.float()
    sq_norms = ((b @ (a @ a.T)) * b).sum(dim=1).clamp_min(0.0)  # B_i (A A^T) B_i^T
    return torch.rsqrt(sq_norms.sqrt() + 1.0 / eta2)


class _RowScaledGrad(torch.autograd.Function):
    """Identity on the LoRA branch's output ``y``; backward: ``g * factor`` (per output row)
    into the branch, ``g B A`` to the layer input x."""

    @staticmethod
    def forward(ctx, y, x, factor, a, b):
        ctx.save_for_backward(factor, a, b)
        ctx.x_dtype = x.dtype
        return y.view_as(y)

    @staticmethod
    def backward(ctx, grad):
        factor, a, b = ctx.saved_tensors
        grad_y = grad * factor.to(grad.dtype)
        # In the branch's dtype, like its forward (lora.compute_dtype): fp32, or bf16 with the
        # fp32 copies of A and B cast at use; the result joins x's gradient in x's dtype.
        grad_x = ((grad @ b.to(grad.dtype)) @ a.to(grad.dtype)).to(ctx.x_dtype) if ctx.needs_input_grad[1] else None
        return grad_y, grad_x, None, None, None


def _keep_input(module: nn.Module, args: tuple) -> tuple | None:
    if not torch.is_grad_enabled():  # evaluation: nothing to rescale
        return None
    x = args[0]
    setattr(module, _X, x)
    return (x.detach(),) + tuple(args[1:])


def _keep_a(module: nn.Module, _args: tuple, _output: torch.Tensor) -> None:
    if torch.is_grad_enabled():
        setattr(module, _A, module.weight.detach().clone())


def _make_b_hook(lora_a: nn.Module, eta2: float):
    def hook(module: nn.Module, _args: tuple, output: torch.Tensor) -> torch.Tensor | None:
        if not torch.is_grad_enabled():
            return None
        x, a = getattr(lora_a, _X, None), getattr(lora_a, _A, None)
        setattr(lora_a, _X, None)  # hold the input no longer than this forward
        setattr(lora_a, _A, None)
        if x is None or a is None:
            raise RuntimeError("ALLoRA: lora_B ran without its lora_A forward (is this a peft LoRA layer?)")
        b = module.weight.detach().clone()
        return _RowScaledGrad.apply(output, x, row_factors(a, b, eta2), a, b)

    return hook


def apply_allora(model: nn.Module, eta2: float) -> int:
    """Turn every peft LoRA layer of ``model`` into ALLoRA (hooks on its ``lora_A`` and
    ``lora_B``). Call right after peft injects the LoRA and before ``deepspeed.initialize``.
    The LoRA must have no dropout and scaling 1 (checked). Returns the number of layers."""
    from peft.tuners.lora import LoraLayer

    count = 0
    for name, layer in model.named_modules():
        if not isinstance(layer, LoraLayer) or ADAPTER not in layer.lora_A:
            continue
        if float(layer.scaling[ADAPTER]) != 1.0 or not isinstance(layer.lora_dropout[ADAPTER], nn.Identity):
            raise ValueError(f"ALLoRA needs LoRA without dropout and with scaling 1 (alpha = r); {name} has scaling "
                             f"{layer.scaling[ADAPTER]} and dropout {layer.lora_dropout[ADAPTER]}")
        lora_a, lora_b = layer.lora_A[ADAPTER], layer.lora_B[ADAPTER]
        lora_a.register_forward_pre_hook(_keep_input)
        lora_a.register_forward_hook(_keep_a)
        lora_b.register_forward_hook(_make_b_hook(lora_a, eta2))
        count += 1
    return count
