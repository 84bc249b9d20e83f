#!/usr/bin/env python3
"""Build the WordNet "definition -> category" classification task.

Parses the WordNet 3.0 noun database (``data.noun``, Debian package
``wordnet-base``) and writes a small, balanced 8-way text classification
dataset: given a noun synset's definition (gloss without its example
sentences), predict which of these lexicographer categories it belongs to:

    animal, artifact, body, food, location, person, plant, substance

Outputs (JSONL, one object per line with exactly the keys ``definition``,
``category`` and ``synset``):

    data/wordnet_categories/train.jsonl   (--train-per-class per category)
    data/wordnet_categories/eval.jsonl    (--eval-per-class per category)

The build is deterministic: rebuilding with the same WordNet files and
arguments gives byte-identical output. Exact rebuild command, from the
repository root:

    python3 scripts/build_wordnet_task.py \\
        --wordnet-dir /usr/share/wordnet --out-dir data/wordnet_categories \\
        --seed 0 --train-per-class 300 --eval-per-class 40

(all of these are the defaults, so ``python3 scripts/build_wordnet_task.py``
is equivalent). Standard library only.

WordNet 3.0 Copyright 2006 by Princeton University; see
data/wordnet_categories/LICENSE.WordNet.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
from pathlib import Path

DEFAULT_WORDNET_DIR = Path("/usr/share/wordnet")
REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT_DIR = REPO_ROOT / "data" / "wordnet_categories"

# Lexicographer file numbers (data.noun field 2, ``lex_filenum``) of the
# categories we keep, as listed in lexnames(5WN) for WordNet 3.0.
CATEGORIES: dict[str, int] = {
    "animal": 5,
    "artifact": 6,
    "body": 8,
    "food": 13,
    "location": 15,
    "person": 18,
    "plant": 20,
    "substance": 27,
}

# Word forms that would give the label away if they appear in a definition
# (e.g. "a large animal ..."). Plurals are included because "animals" or
# "plants" leak the answer just as much as the singular.
CATEGORY_LEAK_WORDS: dict[str, frozenset[str]] = {
    "animal": frozenset({"animal", "animals"}),
    "artifact": frozenset({"artifact", "artifacts", "artefact", "artefacts"}),
    "body": frozenset({"body", "bodies"}),
    "food": frozenset({"food", "foods"}),
    "location": frozenset({"location", "locations"}),
    "person": frozenset({"person", "persons"}),
    "plant": frozenset({"plant", "plants"}),
    "substance": frozenset({"substance", "substances"}),
}

MIN_WORDS = 3
MAX_WORDS = 14

# Function words that show up inside multi-word lemmas ("man_of_war",
# "jack_in_the_box"); matching them against the definition would drop
# almost everything, so they are not treated as lemma leaks.
LEMMA_STOPWORDS = frozenset(
    "a an and as at by for from in into of on or the to with".split()
)

_TOKEN_RE = re.compile(r"[a-z0-9]+")


def tokens(text: str) -> set[str]:
    """Lower-cased alphanumeric tokens ("plant-eating" -> plant, eating)."""
    return set(_TOKEN_RE.findall(text.lower()))


def extract_definition(gloss: str) -> str:
    """Return the definition part of a gloss, without example sentences.

    Glosses look like ``definition; "example one"; "example two"``; the
    examples always start with a double quote, so everything from the first
    quote on is dropped.
    """
    definition = gloss.split('"', 1)[0]
    # Collapse runs of whitespace so the text (and dedup key) is canonical.
    definition = " ".join(definition.split())
    return definition.rstrip(" ;").strip()


def parse_synset_line(line: str) -> tuple[str, int, list[str], str] | None:
    """Parse one data.noun line into (offset, lex_filenum, lemmas, gloss).

    Line layout (wndb(5WN)):
    ``synset_offset lex_filenum ss_type w_cnt [word lex_id]... p_cnt ... | gloss``
    where w_cnt is a two-digit hexadecimal number. Returns None for lines
    without a gloss (there are none in WordNet 3.0 nouns, but be safe).
    """
    head, sep, gloss = line.partition(" | ")
    if not sep:
        return None
    fields = head.split()
    offset, lex_filenum, w_cnt = fields[0], int(fields[1]), int(fields[3], 16)
    # Words alternate with their lex_id: word1 id1 word2 id2 ...
    lemmas = fields[4 : 4 + 2 * w_cnt : 2]
    return offset, lex_filenum, lemmas, gloss.strip()


def lemma_leak_words(lemmas: list[str]) -> set[str]:
    """Content words of the synset's own lemmas ("hot_dog" -> hot, dog)."""
    words: set[str] = set()
    for lemma in lemmas:
        words |= tokens(lemma.replace("_", " "))
    return {w for w in words if w not in LEMMA_STOPWORDS and len(w) > 1}


