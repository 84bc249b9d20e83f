"""The ``merged`` format, shard by shard: the base model's tensors (:class:`_BaseTensor`, from
their safetensors headers), the adapter's LoRA factors checked against them
(:class:`_LoraFactors`), the output shards, and the streaming merge that writes them
(:func:`_write_merged`); a pruned export's cut (:mod:`.pruned`) is applied on top.
"""

from __future__ import annotations

import json
import logging
import math
import re
import shutil
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import torch

from ..sizes import parse_size
from .errors import ExportError, _json_object, _parsed, _read_safetensors_header
from .source import ADAPTER_WEIGHTS, ExportSource

if TYPE_CHECKING:
    from .pruned import _PruneCut

log = logging.getLogger(__package__)  # the export's one logger, loradrop_ds.export
SAFE_WEIGHTS = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
# Settings of a peft LoRA whose merge is more than ``W += scaling * B @ A`` (or that carry weights besides A and B).
_UNMERGEABLE_SETTINGS = ("use_dora", "lora_bias", "modules_to_save", "trainable_token_indices", "target_parameters",
                         "layer_replication")


@dataclass
class _BaseTensor:
    """One tensor of the base checkpoint, as its file's header describes it (nothing read)."""

    file: Path
    shape: list[int]
    nbytes: int


@dataclass
class _LoraFactors:
    """The LoRA of one base weight, read from the peft adapter."""

    a: torch.Tensor  # [r, in_features]
    b: torch.Tensor  # [out_features, r]
    scaling: float
    transpose: bool  # the base layer is transformers' Conv1D, whose weight is stored [in, out] (peft's fan_in_fan_out)


def _shard_size_bytes(size: str | int) -> int:
    """``--max-shard-size`` in bytes: an int, or a size in the project's one grammar (loradrop_ds.sizes)."""
    try:
        value = size if isinstance(size, int) else parse_size(str(size))
    except ValueError:
        value = 0
    if value <= 0:
        raise ExportError(f"--max-shard-size {size}: give a positive size such as 5GB or 500MB")
    return value


def _local_model_dir(base_dir: str) -> Path:
    """The base model's directory; a Hub id is fetched (safetensors, JSON and code files only)."""
    if Path(base_dir).is_dir():
        return Path(base_dir)
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(base_dir, allow_patterns=["*.json", "*.safetensors", "*.py"]))
    except Exception as e:  # network, auth, missing repository: many types
        raise ExportError(f"base model {base_dir}: not a local directory, and fetching it from the Hub failed "
                          f"({type(e).__name__}); pass its local directory with --base-model") from None


def _base_weight_files(model_dir: Path) -> list[Path]:
    """The base's safetensors files: ``model.safetensors``, or the shards its index lists.
    Pickled weights (``*.bin``) are refused, never loaded: unpickling can run code."""
    if (model_dir / SAFE_WEIGHTS).is_file():
        return [model_dir / SAFE_WEIGHTS]
    if (model_dir / SAFE_INDEX).is_file():
        weight_map = _parsed(model_dir / SAFE_INDEX, lambda f: dict(_json_object(f)["weight_map"]))
        files = [model_dir / name for name in sorted(set(weight_map.values()))]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise ExportError(f"{model_dir / SAFE_INDEX} lists {missing[0]}, which is not in {model_dir}; "
                              "the base model's download is incomplete")
        return files
    pickles = sorted(p.name for p in model_dir.glob("*.bin"))
    found = f"it holds PyTorch pickle weights ({', '.join(pickles[:3])})" if pickles else "it holds no model weights"
    raise ExportError(f"base model {model_dir}: no {SAFE_WEIGHTS} or {SAFE_INDEX}, {found}; the merged export reads "
                      "safetensors only (loading a pickle can run code). Convert the base once, e.g. "
                      "AutoModelForCausalLM.from_pretrained(DIR).save_pretrained(NEW_DIR) (transformers writes "
                      "safetensors), and pass --base-model NEW_DIR")


