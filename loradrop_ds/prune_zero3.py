"""LoRAPrune in the main stage under ZeRO-3: the distributed glue around :mod:`loradrop_ds.prune_algorithm`.

What runs where:

* **Gradients of every LoRA use.** In a step that updates the scores, forward hooks on each
  use's ``lora_A`` and ``lora_B`` wrap the Linear's output in ``lora.WeightGradTap``, an
  identity autograd Function whose backward adds that micro-batch's weight gradient,
  ``dL/dW = g^T x``, per (layer, module) use. ``.grad`` cannot be read instead: under
  ZeRO-3 it is reduce-scattered (and, for a LoRA shared by many layers, summed over its
  uses) before anything could see it. The same
  hooks copy A and B as the original forward saw them, i.e. before the optimizer step, as the authors
  do. The gradients are the unclipped ones (the authors score after clipping; with the
  default max_grad_norm of 1 that differs only in steps whose norm exceeds it, and then by a
  common factor c on G's first two terms and c^2 on dB dA). ``engine.backward`` has already
  divided the loss by grad_accum, so the sum over micro-batches, all-reduced and divided by
  the world size, is the step's gradient exactly as DeepSpeed averages it.
* **The frozen weight W** is gathered once per score update, one module at a time
  (``engine.gathered``; every rank takes part, in the same order), used and released:
  never kept, and never gathered in steps that do not update the scores.
* **Scores.** Every rank computes the group scores from the same all-reduced gradients and
  gathered weights; rank 0's are broadcast so the masks are computed from bit-identical
  inputs everywhere, and a checksum of the masks is compared across ranks after every update.
* **Masks** are applied by forward pre-hooks on ``o_proj`` (the input columns of a pruned
  group's query heads) and ``down_proj`` (the input of a pruned channel), in training and in
  evaluation. That equals deleting the group / channel: a pruned group's q/k/v reach nothing
  after o_proj's input is zeroed, and a pruned channel's gate/up reach nothing after down's.
  (The authors mask q, k, v, gate and up outputs instead; the function computed is the same.)

Deviation from the authors, stated: they update the moving average at every optimizer step;
here the scores are computed at every ``prune.every``-th step (when the masks are updated),
from that step's gradient, because each computation needs every base weight gathered once:
at every step that would add half again to ZeRO-3's gather traffic. The EMA runs over
updates. The weight gradients are formed in the backward of an identity autograd Function
on each LoRA Linear's output (``lora.WeightGradTap``), whose saved input autograd manages: no extra
activation memory, also under activation checkpointing. Steps that do not update run without
any recording.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import nn

from . import prune_algorithm as prune_lib
from . import prune_files
from .distributed import check_same_on_every_rank
from .lora import ADAPTER, WeightGradTap, lora_layers
from .metrics import format_count
from .model import decoder_layers
from .model_dims import ModelDims

log = logging.getLogger(__name__)


def pruner_for_run(model: nn.Module, cfg: Any, dims: ModelDims, main_steps: int, device: torch.device,
                   resume_path: Optional[Path]) -> Pruner:
    """The main stage's Pruner (``cfg``: the run's Config; ``dims``: the model's, as preflight
    read them, ``Inputs.dims``); ``resume_path``: the main-stage checkpoint the run resumes
    from, whose prune state it continues, or None."""
    from .run_checkpoint import CheckpointError

    state = None
    if resume_path is not None:
        state = prune_files.load_state(resume_path)
        if state is None:  # pruning would restart from nothing in the middle of the schedule
            raise CheckpointError(f"{resume_path} holds no prune/state.safetensors although prune.target_sparsity > 0; "
                                  "resume from a checkpoint this run wrote")
    pruner = Pruner(model, cfg.prune, list(cfg.lora.target_modules), dims, main_steps, device, state=state)
    log.info("LoRAPrune: target sparsity %.2f, score and mask updates after steps %s, exempt layers %s",
             cfg.prune.target_sparsity, pruner.steps, pruner.exempt)
    return pruner


def update_steps(total_steps: int, every: int, end_fraction: float) -> list[int]:
    """The main-stage steps after which scores and masks are updated: every ``every``-th step,
    and the first step at or after ``end_fraction`` of training (where the cubic schedule
    reaches the target), so the target is reached even when no multiple of ``every`` falls
    between there and the end. None after that step: the masks are final."""
    final = min(total_steps, max(1, math.ceil(end_fraction * total_steps - 1e-9)))
    return sorted({s for s in range(every, final + 1, every)} | {final})


class Pruner:
    """LoRAPrune's hooks, state and updates on one rank's (ZeRO-3 partitioned) peft model.

    Create it before ``deepspeed.initialize`` (so its forward hooks run while ZeRO-3 still has
    A and B gathered) and pass it to ``training.TrainingStage`` as the recorder; call :meth:`update`
    after each step in :attr:`steps`."""

    def __init__(self, model: nn.Module, cfg: Any, module_names: list[str], dims: ModelDims, total_steps: int,
                 device: torch.device, state: Optional[prune_lib.PruneState] = None):
        self.cfg, self.dims, self.total_steps, self.device = cfg, dims, total_steps, device
        self.exempt = prune_lib.exempt_layers(dims.num_layers, cfg.exempt_first_fraction, cfg.exempt_last)
        self.steps = update_steps(total_steps, cfg.every, cfg.end_fraction)
        structures = ([("attn", prune_lib.ATTN_MODULES)] if cfg.heads else []) + \
                     ([("mlp", prune_lib.MLP_MODULES)] if cfg.channels else [])
        self.scored = {name: [m for m in mods if m in module_names] for name, mods in structures}
        self.state = state or prune_lib.PruneState.new(
            prune_lib.initial_masks(dims.num_layers, dims.num_kv_heads, dims.intermediate_size))
        self._uses = {key: layer for key, layer in lora_layers(model, list(module_names)).items()
                      if key[0] not in self.exempt and any(key[1] in mods for mods in self.scored.values())}
        self._grads: dict[tuple[int, str, str], torch.Tensor] = {}
        self._weights: dict[tuple[int, str, str], torch.Tensor] = {}
        self._recording = False
        self._step_records = False
        self._handles = []
        for key, lora_layer in self._uses.items():
            for which in ("A", "B"):
                linear = getattr(lora_layer, f"lora_{which}")[ADAPTER]
                self._handles.append(linear.register_forward_hook(self._grad_hook((*key, which))))
        self._device_masks: dict[int, dict[str, torch.Tensor]] = {}
        layers = decoder_layers(model)
        for i, layer in enumerate(layers):
            if i in self.exempt:
                continue
            self._handles.append(layer.self_attn.o_proj.register_forward_pre_hook(self._mask_hook(i, "attn")))
            self._handles.append(layer.mlp.down_proj.register_forward_pre_hook(self._mask_hook(i, "mlp")))
        self._refresh_device_masks()

    # ------------------------------------------------------------------ hooks
    def _grad_hook(self, key: tuple[int, str, str]):
        def hook(module, inputs, output):
            # Decided per step, not per forward: under activation checkpointing the recomputed
            # forward must save the same tensors as the original one (see WeightGradTap).
            if not self._step_records or not torch.is_grad_enabled() or not output.requires_grad:
                return None
            if self._recording:  # the original forward, not a recomputation
                self._weights[key] = module.weight.detach().float().clone()  # gathered here (see class doc)
            return WeightGradTap.apply(output, inputs[0], self._add_grad, key)

        return hook

    def _add_grad(self, key: tuple[int, str, str], grad: torch.Tensor) -> None:
        self._grads[key] = self._grads[key] + grad if key in self._grads else grad

    def _mask_hook(self, layer: int, structure: str):
        def hook(module, inputs):
            entry = self._device_masks.get(layer, {})
            keep = entry.get(structure)
            if keep is None:
                return None
            x = inputs[0]
            if keep.dtype != x.dtype:  # converted once per mask update, not per forward
                keep = entry[structure] = keep.to(x.dtype)
            return (x * keep, *inputs[1:])

        return hook

    def _refresh_device_masks(self) -> None:
        """The input multipliers of o_proj and down_proj for layers with anything pruned."""
        s, n_rep = self.dims, self.dims.num_heads // self.dims.num_kv_heads
        self._device_masks = {}
        for layer, structures in self.state.masks.items():
            if layer in self.exempt:
                continue
            entry = {}
            if not bool(structures["attn"].all()):  # [kv groups] -> o_proj's input columns (query heads x head_dim)
                entry["attn"] = structures["attn"].repeat_interleave(n_rep * s.head_dim).to(self.device)
            if not bool(structures["mlp"].all()):
                entry["mlp"] = structures["mlp"].to(self.device)
            if entry:
                self._device_masks[layer] = entry

    def begin_step(self, step: int) -> None:
        """Called before each step: record the LoRA gradients only in update steps."""
        self._step_records = step in self.steps

    @contextlib.contextmanager
    def recording(self, token_mask: torch.Tensor) -> Iterator[None]:
        """Around each micro-batch's forward (the TrainingStage recorder protocol). Recomputed
        forwards (activation checkpointing) run outside it and are not recorded twice."""
        self._recording = self._step_records
        try:
            yield
        finally:
            self._recording = False

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    # ----------------------------------------------------------------- update
    def update(self, step: int, world_size: int) -> dict:
        """Scores from this step's gradients, the moving average, and the masks at the
        schedule's ratio for ``step``. Collective: call on every rank. Returns what to log."""
        from .engine import gathered

        start = time.perf_counter()
        keys = sorted(self._grads)
        missing = sorted({(layer, m) for layer, m in self._uses} - {(layer, m) for layer, m, _ in keys})
        if missing:
            raise RuntimeError(f"LoRAPrune: no gradient was recorded for {missing[:4]} in step {step}")
        flat = torch.cat([self._grads[k].reshape(-1) for k in keys]).to(self.device)
        dist.all_reduce(flat)
        flat /= world_size
        grads, offset = {}, 0
        for k in keys:
            n = self._grads[k].numel()
            grads[k] = flat[offset:offset + n].view_as(self._grads[k])
            offset += n
        s = self.dims
        new_scores: dict[int, dict[str, torch.Tensor]] = {}
        for (layer, module_name), lora_layer in sorted(self._uses.items()):
            weight = lora_layer.base_layer.weight
            with gathered([weight]), torch.no_grad():
                reduced = importance_sums(module_name, weight.detach().to(self.device),
                                          self._weights[(layer, module_name, "A")],
                                          self._weights[(layer, module_name, "B")], grads[(layer, module_name, "A")],
                                          grads[(layer, module_name, "B")], float(lora_layer.scaling[ADAPTER]))
            vector = prune_lib.module_group_scores(module_name, reduced, s.num_heads, s.num_kv_heads, s.head_dim)
            new_scores.setdefault(layer, {})[module_name] = vector
        blocks = {layer: prune_lib.structure_scores(vectors, self.scored) for layer, vectors in new_scores.items()}
        order = [(layer, st) for layer in sorted(blocks) for st in sorted(blocks[layer])]
        flat_scores = torch.cat([blocks[layer][st].float().reshape(-1) for layer, st in order]).to(self.device)
        dist.broadcast(flat_scores, src=0)  # every rank masks from rank 0's numbers, bit for bit
        offset = 0
        for layer, st in order:
            n = blocks[layer][st].numel()
            value = flat_scores[offset:offset + n].cpu()
            offset += n
            self.state.scores[layer][st] = prune_lib.ema_update(self.state.scores[layer][st], value, self.cfg.ema)
        ratio = prune_lib.cubic_ratio(step, self.total_steps, self.cfg.target_sparsity, self.cfg.start_fraction,
                                      self.cfg.end_fraction)
        scores = {layer: {st: self.state.scores[layer][st] for st in self.scored} for layer in range(s.num_layers)
                  if layer not in self.exempt}
        self.state.masks = prune_lib.update_masks(self.state.masks, scores, ratio, self.exempt)
        self.state.updates += 1
        self._grads.clear()
        self._weights.clear()
        self._refresh_device_masks()
        self._check_agreement(world_size)
        sparsity = prune_lib.mask_sparsity(self.state.masks)
        removed = prune_lib.pruned_param_count(self.state.masks, s.hidden_size, s.num_heads, s.num_kv_heads,
                                               s.head_dim)
        # The wall time of this update on this rank, to the mask agreement check (whose
        # all_gather_object result is read on the host, so device work is included).
        return {"stage": "prune", "prune_ratio": ratio, "attn_groups_pruned": sparsity["attn"],
                "mlp_channels_pruned": sparsity["mlp"], "base_params_removed": removed["total"],
                "prune_update_seconds": time.perf_counter() - start}

    def _check_agreement(self, world_size: int) -> None:
        check_same_on_every_rank(world_size, masks_digest(self.state.masks), lambda rank, theirs, ref: RuntimeError(
            f"LoRAPrune masks differ between ranks: rank {rank}'s digest {theirs[:12]}, rank 0's {ref[:12]}"))

    # ------------------------------------------------------------------ files
    def summary(self) -> dict:
        s = self.dims
        sparsity = prune_lib.mask_sparsity(self.state.masks)
        removed = prune_lib.pruned_param_count(self.state.masks, s.hidden_size, s.num_heads, s.num_kv_heads,
                                               s.head_dim)
        return {"target_sparsity": self.cfg.target_sparsity, "updates": self.state.updates,
                "exempt_layers": self.exempt, "attn_groups_pruned": sparsity["attn"],
                "mlp_channels_pruned": sparsity["mlp"], "base_params_removed": removed["total"],
                "kept_groups": [int(self.state.masks[i]["attn"].sum()) for i in range(s.num_layers)],
                "kept_channels": [int(self.state.masks[i]["mlp"].sum()) for i in range(s.num_layers)]}

    def log_summary(self, summary: dict) -> None:
        """What the run pruned, at its end (``summary``: :meth:`summary`'s result)."""
        log.info("LoRAPrune: %d of %d KV groups and %d of %d MLP channels per layer kept (layers %s exempt); "
                 "%s base parameters removed", min(summary["kept_groups"]), self.dims.num_kv_heads,
                 min(summary["kept_channels"]), self.dims.intermediate_size, self.exempt,
                 format_count(summary["base_params_removed"]))
        if self.exempt:
            log.info("LoRAPrune: exempt layers keep full width, and `launch/export.py --format pruned` writes every "
                     "layer at the widest layer's width: the exported model is no smaller (docs/EXPORT.md)")


