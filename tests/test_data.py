"""Data: formats and loss masks, the Arrow cache, the stratified sample, packing, and
per-rank batches."""

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from loradrop_ds import data as data_lib
from loradrop_ds.config import DataConfig
from loradrop_ds.data import (
    ALPACA_PROMPT,
    ALPACA_PROMPT_NO_INPUT,
    IGNORE_INDEX,
    BatchStream,
    DataError,
    Example,
    collate,
    collate_packed,
    draw_sample,
    eval_batches,
    load_records,
    pack_examples,
    prepare_tokenized,
    split_for_eval,
    tokenize_records,
)

CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}</s>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


class CharTokenizer:
    """One id per character (+ BOS 1, EOS 2): lets masks be checked by hand."""

    eos_token_id = 2
    pad_token_id = 0

    def __call__(self, text, add_special_tokens=True):
        if isinstance(text, list):
            return {"input_ids": [self(t, add_special_tokens)["input_ids"] for t in text]}
        return {"input_ids": ([1] if add_special_tokens else []) + [ord(c) for c in text]}

    def save_pretrained(self, out_dir):  # what the cache key hashes
        Path(out_dir, "char_tokenizer.json").write_text('{"bos": 1, "eos": 2}')


def chars(text):
    return [ord(c) for c in text]


def cfg(**kw):
    base = dict(prompt_template="Q:{q}\nA:", response_template=" {a}", label_field=None, max_seq_len=64)
    base.update(kw)
    return DataConfig(**base)


@pytest.fixture(scope="module")
def chat_tokenizer(tmp_path_factory):
    """The tests' real SentencePiece tokenizer (fast, with offsets) plus a chat template."""
    from transformers import AutoTokenizer

    from tiny import make_tokenizer

    out = tmp_path_factory.mktemp("chat_tok")
    make_tokenizer(out)
    tok = AutoTokenizer.from_pretrained(out)
    tok.chat_template = CHAT_TEMPLATE
    return tok


# ------------------------------------------------------------------- template format


def test_loss_only_on_response_tokens_plus_eos():
    ex = tokenize_records([{"q": "hi", "a": "yo"}], CharTokenizer(), cfg(), "t").examples([0])[0]
    prompt = [1] + chars("Q:hi\nA:")
    response = chars(" yo") + [2]
    assert ex.input_ids == prompt + response
    assert ex.labels == [IGNORE_INDEX] * len(prompt) + response
    assert ex.response_start == len(prompt)


def test_long_prompts_lose_tokens_from_the_left():
    tok = tokenize_records([{"q": "abcdefghij", "a": "z"}], CharTokenizer(), cfg(max_seq_len=8), "t")
    ex = tok.examples([0])[0]
    assert len(ex.input_ids) == 8 and tok.num_truncated == 1
    assert ex.input_ids[-3:] == [ord(" "), ord("z"), 2]
    assert ex.input_ids[:5] == chars("ij\nA:")
    with pytest.raises(DataError, match="does not fit data.max_seq_len=3"):
        tokenize_records([{"q": "a", "a": "long"}], CharTokenizer(), cfg(max_seq_len=3), "t")


def test_missing_template_column_names_the_columns():
    with pytest.raises(DataError, match=r"columns \['a'\] .* its columns are \['q', 'x'\]"):
        tokenize_records([{"q": "hi", "x": 1}], CharTokenizer(), cfg(), "data.train_file")
    with pytest.raises(DataError, match="set data.label_field=null"):
        tokenize_records([{"q": "hi", "a": "x"}], CharTokenizer(), cfg(label_field="category"), "data.train_file")


def test_a_missing_value_in_a_later_row_names_the_row():
    rows = [{"q": "hi", "a": "x"}, {"q": "ho", "a": "y"}, {"q": None, "a": "z"}]
    with pytest.raises(DataError, match=r"row 2 has no value in column 'q'"):
        tokenize_records(rows, CharTokenizer(), cfg(), "data.train_file")


