"""Engine config resolution, LR schedule, and the rebuild that frees the first model."""

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, run_ranks
from loradrop_ds.config import ConfigError, load_config
from loradrop_ds.engine import SizeHints, load_ds_config, lr_lambda

# SmolLM2-135M's and Llama-3-70B's dimensions, LoRA r = 16 on every linear module; the largest
# parameter is the embedding (vocabulary x hidden).
SMALL = SizeHints(hidden_size=576, largest_weight_numel=576 * 1536, largest_lora_numel=16 * 1536,
                  largest_param_numel=49152 * 576)
LLAMA70B = SizeHints(hidden_size=8192, largest_weight_numel=8192 * 28672, largest_lora_numel=16 * 28672,
                     largest_param_numel=128256 * 8192)


def test_ds_config_auto_values_come_from_the_recipe():
    cfg = load_config(None, ["train.micro_batch_size=3", "train.grad_accum=5", "train.max_grad_norm=0.5",
                             "model.dtype=bfloat16"])
    ds = load_ds_config(cfg, world_size=4, hints=SMALL)
    assert ds["train_micro_batch_size_per_gpu"] == 3
    assert ds["gradient_accumulation_steps"] == 5
    assert ds["train_batch_size"] == 60
    assert ds["gradient_clipping"] == 0.5
    assert ds["bf16"]["enabled"] is True and ds["fp16"]["enabled"] is False
    assert ds["zero_optimization"]["stage"] == 3
    # fp32 LoRA gradients are reduced in fp32 on a bf16 base, not in DeepSpeed's default bf16.
    assert ds["communication_data_type"] == "fp32"
    assert ds["data_types"]["grad_accum_dtype"] == "fp32"  # and accumulated in fp32 (test below)


def test_zero3_sizes_follow_the_model():
    """Hand-worked: hidden^2 reduce bucket; prefetch bucket 0.9 hidden^2 but at least one
    whole layer weight (a 70B MLP weight is 8192 x 28672); persistence 10 x hidden but at
    least the largest LoRA matrix, so every LoRA parameter stays resident."""
    zero = load_ds_config(load_config(None), 8, LLAMA70B)["zero_optimization"]
    assert zero["reduce_bucket_size"] == 8192 * 8192
    assert zero["stage3_prefetch_bucket_size"] == 8192 * 28672 > 0.9 * 8192 * 8192
    assert zero["stage3_param_persistence_threshold"] == 16 * 28672 > 10 * 8192
    assert zero["stage3_param_persistence_threshold"] < 8192 * 1024  # k_proj, the smallest base weight, stays sharded
    zero = load_ds_config(load_config(None), 8, SizeHints(576, 576 * 192, 8 * 576, 49152 * 576))["zero_optimization"]
    assert zero["stage3_prefetch_bucket_size"] == int(0.9 * 576 * 576)  # no weight above 0.9 hidden^2
    assert zero["stage3_param_persistence_threshold"] == 10 * 576  # every LoRA matrix is below 10 x hidden
    # A concrete value in the JSON wins over the rule (the test config partitions everything).
    tiny = load_ds_config(load_config(None, ["deepspeed=ds_configs/zero3_tiny.json"]), 2, SMALL)
    assert tiny["zero_optimization"]["stage3_param_persistence_threshold"] == 0


def test_one_rank_keeps_every_parameter_resident_unless_offloaded():
    """Hand-worked: on one rank "auto" persistence is the largest parameter (70B's embedding,
    128256 x 8192), so no parameter is ever released; with offload_param the several-rank
    rule stays (the largest LoRA matrix), and so it does on 2 ranks."""
    def threshold(world_size, *overrides):
        return load_ds_config(load_config(None, list(overrides)), world_size,
                              LLAMA70B)["zero_optimization"]["stage3_param_persistence_threshold"]

    assert threshold(1) == 128256 * 8192 == 1_050_673_152
    assert threshold(1) >= 8192 * 28672  # the largest decoder weight too
    assert threshold(2) == threshold(8) == 16 * 28672
    assert threshold(1, "deepspeed=ds_configs/zero3_offload_param.json") == 16 * 28672
    assert threshold(1, "deepspeed=ds_configs/zero3_tiny.json") == 0  # a concrete value wins


