"""The optimisation loop of both stages, as an iterator the recipe drives, and evaluation."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F

from . import preemption
from .data import IGNORE_INDEX, TokenizedSet, collate, eval_batches
from .deepspeed_private import forget_zero3_trace
from .distributed import DistInfo
from .faults import fault_point
from .metrics import MetricsLogger, progress_bar
from .throughput import StepFlops, peak_memory

log = logging.getLogger(__name__)


@dataclass
class StageResult:
    steps: int  # optimizer steps run by this call
    losses: list[float]  # mean loss over all ranks at every optimizer step run
    tokens_per_rank: int
    seconds: float
    flops_per_rank: float  # model FLOPs (throughput.StepFlops), 0 without a count
    step_seconds: float  # the seconds of the steps alone: what the recipe did between steps left out
    memory: dict[str, float]  # throughput.peak_memory at the end

    def rates(self, peak_flops: Optional[float]) -> dict[str, Optional[float]]:
        """The stage's throughput for summary.json: tokens/s and model TFLOP/s per rank (per GPU)
        over its step time, the MFU when the peak is known, and the memory peaks."""
        seconds = max(self.step_seconds, 1e-9)
        return {"tokens_per_s_per_rank": self.tokens_per_rank / seconds, "tflops_per_rank": self.flops_per_rank / seconds / 1e12,
                "mfu": self.flops_per_rank / seconds / peak_flops if peak_flops else None, **self.memory}


def _end_of_step_all_reduce(loss: torch.Tensor, stop: bool) -> tuple[float, int]:
    """The step's one collective: the mean of ``loss`` over ranks, and how many ranks asked to
    stop. The preemption flag rides on the loss's all-reduce (one 2-element float64 tensor,
    summed) so that preemption costs no extra collective per step. The loss is summed exactly as
    a 1-element all-reduce would sum it: elementwise, in the same order."""
    packed = torch.stack([loss, torch.ones_like(loss) if stop else torch.zeros_like(loss)])
    dist.all_reduce(packed, op=dist.ReduceOp.SUM)
    total, stopping = packed.tolist()
    return total / dist.get_world_size(), int(stopping)


@dataclass
class TrainingStage:
    """Optimizer steps ``start_step + 1 .. steps`` of ``grad_accum`` micro-batches each,
    driven by the recipe::

        stage = TrainingStage(engine, batches, steps, stage="main", info=info, logger=logger)
        for step, loss in stage:
            ...  # checkpoints, evals, selection checks, prune updates: in order, here
        result = stage.result()

    Iterating runs one step and yields ``(step, mean loss over all ranks)``; a ``break``
    ends the stage there (``sampling_steps=auto``: every rank must break at the same step).
    ``start_step > 0`` continues a resumed stage; ``batches`` must be positioned to match.
    Each batch holds the model's inputs and ``token_mask``, the real tokens (the ones
    counted in throughput and in the LoRA-drop statistics).

    ``engine.backward`` scales each micro-batch loss by ``1/grad_accum`` and averages
    gradients over ranks, so a step's gradient is the mean of the micro-batch means. With
    a ``recorder`` (an :class:`ImportanceRecorder`, or LoRAPrune's ``Pruner``), each
    micro-batch's forward runs inside ``recorder.recording(token_mask)``, and
    ``recorder.begin_step(step)`` is called before each step when it has one. What the
    recipe does between two steps is not in the logged ``seconds_per_step`` and
    ``tokens_per_s_per_rank``. After it, ``STAGE:STEP`` is a test fault point
    (``loradrop_ds.faults``).

    Preemption: the step's all-reduce also tells every rank whether any rank has received a
    stop signal (``loradrop_ds.preemption``). If so, ``preempted`` is True on every rank at
    the same step, and the iteration ends after the recipe's work for that step: the recipe
    checkpoints that step and stops the run.

    With ``flops`` (:class:`throughput.StepFlops`) each logged step also has the model
    TFLOP/s per rank and, with ``peak_flops``, the MFU; CUDA runs log the allocated and
    reserved memory peaks (``throughput.peak_memory``).
    """

    engine: Any
    batches: Iterator[dict[str, torch.Tensor]]
    steps: int
    stage: str
    info: DistInfo
    logger: MetricsLogger
    log_every: int = 1
    start_step: int = 0
    recorder: Optional[Any] = None
    flops: Optional[StepFlops] = None
    peak_flops: Optional[float] = None  # FLOP/s; None: no MFU
    losses: list[float] = field(default_factory=list)  # mean loss over all ranks at every step run
    tokens_per_rank: int = 0
    flops_per_rank: float = 0.0
    step_seconds: float = 0.0
    started: Optional[float] = None
    # True on every rank once a stop signal (loradrop_ds.preemption) reached any rank: the
    # iteration then ends after the step that learned it, and the recipe checkpoints it.
    preempted: bool = False

    def __iter__(self) -> Iterator[tuple[int, float]]:
        engine, info, recorder = self.engine, self.info, self.recorder
        engine.train()
        grad_accum = engine.gradient_accumulation_steps()
        if info.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(info.device)
        bar = progress_bar(self.steps, desc=self.stage, enabled=info.is_main)
        bar.update(self.start_step)
        self.started = step_start = time.perf_counter()
        window_tokens = window_steps = 0
        window_flops = window_seconds = 0.0
        try:
            for step in range(self.start_step + 1, self.steps + 1):
                # The loss stays on the device until the one all-reduce per step: no host
                # sync per micro-batch.
                step_loss = torch.zeros((), dtype=torch.float64, device=info.device)
                if hasattr(recorder, "begin_step"):
                    recorder.begin_step(step)
                for _ in range(grad_accum):
                    batch = next(self.batches)
                    row_tokens = batch["token_mask"].sum(dim=1)  # counted on the host, before the copy
                    n = int(row_tokens.sum())
                    window_tokens += n
                    self.tokens_per_rank += n
                    if self.flops is not None:
                        flops = self.flops.flops(n, int(row_tokens.pow(2).sum()))
                        window_flops += flops
                        self.flops_per_rank += flops
                    batch = {k: v.to(info.device, non_blocking=True) for k, v in batch.items()}
                    token_mask = batch.pop("token_mask")
                    with recorder.recording(token_mask) if recorder else contextlib.nullcontext():
                        out = engine(**batch)
                    engine.backward(out.loss)
                    engine.step()
                    step_loss += out.loss.detach().to(torch.float64) / grad_accum
                # Also a sync point: step times below are whole steps.
                mean_loss, ranks_stopping = _end_of_step_all_reduce(step_loss, preemption.requested())
                if ranks_stopping and not self.preempted:
                    self.preempted = True
                    if info.is_main:
                        log.warning("preemption: a stop signal reached %d of %d ranks; %s step %d is the last one "
                                    "this run takes", ranks_stopping, info.world_size, self.stage, step)
                self.losses.append(mean_loss)
                now = time.perf_counter()
                window_seconds += now - step_start
                self.step_seconds += now - step_start
                window_steps += 1
                if step % self.log_every == 0 or step == self.steps:
                    seconds = max(window_seconds, 1e-9)
                    record = {
                        "stage": self.stage,
                        "loss": mean_loss,
                        "lr": engine.get_lr()[0],
                        "tokens_per_s_per_rank": window_tokens / seconds,
                        "seconds_per_step": seconds / window_steps,
                        "grad_norm": _grad_norm(engine),
                        **peak_memory(info.device),
                    }
                    if self.flops is not None:
                        record["tflops_per_rank"] = window_flops / seconds / 1e12
                        if self.peak_flops:
                            record["mfu"] = window_flops / seconds / self.peak_flops
                    self.logger.log(record, step=step)
                    bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{record['lr']:.2e}")
                    window_tokens, window_steps, window_flops, window_seconds = 0, 0, 0.0, 0.0
                bar.update(1)
                # What the recipe does now (checkpoints, evals, selection checks, prune
                # updates) is not step time: the next step's clock starts after it (each
                # logs its own time where it matters).
                yield step, mean_loss
                step_start = time.perf_counter()
                fault_point(info, f"{self.stage}:{step}")
                if self.preempted:  # every rank learned it at this step's all-reduce: all end here
                    return
        finally:
            bar.close()

    def result(self) -> StageResult:
        """The steps run so far by this call, their losses, tokens and wall time (including
        what the recipe did between steps)."""
        seconds = time.perf_counter() - self.started if self.started is not None else 0.0
        return StageResult(len(self.losses), list(self.losses), self.tokens_per_rank, seconds, self.flops_per_rank,
                           self.step_seconds, peak_memory(self.info.device))


def _grad_norm(engine: Any) -> Optional[float]:
    norm = engine.get_global_grad_norm()
    if norm is None:
        return None
    return float(norm.item()) if torch.is_tensor(norm) else float(norm)


@torch.no_grad()
def evaluate(
    engine: Any,
    data: TokenizedSet,
    info: DistInfo,
    micro_batch_size: int,
    pad_id: int,
    desc: str = "eval",
    probe: Optional[dict] = None,
) -> dict[str, float]:
    """Token-weighted loss on response tokens over the whole set and, for label tasks,
    accuracy: the argmax over the labels' first response tokens at the position that
    predicts the response. Every rank runs the same number of forwards.

    If ``probe`` is a dict, rank 0 stores the first batch and its logits there.
    """
    engine.eval()
    batches = eval_batches(len(data), micro_batch_size, info.rank, info.world_size)
    sums = torch.zeros(4, dtype=torch.float64)  # loss sum, tokens, correct, labelled
    candidates = (torch.tensor(data.label_token_ids, dtype=torch.long, device=info.device) if data.label_token_ids
                  else None)
    bar = progress_bar(len(batches), desc=desc, enabled=info.is_main)
    for idx, weights in batches:
        chosen = data.examples(idx)
        batch = {k: v.to(info.device) for k, v in collate(chosen, pad_id).items() if k != "token_mask"}
        logits = engine(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
        if probe is not None and info.is_main and not probe:
            probe.update({k: v.cpu() for k, v in batch.items()})
            probe["logits"] = logits.cpu()
        w = torch.tensor(weights, dtype=torch.float32, device=info.device)
        shift_logits, shift_labels = logits[:, :-1], batch["labels"][:, 1:]
        token_loss = F.cross_entropy(shift_logits.transpose(1, 2), shift_labels, ignore_index=IGNORE_INDEX,
                                     reduction="none")
        valid = (shift_labels != IGNORE_INDEX).float() * w[:, None]
        sums[0] += float((token_loss * valid).sum())
        sums[1] += float(valid.sum())
        if candidates is not None:
            pos = torch.tensor([e.response_start - 1 for e in chosen], device=info.device)
            row_logits = logits[torch.arange(len(chosen), device=info.device), pos][:, candidates]
            pred = row_logits.argmax(dim=-1).cpu()
            gold = torch.tensor([e.label for e in chosen])
            sums[2] += float(((pred == gold).float() * w.cpu()).sum())
            sums[3] += float(w.sum())
        bar.update(1)
    bar.close()
    sums = sums.to(info.device)
    dist.all_reduce(sums, op=dist.ReduceOp.SUM)
    sums = sums.cpu()
    result = {"eval_loss": float(sums[0] / max(sums[1], 1.0))}
    if candidates is not None:
        result["eval_accuracy"] = float(sums[2] / max(sums[3], 1.0))
    engine.train()
    forget_zero3_trace(engine)  # training must not run on release decisions made for this eval
    return result