def test_labels_map_to_first_response_tokens_and_eval_keeps_train_label_order():
    rows = [{"q": "1", "a": "cat"}, {"q": "2", "a": "dog"}, {"q": "3", "a": "cat"}]
    train = tokenize_records(rows, CharTokenizer(), cfg(label_field="a", response_template="{a}"), "t")
    assert train.label_names == ["cat", "dog"]
    assert train.label_token_ids == [ord("c"), ord("d")]
    assert [e.label for e in train.examples(range(3))] == [0, 1, 0]
    assert train.class_labels.tolist() == [0, 1, 0]
    ev = tokenize_records([{"q": "4", "a": "dog"}], CharTokenizer(), cfg(label_field="a", response_template="{a}"),
                          "e", label_names=train.label_names)
    assert ev.examples([0])[0].label == 1
    with pytest.raises(DataError, match="share their first response token"):
        tokenize_records([{"q": "1", "a": "cat"}, {"q": "2", "a": "cow"}], CharTokenizer(),
                         cfg(label_field="a", response_template="{a}"), "t")
    with pytest.raises(DataError, match="label 'eel' does not occur in the training data"):
        tokenize_records([{"q": "1", "a": "eel"}], CharTokenizer(), cfg(label_field="a", response_template="{a}"),
                         "e", label_names=["cat"])


# --------------------------------------------------------------------- alpaca format


def test_alpaca_rows_use_the_stanford_prompts_with_and_without_input():
    rows = [{"instruction": "Add", "input": "1 2", "output": "3"}, {"instruction": "Greet", "input": "", "output": "hi"}]
    tok = tokenize_records(rows, CharTokenizer(), cfg(format="alpaca", max_seq_len=512), "t")
    with_input, without = tok.examples([0, 1])
    prompt = [1] + chars("Below is an instruction that describes a task, paired with an input that provides further "
                         "context. Write a response that appropriately completes the request.\n\n### Instruction:\nAdd"
                         "\n\n### Input:\n1 2\n\n### Response:\n")
    assert with_input.input_ids == prompt + chars("3") + [2]
    assert with_input.labels == [IGNORE_INDEX] * len(prompt) + chars("3") + [2]
    assert without.input_ids[: without.response_start] == [1] + chars(ALPACA_PROMPT_NO_INPUT.format(instruction="Greet"))
    assert "{input}" in ALPACA_PROMPT
    # No `input` column at all is the no-input prompt too.
    only = tokenize_records([{"instruction": "Greet", "output": "hi"}], CharTokenizer(),
                            cfg(format="alpaca", max_seq_len=512), "t").examples([0])[0]
    assert only.input_ids == without.input_ids
    with pytest.raises(DataError, match=r"columns \['output'\] .*data.format=alpaca"):
        tokenize_records([{"instruction": "x"}], CharTokenizer(), cfg(format="alpaca"), "t")


# ------------------------------------------------------------------- messages format


def _trained_text(tok, ex):
    return tok.decode([t for t, lab in zip(ex.input_ids, ex.labels, strict=True) if lab != IGNORE_INDEX])


def test_chat_loss_is_on_every_assistant_turn_and_nothing_else(chat_tokenizer):
    conversation = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is a cat?"},
                    {"role": "assistant", "content": "an animal"}, {"role": "user", "content": "and a dog"},
                    {"role": "assistant", "content": "also one"}]
    ex = tokenize_records([{"messages": conversation}], chat_tokenizer, cfg(format="messages", max_seq_len=256),
                          "t").examples([0])[0]
    # Hand-rendered from CHAT_TEMPLATE: each assistant reply with its end-of-turn text.
    assert _trained_text(chat_tokenizer, ex) == "an animal</s>\nalso one</s>\n"
    assert chat_tokenizer.decode(ex.input_ids) == ("<|system|>\nBe brief.</s>\n<|user|>\nWhat is a cat?</s>\n"
                                                   "<|assistant|>\nan animal</s>\n<|user|>\nand a dog</s>\n"
                                                   "<|assistant|>\nalso one</s>\n")
    assert ex.labels[ex.response_start] != IGNORE_INDEX and all(
        lab == IGNORE_INDEX for lab in ex.labels[: ex.response_start])


def test_sharegpt_conversations_equal_the_same_messages(chat_tokenizer):
    sharegpt = [{"from": "human", "value": "hello"}, {"from": "gpt", "value": "hi there"}]
    messages = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hi there"}]
    c = cfg(format="messages", max_seq_len=128)
    a = tokenize_records([{"conversations": sharegpt}], chat_tokenizer, c, "t").examples([0])[0]
    b = tokenize_records([{"messages": messages}], chat_tokenizer, c, "t").examples([0])[0]
    assert a == b


