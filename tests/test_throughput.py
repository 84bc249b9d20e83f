"""The model-FLOP convention and the peak behind every logged MFU (loradrop_ds/throughput.py),
against numbers worked by hand."""

import pytest
import torch

from loradrop_ds.model_dims import ModelDims
from loradrop_ds.throughput import StepFlops, peak_flops_per_s, peak_for_name


def dims(**kw) -> ModelDims:
    base = dict(num_layers=32, hidden_size=4096, intermediate_size=11008, num_heads=32, num_kv_heads=32, head_dim=128,
                vocab_size=32000, tied_embeddings=False, target_shapes={}, largest_weight_numel=0, param_numels=(),
                layer_param_numels=())
    return ModelDims(**{**base, **kw})


def test_llama2_7b_has_the_published_matmul_weights():
    # Per layer q, k, v, o: 4 x 4096^2 = 67,108,864; gate, up, down: 3 x 4096 x 11008 = 135,266,304;
    # x 32 layers = 6,476,005,376; the lm_head 4096 x 32000 = 131,072,000. docs/BENCHMARKS.md: N = 6.61e9.
    flops = StepFlops.for_model(dims(), recompute=False)
    assert flops.linear_weights == 6_607_077_376
    assert (flops.num_layers, flops.attention_width) == (32, 4096)


def test_grouped_query_attention_counts_narrower_key_and_value_projections():
    # Llama-3-70B shapes: hidden 8192, 64 heads of 128, 8 KV heads, intermediate 28672, 80 layers,
    # vocab 128256. Per layer q and o 8192^2 each, k and v 8192 x 1024 each, MLP 3 x 8192 x 28672.
    flops = StepFlops.for_model(dims(num_layers=80, hidden_size=8192, intermediate_size=28672, num_heads=64,
                                     num_kv_heads=8, head_dim=128, vocab_size=128256), recompute=False)
    per_layer = 2 * 8192**2 + 2 * 8192 * 1024 + 3 * 8192 * 28672
    assert flops.linear_weights == 80 * per_layer + 8192 * 128256


def test_a_step_costs_4n_per_token_plus_causal_attention_per_row():
    flops = StepFlops(linear_weights=100, num_layers=3, attention_width=4, recompute=False)
    # Rows of 5 and 2 real tokens: 7 tokens x 4N = 2,800; attention 6 x L x d x (25 + 4) = 6 x 3 x 4 x 29 = 2,088.
    assert flops.flops(7, 29) == 2800 + 2088
    recomputed = StepFlops(linear_weights=100, num_layers=3, attention_width=4, recompute=True)
    # The forward runs twice: 6N per token, 8 x L x d per n^2: 4,200 + 2,784.
    assert recomputed.flops(7, 29) == 4200 + 2784
    assert "6N" in recomputed.convention and "4N" in flops.convention


@pytest.mark.parametrize("name, tflops", [
    ("NVIDIA H100 80GB HBM3", 989.4), ("NVIDIA H100 PCIe", 756.0), ("NVIDIA H100 NVL", 835.0), ("NVIDIA H200", 989.4),
    ("NVIDIA A100-SXM4-80GB", 312.0), ("NVIDIA L40S", 362.1), ("NVIDIA L4", 121.0), ("NVIDIA B200", 2250.0),
])
def test_the_peak_is_looked_up_by_the_most_specific_device_name(name, tflops):
    assert peak_for_name(name) == pytest.approx(tflops * 1e12)


def test_an_unknown_card_and_the_cpu_have_no_peak_unless_the_setting_gives_one():
    assert peak_for_name("Tesla T4") is None
    assert peak_flops_per_s(torch.device("cpu"), None) is None
    assert peak_flops_per_s(torch.device("cpu"), 2.5) == pytest.approx(2.5e12)
