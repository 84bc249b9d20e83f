"""The run context every stage of launch/train.py takes: the settings, this rank, the
checked inputs, where results go, and the few things each stage does the same way
(evaluate, its micro-batches, resume from a checkpoint, write one, stop for preemption)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, NoReturn, Optional

from . import config as config_lib
from . import data as data_lib
from . import preemption
from . import run_checkpoint as ckpt
from .distributed import DistInfo
from .importance import Selection
from .metrics import MetricsLogger
from .preflight import Inputs
from .prune_zero3 import Pruner, write_prune_dir
from .throughput import StepFlops, peak_flops_per_s
from .training import TrainingStage, evaluate


@dataclasses.dataclass
class Run:
    """What every stage of a run needs: settings, ranks, checked inputs, where results go."""

    cfg: config_lib.Config
    info: DistInfo
    inputs: Inputs
    logger: MetricsLogger
    results: dict  # zero-shot and final eval, stage summaries: saved in checkpoints and summary.json
    wall_start: float
    hf_ds: Any = None  # transformers' ZeRO-3 config for the model in use: alive as long as the model is
    pruner: Optional[Pruner] = None  # LoRAPrune's hooks and state in the main stage (prune.target_sparsity > 0)

    @property
    def out_dir(self) -> Path:
        return Path(self.cfg.output_dir)

    @property
    def resume_path(self) -> Optional[Path]:
        return self.inputs.resume[0] if self.inputs.resume else None

    @property
    def resumed(self) -> Optional[ckpt.RunState]:
        return self.inputs.resume[1] if self.inputs.resume else None

    @property
    def step_flops(self) -> StepFlops:
        """The model-FLOP count of a step (throughput.py's convention) for this model and recomputation."""
        return StepFlops.for_model(self.inputs.dims, self.cfg.model.gradient_checkpointing)

    @property
    def peak_flops(self) -> Optional[float]:
        """The MFU's denominator: train.peak_tflops, else the device's dense bf16 peak, else None."""
        return peak_flops_per_s(self.info.device, self.cfg.train.peak_tflops)

    def stage_rates(self, stage: TrainingStage) -> dict:
        """A stage's throughput and memory for summary.json (``StageResult.rates``) with the
        planner's predicted tensor peak for that stage beside the measured one (GiB; the main
        stage is planned with every layer kept, an upper bound for LoRA-drop's)."""
        rates = stage.result().rates(self.peak_flops)
        plan = self.inputs.memory_plan
        planned = next((s for s in plan.stages if s.stage == stage.stage), None) if plan is not None else None
        if planned is not None:
            rates["planned_peak_gib"] = planned.tensor_bytes / 2**30
        return rates

    def training_stage(self, engine: Any, batches: data_lib.MicroBatches, steps: int, stage: str, start_step: int,
                       recorder: Any = None) -> TrainingStage:
        """``stage``'s steps ``start_step + 1 .. steps``, logged every train.log_every with throughput and MFU."""
        return TrainingStage(engine, batches, steps, stage=stage, info=self.info, logger=self.logger,
                             log_every=self.cfg.train.log_every, start_step=start_step, recorder=recorder,
                             flops=self.step_flops, peak_flops=self.peak_flops)

    def evaluate(self, engine: Any, desc: str, probe: Optional[dict] = None) -> dict:
        if self.inputs.eval_set is None:
            return {}
        return evaluate(engine, self.inputs.eval_set, self.info, self.cfg.train.micro_batch_size,
                        self.inputs.tokenizer.pad_token_id, desc=desc, probe=probe)

    def micro_batches(self, indices: Any, seed: int) -> data_lib.MicroBatches:
        """This rank's micro-batches over ``indices`` of the training set (packed with
        data.packing; one row per micro-batch for flash-attn's varlen kernel)."""
        return data_lib.MicroBatches(self.inputs.train_set, indices, self.cfg.data, self.cfg.train.micro_batch_size,
                                     self.info.rank, self.info.world_size, seed, self.inputs.tokenizer.pad_token_id,
                                     one_row=self.inputs.attn_implementation == "flash_attention_2")

    def resume_stage(self, stage: str, engine: Any, batches: data_lib.MicroBatches) -> int:
        """The step to continue ``stage`` from: 0, or the resumed checkpoint's step with the
        engine, RNG and data position restored from it."""
        if self.resumed is None or self.resumed.stage != stage:
            return 0
        ckpt.restore_engine(engine, batches, self.resume_path, self.resumed, self.info, self.cfg.seed)
        return self.resumed.step

    def save_checkpoint(self, engine: Any, stage: str, step: int, batches: data_lib.MicroBatches,
                        selection: Optional[Selection], stats=None) -> None:
        state = ckpt.RunState(stage, step, batches.stream.position, self.info.world_size, config_lib.to_dict(self.cfg),
                              self.inputs.base_model, selection=json.loads(selection.to_json()) if selection else None,
                              results=self.results)
        pruner = self.pruner if stage == "main" else None
        ckpt.save_run_checkpoint(engine, self.out_dir, state, self.info, self.cfg.train.keep_last, stats=stats,
                                 write_extra=(lambda d: write_prune_dir(d, pruner)) if pruner else None)

    def stop_for_preemption(self, stage: str, step: int) -> NoReturn:
        """Every rank, once the checkpoint at (stage, step) is complete on every rank (the
        write ends with an exchange of outcomes): rank 0 writes the preemption marker, and
        every rank raises ``Preempted`` (the CLI exits with ``preemption.EXIT_CODE``)."""
        checkpoint = self.out_dir / ckpt.CHECKPOINTS / ckpt.checkpoint_name(stage, step)
        if self.info.is_main:
            preemption.write_marker(self.out_dir, stage, step, checkpoint)
        raise preemption.Preempted(stage, step, checkpoint)
