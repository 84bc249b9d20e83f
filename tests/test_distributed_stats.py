"""Cross-rank statistics: the all-reduced importance equals the importance computed in
one process over the union of both ranks' batches; disagreeing ranks fail loudly."""

import torch
from safetensors.torch import load_file

from conftest import REPO, run_ranks
from loradrop_ds.importance import Selection, compute_selection
from workers.common import randomize_lora_b, rank_batches, tiny_config
from workers.stats import PER_RANK


def reference_stats(model_dir):
    """Plain fp32 model, no DeepSpeed: the recorder over both ranks' batches in turn,
    checked against a direct computation of sum ||scaling * B(A(x))||^2."""
    from transformers import AutoModelForCausalLM

    from loradrop_ds.lora import ImportanceRecorder, add_lora, lora_layers
    from loradrop_ds.model import load_tokenizer

    cfg = tiny_config(str(model_dir), f"train.micro_batch_size={PER_RANK}")
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.requires_grad_(False)
    model = add_lora(model, cfg.lora, cfg.seed)
    randomize_lora_b(model, seed=3)
    recorder = ImportanceRecorder(model, cfg.lora.target_modules, "cpu")
    batches = rank_batches(cfg, load_tokenizer(str(model_dir)), PER_RANK, 2)

    # Independent computation: capture each LoRA module's input and apply A, B by hand.
    layers = lora_layers(model, cfg.lora.target_modules)
    direct = torch.zeros(4, len(cfg.lora.target_modules), dtype=torch.float64)
    inputs = {}
    handles = [m.register_forward_hook(lambda mod, args, out, key=key: inputs.__setitem__(key, args[0].detach()))
               for key, m in layers.items()]
    with torch.no_grad():
        for b in batches:
            with recorder.recording(b["attention_mask"]):
                model(**b)
            for (layer, name), m in layers.items():
                x = inputs[(layer, name)].double()
                a = m.lora_A["default"].weight.double()
                bw = m.lora_B["default"].weight.double()
                delta = m.scaling["default"] * (x @ a.T @ bw.T)
                mask = b["attention_mask"].double()[..., None]
                direct[layer, cfg.lora.target_modules.index(name)] += (delta.pow(2) * mask).sum()
    for h in handles:
        h.remove()
    tokens = sum(int(b["attention_mask"].sum()) for b in batches)
    return recorder.stats, direct, tokens


def test_all_reduced_statistics_equal_single_process_union(tiny_model, tmp_path):
    run_ranks(REPO / "tests" / "workers" / "stats.py", [str(tiny_model), str(tmp_path)])
    got = load_file(tmp_path / "stats.safetensors")
    ref, direct, tokens = reference_stats(tiny_model)

    # The recorder itself agrees with the hand computation.
    torch.testing.assert_close(ref.sq_norm_sums, direct, rtol=1e-5, atol=0)
    # One rank saw only part of the data; the all-reduced sums cover the union.
    assert (got["local_sq_norm_sums"] < got["sq_norm_sums"]).all()
    torch.testing.assert_close(got["sq_norm_sums"], ref.sq_norm_sums, rtol=1e-5, atol=0)
    assert got["token_counts"].unique().tolist() == [float(tokens)]
    assert (got["sq_norm_sums"] > 0).all()

    selection = Selection.from_json((tmp_path / "selection.json").read_text())
    expected = compute_selection(ref, 0.6, "layer")
    assert selection.kept == expected.kept
    assert selection.importance == [pytest_approx(x) for x in expected.importance]
    # The tampered selection on rank 1 was refused on *both* ranks.
    assert int(got["refused_ranks"]) == 2


def pytest_approx(x):
    import pytest

    return pytest.approx(x, rel=1e-5)


def test_run_on_every_rank_in_one_process():
    """The outcome exchange's local half: results come back, bad input keeps its message
    (exit code 2 in the CLI), anything else names the step, the rank and the type."""
    import pytest

    from loradrop_ds.config import ConfigError
    from loradrop_ds.distributed import DistInfo, RankFailure, run_on_every_rank

    info = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    assert run_on_every_rank(info, "step", lambda: 41 + 1) == 42
    assert run_on_every_rank(info, "step", lambda: "x", gather=True) == ["x"]

    def bad_input():
        raise ConfigError("train.lr must be > 0")

    with pytest.raises(RankFailure) as failure:
        run_on_every_rank(info, "input checks", bad_input, (ConfigError,))
    assert str(failure.value) == "train.lr must be > 0" and failure.value.user_error

    def crash():
        raise KeyError("boom")

    with pytest.raises(RankFailure) as failure:
        run_on_every_rank(info, "save", crash, (ConfigError,))
    assert str(failure.value) == "save failed on rank 0: KeyError: 'boom'" and not failure.value.user_error