def test_chat_errors_are_named(chat_tokenizer):
    from transformers import AutoTokenizer

    c = cfg(format="messages", max_seq_len=128)
    plain = AutoTokenizer.from_pretrained(chat_tokenizer.name_or_path)
    plain.chat_template = None
    with pytest.raises(DataError, match="needs a chat template, but the tokenizer has none"):
        tokenize_records([{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]}],
                         plain, c, "t")
    with pytest.raises(DataError, match="row 1 has no assistant turn"):
        tokenize_records([{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]},
                          {"messages": [{"role": "user", "content": "x"}]}], chat_tokenizer, c, "t")
    with pytest.raises(DataError, match="unknown ShareGPT role 'robot'"):
        tokenize_records([{"conversations": [{"from": "robot", "value": "x"}]}], chat_tokenizer, c, "t")
    # A generation prompt that a finished turn does not start with (as in templates that open
    # a reasoning block only when generating): the reply's start cannot be located.
    thinking = type(chat_tokenizer).from_pretrained(chat_tokenizer.name_or_path)
    thinking.chat_template = CHAT_TEMPLATE.replace("<|assistant|>\n{% endif %}", "<|assistant|>\n<think>\n{% endif %}")
    with pytest.raises(DataError, match="does not render the start of a conversation"):
        tokenize_records([{"messages": [{"role": "user", "content": "x"},
                                        {"role": "assistant", "content": "a reply longer than the prompt"}]}],
                         thinking, c, "t")
    with pytest.raises(DataError, match="no assistant token within data.max_seq_len=4"):
        tokenize_records([{"messages": [{"role": "user", "content": "a long question"},
                                        {"role": "assistant", "content": "y"}]}], chat_tokenizer,
                         cfg(format="messages", max_seq_len=4), "t")


# ------------------------------------------------------------------------ the cache


def test_the_cache_is_reused_and_never_stale(tmp_path, chat_tokenizer):
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"q": q, "a": a}) + "\n" for q, a in [("hi", "yo"), ("ho", "ya")]))
    c = cfg()
    first, entry = prepare_tokenized(str(data), "k", chat_tokenizer, c, tmp_path / "cache", build=True)
    again, entry2 = prepare_tokenized(str(data), "k", chat_tokenizer, c, tmp_path / "cache", build=False)
    assert entry == entry2 and again.examples([0, 1]) == first.examples([0, 1])
    assert [p.name for p in (tmp_path / "cache" / "tokenized").iterdir()] == [entry.name]  # no .tmp-* left
    # Any change to what shapes the tokens is a new entry: the old one is never served.
    changes = [(data, cfg(response_template=" <{a}>")), (data, cfg(max_seq_len=32))]
    edited = tmp_path / "edited.jsonl"
    edited.write_text(data.read_text().replace("yo", "yu"))
    changes.append((edited, c))
    for path, changed in changes:
        with pytest.raises(DataError, match="tokenised cache entry .* is missing"):
            prepare_tokenized(str(path), "k", chat_tokenizer, changed, tmp_path / "cache", build=False)
    other_tok = type(chat_tokenizer).from_pretrained(chat_tokenizer.name_or_path)
    other_tok.chat_template = CHAT_TEMPLATE.replace("<|", "[")
    with pytest.raises(DataError, match="is missing"):
        prepare_tokenized(str(data), "k", other_tok, c, tmp_path / "cache", build=False)
    rebuilt, _ = prepare_tokenized(str(edited), "k", chat_tokenizer, c, tmp_path / "cache", build=True)
    assert rebuilt.examples([0])[0].input_ids[-3:-1] == chat_tokenizer(" yu", add_special_tokens=False)["input_ids"][-2:]


def test_a_failed_tokenisation_leaves_no_entry(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"q": "hi", "a": "yo"}) + "\n" + json.dumps({"q": None, "a": "x"}) + "\n")
    with pytest.raises(DataError, match="row 1"):
        prepare_tokenized(str(data), "k", CharTokenizer(), cfg(), tmp_path / "cache", build=True)
    assert list((tmp_path / "cache" / "tokenized").iterdir()) == []


# ------------------------------------------------------------------ loading, splits


