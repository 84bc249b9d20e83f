"""Tests for the shipped WordNet definition -> category dataset and its builder."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
DATA_DIR = REPO_ROOT / "data" / "wordnet_categories"
SCRIPT = REPO_ROOT / "scripts" / "build_wordnet_task.py"
WORDNET_DIR = Path("/usr/share/wordnet")

CATEGORIES = {"animal", "artifact", "body", "food", "location", "person", "plant", "substance"}
KEYS = {"definition", "category", "synset"}


def load(split: str) -> list[dict]:
    with (DATA_DIR / f"{split}.jsonl").open(encoding="utf-8") as f:
        return [json.loads(line) for line in f]


@pytest.mark.parametrize("split", ["train", "eval"])
def test_split_schema_and_balance(split: str) -> None:
    rows = load(split)
    assert rows, f"{split}.jsonl is empty"
    for row in rows:
        assert set(row) == KEYS
        assert all(isinstance(row[k], str) for k in KEYS)
        assert row["category"] in CATEGORIES
        assert row["synset"].startswith("n") and len(row["synset"]) == 9
        assert row["synset"][1:].isdigit()
        assert 3 <= len(row["definition"].split()) <= 14
    counts = Counter(row["category"] for row in rows)
    assert set(counts) == CATEGORIES
    assert len(set(counts.values())) == 1, f"unbalanced {split}: {counts}"
    # No duplicates within a split either.
    assert len({r["synset"] for r in rows}) == len(rows)
    assert len({r["definition"] for r in rows}) == len(rows)


def test_splits_are_disjoint() -> None:
    train, eval_ = load("train"), load("eval")
    assert not {r["synset"] for r in train} & {r["synset"] for r in eval_}
    assert not {r["definition"] for r in train} & {r["definition"] for r in eval_}


def test_rebuild_is_byte_identical(tmp_path: Path) -> None:
    if not (WORDNET_DIR / "data.noun").is_file():
        pytest.skip(
            f"{WORDNET_DIR / 'data.noun'} not found (apt-get install wordnet-base); "
            "cannot rebuild the dataset"
        )
    # Defaults for seed and per-class counts are what the shipped files use.
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--wordnet-dir", str(WORDNET_DIR), "--out-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    for name in ("train.jsonl", "eval.jsonl"):
        assert (tmp_path / name).read_bytes() == (DATA_DIR / name).read_bytes(), name


def test_missing_wordnet_exits_2_with_hint(tmp_path: Path) -> None:
    result = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            "--wordnet-dir",
            str(tmp_path / "does-not-exist"),
            "--out-dir",
            str(tmp_path / "out"),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 2
    assert "apt-get install wordnet-base" in result.stderr
    assert not (tmp_path / "out").exists()