def _zero_with(tmp_path, base: str, **settings) -> str:
    ds = json.loads((REPO / "ds_configs" / base).read_text())
    ds["zero_optimization"].update(settings)
    path = tmp_path / f"ds{len(list(tmp_path.iterdir()))}.json"
    path.write_text(json.dumps(ds))
    return f"deepspeed={path}"


def test_memory_efficient_linear_auto_is_off_where_nothing_released_is_held(tmp_path):
    """Hand-worked from the rule (engine.memory_efficient_linear_auto): DeepSpeed's linear
    (true) only on several ranks without recomputation, or with the parameters offloaded;
    a bool in the JSON wins; anything else is refused."""
    def linear(world_size, *overrides):
        return load_ds_config(load_config(None, list(overrides)), world_size,
                              SMALL)["zero_optimization"]["memory_efficient_linear"]

    assert linear(2) is True and linear(8) is True
    assert linear(2, "model.gradient_checkpointing=true") is False
    assert linear(1) is False
    offload = "deepspeed=ds_configs/zero3_offload_param.json"
    assert linear(1, offload) is True
    assert linear(1, offload, "model.gradient_checkpointing=true") is False
    assert linear(2, _zero_with(tmp_path, "zero3.json", memory_efficient_linear=False)) is False
    assert linear(1, _zero_with(tmp_path, "zero3.json", memory_efficient_linear=True)) is True
    absent = json.loads((REPO / "ds_configs" / "zero3.json").read_text())
    del absent["zero_optimization"]["memory_efficient_linear"]
    (tmp_path / "absent.json").write_text(json.dumps(absent))
    assert linear(1, f"deepspeed={tmp_path / 'absent.json'}") is False  # absent means "auto", not DeepSpeed's true
    with pytest.raises(ConfigError, match="memory_efficient_linear='yes'; use true, false or \"auto\""):
        linear(2, _zero_with(tmp_path, "zero3.json", memory_efficient_linear="yes"))


def test_leaf_modules_are_refused_with_a_shared_lora(tmp_path):
    """DeepSpeed's leaf modules file the tied shared LoRA under one layer and lose the other
    layers' gradient (tests/test_tied_lora_zero3.py shows it): refused in any LoRA-drop run,
    whichever setting makes them; plain LoRA (no tie) may use them."""
    leaf = _zero_with(tmp_path, "zero3.json", leaf_module={"classes": ["LlamaDecoderLayer"]})
    with pytest.raises(ConfigError, match="zero_optimization.leaf_module makes DeepSpeed reduce the tied shared "
                                          "LoRA's gradient .*remove leaf_module from the JSON"):
        load_ds_config(load_config(None, [leaf]), 2, SMALL)
    by_size = _zero_with(tmp_path, "zero3.json", stage3_module_granularity_threshold=10**6)
    with pytest.raises(ConfigError, match="zero_optimization.stage3_module_granularity_threshold makes"):
        load_ds_config(load_config(None, [by_size]), 2, SMALL)
    plain = load_ds_config(load_config(None, [leaf, "loradrop.enabled=false"]), 2, SMALL)
    assert plain["zero_optimization"]["leaf_module"] == {"classes": ["LlamaDecoderLayer"]}
    zero = load_ds_config(load_config(None, [_zero_with(tmp_path, "zero3.json", stage3_module_granularity_threshold=0)]),
                          2, SMALL)["zero_optimization"]
    assert "leaf_module" not in zero