def _base_tensors(files: list[Path]) -> dict[str, _BaseTensor]:
    """Every tensor of the base, in file order and, within a file, in the order it is stored
    (so reading them is one sequential pass)."""
    found: dict[str, _BaseTensor] = {}
    for path in files:
        header = _read_safetensors_header(path)
        for name, info in sorted(header.items(), key=lambda item: item[1]["data_offsets"][0]):
            if name in found:
                raise ExportError(f"base model: tensor {name} is in both {found[name].file.name} and {path.name}")
            start, end = info["data_offsets"]
            found[name] = _BaseTensor(path, info["shape"], end - start)
    index = files[0].parent / SAFE_INDEX
    if files[0].name != SAFE_WEIGHTS and index.is_file():
        for name, file in _parsed(index, lambda f: dict(_json_object(f)["weight_map"])).items():
            if name not in found or found[name].file.name != file:
                raise ExportError(f"{index} maps {name} to {file}, which does not hold it; the base model is inconsistent")
    return found


def _lora_factors(adapter_dir: Path, model_dir: Path, tensors: dict[str, _BaseTensor],
                 trust_remote_code: bool) -> dict[str, _LoraFactors]:
    """``{base weight name: its LoRA}`` for every weight the adapter targets, checked both ways
    against the base: every adapter key must land on a base weight, and every weight its
    ``target_modules`` select must be in the base and have a LoRA in the adapter.

    Which modules are targeted, and whether ``B @ A`` is transposed, are decided as peft
    decides them when it loads the adapter: on a weightless (meta-device) copy of the model,
    with peft's own target matching; peft transposes for transformers' ``Conv1D`` layers and
    never for ``nn.Linear``, whatever ``fan_in_fan_out`` says."""
    from peft import LoraConfig, PeftType
    from peft.tuners.tuners_utils import check_target_module_exists
    from peft.utils.other import get_pattern_key
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.pytorch_utils import Conv1D

    config = _parsed(adapter_dir / "adapter_config.json", lambda f: LoraConfig.from_pretrained(str(adapter_dir)))
    variants = [f.name for f in fields(config) if f.metadata.get("is_lora_variant") and getattr(config, f.name)]
    unmergeable = variants + [name for name in _UNMERGEABLE_SETTINGS if getattr(config, name, None)]
    if config.peft_type != PeftType.LORA or unmergeable:
        raise ExportError(f"{adapter_dir}: the merged export merges plain LoRA only, and this adapter is "
                          f"{config.peft_type} with {unmergeable}; export it with --format peft")
    if not (model_dir / "config.json").is_file():
        raise ExportError(f"base model {model_dir}: no config.json; it is not a model directory")
    model_config = _parsed(model_dir / "config.json",
                           lambda f: AutoConfig.from_pretrained(model_dir, trust_remote_code=trust_remote_code))
    if getattr(model_config, "quantization_config", None):
        raise ExportError(f"base model {model_dir} is quantized; merging needs its unquantized weights")
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(model_config, trust_remote_code=trust_remote_code)
    targets: dict[str, bool] = {}  # module name -> transpose
    for name, module in skeleton.named_modules():
        if not name or not check_target_module_exists(config, name):
            continue
        if not isinstance(module, (torch.nn.Linear, Conv1D)):
            raise ExportError(f"the adapter targets {name}, a {type(module).__name__}; the merged export merges LoRA "
                              "on Linear layers only; export with --format peft")
        targets[name] = isinstance(module, Conv1D)
    if not targets:  # peft refuses such an adapter too ("Target modules ... not found in the base model")
        raise ExportError(f"the adapter's target_modules {config.target_modules} select no layer of the base model "
                          f"{model_dir}: this adapter was not trained on this base")

    halves: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in load_file(adapter_dir / ADAPTER_WEIGHTS).items():
        m = re.fullmatch(r"base_model\.model\.(.+)\.(lora_A|lora_B)\.weight", key)
        if m is None:
            raise ExportError(f"adapter key {key} is not a LoRA A or B weight; the merged export merges plain LoRA "
                              "only; export with --format peft")
        module, half = m.groups()
        if f"{module}.weight" not in tensors:
            raise ExportError(f"adapter key {key} targets {module}.weight, which is not in the base model "
                              f"{model_dir}: this adapter was not trained on this base")
        if module not in targets:
            raise ExportError(f"adapter key {key}: {module} is not selected by the adapter's target_modules "
                              f"{config.target_modules}; adapter_config.json and the weights disagree")
        halves.setdefault(module, {})[half] = tensor

    rank_pattern, alpha_pattern = config.rank_pattern or {}, config.alpha_pattern or {}
    factors: dict[str, _LoraFactors] = {}
    for module, transpose in targets.items():
        weight = f"{module}.weight"
        if weight not in tensors:
            raise ExportError(f"the adapter targets {weight} (target_modules {config.target_modules}), but the base "
                              f"model {model_dir} does not hold it")
        have = halves.get(module, {})
        for half in ("lora_A", "lora_B"):
            if half not in have:
                raise ExportError(f"the adapter has no base_model.model.{module}.{half}.weight, but its target_modules "
                                  f"{config.target_modules} select {module}; the adapter is incomplete")
        # Scaling as peft's LoraModel._create_and_replace and LoraLayer.update_layer compute it.
        r = rank_pattern.get(get_pattern_key(rank_pattern.keys(), module), config.r)
        alpha = alpha_pattern.get(get_pattern_key(alpha_pattern.keys(), module), config.lora_alpha)
        a, b = have["lora_A"], have["lora_B"]
        delta_shape = [a.shape[1], b.shape[0]] if transpose else [b.shape[0], a.shape[1]]
        if a.shape[0] != r or b.shape[1] != r or delta_shape != tensors[weight].shape:
            raise ExportError(f"base_model.model.{module}.lora_A/lora_B.weight have shapes {list(a.shape)} and "
                              f"{list(b.shape)} (r = {r}), which do not fit {weight} of shape {tensors[weight].shape}")
        factors[weight] = _LoraFactors(a, b, alpha / math.sqrt(r) if config.use_rslora else alpha / r, transpose)
    return factors


