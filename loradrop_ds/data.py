"""Data: rows from local files or the hub, rendered (format strings, Alpaca, or the
tokenizer's chat template) and tokenised once per node into an Arrow cache, the
stratified sampling subset, packing, and deterministic per-rank micro-batches.

* Tokenisation runs through ``datasets.Dataset.map(batched=True, num_proc=...)`` on each
  node's local rank 0 and is saved under ``$LORADROP_CACHE/tokenized/<key>``; the key
  hashes the data's bytes, the tokenizer's files, every setting that shapes the tokens
  and this module's format version, so a changed input is never served stale. Every rank
  then memory-maps the same Arrow files and reads only the rows of its micro-batches.
* Everything else is a pure function of (data, config, seed, rank, world size), so every
  rank derives the same subset, the same packs and the same global batch order without
  communicating.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import logging
import math
import os
import random
import string
import tempfile
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from .atomic import staged_dir
from .config import DataConfig

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
_LOCAL_FORMATS = {".json": "json", ".jsonl": "json", ".parquet": "parquet"}
# Bump when the tokenised columns change meaning: old cache entries are then never read.
TOKENIZED_FORMAT_VERSION = 1

# The Stanford Alpaca prompts (github.com/tatsu-lab/stanford_alpaca, train.py PROMPT_DICT),
# with a newline after "### Response:"; the loss is on `output` (+ EOS).
ALPACA_PROMPT = ("Below is an instruction that describes a task, paired with an input that provides further context. "
                 "Write a response that appropriately completes the request.\n\n"
                 "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n")
ALPACA_PROMPT_NO_INPUT = ("Below is an instruction that describes a task. Write a response that appropriately "
                          "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n")
# ShareGPT's `from` values -> chat-template roles.
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "tool": "tool", "function": "tool"}


class DataError(ValueError):
    """Data that cannot be used; the message names the file or column and the fix."""


# ----------------------------------------------------------------------------- loading


def load_table(path_or_name: str, key: str, name: Optional[str] = None, split: str = "train") -> Any:
    """A ``datasets.Dataset`` of a local JSON/JSONL/parquet file, or of a hub dataset's
    ``split`` (configuration ``name``)."""
    import datasets

    path_or_name = os.path.expanduser(path_or_name)
    suffix = Path(path_or_name).suffix.lower()
    # "org/name" is a hub id; a data suffix, an absolute or ./ path, or an existing path is a file.
    looks_local = suffix in _LOCAL_FORMATS or path_or_name.startswith((".", os.sep, "~"))
    if looks_local or os.path.exists(path_or_name):
        if not os.path.isfile(path_or_name):
            raise DataError(f"{key}={path_or_name}: no such file")
        if suffix not in _LOCAL_FORMATS:
            raise DataError(f"{key}={path_or_name}: unsupported format {suffix!r}; use .json, .jsonl or .parquet")
        if os.path.getsize(path_or_name) == 0 or (suffix != ".parquet" and _only_whitespace(path_or_name)):
            raise DataError(f"{key}={path_or_name}: the dataset is empty")
        if suffix != ".parquet":  # datasets' JSON reader reports bad bytes without saying where
            check_utf8(path_or_name, key)
        try:
            ds = datasets.load_dataset(_LOCAL_FORMATS[suffix], data_files=path_or_name, split="train")
        except Exception as e:  # datasets raises many types for malformed files
            raise DataError(f"{key}={path_or_name}: cannot be read as {_LOCAL_FORMATS[suffix]} ({e})") from e
    else:
        try:
            ds = datasets.load_dataset(path_or_name, name, split=split)
        except Exception as e:
            raise DataError(f"{key}={path_or_name}: not a local file and not loadable from the hub "
                            f"(data.name={name}, data.split={split}): {e}") from e
    if len(ds) == 0:
        raise DataError(f"{key}={path_or_name}: the dataset is empty")
    return ds


def _only_whitespace(path: str) -> bool:
    """True for a text file with nothing but whitespace, read until the first other byte."""
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 16), b""):
            if chunk.strip():
                return False
    return True


def check_utf8(path: str, key: str, chunk_size: int = 1 << 20) -> None:
    """Raise a DataError naming ``file:line`` of the first bytes that are not UTF-8.

    Reads whole lines a chunk at a time (a newline byte never occurs inside a UTF-8
    sequence, so a chunk cut after a newline decodes on its own)."""
    lines_before = 0
    tail = b""
    with open(path, "rb") as f:
        while True:
            chunk = f.read(chunk_size)
            data = tail + chunk
            cut = data.rfind(b"\n") + 1 if chunk else len(data)
            block, tail = data[:cut], data[cut:]
            try:
                block.decode("utf-8")
            except UnicodeDecodeError as e:
                line = lines_before + block.count(b"\n", 0, e.start) + 1
                raise DataError(f"{key}={path}:{line}: byte {block[e.start]:#04x} is not UTF-8 ({e.reason}); "
                                "save the file as UTF-8 or fix that line") from None
            lines_before += block.count(b"\n")
            if not chunk:
                return


def load_records(path_or_name: str, key: str) -> list[dict]:
    """Rows as Python dicts (small files and tests; the training path keeps Arrow tables)."""
    return load_table(path_or_name, key).to_list()


# --------------------------------------------------------------------------- rendering


def template_fields(template: str) -> list[str]:
    return [f for _, f, _, _ in string.Formatter().parse(template) if f]


def needed_columns(cfg: DataConfig, columns: Sequence[str]) -> list[str]:
    """The columns ``cfg.format`` reads (for messages: whichever chat column exists)."""
    needed: list[str] = []
    if cfg.format == "template":
        needed = template_fields(cfg.prompt_template) + template_fields(cfg.response_template)
    elif cfg.format == "alpaca":
        needed = ["instruction", "output"]
    else:
        needed = ["conversations"] if "conversations" in columns and "messages" not in columns else ["messages"]
    if cfg.label_field:
        needed.append(cfg.label_field)
    return list(dict.fromkeys(needed))


def check_columns(columns: Sequence[str], cfg: DataConfig, key: str) -> None:
    missing = [c for c in needed_columns(cfg, columns) if c not in columns]
    if not missing:
        return
    if cfg.format == "messages":
        hint = "data.format=messages reads a `messages` column of {role, content} or ShareGPT's `conversations`"
    elif cfg.format == "alpaca":
        hint = "data.format=alpaca reads instruction, input (optional) and output"
    else:
        hint = "used by data.prompt_template/response_template"
    if cfg.label_field in missing:
        hint += f"; data.label_field={cfg.label_field} (set data.label_field=null for data without a class column)"
    raise DataError(f"{key}: columns {missing} are not in the data ({hint}); its columns are {sorted(columns)}")


def _cell(batch: dict[str, list], column: str, j: int, row: int, key: str) -> Any:
    value = batch[column][j]
    if value is None:
        raise DataError(f"{key}: row {row} has no value in column {column!r}; fix or drop that row")
    return value


def _prompt_response(batch: dict[str, list], j: int, row: int, cfg: DataConfig, key: str) -> tuple[str, str]:
    if cfg.format == "alpaca":
        instruction = str(_cell(batch, "instruction", j, row, key))
        extra = batch["input"][j] if "input" in batch else None
        prompt = (ALPACA_PROMPT.format(instruction=instruction, input=extra) if extra
                  else ALPACA_PROMPT_NO_INPUT.format(instruction=instruction))
        return prompt, str(_cell(batch, "output", j, row, key))
    fields = set(template_fields(cfg.prompt_template) + template_fields(cfg.response_template))
    values = {f: _cell(batch, f, j, row, key) for f in fields}
    rendered = []
    for setting in ("prompt_template", "response_template"):
        try:  # config validation rules out bad templates; a format spec can still not fit a cell's type
            rendered.append(getattr(cfg, setting).format(**values))
        except (ValueError, TypeError, KeyError, IndexError, AttributeError) as e:
            raise DataError(f"{key}: row {row}: data.{setting} cannot render this row ({type(e).__name__}: {e}); "
                            "fix the template's format spec or the row") from None
    return rendered[0], rendered[1]


def _chat_messages(batch: dict[str, list], j: int, row: int, key: str) -> list[dict[str, str]]:
    if "messages" in batch:
        turns = _cell(batch, "messages", j, row, key)
        role_key, text_key, roles = "role", "content", None
    else:
        turns = _cell(batch, "conversations", j, row, key)
        role_key, text_key, roles = "from", "value", SHAREGPT_ROLES
    messages = []
    for turn in turns:
        if not isinstance(turn, dict) or role_key not in turn or text_key not in turn:
            raise DataError(f"{key}: row {row}: every turn needs {role_key!r} and {text_key!r}, got {turn!r}")
        role = turn[role_key] if roles is None else roles.get(turn[role_key])
        if role is None:
            raise DataError(f"{key}: row {row}: unknown ShareGPT role {turn[role_key]!r}; known: {sorted(roles)}")
        messages.append({"role": role, "content": turn[text_key]})
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{key}: row {row} has no assistant turn: nothing to train on")
    return messages


def _assistant_char_spans(messages: list[dict], tokenizer: Any, key: str, row: int) -> tuple[str, list[tuple[int, int]]]:
    """The conversation rendered by the chat template, and the character spans of its
    assistant turns (the reply and the template's end-of-turn text after it).

    Span ``i`` runs from the end of ``messages[:i]`` rendered with the generation prompt to
    the end of ``messages[:i+1]`` rendered. That needs the template to render a prefix of
    the conversation as a prefix of its text, which is checked."""
    def render(msgs: list[dict], generation_prompt: bool) -> str:
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=generation_prompt)

    full = render(messages, False)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prompt = render(messages[:i], True) if i else ""
        upto = render(messages[: i + 1], False)
        start, end = len(prompt), len(upto)
        if not full.startswith(upto) or not upto.startswith(prompt) or start > end:
            raise DataError(f"{key}: row {row}: the tokenizer's chat template does not render the start of a "
                            "conversation as the start of its text, so assistant turns cannot be located; "
                            "use data.format=template with explicit templates")
        spans.append((start, end))
    return full, spans


def tokenize_batch(batch: dict[str, list], indices: list[int], *, tokenizer: Any, cfg: DataConfig, key: str,
                   label_index: dict[str, int]) -> dict[str, list]:
    """Tokenise a batch of rows (the ``datasets.map(batched=True, with_indices=True)``
    function). Columns out: ``input_ids``, ``labels`` (IGNORE_INDEX where no loss),
    ``response_start`` (first loss position), ``label`` (class index, -1 without),
    ``truncated``, ``length``."""
    out: dict[str, list] = {k: [] for k in ("input_ids", "labels", "response_start", "label", "truncated", "length")}
    if cfg.format == "messages":
        _tokenize_chats(batch, indices, tokenizer, cfg, key, out)
    else:
        _tokenize_prompt_response(batch, indices, tokenizer, cfg, key, out)
    if cfg.label_field:
        for j, row in enumerate(indices):
            name = str(_cell(batch, cfg.label_field, j, row, key))
            if name not in label_index:
                raise DataError(f"{key}: label {name!r} does not occur in the training data")
            out["label"].append(label_index[name])
    else:
        out["label"] = [-1] * len(indices)
    out["length"] = [len(ids) for ids in out["input_ids"]]
    return out


def _tokenize_prompt_response(batch, indices, tokenizer, cfg, key, out) -> None:
    """Prompt tokens (with BOS if the tokenizer adds one) + response tokens + EOS; the
    labels mask the prompt. Too-long examples lose prompt tokens from the left."""
    texts = [_prompt_response(batch, j, row, cfg, key) for j, row in enumerate(indices)]
    prompts = tokenizer([p for p, _ in texts], add_special_tokens=True)["input_ids"]
    responses = tokenizer([r for _, r in texts], add_special_tokens=False)["input_ids"]
    for (_, response_text), prompt_ids, response_ids in zip(texts, prompts, responses, strict=True):
        if not response_ids:
            raise DataError(f"{key}: a response tokenizes to nothing: {response_text!r}")
        response_ids = list(response_ids) + [tokenizer.eos_token_id]
        budget = cfg.max_seq_len - len(response_ids)
        if budget < 1:
            raise DataError(f"{key}: a response of {len(response_ids)} tokens does not fit data.max_seq_len="
                            f"{cfg.max_seq_len}; raise it")
        truncated = len(prompt_ids) > budget
        prompt_ids = list(prompt_ids[len(prompt_ids) - budget:] if truncated else prompt_ids)
        out["input_ids"].append(prompt_ids + response_ids)
        out["labels"].append([IGNORE_INDEX] * len(prompt_ids) + response_ids)
        out["response_start"].append(len(prompt_ids))
        out["truncated"].append(truncated)


def _tokenize_chats(batch, indices, tokenizer, cfg, key, out) -> None:
    """The chat template's text, tokenised once with offsets; a token is trained on when
    it starts inside an assistant turn. Conversations longer than max_seq_len keep their
    start (a conversation left with no assistant token is an error, not a silent drop)."""
    if not getattr(tokenizer, "chat_template", None):
        raise DataError("data.format=messages needs a chat template, but the tokenizer has none; "
                        "set model.tokenizer to one that has (e.g. the model's -Instruct tokenizer) "
                        "or use data.format=template")
    if not getattr(tokenizer, "is_fast", False):
        raise DataError("data.format=messages needs a fast tokenizer (character offsets); this one is not")
    texts, spans = [], []
    for j, row in enumerate(indices):
        text, row_spans = _assistant_char_spans(_chat_messages(batch, j, row, key), tokenizer, key, row)
        texts.append(text)
        spans.append(row_spans)
    # The template writes BOS itself where the model wants one.
    enc = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
    for row, ids, offsets, row_spans in zip(indices, enc["input_ids"], enc["offset_mapping"], spans, strict=True):
        labels = [tok if any(a <= start < b for a, b in row_spans) else IGNORE_INDEX
                  for tok, (start, _end) in zip(ids, offsets, strict=True)]
        truncated = len(ids) > cfg.max_seq_len
        ids, labels = list(ids[: cfg.max_seq_len]), labels[: cfg.max_seq_len]
        first = next((i for i, lab in enumerate(labels) if lab != IGNORE_INDEX), None)
        if first is None:
            raise DataError(f"{key}: row {row}: no assistant token within data.max_seq_len={cfg.max_seq_len}; "
                            "raise it or shorten that conversation")
        out["input_ids"].append(ids)
        out["labels"].append(labels)
        out["response_start"].append(first)
        out["truncated"].append(truncated)


# -------------------------------------------------------------------- tokenised sets


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]  # IGNORE_INDEX where there is no loss
    response_start: int  # index of the first loss token in input_ids
    label: Optional[int] = None  # class index into TokenizedSet.label_names


@dataclass
class TokenizedSet:
    """A tokenised split: an Arrow table (memory-mapped from the cache) read a few rows
    at a time, plus what evaluation needs to score class labels."""

    rows: Any  # datasets.Dataset with the columns tokenize_batch writes
    label_names: list[str]  # sorted class names ([] when there is no label column)
    label_token_ids: list[int]  # first response token of each class
    cache_key: str = ""  # the cache entry it was read from (prepare_tokenized)

    def __len__(self) -> int:
        return len(self.rows)

    def examples(self, indices: Sequence[int]) -> list[Example]:
        cols = self.rows[list(indices)]  # an Arrow take of these rows only
        return [Example(ids, labels, start, label if label >= 0 else None)
                for ids, labels, start, label in zip(cols["input_ids"], cols["labels"], cols["response_start"],
                                                     cols["label"], strict=True)]

    def column(self, name: str) -> np.ndarray:
        """A whole scalar column as numpy, through Arrow (datasets' numpy format reads an
        index-mapped table row by row: 30x slower for a carved or selected set)."""
        return self.rows.with_format("arrow")[name].to_numpy()

    @cached_property
    def lengths(self) -> np.ndarray:
        return self.column("length").astype(np.int64)

    @cached_property
    def class_labels(self) -> Optional[np.ndarray]:
        return self.column("label").astype(np.int64) if self.label_names else None

    @property
    def num_truncated(self) -> int:
        return int(self.column("truncated").sum())

    def head(self, n: Optional[int]) -> TokenizedSet:
        return self if n is None or n >= len(self) else TokenizedSet(self.rows.select(range(n)), self.label_names,
                                                                     self.label_token_ids, self.cache_key)

    def subset(self, indices: Sequence[int]) -> TokenizedSet:
        return TokenizedSet(self.rows.select(list(indices)), self.label_names, self.label_token_ids, self.cache_key)


def class_names(table: Any, cfg: DataConfig) -> list[str]:
    return sorted({str(v) for v in table.unique(cfg.label_field)}) if cfg.label_field else []


def tokenize_table(table: Any, tokenizer: Any, cfg: DataConfig, key: str, label_names: Optional[list[str]] = None,
                   num_proc: Optional[int] = None, cache_file: Optional[str] = None) -> TokenizedSet:
    """Tokenise ``table`` (a ``datasets.Dataset``) and check the result; the training
    path goes through :func:`prepare_tokenized` for the cache. ``cache_file``: where map
    writes its Arrow output (else datasets' cache directory of a file-backed table)."""
    check_columns(table.column_names, cfg, key)
    label_names = class_names(table, cfg) if label_names is None else label_names
    label_index = {name: i for i, name in enumerate(label_names)}
    # Our own cache key decides reuse (prepare_tokenized), so datasets need not hash the
    # function and its tokenizer (which it cannot always do deterministically).
    rows = table.map(tokenize_batch, batched=True, with_indices=True, remove_columns=table.column_names,
                     num_proc=num_proc, load_from_cache_file=False, cache_file_name=cache_file,
                     new_fingerprint=uuid.uuid4().hex, desc=f"tokenising {key}",
                     fn_kwargs=dict(tokenizer=tokenizer, cfg=cfg, key=key, label_index=label_index))
    result = TokenizedSet(rows, label_names, _label_token_ids(rows, label_names, key))
    if result.num_truncated:
        log.warning("%s: %d of %d examples truncated to data.max_seq_len=%d", key, result.num_truncated, len(rows),
                    cfg.max_seq_len)
    return result


def tokenize_records(records: Sequence[dict], tokenizer: Any, cfg: DataConfig, key: str,
                     label_names: Optional[list[str]] = None) -> TokenizedSet:
    """:func:`tokenize_table` for a list of row dicts (tests, workers)."""
    import datasets

    if not records:
        raise DataError(f"{key}: the dataset is empty")
    return tokenize_table(datasets.Dataset.from_list(list(records)), tokenizer, cfg, key, label_names)


def _label_token_ids(rows: Any, label_names: list[str], key: str) -> list[int]:
    """Each class's first response token; accuracy needs them distinct and one per class."""
    if not label_names:
        return []
    first: dict[int, int] = {}
    for batch in rows.select_columns(["input_ids", "response_start", "label"]).iter(batch_size=4096):
        for ids, start, label in zip(batch["input_ids"], batch["response_start"], batch["label"], strict=True):
            if first.setdefault(label, ids[start]) != ids[start]:
                raise DataError(f"{key}: label {label_names[label]!r} has responses starting with different tokens; "
                                "accuracy needs one response per label (check data.response_template)")
    token_ids = [first.get(i, -1) for i in range(len(label_names))]
    if len(set(token_ids)) != len(token_ids):
        raise DataError(f"{key}: two labels share their first response token; accuracy cannot tell them apart")
    return token_ids


# ---------------------------------------------------------------------------- caching


def _sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A hash of the files ``save_pretrained`` writes: vocabulary, merges, special tokens,
    chat template; any change to how text becomes ids changes it."""
    h = hashlib.sha256(type(tokenizer).__name__.encode())
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        for name in sorted(os.listdir(tmp)):
            h.update(name.encode())
            h.update(_sha256_file(os.path.join(tmp, name)).encode())
    return h.hexdigest()


def table_fingerprint(path_or_name: str, table: Any) -> str:
    """Local files: their bytes. Hub datasets: datasets' own fingerprint of the loaded split
    (derived from the dataset's revision and configuration)."""
    path = os.path.expanduser(path_or_name)
    return _sha256_file(path) if os.path.isfile(path) else str(table._fingerprint)


def cache_key(data_fingerprint: str, tok_fingerprint: str, cfg: DataConfig, label_names: list[str]) -> str:
    shaping = {"version": TOKENIZED_FORMAT_VERSION, "data": data_fingerprint, "tokenizer": tok_fingerprint,
               "format": cfg.format, "max_seq_len": cfg.max_seq_len, "label_field": cfg.label_field,
               "labels": label_names}
    if cfg.format == "template":
        shaping.update(prompt=cfg.prompt_template, response=cfg.response_template)
    return hashlib.sha256(json.dumps(shaping, sort_keys=True).encode()).hexdigest()[:32]


def default_num_proc(num_rows: int) -> int:
    """One process per core up to 8, and none extra for small sets (a process costs
    about a second to start; tokenising 1000 short rows takes less)."""
    return max(1, min(8, os.cpu_count() or 1, num_rows // 2000))


def prepare_tokenized(path_or_name: str, key: str, tokenizer: Any, cfg: DataConfig, cache_root: Path, *,
                      build: bool, split: Optional[str] = None, label_names: Optional[list[str]] = None
                      ) -> tuple[TokenizedSet, Path]:
    """The tokenised split from the cache, building it first when ``build`` (each node's
    local rank 0; the other ranks call this after it with ``build=False``).

    The entry is written to a temporary directory and renamed into place, so a reader
    never sees half an entry; two nodes building the same key on shared storage both
    succeed and one copy wins. ``split``: a hub dataset's split (default ``cfg.split``)."""
    import datasets

    path_or_name = os.path.expanduser(path_or_name)
    table = load_table(path_or_name, key, cfg.name, split or cfg.split)
    check_columns(table.column_names, cfg, key)
    label_names = class_names(table, cfg) if label_names is None else label_names
    key_hash = cache_key(table_fingerprint(path_or_name, table), tokenizer_fingerprint(tokenizer), cfg, label_names)
    entry = cache_root / "tokenized" / key_hash
    if not (entry / "meta.json").is_file():
        if not build:
            raise DataError(f"{key}: the tokenised cache entry {entry} is missing on this node after local rank 0 "
                            "built it; is $LORADROP_CACHE on storage every rank of this node sees?")
        num_proc = cfg.num_proc or default_num_proc(len(table))
        # "keep": another node on shared storage may finish the same entry first.
        with staged_dir(entry, if_exists="keep") as tmp:
            tokenized = tokenize_table(table, tokenizer, cfg, key, label_names,
                                       num_proc=num_proc if num_proc > 1 else None, cache_file=str(tmp / "map.arrow"))
            tokenized.rows.save_to_disk(str(tmp / "rows"))
            for scratch in tmp.glob("map*.arrow"):  # map's own output, now copied into rows/
                scratch.unlink()
            meta = {"source": path_or_name, "key": key, "label_names": label_names,
                    "label_token_ids": tokenized.label_token_ids, "num_rows": len(tokenized)}
            (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        log.info("%s: %d rows tokenised into %s", key, len(tokenized), entry)
    meta = json.loads((entry / "meta.json").read_text())
    rows = datasets.load_from_disk(str(entry / "rows"))
    return TokenizedSet(rows, meta["label_names"], meta["label_token_ids"], key_hash), entry


def split_for_eval(num_rows: int, ratio: float, seed: int) -> tuple[list[int], list[int]]:
    """Seeded (train, eval) row indices, eval = round(ratio * rows) (at least 1), sorted."""
    n_eval = max(1, round(ratio * num_rows))
    if n_eval >= num_rows:
        raise DataError(f"data.eval_split_ratio={ratio} leaves no training rows out of {num_rows}; lower it")
    chosen = set(random.Random(f"eval-split:{seed}").sample(range(num_rows), n_eval))
    return [i for i in range(num_rows) if i not in chosen], sorted(chosen)


# --------------------------------------------------------------- sampling and batches


def draw_sample(num_examples: int, ratio: float, seed: int, labels: Optional[Sequence[int]] = None) -> list[int]:
    """Indices of the sampling subset: ``ratio`` of the data, stratified by ``labels``
    (each class contributes ``round(ratio * class size)``, at least one), sorted."""
    rng = random.Random(seed)
    groups: dict[Any, list[int]] = {}
    for i in range(num_examples):
        groups.setdefault(int(labels[i]) if labels is not None else None, []).append(i)
    chosen: list[int] = []
    for key in sorted(groups, key=lambda k: (k is None, k)):
        members = groups[key]
        k = max(1, round(ratio * len(members)))
        chosen.extend(rng.sample(members, k))
    return sorted(chosen)


def pack_examples(lengths: Sequence[int], indices: Sequence[int], max_len: int) -> list[list[int]]:
    """Group examples into packs of at most ``max_len`` tokens: best-fit decreasing
    (longest first, each into the fullest pack it still fits), deterministic.

    A pack whose free space is below the shortest example is closed, which keeps the
    search list short."""
    order = sorted(indices, key=lambda i: (-int(lengths[i]), i))
    if not order:
        return []
    shortest = min(int(lengths[i]) for i in order)
    packs: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (free tokens, pack id), ascending
    for i in order:
        n = int(lengths[i])
        if n > max_len:
            raise DataError(f"an example of {n} tokens is longer than data.max_seq_len={max_len}")
        pos = bisect.bisect_left(free, (n, -1))
        if pos == len(free):
            packs.append([i])
            room, pack = max_len - n, len(packs) - 1
        else:
            room, pack = free.pop(pos)
            packs[pack].append(i)
            room -= n
        if room >= shortest:
            bisect.insort(free, (room, pack))
    return packs


def steps_for_epochs(num_items: int, micro_batch_size: int, world_size: int, grad_accum: int, epochs: float) -> int:
    """Optimizer steps in ``epochs`` passes: each epoch is the whole global micro-batches
    of ``num_items`` (BatchStream drops the incomplete last one), rounded up to a step."""
    micro_batches_per_epoch = num_items // (micro_batch_size * world_size)
    return max(1, math.ceil(epochs * micro_batches_per_epoch / grad_accum))


class BatchStream:
    """An endless, deterministic stream of this rank's micro-batches of item ids
    (``range(num_items)``: examples, or packs of them).

    Epoch ``e`` visits the items in a permutation seeded by ``(seed, e)``, computed once
    per epoch; each consecutive group of ``micro_batch_size * world_size`` items is one
    global micro-batch, of which rank ``r`` takes the ``r``-th slice. An incomplete group
    at the end of an epoch is dropped, so every rank always has a full micro-batch.
    ``position`` (global micro-batches consumed) is all a checkpoint needs to resume.
    """

    def __init__(self, items: Sequence[int] | int, micro_batch_size: int, rank: int, world_size: int, seed: int):
        self.items = np.arange(items) if isinstance(items, int) else np.asarray(list(items), dtype=np.int64)
        self.micro_batch_size = micro_batch_size
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.group = micro_batch_size * world_size
        self.groups_per_epoch = len(self.items) // self.group
        if self.groups_per_epoch == 0:
            raise DataError(f"{len(self.items)} examples cannot fill one micro-batch of {micro_batch_size} "
                            f"on each of {world_size} ranks")
        self.position = 0
        self._order_epoch: Optional[int] = None
        self._order: np.ndarray = self.items

    def epoch_order(self, epoch: int) -> np.ndarray:
        if self._order_epoch != epoch:
            self._order = self.items[np.random.default_rng([self.seed, epoch]).permutation(len(self.items))]
            self._order_epoch = epoch
        return self._order

    def __iter__(self) -> Iterator[list[int]]:
        return self

    def __next__(self) -> list[int]:
        epoch, group = divmod(self.position, self.groups_per_epoch)
        start = group * self.group + self.rank * self.micro_batch_size
        self.position += 1
        return self.epoch_order(epoch)[start:start + self.micro_batch_size].tolist()


def collate(examples: Sequence[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad into ``input_ids``, ``attention_mask`` and ``labels``; ``token_mask``
    marks the real tokens (here the attention mask itself)."""
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, e in enumerate(examples):
        n = len(e.input_ids)
        ids[row, :n] = torch.tensor(e.input_ids)
        labels[row, :n] = torch.tensor(e.labels)
        mask[row, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "token_mask": mask}


def collate_packed(packs: Sequence[Sequence[Example]], pad_id: int, one_row: bool) -> dict[str, torch.Tensor]:
    """Packed rows: each example's tokens back to back, ``position_ids`` restarting at 0
    for each, and no ``attention_mask``. transformers then keeps attention inside each
    example: sdpa/eager build a block-diagonal causal mask from the position ids
    (masking_utils.find_packed_sequence_indices, any batch size), flash-attn runs its
    varlen kernel (modeling_flash_attention_utils._is_packed_sequence, batch size 1 only:
    hence ``one_row``, which puts the whole micro-batch in one row without padding).

    Each example's first label is IGNORE_INDEX: it would be predicted from the previous
    example's last token (unpacked, nothing predicts it either), so the loss covers
    exactly the unpacked tokens. Padding (rows only) continues as its own sequence with
    IGNORE_INDEX labels and is left out of ``token_mask``."""
    rows = [[e for pack in packs for e in pack]] if one_row else [list(pack) for pack in packs]
    width = max(sum(len(e.input_ids) for e in row) for row in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    positions = torch.zeros((len(rows), width), dtype=torch.long)
    token_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for r, row in enumerate(rows):
        at = 0
        for e in row:
            n = len(e.input_ids)
            ids[r, at:at + n] = torch.tensor(e.input_ids)
            labels[r, at + 1:at + n] = torch.tensor(e.labels[1:])
            positions[r, at:at + n] = torch.arange(n)
            token_mask[r, at:at + n] = 1
            at += n
        positions[r, at:] = torch.arange(width - at)
    return {"input_ids": ids, "position_ids": positions, "labels": labels, "token_mask": token_mask}


class MicroBatches:
    """This rank's training micro-batches over ``indices`` of ``data``: a :class:`BatchStream`
    over examples, or over packs of them (``packing``), turned into tensors."""

    def __init__(self, data: TokenizedSet, indices: Sequence[int], cfg: DataConfig, micro_batch_size: int, rank: int,
                 world_size: int, seed: int, pad_id: int, one_row: bool = False):
        self.data, self.pad_id, self.one_row = data, pad_id, one_row
        indices = list(indices)
        self.packs = pack_examples(data.lengths, indices, cfg.max_seq_len) if cfg.packing else None
        self.item_ids = indices if self.packs is None else list(range(len(self.packs)))
        self.stream = BatchStream(len(self.item_ids), micro_batch_size, rank, world_size, seed)

    @property
    def num_items(self) -> int:
        return len(self.item_ids)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        chosen = next(self.stream)
        if self.packs is None:
            return collate(self.data.examples([self.item_ids[i] for i in chosen]), self.pad_id)
        packs = [self.data.examples(self.packs[i]) for i in chosen]
        return collate_packed(packs, self.pad_id, self.one_row)


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
