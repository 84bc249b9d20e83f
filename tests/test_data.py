"""Data: templates and loss masks, the stratified sample, per-rank batches."""

import json
from collections import Counter

import pytest

from loradrop_ds.config import DataConfig
from loradrop_ds.data import (
    IGNORE_INDEX,
    BatchStream,
    DataError,
    collate,
    draw_sample,
    eval_batches,
    load_records,
    tokenize_records,
)


class CharTokenizer:
    """One id per character (+ BOS 1, EOS 2): lets masks be checked by hand."""

    eos_token_id = 2
    pad_token_id = 0

    def __call__(self, text, add_special_tokens=True):
        ids = [ord(c) for c in text]
        return {"input_ids": ([1] if add_special_tokens else []) + ids}


def cfg(**kw):
    base = dict(prompt_template="Q:{q}\nA:", response_template=" {a}", label_field=None, max_seq_len=64)
    base.update(kw)
    return DataConfig(**base)


def test_loss_only_on_response_tokens_plus_eos():
    tok = tokenize_records([{"q": "hi", "a": "yo"}], CharTokenizer(), cfg(), "t")
    ex = tok.examples[0]
    prompt = [1] + [ord(c) for c in "Q:hi\nA:"]
    response = [ord(c) for c in " yo"] + [2]
    assert ex.input_ids == prompt + response
    assert ex.labels == [IGNORE_INDEX] * len(prompt) + response
    assert ex.response_start == len(prompt)


def test_long_prompts_lose_tokens_from_the_left():
    tok = tokenize_records([{"q": "abcdefghij", "a": "z"}], CharTokenizer(), cfg(max_seq_len=8), "t")
    ex = tok.examples[0]
    assert len(ex.input_ids) == 8 and tok.num_truncated == 1
    assert ex.input_ids[-3:] == [ord(" "), ord("z"), 2]
    assert ex.input_ids[:5] == [ord(c) for c in "ij\nA:"]
    with pytest.raises(DataError, match="does not fit data.max_seq_len=3"):
        tokenize_records([{"q": "a", "a": "long"}], CharTokenizer(), cfg(max_seq_len=3), "t")


def test_missing_template_column_names_the_columns():
    with pytest.raises(DataError, match=r"columns \['a'\] .* its columns are \['q', 'x'\]"):
        tokenize_records([{"q": "hi", "x": 1}], CharTokenizer(), cfg(), "data.train_file")


def test_labels_map_to_first_response_tokens_and_eval_keeps_train_label_order():
    rows = [{"q": "1", "a": "cat"}, {"q": "2", "a": "dog"}, {"q": "3", "a": "cat"}]
    train = tokenize_records(rows, CharTokenizer(), cfg(label_field="a", response_template="{a}"), "t")
    assert train.label_names == ["cat", "dog"]
    assert train.label_token_ids == [ord("c"), ord("d")]
    assert [e.label for e in train.examples] == [0, 1, 0]
    ev = tokenize_records([{"q": "4", "a": "dog"}], CharTokenizer(), cfg(label_field="a", response_template="{a}"),
                          "e", label_names=train.label_names)
    assert ev.examples[0].label == 1
    with pytest.raises(DataError, match="share their first response token"):
        tokenize_records([{"q": "1", "a": "cat"}, {"q": "2", "a": "cow"}], CharTokenizer(),
                         cfg(label_field="a", response_template="{a}"), "t")
    with pytest.raises(DataError, match="label 'eel' does not occur in the training data"):
        tokenize_records([{"q": "1", "a": "eel"}], CharTokenizer(), cfg(label_field="a", response_template="{a}"),
                         "e", label_names=["cat"])


def test_stratified_sample_is_seeded_and_proportional():
    labels = [0] * 100 + [1] * 50 + [2] * 10
    a = draw_sample(len(labels), 0.1, seed=3, labels=labels)
    assert a == draw_sample(len(labels), 0.1, seed=3, labels=labels)
    assert a != draw_sample(len(labels), 0.1, seed=4, labels=labels)
    assert Counter(labels[i] for i in a) == {0: 10, 1: 5, 2: 1}
    assert len(set(a)) == len(a) and a == sorted(a)
    assert len(draw_sample(200, 0.25, seed=0)) == 50
    assert len(draw_sample(10, 1.0, seed=0)) == 10


def test_batch_stream_partitions_each_epoch_across_ranks():
    indices = list(range(20))
    streams = [BatchStream(indices, micro_batch_size=3, rank=r, world_size=2, seed=5) for r in range(2)]
    # 20 // 6 = 3 global micro-batches per epoch; the last 2 indices are dropped this epoch.
    epoch = [[next(s) for _ in range(3)] for s in streams]
    seen = [i for rank in epoch for batch in rank for i in batch]
    assert len(seen) == 18 and len(set(seen)) == 18
    again = BatchStream(indices, 3, 0, 2, seed=5)
    assert [next(again) for _ in range(3)] == epoch[0]  # deterministic
    nxt = next(streams[0])  # epoch 2 reshuffles
    assert len(nxt) == 3
    with pytest.raises(DataError, match="cannot fill one micro-batch"):
        BatchStream(range(5), 3, 0, 2, seed=0)


def test_eval_batches_cover_every_example_once_with_equal_batch_counts():
    per_rank = [eval_batches(11, micro_batch_size=2, rank=r, world_size=3) for r in range(3)]
    assert len({len(b) for b in per_rank}) == 1  # same number of forwards on every rank
    counted = Counter(i for batches in per_rank for idx, w in batches for i, wi in zip(idx, w, strict=True) if wi > 0)
    assert counted == {i: 1 for i in range(11)}


def test_collate_pads_right_and_masks():
    tok = tokenize_records([{"q": "a", "a": "b"}, {"q": "abc", "a": "b"}], CharTokenizer(), cfg(), "t")
    batch = collate(tok.examples, pad_id=0)
    assert batch["input_ids"].shape == (2, len(tok.examples[1].input_ids))
    assert batch["attention_mask"][0].tolist().count(0) == 2
    assert (batch["labels"][0][batch["attention_mask"][0] == 0] == IGNORE_INDEX).all()


def test_load_records_errors(tmp_path):
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


def test_load_records_reads_parquet_and_json_arrays(tmp_path):
    import datasets

    rows = [{"q": "x", "a": "y"}, {"q": "z", "a": "w"}]
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "d.parquet"))
    assert load_records(str(tmp_path / "d.parquet"), "k") == rows
    (tmp_path / "d.json").write_text(json.dumps(rows))
    assert load_records(str(tmp_path / "d.json"), "k") == rows