def test_tf32_is_set_on_cuda_and_a_logged_no_op_elsewhere(caplog):
    """train.tf32 through torch.set_float32_matmul_precision: the new API's flag reads "tf32"
    and the legacy getters stay readable (setting only the new API makes them raise in torch
    2.13). Only flags are set, no device is touched, so this runs on CPU; they are restored."""
    import logging

    from loradrop_ds.engine import set_matmul_precision

    before = torch.get_float32_matmul_precision()
    try:
        set_matmul_precision(True, "cuda")
        assert torch.backends.cuda.matmul.fp32_precision == "tf32"
        assert torch.backends.cuda.matmul.allow_tf32 is True and torch.get_float32_matmul_precision() == "high"
        set_matmul_precision(False, "cuda")  # a later run in the same process does not inherit it
        assert torch.backends.cuda.matmul.fp32_precision == "ieee"
        assert torch.backends.cuda.matmul.allow_tf32 is False
        with caplog.at_level(logging.INFO, logger="loradrop_ds.engine"):
            set_matmul_precision(True, "cpu")
        assert torch.get_float32_matmul_precision() == "highest"  # unchanged
        assert [r.getMessage() for r in caplog.records] == [
            "train.tf32 has no effect on cpu: TF32 is a format of NVIDIA tensor cores"]
    finally:
        torch.set_float32_matmul_precision(before)


def test_ds_config_contradictions_are_errors(tmp_path):
    bad = json.loads((REPO / "ds_configs" / "zero3.json").read_text())
    bad["train_micro_batch_size_per_gpu"] = 16
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(bad))
    with pytest.raises(ConfigError, match="train_micro_batch_size_per_gpu=16 contradicts"):
        load_ds_config(load_config(None, [f"deepspeed={path}"]), 1, SMALL)
    path.write_text(json.dumps({"zero_optimization": {"stage": 2}}))
    with pytest.raises(ConfigError, match="stage is 2"):
        load_ds_config(load_config(None, [f"deepspeed={path}"]), 1, SMALL)
    path.write_text("[1, 2]")
    with pytest.raises(ConfigError, match="expected a JSON object of settings, got list"):
        load_ds_config(load_config(None, [f"deepspeed={path}"]), 1, SMALL)
    with pytest.raises(ConfigError, match="no such file"):
        load_ds_config(load_config(None, ["deepspeed=ds_configs/missing.json"]), 1, SMALL)


@pytest.mark.parametrize("name", sorted(p.name for p in (REPO / "ds_configs").glob("*.json")))
def test_shipped_ds_configs_resolve(name):
    ds = load_ds_config(load_config(None, [f"deepspeed=ds_configs/{name}"]), 8, LLAMA70B)
    assert ds["train_batch_size"] == 8 * ds["train_micro_batch_size_per_gpu"] * ds["gradient_accumulation_steps"]
    assert "auto" not in json.dumps(ds)


def test_float16_is_refused_with_the_fix():
    with pytest.raises(ConfigError, match="model.dtype=float16 is not supported.*use model.dtype=bfloat16"):
        load_config(None, ["model.dtype=float16"])


