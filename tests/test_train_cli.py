"""The real CLI on a tiny LLaMA: ``launch/train.py`` on 2 gloo ranks, and bad input
rejected before any training."""

import json
import threading
import time

import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import REPO, assert_adapter_reproduces_run, run_ranks_many

TRAIN = REPO / "launch" / "train.py"


def tiny_args(model_dir, out_dir, *extra):
    return [f"model.path={model_dir}", f"output_dir={out_dir}", "deepspeed=ds_configs/zero3_tiny.json",
            "loradrop.sampling_steps=3", "loradrop.sample_ratio=0.05", "loradrop.threshold=0.6",
            "loradrop.sampling_lr=0.01", "train.max_steps=4", "train.warmup_steps=1", "train.lr=0.01",
            "train.micro_batch_size=4", "data.max_eval_examples=24", "lora.dropout=0.0",
            "lora.target_modules=[q_proj,v_proj,up_proj]", "train.save_probe_logits=true", *extra]


def chat_setup(tiny_model, root):
    """A copy of the tiny model with a chat template, and 120 WordNet rows as chats."""
    import shutil

    from test_data import CHAT_TEMPLATE

    model_dir = root / "chat_model"
    shutil.copytree(tiny_model, model_dir)
    config = json.loads((model_dir / "tokenizer_config.json").read_text())
    (model_dir / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": CHAT_TEMPLATE}))
    rows = [json.loads(line) for line in (REPO / "data/wordnet_categories/train.jsonl").read_text().splitlines()][:120]
    chats = root / "chats.jsonl"
    chats.write_text("".join(json.dumps({"messages": [
        {"role": "user", "content": f"Define the category of: {r['definition']}"},
        {"role": "assistant", "content": r["category"]}]}) + "\n" for r in rows))
    return model_dir, chats


def delete_weights_once_sampling_runs(model_dir, out, deleted: list) -> threading.Thread:
    """A thread that deletes ``model_dir``'s weight files as soon as the run in ``out`` has
    its first sampling checkpoint (``train.save_every=2``), naming them in ``deleted``."""
    first_checkpoint = out / "checkpoints" / "sampling-step0000002"

    def watch():
        deadline = time.monotonic() + 300
        while not first_checkpoint.is_dir() and time.monotonic() < deadline:
            time.sleep(0.01)
        for f in model_dir.glob("*.safetensors"):
            f.unlink()
            deleted.append(f.name)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    return watcher


@pytest.fixture(scope="module")
def runs(tiny_model, tmp_path_factory) -> dict:
    """The module's finished runs, by name: (output_dir, rank 0's log), trained one after
    another in one set of rank processes (``run_ranks_many``); and ``deleted``: the weight
    files of the "read_once" run's own model copy, deleted while its sampling stage ran."""
    import shutil

    root = tmp_path_factory.mktemp("train_cli")
    chat_model, chats = chat_setup(tiny_model, root)
    once_model = root / "read_once_model"
    shutil.copytree(tiny_model, once_model)
    argvs = {
        # First, so that nothing earlier in these processes has read its model; 10 sampling steps:
        # the deletion lands long before the sampling stage ends.
        "read_once": tiny_args(once_model, root / "read_once", "loradrop.sampling_steps=10", "train.save_every=2"),
        # The module-granularity run also warm-starts the kept LoRAs from the sampling stage.
        # The layer run gives the MFU a peak (a CPU has none of its own).
        "layer": tiny_args(tiny_model, root / "layer", "loradrop.granularity=layer", "loradrop.warm_start=false",
                           "train.peak_tflops=0.5"),
        "module": tiny_args(tiny_model, root / "module", "loradrop.granularity=module", "loradrop.warm_start=true"),
        "bf16": tiny_args(tiny_model, root / "bf16", "model.dtype=bfloat16"),
        "chat": tiny_args(chat_model, root / "chat", f"data.train_file={chats}", "data.eval_file=null",
                          "data.eval_split_ratio=0.1", "data.format=messages", "data.label_field=null",
                          "data.packing=true", "data.max_seq_len=96", "train.max_steps=null", "train.num_epochs=1",
                          "loradrop.sample_ratio=0.3", "train.report_to=[tensorboard]"),
    }
    deleted: list[str] = []
    watcher = delete_weights_once_sampling_runs(once_model, root / "read_once", deleted)
    procs = run_ranks_many(list(argvs.values()), root / "logs")
    watcher.join(timeout=5)
    return {"deleted": deleted, **{name: (root / name, proc.stderr) for name, proc in zip(argvs, procs, strict=True)}}


@pytest.mark.parametrize("granularity", ["layer", "module"])
def test_two_rank_run_writes_an_adapter_that_plain_peft_reloads(tiny_model, runs, granularity):
    out, log = runs[granularity]
    assert "=== loradrop_ds run summary ===" in log

    selection = json.loads((out / "selection.json").read_text())
    for key in ("raw_sums", "importance", "token_count", "kept_layers", "shared_layers", "threshold", "granularity"):
        assert key in selection
    assert selection["granularity"] == granularity and selection["threshold"] == 0.6
    assert sum(selection["importance"]) == pytest.approx(1.0)
    assert selection["token_count"] > 0 and selection["shared"], selection  # T=0.6 on 4 layers shares some
    assert (out / "importance.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert yaml.safe_load((out / "config.yaml").read_text())["loradrop"]["granularity"] == granularity
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    stages = {r["stage"] for r in records}
    assert {"zero_shot", "sampling", "main", "eval"} <= stages
    main_steps = [r for r in records if r["stage"] == "main" and "loss" in r]
    assert len(main_steps) == 4 and all(r["tokens_per_s_per_rank"] > 0 and r["tflops_per_rank"] > 0 for r in main_steps)
    summary = json.loads((out / "summary.json").read_text())
    # Throughput in the log and the summary: MFU only where train.peak_tflops gives a peak.
    for rates in [*main_steps, summary["main"], summary["sampling"]]:
        if granularity == "layer":
            assert rates["mfu"] == pytest.approx(rates["tflops_per_rank"] / 0.5)
        else:
            assert rates.get("mfu") is None
    assert summary["main"]["tokens_per_s_per_rank"] > 0 and summary["main"]["peak_memory_gib"] > 0
    # The start-up check's estimate beside the measured peak: on CPU the rank's tensors, below its RSS.
    assert 0 < summary["main"]["planned_peak_gib"] < summary["main"]["peak_memory_gib"]
    assert "model FLOPs 4N + 6·L·d·Σn²" in log and "main stage per GPU:" in log
    assert summary["trainable_params"] < summary["plain_lora_params"]
    assert "eval_accuracy" in summary["final"]

    # The adapter is materialised: every (layer, module) that uses the shared LoRA of its
    # module type holds the same values, under its own name.
    weights = load_file(out / "adapter" / "adapter_model.safetensors")
    modules = ["q_proj", "v_proj", "up_proj"]
    assert len(weights) == 4 * len(modules) * 2  # A and B for every (layer, module)
    shared = [(int(i), m) for i in selection["shared"] for m in modules] if granularity == "layer" else \
        [(int(i.split(".")[0]), i.split(".")[1]) for i in selection["shared"]]
    for m in modules:
        users = sorted(layer for layer, mod in shared if mod == m)
        sub = "mlp" if m == "up_proj" else "self_attn"
        for ab in ("lora_A", "lora_B"):
            values = [weights[f"base_model.model.model.layers.{layer}.{sub}.{m}.{ab}.weight"] for layer in users]
            assert all(torch.equal(v, values[0]) for v in values[1:]), (m, ab, users)

    assert_adapter_reproduces_run(tiny_model, out)


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


BAD_INPUT_CASES = ["unknown_key", "missing_file", "empty_dataset", "absent_target", "sample_too_small", "bad_threshold",
                   "bad_rank", "unwritable_output", "does_not_fit"]


@pytest.fixture(scope="module")
def bad_input_runs(tiny_model, tmp_path_factory) -> dict:
    """Each case's one-process run (all in one process: ``run_ranks_many``), its output_dir
    and the message it must print."""
    root = tmp_path_factory.mktemp("bad_input")
    cases = {
        "unknown_key": (["train.max_stepz=3"], "unknown setting train.max_stepz"),
        "missing_file": ([f"data.train_file={root}/nope.jsonl"], "no such file"),
        "empty_dataset": ([f"data.train_file={_write_jsonl(root / 'empty.jsonl', [])}"], "is empty"),
        "absent_target": (["lora.target_modules=[q_proj,wq]"], "lora.target_modules ['wq'] not found"),
        "sample_too_small": (["loradrop.sample_ratio=0.001", "train.micro_batch_size=16"],
                             "the sampling subset has 8 examples, fewer than one optimizer step needs"),
        "bad_threshold": (["loradrop.threshold=1.5"], "loradrop.threshold (T) must be in (0, 1]"),
        "bad_rank": (["lora.r=0"], "lora.r must be a positive integer"),
        # A file where a directory should be: unwritable even for root.
        "unwritable_output": ([f"output_dir={_write_jsonl(root / 'a_file', [])}/run"], "is not writable"),
        # The planner's estimate (launch/plan.py) against this machine's RAM: terabytes of activations.
        "does_not_fit": (["train.micro_batch_size=4096", "data.max_seq_len=4096"],
                         "train.skip_memory_check=true runs it anyway"),
    }
    assert sorted(cases) == sorted(BAD_INPUT_CASES)
    outs = {case: root / case / "run" for case in BAD_INPUT_CASES}
    procs = run_ranks_many([tiny_args(tiny_model, outs[case], *cases[case][0]) for case in BAD_INPUT_CASES],
                           root / "logs", nproc=1, check=False)
    return {case: (proc, outs[case], cases[case][1]) for case, proc in zip(BAD_INPUT_CASES, procs, strict=True)}


@pytest.mark.parametrize("case", BAD_INPUT_CASES)
def test_bad_input_is_rejected_before_training(bad_input_runs, case):
    proc, out, expected = bad_input_runs[case]
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert expected in proc.stderr, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert not (out / "metrics.jsonl").exists()  # nothing trained, nothing logged


def test_bf16_run_trains_fp32_adapters_on_a_bf16_base(tiny_model, runs):
    """The GPU precision path on CPU: a bf16 base (DeepSpeed bf16, gradients reduced in
    fp32), adapters kept in fp32, through the whole CLI; the adapter reloads in plain peft
    on a bf16 base to the trained model's logits (bf16 tolerance)."""

    out, _ = runs["bf16"]
    weights = load_file(out / "adapter" / "adapter_model.safetensors")
    assert {w.dtype for w in weights.values()} == {torch.float32}
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    main_losses = [r["loss"] for r in records if r["stage"] == "main" and "loss" in r]
    assert len(main_losses) == 4 and main_losses[-1] < main_losses[0]
    assert_adapter_reproduces_run(tiny_model, out, tol=0.05, dtype="bfloat16", rtol=0.02)


def test_the_base_weights_are_read_once(runs):
    """The rebuild keeps the sampling stage's partitioned base: once the sampling stage is
    under way (its first checkpoint is complete) the weight files are deleted, and the
    main stage still builds and trains. (Reloading the base for the main stage, as
    earlier versions did, fails here.)"""
    out, log = runs["read_once"]
    assert runs["deleted"] == ["model.safetensors"]
    assert "=== loradrop_ds run summary ===" in log
    summary = json.loads((out / "summary.json").read_text())
    assert summary["sampling"]["steps"] == 10 and summary["main"]["steps"] == 4
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["stage"] == "main" and "loss" in r] == [1, 2, 3, 4]


def test_chat_data_packed_for_epochs_with_a_carved_eval_set(runs):
    """data.format=messages through the tokenizer's chat template, packing, train.num_epochs,
    data.eval_split_ratio and a tracker, on 2 ranks; the adapter reloads in plain peft."""
    out, log = runs["chat"]
    assert "=== loradrop_ds run summary ===" in log
    # 120 rows: 12 carved for eval (round(0.1 * 120)), 108 trained on.
    assert "data: 108 training examples, 12 eval" in log
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    main_steps = [r for r in records if r["stage"] == "main" and "loss" in r]
    summary = json.loads((out / "summary.json").read_text())
    # One epoch of packs of up to 96 tokens, 4 per micro-batch on 2 ranks: fewer steps than
    # unpacked (108 // 8 = 13), at least one.
    assert 1 <= len(main_steps) == summary["main"]["steps"] < 13
    assert summary["final"]["eval_loss"] < summary["zero_shot"]["eval_loss"]
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))  # train.report_to reached the tracker
    assert_adapter_reproduces_run(out.parent / "chat_model", out, tol=1e-4)
