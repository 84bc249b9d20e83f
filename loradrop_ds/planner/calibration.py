"""What the estimate is calibrated by, kept apart from it: the allowances for what cannot be
counted (the safety margin, CUDA context, allocator caching, the Python runtime), what is not
counted at all (``NOT_COUNTED``), and the published figure it is checked against (the peft
docs' Llama-2-70B ZeRO-3 run: ``PEFT_ANCHOR_BYTES``, ``peft_anchor_spec``)."""

from __future__ import annotations

import torch

from ..model_dims import KNOWN_MODEL_CONFIGS, ModelDims
from .run_spec import RunSpec, ZeroSettings
from .units import GiB

# Leave this fraction of the device (or of host RAM) free beyond the estimate: the estimate
# counts tensors, not the allocator's rounding or a kernel's scratch space.
SAFETY_MARGIN = 0.10

# CUDA context, cuBLAS workspaces and NCCL communicator buffers: memory that nvidia-smi shows
# but torch.cuda.memory_allocated() does not. About 0.5 GiB of context on an H100 with lazy
# module loading plus NCCL buffers for the data-parallel group; an assumption, not measured
# here (no GPU was available to this work).
CUDA_RUNTIME_BYTES = 1 * GiB

# PyTorch's caching allocator keeps freed blocks reserved, and ZeRO-3 gathers and frees
# buffers of a different size for every module, so the reserved peak (what nvidia-smi and
# the OOM limit see) exceeds the allocated peak. 10% of the tensor bytes is our assumption
# for that gap; the first thing to calibrate against torch.cuda.max_memory_reserved() on a GPU.
ALLOCATOR_RESERVE_FRACTION = 0.10

# Host RSS of one rank before any model tensor: the interpreter with torch, deepspeed,
# transformers, peft and datasets imported. Measured on the project's CPU machine
# (`python -c "import torch, deepspeed, transformers, peft, datasets"`: 0.45 GiB maximum
# RSS, torch 2.13.0+cpu). A CUDA build also maps the CUDA libraries and keeps host-side
# copies of kernels and pinned staging buffers: 3 GiB per GPU rank is our assumption.
HOST_RUNTIME_BYTES_CPU = int(0.45 * GiB)
HOST_RUNTIME_BYTES_GPU = 3 * GiB

NOT_COUNTED = (
    "the eval forward (no_grad, smaller than a training step)",
    "optimizer-step temporaries (activations are freed by then)",
    "rotary cos/sin tables and integer inputs (a few bytes per token)",
    "the init-time fp32 gradient buffer of stage3.initialize_optimizer_states (freed before training)",
)


# The published figure the planner is checked against (issue 7): the peft docs' "Use PEFT
# and DeepSpeed with ZeRO3 for finetuning large models on multiple devices and multiple
# nodes" (huggingface/peft docs/source/accelerate/deepspeed.md; launch command
# examples/sft/run_peft_deepspeed.sh): "the memory consumed per GPU is 64 GB (80%)".
# 80% of an H100's 79.6 GiB is 63.7 GiB, so the figure is read as 64 GiB (64e9 bytes would
# be 75%); a screenshot of the GPU monitor, i.e. memory reserved, not just allocated.
PEFT_ANCHOR_BYTES = 64 * GiB


def peft_anchor_spec() -> RunSpec:
    """That run's settings, as the doc's command and configs give them: Llama-2-70b-hf,
    8 x H100 80GB on one node, accelerate's ZeRO-3 config (zero_stage 3, no offload, no
    stage3_* keys: DeepSpeed's defaults; no communication_data_type: the engine's bf16), bf16,
    LoRA r=8 (alpha 16) dropout 0.1 on all linear layers of the decoder ("all-linear" leaves
    out lm_head), max_seq_len 2048 packed, per-device batch 8, gradient checkpointing
    (use_reentrant False), flash-attn. Two details of its time: the ChatML special tokens
    grow the vocabulary to 32008 (examples/sft/utils.py: resize_token_embeddings(...,
    pad_to_multiple_of=8)), and the LoRA weights were bf16: DeepSpeed then cast the whole
    module with ``module.bfloat16()`` (engine._configure_distributed_model, "Replaces blanket
    module.half()/bfloat16()" in 0.19.8), and peft's fp32 ``autocast_adapter_dtype`` came later.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    values = dict(KNOWN_MODEL_CONFIGS["meta-llama/Llama-2-70b-hf"], vocab_size=32008)
    model_config = AutoConfig.for_model(values.pop("model_type"), **values)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(model_config)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    dims = ModelDims.from_model(model, targets, "meta-llama/Llama-2-70b-hf (vocab 32008)",
                                "shipped copy of the public config.json", "float16")
    return RunSpec(model=dims, world_size=8, gpus_per_node=8, device="cuda", dtype="bfloat16", lora_r=8,
                   lora_dropout=0.1, target_modules=tuple(targets), micro_batch_size=8, seq_len=2048, grad_accum=4,
                   packing=True, gradient_checkpointing=True, attn_implementation="flash_attention_2",
                   zero=ZeroSettings(), lora_dtype="bfloat16", loradrop=False)