def test_load_records_errors(tmp_path, monkeypatch):
    import datasets
    import huggingface_hub

    # The hub case below must fail fast here (no network): offline, as on the CI machine.
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(DataError, match="no such file"):
        load_records(str(tmp_path / "x.jsonl"), "data.train_file")
    (tmp_path / "e.jsonl").write_text("\n")
    with pytest.raises(DataError, match="is empty"):
        load_records(str(tmp_path / "e.jsonl"), "data.train_file")
    (tmp_path / "d.csv").write_text("a,b\n1,2\n")
    with pytest.raises(DataError, match="unsupported format '.csv'"):
        load_records(str(tmp_path / "d.csv"), "data.train_file")
    (tmp_path / "ok.jsonl").write_text(json.dumps({"q": "x", "a": "y"}) + "\n")
    assert load_records(str(tmp_path / "ok.jsonl"), "k") == [{"q": "x", "a": "y"}]
    with pytest.raises(DataError, match=r"not loadable from the hub \(data.name=cfgname, data.split=validation\)"):
        data_lib.load_table("no-such-org-xyz/no-such-dataset", "data.train_file", "cfgname", "validation")


def test_load_records_reads_parquet_and_json_arrays(tmp_path):
    import datasets

    rows = [{"q": "x", "a": "y"}, {"q": "z", "a": "w"}]
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "d.parquet"))
    assert load_records(str(tmp_path / "d.parquet"), "k") == rows
    (tmp_path / "d.json").write_text(json.dumps(rows))
    assert load_records(str(tmp_path / "d.json"), "k") == rows


def test_eval_split_is_seeded_and_disjoint():
    train, ev = split_for_eval(100, 0.1, seed=3)
    assert len(ev) == 10 and len(train) == 90 and not set(train) & set(ev) and sorted(train + ev) == list(range(100))
    assert split_for_eval(100, 0.1, seed=3) == (train, ev) and split_for_eval(100, 0.1, seed=4)[1] != ev
    with pytest.raises(DataError, match="leaves no training rows"):
        split_for_eval(1, 0.5, seed=0)


def test_stratified_sample_is_seeded_and_proportional():
    labels = [0] * 100 + [1] * 50 + [2] * 10
    a = draw_sample(len(labels), 0.1, seed=3, labels=labels)
    assert a == draw_sample(len(labels), 0.1, seed=3, labels=np.array(labels))
    assert a != draw_sample(len(labels), 0.1, seed=4, labels=labels)
    assert Counter(labels[i] for i in a) == {0: 10, 1: 5, 2: 1}
    assert len(set(a)) == len(a) and a == sorted(a)
    assert len(draw_sample(200, 0.25, seed=0)) == 50
    assert len(draw_sample(10, 1.0, seed=0)) == 10


# ----------------------------------------------------------------- batches, packing


def test_batch_stream_partitions_each_epoch_across_ranks_and_resumes_exactly():
    streams = [BatchStream(20, micro_batch_size=3, rank=r, world_size=2, seed=5) for r in range(2)]
    # 20 // 6 = 3 global micro-batches per epoch; the last 2 items are dropped this epoch.
    epoch = [[next(s) for _ in range(3)] for s in streams]
    seen = [i for rank in epoch for batch in rank for i in batch]
    assert len(seen) == 18 and len(set(seen)) == 18
    again = BatchStream(20, 3, 0, 2, seed=5)
    assert [next(again) for _ in range(3)] == epoch[0]  # deterministic
    later = [next(streams[0]) for _ in range(4)]  # into epoch 2, reshuffled
    resumed = BatchStream(20, 3, 0, 2, seed=5)
    resumed.position = 3
    assert [next(resumed) for _ in range(4)] == later
    assert later[:3] != epoch[0]
    with pytest.raises(DataError, match="cannot fill one micro-batch"):
        BatchStream(5, 3, 0, 2, seed=0)


def test_the_epoch_order_is_drawn_once_per_epoch(monkeypatch):
    draws = []
    real = np.random.default_rng
    monkeypatch.setattr(data_lib.np.random, "default_rng", lambda seed: draws.append(tuple(seed)) or real(seed))
    stream = BatchStream(40, 2, 0, 2, seed=1)  # 10 micro-batches per epoch
    for _ in range(25):
        next(stream)
    assert draws == [(1, 0), (1, 1), (1, 2)]


