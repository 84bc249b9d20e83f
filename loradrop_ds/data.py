"""Data: datasets from local files (or the hub), prompt/response templates with the
loss on response tokens only, the stratified sampling subset, and deterministic
per-rank batches.

Everything here is a pure function of (data, config, seed, rank, world size), so every
rank derives the same subset and the same global batch order without communicating.
"""

from __future__ import annotations

import logging
import math
import os
import random
import string
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from .config import DataConfig

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
_LOCAL_FORMATS = {".json": "json", ".jsonl": "json", ".parquet": "parquet"}


class DataError(ValueError):
    """Data that cannot be used; the message names the file or column and the fix."""


def load_records(path_or_name: str, key: str) -> list[dict]:
    """Rows of a local JSON/JSONL/parquet file, or of a hub dataset's train split."""
    import datasets

    suffix = Path(path_or_name).suffix.lower()
    looks_local = suffix in _LOCAL_FORMATS or os.sep in path_or_name or path_or_name.startswith(".")
    if looks_local or os.path.exists(path_or_name):
        if not os.path.isfile(path_or_name):
            raise DataError(f"{key}={path_or_name}: no such file")
        if suffix not in _LOCAL_FORMATS:
            raise DataError(f"{key}={path_or_name}: unsupported format {suffix!r}; use .json, .jsonl or .parquet")
        if os.path.getsize(path_or_name) == 0 or (suffix != ".parquet" and not Path(path_or_name).read_text().strip()):
            raise DataError(f"{key}={path_or_name}: the dataset is empty")
        try:
            ds = datasets.load_dataset(_LOCAL_FORMATS[suffix], data_files=path_or_name, split="train")
        except Exception as e:  # datasets raises many types for malformed files
            raise DataError(f"{key}={path_or_name}: cannot be read as {_LOCAL_FORMATS[suffix]} ({e})") from e
    else:
        try:
            ds = datasets.load_dataset(path_or_name, split="train")
        except Exception as e:
            raise DataError(f"{key}={path_or_name}: not a local file and not loadable from the hub ({e})") from e
    if len(ds) == 0:
        raise DataError(f"{key}={path_or_name}: the dataset is empty")
    return ds.to_list()


def template_fields(template: str) -> list[str]:
    return [f for _, f, _, _ in string.Formatter().parse(template) if f]


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]  # IGNORE_INDEX on prompt tokens
    response_start: int  # index of the first response token in input_ids
    label: Optional[int] = None  # class index into Tokenized.label_names


@dataclass
class Tokenized:
    examples: list[Example]
    label_names: list[str]  # sorted class names ([] when there is no label column)
    label_token_ids: list[int]  # first response token of each class
    num_truncated: int


def tokenize_records(
    records: Sequence[dict], tokenizer: Any, cfg: DataConfig, key: str, label_names: Optional[list[str]] = None
) -> Tokenized:
    """Prompt tokens (with BOS if the tokenizer adds one) + response tokens + EOS; the
    labels mask the prompt. Too-long examples lose prompt tokens from the left."""
    needed = set(template_fields(cfg.prompt_template) + template_fields(cfg.response_template))
    if cfg.label_field:
        needed.add(cfg.label_field)
    columns = set(records[0])
    missing = sorted(needed - columns)
    if missing:
        raise DataError(f"{key}: columns {missing} used by data.prompt_template/response_template/label_field "
                        f"are not in the data; its columns are {sorted(columns)}")
    if cfg.label_field and label_names is None:
        label_names = sorted({str(r[cfg.label_field]) for r in records})
    label_index = {name: i for i, name in enumerate(label_names or [])}

    examples, truncated = [], 0
    label_first_token: dict[int, int] = {}
    for row in records:
        prompt_ids = tokenizer(cfg.prompt_template.format(**row), add_special_tokens=True)["input_ids"]
        response_ids = tokenizer(cfg.response_template.format(**row), add_special_tokens=False)["input_ids"]
        if not response_ids:
            raise DataError(f"{key}: a response tokenizes to nothing: {cfg.response_template.format(**row)!r}")
        response_ids = response_ids + [tokenizer.eos_token_id]
        budget = cfg.max_seq_len - len(response_ids)
        if budget < 1:
            raise DataError(f"{key}: a response of {len(response_ids)} tokens does not fit data.max_seq_len="
                            f"{cfg.max_seq_len}; raise it")
        if len(prompt_ids) > budget:
            prompt_ids = prompt_ids[len(prompt_ids) - budget:]
            truncated += 1
        label = None
        if cfg.label_field:
            name = str(row[cfg.label_field])
            if name not in label_index:
                raise DataError(f"{key}: label {name!r} does not occur in the training data")
            label = label_index[name]
            first = label_first_token.setdefault(label, response_ids[0])
            if first != response_ids[0]:
                raise DataError(f"{key}: label {name!r} has responses starting with different tokens; "
                                "accuracy needs one response per label (check data.response_template)")
        examples.append(Example(prompt_ids + response_ids, [IGNORE_INDEX] * len(prompt_ids) + response_ids,
                                len(prompt_ids), label))
    label_token_ids = [label_first_token.get(i, -1) for i in range(len(label_names or []))]
    if cfg.label_field and len(set(label_token_ids)) != len(label_token_ids):
        raise DataError(f"{key}: two labels share their first response token; accuracy cannot tell them apart")
    if truncated:
        log.warning("%s: %d of %d examples truncated to data.max_seq_len=%d", key, truncated, len(records), cfg.max_seq_len)
    return Tokenized(examples, list(label_names or []), label_token_ids, truncated)