def _merge_lora(weight: torch.Tensor, lora: _LoraFactors) -> torch.Tensor:
    """``weight += scaling * B @ A`` in place, computed as peft's ``merge_and_unload`` computes it
    (``LoraLayer.get_delta_weight``, then ``base_layer.weight.data += delta``): A and B in fp32
    (peft loads an adapter in fp32 on any base dtype, ``autocast_adapter_dtype``), ``B @ A``
    transposed for Conv1D, then times scaling; the in-place add computes in fp32 and rounds
    a half-precision weight once, so the result has the base weight's dtype."""
    delta = lora.b.float() @ lora.a.float()
    if lora.transpose:
        delta = delta.T
    weight += delta.mul_(lora.scaling)  # in place: the same products as peft's ``* scaling``, one fp32 temporary less
    return weight


def _plan_output_shards(tensors: dict[str, _BaseTensor], max_bytes: int) -> list[list[str]]:
    """Tensor names per output shard, in order: a shard is closed when the next tensor would
    take it over ``max_bytes``; a tensor larger than that gets a shard of its own (as
    transformers' ``save_pretrained`` shards)."""
    shards: list[list[str]] = []
    size = 0
    for name, info in tensors.items():
        if not shards or size + info.nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += info.nbytes
    return shards


def _stream_base_tensors(tensors: dict[str, _BaseTensor]):
    """``(name, tensor)`` in the order of ``tensors``, one base file open at a time.

    safetensors' ``pread`` backend reads each tensor into memory of its own, so what is held
    is what the output shard holds. The default memory map keeps every page read resident
    (counted in RSS) until the file is closed: a whole base file, however large it is (a
    single-file base: the whole model; measured: 332 MB held for a 320 MB file). A
    safetensors without the ``pread`` backend (it came with 0.8) memory-maps: the merge then
    holds up to one base file."""
    from safetensors import safe_open

    by_file: dict[Path, list[str]] = {}
    for name, info in tensors.items():
        by_file.setdefault(info.file, []).append(name)
    for path, names in by_file.items():
        try:
            reader = safe_open(str(path), framework="pt", device="cpu", backend="pread")
        except (TypeError, ValueError):  # no ``backend`` argument, or no "pread" among its values
            reader = safe_open(str(path), framework="pt", device="cpu")
        with reader:
            for name in names:
                yield name, reader.get_tensor(name)


@dataclass
class _MergeJob:
    """Everything the merged export needs, read and checked before anything is written."""

    model_dir: Path
    trust: bool
    tensors: dict[str, _BaseTensor]
    factors: dict[str, _LoraFactors]
    shards: list[list[str]]
    max_bytes: int
    tokenizer: object