def test_eval_batches_cover_every_example_once_with_equal_batch_counts():
    per_rank = [eval_batches(11, micro_batch_size=2, rank=r, world_size=3) for r in range(3)]
    assert len({len(b) for b in per_rank}) == 1  # same number of forwards on every rank
    counted = Counter(i for batches in per_rank for idx, w in batches for i, wi in zip(idx, w, strict=True) if wi > 0)
    assert counted == {i: 1 for i in range(11)}


def test_collate_pads_right_and_masks():
    tok = tokenize_records([{"q": "a", "a": "b"}, {"q": "abc", "a": "b"}], CharTokenizer(), cfg(), "t")
    examples = tok.examples([0, 1])
    batch = collate(examples, pad_id=0)
    assert batch["input_ids"].shape == (2, len(examples[1].input_ids))
    assert batch["attention_mask"][0].tolist().count(0) == 2
    assert (batch["labels"][0][batch["attention_mask"][0] == 0] == IGNORE_INDEX).all()
    assert torch.equal(batch["token_mask"], batch["attention_mask"])


def test_best_fit_decreasing_packs_by_hand():
    lengths = [3, 5, 1, 4, 3]
    # Longest first: 5 -> new pack A (3 free); 4 -> new pack B (4 free); 3 (index 0) -> A,
    # the fullest it fits (A full, closed); 3 (index 4) -> B (1 free); 1 -> B (full).
    assert pack_examples(lengths, range(5), 8) == [[1, 0], [3, 4, 2]]
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 60, size=500)
    packs = pack_examples(lengths, range(500), 64)
    assert sorted(i for p in packs for i in p) == list(range(500))
    assert all(sum(lengths[i] for i in p) <= 64 for p in packs)
    assert len(packs) <= 1.1 * lengths.sum() / 64 + 1  # nearly full packs
    with pytest.raises(DataError, match="longer than data.max_seq_len=4"):
        pack_examples([5], [0], 4)


def test_collate_packed_restarts_positions_and_drops_cross_example_labels():
    a = Example([1, 10, 11], [IGNORE_INDEX, 11, 12], 1)
    b = Example([1, 20], [IGNORE_INDEX, 21], 1)
    c = Example([1, 30, 31, 32], [IGNORE_INDEX, IGNORE_INDEX, 32, 2], 2)
    rows = collate_packed([[a, b], [c]], pad_id=0, one_row=False)
    assert rows["input_ids"].tolist() == [[1, 10, 11, 1, 20], [1, 30, 31, 32, 0]]
    assert rows["position_ids"].tolist() == [[0, 1, 2, 0, 1], [0, 1, 2, 3, 0]]
    assert rows["labels"].tolist() == [[IGNORE_INDEX, 11, 12, IGNORE_INDEX, 21],
                                       [IGNORE_INDEX, IGNORE_INDEX, 32, 2, IGNORE_INDEX]]
    assert rows["token_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]]
    assert "attention_mask" not in rows
    flat = collate_packed([[a, b], [c]], pad_id=0, one_row=True)
    assert flat["input_ids"].tolist() == [[1, 10, 11, 1, 20, 1, 30, 31, 32]]
    assert flat["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0, 1, 2, 3]]
    assert flat["token_mask"].sum() == 9


def _tiny_lora_model(attn: str):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         attn_implementation=attn, use_cache=False)
    model = get_peft_model(LlamaForCausalLM(config), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                                lora_dropout=0.0))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn_like(p) * 0.1)
    return model.eval()


def _per_example_loss_and_stats(model, batch, owners):
    """Summed token loss per example (``owners[r][t]``: which example token t of row r
    belongs to, -1 for padding) and the LoRA-drop statistics, by the definition:
    ``sum over real tokens of ||scaling * B(A(x))||^2`` per (layer, module), from hooks
    written here (not the project's recorder)."""
    sq = Counter()
    token_mask = batch.pop("token_mask").float()

    def hook(name, scaling):
        def fn(_m, _i, out):
            sq[name] += float(((out.float() * scaling).pow(2).sum(-1) * token_mask).sum())
        return fn

    handles = [m.lora_B["default"].register_forward_hook(hook(n, m.scaling["default"]))
               for n, m in model.named_modules() if hasattr(m, "lora_B") and "default" in getattr(m, "lora_B", {})]
    with torch.no_grad():
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits.double()
    for h in handles:
        h.remove()
    labels = batch["labels"]
    token_loss = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), labels[:, 1:],
                                                   ignore_index=IGNORE_INDEX, reduction="none")
    losses = Counter()
    for r in range(labels.shape[0]):
        for t in range(labels.shape[1] - 1):
            if labels[r, t + 1] != IGNORE_INDEX:
                losses[owners[r][t + 1]] += float(token_loss[r, t])
    return losses, sq