COLUMN_MODULES = ("o_proj", "down_proj")  # grouped by input columns; the others by output rows
CHUNK_ELEMENTS = 1 << 24  # 64 MB of float32 scratch per chunk


def importance_sums(module_name: str, w: torch.Tensor, a: torch.Tensor, b: torch.Tensor, grad_a: torch.Tensor,
                    grad_b: torch.Tensor, scaling: float) -> torch.Tensor:
    """The per-weight importance of one module summed over what its groups do not split:
    ``[out, 1]`` row sums (q/k/v, gate/up) or ``[1, in]`` column sums (o_proj, down_proj), which
    ``prune.module_group_scores`` reduces exactly as it would the full ``[out, in]`` matrix.
    Computed over blocks of output rows (a row of G needs only that row of B and dB), so the
    float32 scratch is a few CHUNK_ELEMENTS instead of several copies of W: a 70B MLP
    projection is 0.9 GB in float32."""
    rows = max(1, CHUNK_ELEMENTS // w.shape[1])
    columns = module_name in COLUMN_MODULES
    total = torch.zeros((1, w.shape[1]) if columns else (w.shape[0], 1), dtype=torch.float32, device=w.device)
    for start in range(0, w.shape[0], rows):
        end = min(start + rows, w.shape[0])
        block = prune_lib.weight_importance(w[start:end], a, b[start:end], grad_a, grad_b[start:end], scaling)
        if columns:
            total += block.sum(dim=0, keepdim=True)
        else:
            total[start:end] = block.sum(dim=1, keepdim=True)
    return total


def masks_digest(masks: prune_lib.Masks) -> str:
    h = hashlib.sha256()
    for layer in sorted(masks):
        for name in sorted(masks[layer]):
            h.update(f"{layer}.{name}:".encode())
            h.update(masks[layer][name].to(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def write_prune_dir(directory: Path, pruner: Pruner) -> list[Path]:
    """``directory/prune/`` (:func:`loradrop_ds.prune_files.write_prune_dir`) from ``pruner``'s
    state, with its summary and the model's dimensions in prune.json (under config.json's key
    names: a file format the pruned export reads). Rank 0 only; returns the files."""
    s = pruner.dims
    info = {**pruner.summary(), "num_attention_heads": s.num_heads, "num_key_value_heads": s.num_kv_heads,
            "head_dim": s.head_dim, "intermediate_size": s.intermediate_size, "hidden_size": s.hidden_size,
            "num_hidden_layers": s.num_layers, "masks_sha256": masks_digest(pruner.state.masks)}
    return prune_files.write_prune_dir(directory, pruner.state, info)
