"""Model FLOPs of a LoRA training step, the accelerator's peak, and the MFU every run logs.

The convention (the same as bench/gpu_speed.py's published numbers, docs/BENCHMARKS.md):

* The base is frozen, so no weight gradients are computed for it. Per token the N weights
  that take part in a matrix multiply (every projection and the lm_head; the embedding
  lookup does no multiply) cost 2N forward and 2N backward (input gradients only): **4N**.
* Causal attention adds 2·L·s·d per token forward (QK^T and AV over half of the s×s scores,
  d = heads × head_dim) and twice that backward: 6·L·s·d. A row of n real tokens therefore
  costs 6·L·d·n², so a step's attention term is 6·L·d·Σn² over its rows (padding is not
  work; a packed row counts as one sequence of its length, an upper bound for kernels that
  attend within each example).
* With activation checkpointing the forward runs twice: **6N** + 8·L·d·Σn². The recomputed
  forward is counted, so with recomputation this is closer to hardware-FLOPs utilisation;
  the log names the convention with the number.
* LoRA's own FLOPs (under 1% of N at r = 16) are not counted: the MFU is the base model's.

The peak is the accelerator's dense bf16 tensor-core rate from its data sheet, looked up by
``torch.cuda.get_device_name`` (or ``train.peak_tflops``); a device not in the table, and
the CPU, get no MFU unless the setting gives one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .model_dims import ModelDims

# Dense bf16 tensor-core peaks, TFLOP/s, from NVIDIA's data sheets, matched as substrings of
# the device name in this order (the more specific name first: "L40S" contains "L4",
# "H100 PCIe" and "H100 NVL" contain "H100").
PEAK_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("GH200", 989.4),
    ("H200", 989.4),
    ("H100", 989.4),  # SXM
    ("H800", 989.4),
    ("B200", 2250.0),
    ("A100", 312.0),
    ("A800", 312.0),
    ("L40S", 362.1),
    ("L4", 121.0),
)


@dataclass(frozen=True)
class StepFlops:
    """The FLOP convention above for one model: ``flops(tokens, row_tokens_sq)``."""

    linear_weights: int  # N
    num_layers: int  # L
    attention_width: int  # d = heads x head_dim
    recompute: bool

    @classmethod
    def for_model(cls, dims: ModelDims, recompute: bool) -> StepFlops:
        d, q = dims.hidden_size, dims.num_heads * dims.head_dim
        kv = dims.num_kv_heads * dims.head_dim
        per_layer = d * q + 2 * d * kv + q * d + 3 * d * dims.intermediate_size  # q, k, v, o; gate, up, down
        return cls(dims.num_layers * per_layer + d * dims.vocab_size, dims.num_layers, q, recompute)

    def flops(self, tokens: int, row_tokens_sq: int) -> float:
        """Model FLOPs of ``tokens`` real tokens in rows whose token counts squared sum to ``row_tokens_sq``."""
        weight_factor, attention_factor = (6, 8) if self.recompute else (4, 6)
        return (weight_factor * self.linear_weights * tokens
                + attention_factor * self.num_layers * self.attention_width * row_tokens_sq)

    @property
    def convention(self) -> str:
        weights, attention = ("6N", "8") if self.recompute else ("4N", "6")
        return (f"{weights} + {attention}·L·d·Σn² per step (N = {self.linear_weights:.3g} matmul weights, L = "
                f"{self.num_layers}, d = {self.attention_width}{'; recomputed forward counted' if self.recompute else ''})")


def peak_flops_per_s(device: torch.device, setting_tflops: Optional[float]) -> Optional[float]:
    """The MFU's denominator: ``train.peak_tflops`` when set, else the device's dense bf16 peak
    from :data:`PEAK_BF16_TFLOPS`, else None (the CPU, or a card not in the table)."""
    if setting_tflops is not None:
        return setting_tflops * 1e12
    if device.type != "cuda":
        return None
    return peak_for_name(torch.cuda.get_device_name(device))


def peak_for_name(device_name: str) -> Optional[float]:
    return next((tflops * 1e12 for key, tflops in PEAK_BF16_TFLOPS if key in device_name), None)


def peak_memory(device: torch.device) -> dict[str, float]:
    """This rank's memory peaks since the stage began, GiB: on CUDA ``peak_memory_gib`` (the
    allocated peak, what the planner predicts) and ``peak_reserved_gib`` (the caching
    allocator's, what nvidia-smi and the out-of-memory limit see); on the CPU
    ``peak_memory_gib`` is the process's peak resident set since it started."""
    if device.type == "cuda":
        return {"peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30,
                "peak_reserved_gib": torch.cuda.max_memory_reserved(device) / 2**30}
    import resource

    return {"peak_memory_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}  # kB on Linux