@pytest.mark.parametrize("attn,one_row", [("sdpa", False), ("sdpa", True), ("eager", False)])
def test_packed_and_unpacked_give_the_same_per_example_loss_and_statistics(attn, one_row):
    gen = torch.Generator().manual_seed(1)
    examples = []
    for n in (9, 5, 12, 3, 7, 6):
        ids = [1] + torch.randint(3, 64, (n - 1,), generator=gen).tolist()
        start = n // 2
        examples.append(Example(ids, [IGNORE_INDEX] * start + ids[start:], start))
    model = _tiny_lora_model(attn)
    unpacked = collate(examples, pad_id=0)
    owners = [[i if t < len(e.input_ids) else -1 for t in range(unpacked["input_ids"].shape[1])]
              for i, e in enumerate(examples)]
    ref_loss, ref_sq = _per_example_loss_and_stats(model, unpacked, owners)

    packs = pack_examples([len(e.input_ids) for e in examples], range(len(examples)), 16)
    assert any(len(p) > 1 for p in packs)  # something really is packed
    packed = collate_packed([[examples[i] for i in p] for p in packs], pad_id=0, one_row=one_row)
    rows = [[i for p in packs for i in p]] if one_row else packs
    owners = [[i for i in row for _ in examples[i].input_ids] for row in rows]
    owners = [o + [-1] * (packed["input_ids"].shape[1] - len(o)) for o in owners]
    loss, sq = _per_example_loss_and_stats(model, packed, owners)

    assert set(loss) == set(range(len(examples))) == set(ref_loss)
    for i in ref_loss:  # fp32 model, float64 sums: 1e-5 relative covers summation order
        assert loss[i] == pytest.approx(ref_loss[i], rel=1e-5), i
    assert set(sq) == set(ref_sq) and len(sq) == 4
    for name in ref_sq:
        assert sq[name] == pytest.approx(ref_sq[name], rel=1e-5), name


def test_micro_batches_over_packs_cover_the_subset(tmp_path):
    rows = [{"q": "x" * n, "a": "y"} for n in (1, 5, 9, 2, 7, 3, 8, 4)]
    data = tokenize_records(rows, CharTokenizer(), cfg(packing=True, max_seq_len=24), "t")
    subset = [0, 2, 3, 5, 6, 7]
    per_rank = [data_lib.MicroBatches(data, subset, cfg(packing=True, max_seq_len=24), 1, r, 2, seed=0, pad_id=0)
                for r in range(2)]
    assert per_rank[0].num_items == len(per_rank[0].packs) and sorted(
        i for p in per_rank[0].packs for i in p) == subset
    batch = next(per_rank[0])
    assert batch["input_ids"].shape[1] <= 24 and "position_ids" in batch
    assert int(batch["token_mask"].sum()) == sum(int(data.lengths[i]) for i in per_rank[0].packs[
        int(per_rank[0].stream.epoch_order(0)[0])])


def test_steps_for_epochs_by_hand():
    # 100 items, 4 per micro-batch on 2 ranks: 12 whole global micro-batches per epoch.
    assert data_lib.steps_for_epochs(100, 4, 2, 1, 1.0) == 12
    assert data_lib.steps_for_epochs(100, 4, 2, 5, 1.0) == 3  # 12 / 5 rounded up
    assert data_lib.steps_for_epochs(100, 4, 2, 1, 2.5) == 30
    assert data_lib.steps_for_epochs(100, 4, 2, 1, 0.01) == 1


def test_default_num_proc_is_one_for_small_sets():
    assert data_lib.default_num_proc(500) == 1
    assert 1 <= data_lib.default_num_proc(10**6) <= 8


def test_shipped_data_files_exist():
    assert Path(DataConfig().train_file).exists() or (Path(__file__).parents[1] / DataConfig().train_file).exists()