def draw_sample(num_examples: int, ratio: float, seed: int, labels: Optional[Sequence[int]] = None) -> list[int]:
    """Indices of the sampling subset: ``ratio`` of the data, stratified by ``labels``
    (each class contributes ``round(ratio * class size)``, at least one), sorted."""
    rng = random.Random(seed)
    groups: dict[Any, list[int]] = {}
    for i in range(num_examples):
        groups.setdefault(labels[i] if labels is not None else None, []).append(i)
    chosen: list[int] = []
    for key in sorted(groups, key=lambda k: (k is None, k)):
        members = groups[key]
        k = max(1, round(ratio * len(members)))
        chosen.extend(rng.sample(members, k))
    return sorted(chosen)


class BatchStream:
    """An endless, deterministic stream of this rank's micro-batches over ``indices``.

    Epoch ``e`` visits the indices in a permutation seeded by ``(seed, e)``; each
    consecutive group of ``micro_batch_size * world_size`` indices is one global
    micro-batch, of which rank ``r`` takes the ``r``-th slice. An incomplete group at
    the end of an epoch is dropped, so every rank always has a full micro-batch.
    """

    def __init__(self, indices: Sequence[int], micro_batch_size: int, rank: int, world_size: int, seed: int):
        self.indices = list(indices)
        self.micro_batch_size = micro_batch_size
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.group = micro_batch_size * world_size
        self.groups_per_epoch = len(self.indices) // self.group
        if self.groups_per_epoch == 0:
            raise DataError(f"{len(self.indices)} examples cannot fill one micro-batch of {micro_batch_size} "
                            f"on each of {world_size} ranks")
        self.position = 0  # global micro-batches consumed so far

    def _epoch_order(self, epoch: int) -> list[int]:
        order = list(self.indices)
        random.Random(f"{self.seed}:{epoch}").shuffle(order)
        return order

    def __iter__(self) -> Iterator[list[int]]:
        return self

    def __next__(self) -> list[int]:
        epoch, group = divmod(self.position, self.groups_per_epoch)
        order = self._epoch_order(epoch)
        start = group * self.group + self.rank * self.micro_batch_size
        self.position += 1
        return order[start:start + self.micro_batch_size]


def collate(examples: Sequence[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad into ``input_ids``, ``attention_mask`` and ``labels`` tensors."""
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, e in enumerate(examples):
        n = len(e.input_ids)
        ids[row, :n] = torch.tensor(e.input_ids)
        labels[row, :n] = torch.tensor(e.labels)
        mask[row, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def eval_batches(num_examples: int, micro_batch_size: int, rank: int, world_size: int) -> list[tuple[list[int], list[float]]]:
    """This rank's share of the eval set as ``(indices, weights)`` batches.

    Every rank must run the same number of forwards under ZeRO-3 (each forward gathers
    parameters collectively), so the set is padded up to a whole number of global
    batches with repeats of example 0 carrying weight 0.
    """
    per_step = micro_batch_size * world_size
    steps = math.ceil(num_examples / per_step)
    out = []
    for s in range(steps):
        idx, w = [], []
        for j in range(micro_batch_size):
            i = s * per_step + rank * micro_batch_size + j
            idx.append(i if i < num_examples else 0)
            w.append(1.0 if i < num_examples else 0.0)
        out.append((idx, w))
    return out
