"""Tiny LLaMA models for tests: a SentencePiece BPE tokenizer trained on the repo's
WordNet definitions and a randomly initialised LlamaForCausalLM, saved as a normal
model directory that ``launch/train.py`` loads with ``model.path=DIR``."""

from __future__ import annotations

import json
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WORDNET_TRAIN = REPO / "data" / "wordnet_categories" / "train.jsonl"


def make_tokenizer(out_dir: Path, vocab_size: int = 600) -> None:
    """A LLaMA-style SentencePiece BPE tokenizer (byte fallback), loadable by
    ``AutoTokenizer`` through a tokenizer_config.json naming ``LlamaTokenizer``."""
    import sentencepiece as spm

    out_dir.mkdir(parents=True, exist_ok=True)
    rows = [json.loads(line) for line in WORDNET_TRAIN.read_text().splitlines()]
    text = out_dir / "corpus.txt"
    text.write_text("\n".join(f"Definition: {r['definition']}\nCategory: {r['category']}" for r in rows))
    spm.SentencePieceTrainer.train(
        input=str(text), model_prefix=str(out_dir / "tokenizer"), vocab_size=vocab_size, model_type="bpe",
        byte_fallback=True, bos_id=1, eos_id=2, unk_id=0, pad_id=-1, character_coverage=1.0,
        num_threads=1, minloglevel=2,
    )
    text.unlink()
    (out_dir / "tokenizer.vocab").unlink()
    (out_dir / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "add_bos_token": True, "add_eos_token": False, "legacy": False,
    }))


def make_tiny_llama(out_dir: Path, num_layers: int = 4, hidden: int = 64, seed: int = 0, tied: bool = False) -> Path:
    """Tokenizer + random fp32 LLaMA (``num_layers`` layers, GQA 4 heads / 2 KV heads);
    ``tied``: the LM head is the input embedding (SmolLM2's ``tie_word_embeddings``)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    out_dir = Path(out_dir)
    make_tokenizer(out_dir)
    tokenizer = AutoTokenizer.from_pretrained(out_dir)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
        num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=256, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=tied,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return out_dir


if __name__ == "__main__":
    import sys

    print(make_tiny_llama(Path(sys.argv[1])))