def load_candidates(data_noun: Path) -> dict[str, list[tuple[str, str]]]:
    """Return {category: [(synset_id, definition), ...]} sorted by synset id.

    Applies the length, leak and deduplication filters.
    """
    filenum_to_cat = {num: cat for cat, num in CATEGORIES.items()}
    # definition -> list of (synset_id, category) over all kept categories
    by_definition: dict[str, list[tuple[str, str]]] = {}
    with data_noun.open(encoding="utf-8") as f:
        for line in f:
            # The licence header lines start with two spaces.
            if line.startswith("  "):
                continue
            parsed = parse_synset_line(line)
            if parsed is None:
                continue
            offset, lex_filenum, lemmas, gloss = parsed
            category = filenum_to_cat.get(lex_filenum)
            if category is None:
                continue
            definition = extract_definition(gloss)
            if not MIN_WORDS <= len(definition.split()) <= MAX_WORDS:
                continue
            def_tokens = tokens(definition)
            if def_tokens & CATEGORY_LEAK_WORDS[category]:
                continue
            if def_tokens & lemma_leak_words(lemmas):
                continue
            by_definition.setdefault(definition, []).append(("n" + offset, category))

    candidates: dict[str, list[tuple[str, str]]] = {cat: [] for cat in CATEGORIES}
    for definition, occurrences in by_definition.items():
        categories = {cat for _, cat in occurrences}
        # A definition shared by synsets of different categories has no
        # single correct label: drop it entirely. Otherwise keep one copy
        # (the lowest synset offset) so each definition appears only once.
        if len(categories) != 1:
            continue
        synset_id = min(sid for sid, _ in occurrences)
        candidates[categories.pop()].append((synset_id, definition))
    for items in candidates.values():
        items.sort()
    return candidates


def check_lexnames(wordnet_dir: Path) -> None:
    """Cross-check CATEGORIES against a ``lexnames`` file when one is shipped.

    Debian's wordnet-base does not ship it (the table is in lexnames(5WN)),
    but upstream WordNet distributions do.
    """
    lexnames = wordnet_dir / "lexnames"
    if not lexnames.is_file():
        return
    table = {}
    for line in lexnames.read_text(encoding="utf-8").splitlines():
        parts = line.split()
        if len(parts) >= 2:
            table[parts[1]] = int(parts[0])
    for cat, num in CATEGORIES.items():
        if table.get(f"noun.{cat}") != num:
            sys.exit(
                f"error: {lexnames} maps noun.{cat} to {table.get(f'noun.{cat}')}, "
                f"expected {num}; unexpected WordNet version?"
            )


def write_jsonl(path: Path, rows: list[dict[str, str]]) -> None:
    # newline="\n" keeps line endings identical on every platform.
    with path.open("w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--wordnet-dir", type=Path, default=DEFAULT_WORDNET_DIR,
                        help="directory holding WordNet 3.0 data.noun (default: %(default)s)")
    parser.add_argument("--out-dir", type=Path, default=DEFAULT_OUT_DIR,
                        help="output directory (default: data/wordnet_categories in the repo)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train-per-class", type=int, default=300)
    parser.add_argument("--eval-per-class", type=int, default=40)
    args = parser.parse_args(argv)

    data_noun = args.wordnet_dir / "data.noun"
    if not data_noun.is_file():
        print(
            f"error: WordNet noun database not found at {data_noun}.\n"
            "Install it with `apt-get install wordnet-base` "
            "(or point --wordnet-dir at a WordNet 3.0 dict/ directory).",
            file=sys.stderr,
        )
        return 2
    check_lexnames(args.wordnet_dir)

    candidates = load_candidates(data_noun)
    needed = args.train_per_class + args.eval_per_class
    # A single RNG walked over the categories in a fixed order makes the
    # whole build a pure function of (WordNet files, arguments).
    rng = random.Random(args.seed)
    train: list[dict[str, str]] = []
    eval_: list[dict[str, str]] = []
    for category in sorted(CATEGORIES):
        pool = candidates[category]
        if len(pool) < needed:
            print(f"error: only {len(pool)} usable '{category}' definitions, "
                  f"need {needed}", file=sys.stderr)
            return 1
        picked = rng.sample(pool, needed)
        rows = [{"definition": d, "category": category, "synset": s} for s, d in picked]
        train += rows[: args.train_per_class]
        eval_ += rows[args.train_per_class :]
    rng.shuffle(train)
    rng.shuffle(eval_)

    args.out_dir.mkdir(parents=True, exist_ok=True)
    write_jsonl(args.out_dir / "train.jsonl", train)
    write_jsonl(args.out_dir / "eval.jsonl", eval_)

    print(f"{'category':<10} {'usable':>6} {'train':>6} {'eval':>6}")
    for category in sorted(CATEGORIES):
        n_train = sum(r["category"] == category for r in train)
        n_eval = sum(r["category"] == category for r in eval_)
        print(f"{category:<10} {len(candidates[category]):>6} {n_train:>6} {n_eval:>6}")
    print(f"{'total':<10} {'':>6} {len(train):>6} {len(eval_):>6}")
    print(f"wrote {args.out_dir / 'train.jsonl'} and {args.out_dir / 'eval.jsonl'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