def _merge_job(src: ExportSource, base_dir: str, max_shard_size: str | int) -> _MergeJob:
    """Read and check the base (its safetensors headers against the files' sizes, so a missing
    or truncated weight file is refused here), the adapter against it, and the tokenizer."""
    from transformers import AutoTokenizer

    from ..model import resolve_model_path

    trust = bool(src.config.get("model", {}).get("trust_remote_code", False))
    max_bytes = _shard_size_bytes(max_shard_size)
    model_dir = _local_model_dir(base_dir)
    tensors = _base_tensors(_base_weight_files(model_dir))
    factors = _lora_factors(src.adapter_dir, model_dir, tensors, trust)
    tok_path = src.config.get("model", {}).get("tokenizer") or base_dir
    try:
        tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(tok_path), trust_remote_code=trust)
    except (OSError, ValueError) as e:
        raise ExportError(f"tokenizer {tok_path}: cannot be loaded ({type(e).__name__}); the merged export "
                          "writes it next to the weights") from None
    return _MergeJob(model_dir, trust, tensors, factors, _plan_output_shards(tensors, max_bytes), max_bytes,
                      tokenizer)


def _write_merged(plan: _MergeJob, out: Path, pruned: Optional[_PruneCut] = None) -> None:
    """Merge shard by shard: the base's tensors are read one at a time, each LoRA-targeted
    weight gets its delta, and every output shard is written as soon as it is full, so
    memory holds one output shard (``max_shard_size``), the adapter and one fp32 delta,
    whatever the model's size. The output is sharded by ``max_shard_size`` like
    ``save_pretrained`` (one file ``model.safetensors``, or shards plus an index), each
    tensor in the dtype the base stores it in.

    With ``pruned`` (the ``pruned`` format), each merged tensor is then cut as the prune plan
    says (:class:`_PruneCut`), the shards are planned on the cut sizes, and ``config.json``
    is the plan's (the kept widths, ``head_dim`` written explicitly)."""
    from safetensors.torch import save_file

    model_dir, tensors, factors, shards, max_bytes = plan.model_dir, plan.tensors, plan.factors, plan.shards, \
        plan.max_bytes
    if pruned is not None:
        shards = _plan_output_shards(pruned.shapes(tensors), max_bytes)
    for name in ("config.json", "generation_config.json"):
        if (model_dir / name).is_file() and not (pruned is not None and name == "config.json"):
            shutil.copy2(model_dir / name, out / name)
    if pruned is not None:
        (out / "config.json").write_text(json.dumps(pruned.config, indent=2, sort_keys=True) + "\n")
    elif plan.trust:  # the model's own code, which config.json's auto_map names
        for code in model_dir.glob("*.py"):
            shutil.copy2(code, out / code.name)
    plan.tokenizer.save_pretrained(out)

    log.info("merging LoRA into %d of %d base tensors, %d output shard(s) of up to %s bytes",
             len(factors), len(tensors), len(shards), f"{max_bytes:,}")
    if pruned is not None:
        pruned.log_widths()

    names = [SAFE_WEIGHTS] if len(shards) == 1 else [f"model-{i:05d}-of-{len(shards):05d}.safetensors"
                                                     for i in range(1, len(shards) + 1)]
    stream = _stream_base_tensors(tensors)
    weight_map: dict[str, str] = {}
    total_params = total_size = 0
    for filename, shard in zip(names, shards, strict=True):
        merged: dict[str, torch.Tensor] = {}  # drops the previous shard before this one is read
        for name in shard:
            streamed, tensor = next(stream)
            assert streamed == name  # the plan and the stream walk ``tensors`` in the same order
            tensor = _merge_lora(tensor, factors[name]) if name in factors else tensor
            if pruned is not None and name in pruned.slices:
                tensor = pruned.slices[name].apply(tensor)  # after the merge: LoRA's delta is on the full shape
            merged[name] = tensor
            weight_map[name] = filename
            total_params += tensor.numel()
            total_size += tensor.numel() * tensor.element_size()
        save_file(merged, out / filename, metadata={"format": "pt"})
    if len(shards) > 1:
        (out / SAFE_INDEX).write_text(json.dumps({
            "metadata": {"total_parameters": total_params, "total_size": total_size},
            "weight_map": dict(sorted(weight_map.items())),
        }, indent=2) + "\n")