def test_lr_schedule_hand_worked():
    f = lr_lambda("cosine", warmup_steps=4, total_steps=12, min_lr_ratio=0.1)
    assert [f(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert f(4) == pytest.approx(1.0)
    assert f(8) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert f(12) == pytest.approx(0.1) and f(20) == pytest.approx(0.1)
    lin = lr_lambda("linear", 0, 10, 0.0)
    assert [lin(s) for s in (0, 5, 10)] == pytest.approx([1.0, 0.5, 0.0])
    assert lr_lambda("constant", 2, 10, 0.0)(7) == 1.0


def _rebuild(tiny_model, tmp_path, mode):
    import shutil

    model_dir = tmp_path / f"model-{mode}"
    shutil.copytree(tiny_model, model_dir)  # the in-place mode moves the weight files away
    out = tmp_path / mode
    out.mkdir()
    run_ranks(REPO / "tests" / "workers" / "rebuild.py", [str(model_dir), str(out), mode])
    return json.loads((out / "rebuild.json").read_text()), load_file(out / "adapter.safetensors")


@pytest.fixture(scope="module")
def reload_rebuild(tiny_model, tmp_path_factory):
    """The ``reload`` rebuild (the reference of the in-place one, and checked on its own)."""
    return _rebuild(tiny_model, tmp_path_factory.mktemp("rebuild"), "reload")


def test_in_place_rebuild_equals_reloading_the_base(tiny_model, tmp_path, reload_rebuild):
    """The main stage built on the sampling stage's partitioned base trains exactly as
    one built on a base loaded again from disk (fp32, 2 ranks, dropout on), without
    reading the weight files again (they are moved away after the first load), with the
    sampling LoRA and optimizer freed and no DeepSpeed state left behind."""
    inplace, adapter = _rebuild(tiny_model, tmp_path, "inplace")
    reload, ref_adapter = reload_rebuild
    assert inplace["sampling_losses"] == reload["sampling_losses"]
    assert inplace["main_losses"] == pytest.approx(reload["main_losses"], rel=1e-6, abs=1e-7)
    assert adapter.keys() == ref_adapter.keys()
    for k in ref_adapter:
        torch.testing.assert_close(adapter[k], ref_adapter[k], rtol=1e-6, atol=1e-6, msg=lambda m, k=k: f"{k}: {m}")
    assert inplace["same_base_objects"] is True and reload["same_base_objects"] is False
    # Memory is flat: the sampling LoRA and its optimizer are gone, nothing partitioned
    # outlives the rebuild but the main model, and ZeRO-3 registered the same hooks as on
    # a fresh model.
    assert inplace["freed"]["lora"] and inplace["freed"]["optimizer"], inplace["freed"]
    assert inplace["zero_params_not_in_main_model"] == 0
    assert inplace["fwd_module_stack"] == 0
    assert inplace["hooks"] == reload["hooks"]


def test_rebuild_by_reload_frees_the_first_engines_model(reload_rebuild):
    result, _ = reload_rebuild
    assert result["freed"] == {"lora": True, "optimizer": True, "model": True}, result
    assert result["fwd_module_stack"] == 0 and result["zero_params_not_in_main_model"] == 0
    assert all(math.isfinite(x) for x in result["main_losses"])


def test_rebuild_leak_is_visible_without_release(tiny_model, tmp_path):
    """Control: with DeepSpeed's plain destroy() the first model stays alive, so the
    checks above can fail. If a DeepSpeed release fixes the leak this test says so."""
    import deepspeed

    result, _ = _rebuild(tiny_model, tmp_path, "plain-destroy")
    assert result["freed"]["model"] is False and result["zero_params_not_in_main_model"] > 0, (
        f"deepspeed {deepspeed.__version__} no longer leaks the model on destroy(); "
        "release_engine's workaround may be dropped")


def test_a_bf16_run_keeps_lora_gradients_in_fp32(tiny_model, tmp_path):
    """fp32 LoRA on a bf16 base: the ZeRO-3 optimizer's gradient partitions are fp32 with the
    project's config; DeepSpeed's default (no data_types) would hold them in bf16, which the
    control shows (so the check can see the difference)."""
    worker = REPO / "tests" / "workers" / "grad_dtype.py"
    ours, default = tmp_path / "ours.json", tmp_path / "default.json"
    run_ranks(worker, [str(tiny_model), str(ours), f"{default},data_types={{}}"])  # one engine after the other
    ours, default = json.loads(ours.read_text()), json.loads(default.read_text())
    assert ours["lora_param_dtypes"] == default["lora_param_dtypes"] == ["torch.float32"]
    assert ours["partition_dtypes"] == ["torch.float32"] and ours["gradient_accumulation_dtype"] == "torch.float32"
    assert default["partition_dtypes"] == ["torch.bfloat16"]


def test_training_after_an_evaluation_gathers_what_it_gathers_without_one(tiny_model, tmp_path):
    """DeepSpeed 0.19.8 caches its release decisions per (module, step) of the trace and does
    not forget them when an evaluation's forward-only trace is replaced by the training one:
    every later step then gathered 121 parameters instead of 63 here (3.64 against 2.76 s
    per step on the default model). training.evaluate resets the trace afterwards."""
    modes = ("no-eval", "eval")  # one engine after the other, in one set of rank processes
    run_ranks(REPO / "tests" / "workers" / "eval_trace.py",
              [str(tiny_model), *(arg for mode in modes for arg in (str(tmp_path / mode), mode))])
    fetched = {mode: json.loads((tmp_path / mode).read_text())["fetched"] for mode in modes}
    steady = fetched["no-eval"][2:]  # from the third step on, the trace is recorded
    assert len(set(steady)) == 1 and steady[0] > 0
    assert fetched["eval"][2:] == steady, fetched


@pytest.fixture(scope="module")
def one_rank_run(tiny_model, tmp_path_factory):
    """tests/workers/step_timing.py: four steps on one rank with ds_configs/zero3.json."""
    out = tmp_path_factory.mktemp("one_rank")
    run_ranks(REPO / "tests" / "workers" / "step_timing.py", [str(tiny_model), str(out)], nproc=1)
    return out


def test_step_times_leave_out_what_runs_between_steps(one_rank_run):
    """Checkpoints, evaluations, selection checks and LoRAPrune updates run in the recipe's
    loop body between steps; the clock jumps 1000 s inside each one, and no logged step time or throughput may see it."""
    records = [json.loads(line) for line in (one_rank_run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if r.get("stage") == "main"]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    assert all(0 < r["seconds_per_step"] < 1000 for r in steps), [r["seconds_per_step"] for r in steps]
    assert all(r["tokens_per_s_per_rank"] > 0.01 for r in steps)
    # Model FLOPs per step by the convention, worked from the rows: 4N per token plus 6·L·d·n²
    # per row of n tokens (the worker's N = 1000, L = 2, d = 8), over the same step time.
    rows = json.loads((one_rank_run / "rows.json").read_text())
    n = rows["row_tokens"]
    step_flops = 4 * 1000 * sum(n) + 6 * 2 * 8 * sum(k * k for k in n)
    for r in steps:
        assert r["tflops_per_rank"] * 1e12 * r["seconds_per_step"] == pytest.approx(step_flops, rel=1e-6)
        assert r["mfu"] == pytest.approx(r["tflops_per_rank"] * 1e12 / 1e6)
    # The stage's rates for summary.json leave out the jumps too.
    rates = rows["rates"]
    seconds = 4 * sum(n) / rates["tokens_per_s_per_rank"]
    assert 0 < seconds < 1000
    assert rates["tflops_per_rank"] * 1e12 * seconds == pytest.approx(4 * step_flops, rel=1e-6)
    assert rates["mfu"] == pytest.approx(rates["tflops_per_rank"] * 1e12 / 1e6) and rates["peak_memory_gib"] > 0


def test_one_rank_keeps_the_whole_base_resident_in_its_own_partition(one_rank_run, tiny_model):
    """On one rank the "auto" persistence threshold is the largest parameter (the tiny
    model's embedding, 600 x 64), so after training every base parameter is persistent and
    gathered, and its full tensor is the storage of its partition: no second copy (DeepSpeed
    0.19.8's one-rank gather is a view). torch's linear is used (memory_efficient_linear
    "auto" is false on one rank)."""
    result = json.loads((one_rank_run / "residency.json").read_text())
    config = json.loads((tiny_model / "config.json").read_text())
    assert result["zero"] == {"stage3_param_persistence_threshold": config["vocab_size"] * config["hidden_size"],
                              "memory_efficient_linear": False}
    assert result["deepspeed_linear"] is False
    base = result["base"]
    assert len(base) == 3 + 9 * config["num_hidden_layers"]  # embedding, final norm, lm_head; 9 per layer
    assert max(p["numel"] for p in base.values()) == 600 * 64
    assert all(p["persistent"] and p["available"] and p["is_its_partition"] for p in base.values()), base
