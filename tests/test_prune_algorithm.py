"""LoRAPrune's pure algorithm (``loradrop_ds/prune_algorithm.py``): hand-worked examples and brute-force
references written from the definitions, no DeepSpeed, no process group."""

import math

import pytest
import torch

from loradrop_ds.prune_algorithm import (
    PruneState,
    attention_group_scores,
    block_scores,
    cubic_ratio,
    ema_update,
    exempt_layers,
    initial_masks,
    mask_sparsity,
    mlp_channel_scores,
    module_group_scores,
    pruned_param_count,
    update_masks,
    weight_importance,
)

ALL_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


# ---------------------------------------------------------------- per-weight importance

def test_weight_importance_hand_worked_2x2():
    w = torch.tensor([[1.0, -2.0], [3.0, 0.0]])
    a = torch.tensor([[1.0, 2.0]])  # r = 1
    b = torch.tensor([[1.0], [-1.0]])
    da = torch.tensor([[0.5, -1.0]])
    db = torch.tensor([[2.0], [1.0]])
    # dB@A = [[2, 4], [1, 2]]; B@dA = [[.5, -1], [-.5, 1]]; dB@dA = [[1, -2], [.5, -1]]
    # G = dB@A + B@dA - dB@dA = [[1.5, 5], [0, 4]]
    # B@A = [[1, 2], [-1, -2]]; W + 2*B@A = [[3, 2], [1, -4]]
    # G * (W + 2 BA) = [[4.5, 10], [0, -16]] -> absolute value [[4.5, 10], [0, 16]]
    s = weight_importance(w, a, b, da, db, scaling=2.0)
    assert s.dtype == torch.float32
    assert torch.equal(s, torch.tensor([[4.5, 10.0], [0.0, 16.0]]))


def _importance_loop(w, a, b, da, db, scaling):
    """Element by element, in float64 Python arithmetic."""
    out, inp = w.shape
    r = a.shape[0]
    s = torch.zeros(out, inp, dtype=torch.float64)
    for i in range(out):
        for j in range(inp):
            g = 0.0
            ba = 0.0
            for k in range(r):
                g += (float(db[i, k]) * float(a[k, j]) + float(b[i, k]) * float(da[k, j])
                      - float(db[i, k]) * float(da[k, j]))
                ba += float(b[i, k]) * float(a[k, j])
            s[i, j] = abs(g * (float(w[i, j]) + scaling * ba))
    return s


def test_weight_importance_matches_elementwise_loop():
    gen = torch.Generator().manual_seed(0)
    out, inp, r = 5, 7, 3
    w = torch.randn(out, inp, generator=gen)
    a, b = torch.randn(r, inp, generator=gen), torch.randn(out, r, generator=gen)
    da, db = torch.randn(r, inp, generator=gen), torch.randn(out, r, generator=gen)
    s = weight_importance(w, a, b, da, db, scaling=0.5)
    torch.testing.assert_close(s.double(), _importance_loop(w, a, b, da, db, 0.5), rtol=1e-5, atol=1e-6)


def test_weight_importance_bf16_inputs_are_computed_in_float32():
    gen = torch.Generator().manual_seed(1)
    t = [torch.randn(shape, generator=gen).bfloat16() for shape in [(4, 6), (2, 6), (4, 2), (2, 6), (4, 2)]]
    s = weight_importance(*t, scaling=2.0)
    assert s.dtype == torch.float32
    torch.testing.assert_close(s.double(), _importance_loop(*[x.float() for x in t], 2.0), rtol=1e-5, atol=1e-6)


def test_weight_importance_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="shapes"):
        weight_importance(torch.zeros(4, 6), torch.zeros(2, 5), torch.zeros(4, 2), torch.zeros(2, 5),
                          torch.zeros(4, 2), 1.0)


# ---------------------------------------------------------------- grouping on a real GQA model

def _normalised(v):
    n = math.sqrt(sum(x * x for x in v))
    return [x / n if n > 0 else 0.0 for x in v]


def _reference_layer_scores(mods, scaling, num_heads, num_kv, head_dim, intermediate):
    """Brute force from the definitions: G by an explicit sum over the rank, then explicit loops
    over query heads (with the GQA group of each written out), KV heads and channels."""
    s = {}
    for name, (w, a, b, da, db) in mods.items():
        w, a, b, da, db = (t.double() for t in (w, a, b, da, db))
        g = torch.einsum("ik,kj->ij", db, a) + torch.einsum("ik,kj->ij", b, da) - torch.einsum("ik,kj->ij", db, da)
        s[name] = (g * (w + scaling * torch.einsum("ik,kj->ij", b, a))).abs()
    assert (num_heads, num_kv) == (4, 2)
    group_of_query_head = {0: 0, 1: 0, 2: 1, 3: 1}  # repeat_kv: query heads 0,1 share KV head 0; 2,3 share 1
    vectors = {}
    for name in ("q_proj", "o_proj"):
        v = [0.0] * num_kv
        for h in range(num_heads):
            for d in range(head_dim):
                unit = h * head_dim + d
                line = s[name][unit, :] if name == "q_proj" else s[name][:, unit]  # q rows, o columns
                v[group_of_query_head[h]] += float(line.sum())
        vectors[name] = v
    for name in ("k_proj", "v_proj"):
        vectors[name] = [float(s[name][g * head_dim:(g + 1) * head_dim, :].sum()) for g in range(num_kv)]
    for name in ("gate_proj", "up_proj"):
        vectors[name] = [float(s[name][c, :].sum()) for c in range(intermediate)]
    vectors["down_proj"] = [float(s["down_proj"][:, c].sum()) for c in range(intermediate)]
    attn = [0.0] * num_kv
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
        for g, x in enumerate(_normalised(vectors[name])):
            attn[g] += x
    mlp = [0.0] * intermediate
    for name in ("gate_proj", "up_proj", "down_proj"):
        for c, x in enumerate(_normalised(vectors[name])):
            mlp[c] += x
    return torch.tensor(attn, dtype=torch.float64), torch.tensor(mlp, dtype=torch.float64), vectors


@pytest.fixture(scope="module")
def tiny_gqa_lora():
    """A 2-layer GQA LLaMA (4 query heads, 2 KV heads, head_dim 8) with LoRA on all seven modules,
    after one forward/backward: ``{(layer, module): (W, A, B, dA, dB)}`` and the scaling."""
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import LoraLayer
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    model = get_peft_model(LlamaForCausalLM(config), LoraConfig(r=4, lora_alpha=8, target_modules=ALL_MODULES,
                                                                lora_dropout=0.0))
    layers = {}
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            with torch.no_grad():
                module.lora_B["default"].weight.normal_(0.0, 0.2)  # peft starts B at zero
            layer = int(name.split(".layers.")[1].split(".")[0])
            layers[(layer, name.rsplit(".", 1)[-1])] = module
    assert len(layers) == 2 * 7
    tokens = torch.randint(0, 64, (2, 12))
    model(input_ids=tokens, labels=tokens).loss.backward()
    mods = {}
    scaling = None
    for key, module in layers.items():
        a, b = module.lora_A["default"].weight, module.lora_B["default"].weight
        assert a.grad is not None and b.grad is not None and a.grad.abs().sum() > 0 and b.grad.abs().sum() > 0
        mods[key] = tuple(t.detach().clone() for t in (module.base_layer.weight, a, b, a.grad, b.grad))
        scaling = module.scaling["default"]
    assert scaling == 2.0
    return mods, scaling


def test_group_scores_on_tiny_gqa_model_match_brute_force(tiny_gqa_lora):
    mods, scaling = tiny_gqa_lora
    for layer in range(2):
        layer_mods = {name: mods[(layer, name)] for name in ALL_MODULES}
        ref_attn, ref_mlp, ref_vectors = _reference_layer_scores(layer_mods, scaling, 4, 2, 8, 48)
        full = {name: weight_importance(*t, scaling) for name, t in layer_mods.items()}
        # whole-matrix entry points
        attn = attention_group_scores(full, num_heads=4, num_kv_heads=2, head_dim=8)
        mlp = mlp_channel_scores(full)
        assert attn.shape == (2,) and mlp.shape == (48,)
        torch.testing.assert_close(attn.double(), ref_attn, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(mlp.double(), ref_mlp, rtol=1e-5, atol=1e-6)
        # reduce-then-drop path: one module at a time, then the block sum
        vectors = {name: module_group_scores(name, full[name], 4, 2, 8) for name in ALL_MODULES}
        for name in ALL_MODULES:
            torch.testing.assert_close(vectors[name].double(), torch.tensor(ref_vectors[name], dtype=torch.float64),
                                       rtol=1e-5, atol=1e-5)
        attn_vectors = {n: vectors[n] for n in ("q_proj", "k_proj", "v_proj", "o_proj")}
        mlp_vectors = {n: vectors[n] for n in ("gate_proj", "up_proj", "down_proj")}
        torch.testing.assert_close(block_scores(attn_vectors).double(), ref_attn, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(block_scores(mlp_vectors).double(), ref_mlp, rtol=1e-5, atol=1e-6)


def test_only_present_modules_contribute(tiny_gqa_lora):
    mods, scaling = tiny_gqa_lora
    layer_mods = {name: mods[(0, name)] for name in ALL_MODULES}
    _, _, ref_vectors = _reference_layer_scores(layer_mods, scaling, 4, 2, 8, 48)
    qv = {name: weight_importance(*layer_mods[name], scaling) for name in ("q_proj", "v_proj")}
    q_ref, v_ref = _normalised(ref_vectors["q_proj"]), _normalised(ref_vectors["v_proj"])
    expected = torch.tensor([x + y for x, y in zip(q_ref, v_ref, strict=True)], dtype=torch.float64)
    torch.testing.assert_close(attention_group_scores(qv, 4, 2, 8).double(), expected, rtol=1e-5, atol=1e-6)
    down = {"down_proj": weight_importance(*layer_mods["down_proj"], scaling), "q_proj": qv["q_proj"]}
    down_ref = torch.tensor(_normalised(ref_vectors["down_proj"]), dtype=torch.float64)
    torch.testing.assert_close(mlp_channel_scores(down).double(), down_ref, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="none of the MLP modules"):
        mlp_channel_scores(qv)
    with pytest.raises(ValueError, match="unknown modules"):
        attention_group_scores({"q": qv["q_proj"]}, 4, 2, 8)


def test_module_group_scores_hand_worked_gqa():
    # 4 query heads, 2 KV heads, head_dim 1, in = 2: q rows are heads 0..3 -> groups 0,0,1,1
    q = torch.tensor([[1.0, 0.0], [2.0, 0.0], [0.0, 4.0], [8.0, 0.0]])
    assert module_group_scores("q_proj", q, 4, 2, 1).tolist() == [3.0, 12.0]
    # o_proj [hidden=2, 4 heads]: columns are the heads
    o = q.t().contiguous()
    assert module_group_scores("o_proj", o, 4, 2, 1).tolist() == [3.0, 12.0]
    # the rows of o_proj would give per-hidden sums, not per head: the shapes guard against it
    with pytest.raises(ValueError, match="columns"):
        module_group_scores("o_proj", q, 4, 2, 1)
    k = torch.tensor([[1.0, 1.0], [5.0, 0.0]])
    assert module_group_scores("k_proj", k, 4, 2, 1).tolist() == [2.0, 5.0]
    m = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    assert module_group_scores("gate_proj", m, 0, 1, 0).tolist() == [6.0, 15.0]
    assert module_group_scores("down_proj", m, 0, 1, 0).tolist() == [5.0, 7.0, 9.0]
    with pytest.raises(ValueError, match="rows"):
        module_group_scores("q_proj", k, 4, 2, 1)
    with pytest.raises(ValueError, match="unknown module"):
        module_group_scores("lm_head", k, 4, 2, 1)


def test_block_scores_normalises_each_module():
    v = block_scores({"q_proj": torch.tensor([3.0, 4.0]), "k_proj": torch.tensor([0.0, 0.0]),
                      "v_proj": torch.tensor([10.0, 0.0])})
    # [3,4]/5 + [0,0] (zero stays zero) + [10,0]/10
    torch.testing.assert_close(v, torch.tensor([1.6, 0.8]))
    with pytest.raises(ValueError):
        block_scores({})


# ---------------------------------------------------------------- planted structure

def test_planted_kv_group_and_channels_are_kept():
    gen = torch.Generator().manual_seed(3)
    hidden, num_heads, num_kv, head_dim, inter, r = 16, 8, 4, 2, 20, 2
    n_rep = num_heads // num_kv
    shapes = {"q_proj": (num_heads * head_dim, hidden), "k_proj": (num_kv * head_dim, hidden),
              "v_proj": (num_kv * head_dim, hidden), "o_proj": (hidden, num_heads * head_dim),
              "gate_proj": (inter, hidden), "up_proj": (inter, hidden), "down_proj": (hidden, inter)}
    full = {}
    for name, (out, inp) in shapes.items():
        w = torch.randn(out, inp, generator=gen) * 0.01
        a, b = torch.randn(r, inp, generator=gen) * 0.01, torch.randn(out, r, generator=gen) * 0.01
        da, db = torch.randn(r, inp, generator=gen), torch.randn(out, r, generator=gen)
        # plant: KV group 1 = query heads 2,3 (q rows / o columns 4..7), KV head 1 (k/v rows 2..3);
        # MLP channels 5..9 (gate/up rows, down columns)
        g1 = slice(1 * n_rep * head_dim, 2 * n_rep * head_dim)
        kv1 = slice(1 * head_dim, 2 * head_dim)
        if name == "q_proj":
            w[g1, :] *= 1000
        elif name in ("k_proj", "v_proj"):
            w[kv1, :] *= 1000
        elif name == "o_proj":
            w[:, g1] *= 1000
        elif name in ("gate_proj", "up_proj"):
            w[5:10, :] *= 1000
        else:
            w[:, 5:10] *= 1000
        full[name] = weight_importance(w, a, b, da, db, 2.0)
    attn = attention_group_scores(full, num_heads, num_kv, head_dim)
    mlp = mlp_channel_scores(full)
    assert int(attn.argmax()) == 1
    assert set(torch.topk(mlp, 5).indices.tolist()) == {5, 6, 7, 8, 9}
    masks = update_masks(initial_masks(2, num_kv, inter), {1: {"attn": attn, "mlp": mlp}}, 0.75, exempt=[0])
    assert masks[1]["attn"].tolist() == [False, True, False, False]
    assert torch.nonzero(masks[1]["mlp"]).flatten().tolist() == [5, 6, 7, 8, 9]
    assert bool(masks[0]["attn"].all()) and bool(masks[0]["mlp"].all())


# ---------------------------------------------------------------- schedule, exemption

def test_cubic_ratio_hand_values_and_monotone():
    # total 100, t0 = 10, t1 = 90
    assert cubic_ratio(0, 100, 0.5) == 0.0
    assert cubic_ratio(9, 100, 0.5) == 0.0
    assert cubic_ratio(10, 100, 0.5) == 0.0  # p = 0
    assert cubic_ratio(30, 100, 0.5) == pytest.approx(0.5 * (1 - 0.75 ** 3))  # p = 1/4: 0.2890625
    assert cubic_ratio(30, 100, 0.5) == pytest.approx(0.2890625)
    assert cubic_ratio(50, 100, 0.5) == pytest.approx(0.4375)  # p = 1/2: 0.5 * (1 - 1/8)
    assert cubic_ratio(90, 100, 0.5) == 0.5
    assert cubic_ratio(100, 100, 0.5) == 0.5
    assert cubic_ratio(20, 40, 0.8, start_fraction=0.0, end_fraction=1.0) == pytest.approx(0.8 * 7 / 8)
    values = [cubic_ratio(s, 100, 0.5) for s in range(0, 121)]
    assert all(x <= y for x, y in zip(values, values[1:], strict=False))
    # cubic: steeper at the start of the ramp than at its end
    assert values[11] - values[10] > values[89] - values[88]


def test_exempt_layers_hand_values():
    assert exempt_layers(30, 0.1, True) == [0, 1, 2, 29]
    assert exempt_layers(32, 0.1, True) == [0, 1, 2, 31]  # int(3.2) = 3
    assert exempt_layers(4, 0.1, True) == [3]
    assert exempt_layers(4, 0.1, False) == []
    assert exempt_layers(10, 0.5, False) == [0, 1, 2, 3, 4]
    assert exempt_layers(3, 1.0, True) == [0, 1, 2]


# ---------------------------------------------------------------- masks

def _pruned(mask):
    return torch.nonzero(~mask).flatten().tolist()


def test_update_masks_counts_and_lowest_pruned():
    masks = initial_masks(3, 8, 10)
    attn = torch.tensor([5.0, 1.0, 7.0, 0.5, 9.0, 2.0, 8.0, 6.0])
    mlp = torch.arange(10, 0, -1).float()  # channel 9 lowest
    scores = {layer: {"attn": attn, "mlp": mlp} for layer in range(3)}
    new = update_masks(masks, scores, 0.25, exempt=[0])
    for layer in (1, 2):
        assert _pruned(new[layer]["attn"]) == [1, 3]  # 0.25 * 8 = 2: scores 0.5 and 1
        assert _pruned(new[layer]["mlp"]) == [8, 9]  # floor(2.5) = 2: the two lowest
    assert new[0]["attn"].all() and new[0]["mlp"].all()  # exempt
    # float error: 0.29 * 100 = 28.999999999999996 must prune 29
    big = update_masks(initial_masks(1, 2, 100), {0: {"mlp": torch.arange(100.0)}}, 0.29, exempt=[])
    assert _pruned(big[0]["mlp"]) == list(range(29))
    assert big[0]["attn"].all()  # no attention scores: left as it is


def test_update_masks_only_shrink_and_keep_previous_pruning():
    masks = initial_masks(1, 4, 6)
    first = update_masks(masks, {0: {"attn": torch.tensor([1.0, 2.0, 3.0, 4.0]),
                                     "mlp": torch.tensor([6.0, 5.0, 4.0, 3.0, 2.0, 1.0])}}, 0.34, exempt=[])
    assert _pruned(first[0]["attn"]) == [0]  # floor(1.36) = 1
    assert _pruned(first[0]["mlp"]) == [4, 5]  # floor(2.04) = 2
    # the scores turn around: the pruned units now score highest, yet stay pruned
    flipped = {0: {"attn": torch.tensor([9.0, 2.0, 3.0, 1.0]), "mlp": torch.tensor([1.0, 2.0, 3.0, 4.0, 9.0, 9.0])}}
    second = update_masks(first, flipped, 0.5, exempt=[])
    assert _pruned(second[0]["attn"]) == [0, 3]  # 2 pruned: 0 (before) + 3 (lowest of the kept)
    assert _pruned(second[0]["mlp"]) == [0, 4, 5]  # 3 pruned: 4, 5 (before) + 0
    # a lower ratio un-prunes nothing
    third = update_masks(second, flipped, 0.1, exempt=[])
    assert torch.equal(third[0]["attn"], second[0]["attn"]) and torch.equal(third[0]["mlp"], second[0]["mlp"])
    # sequences of calls only shrink
    state, previous = first, first
    for ratio in (0.4, 0.5, 0.6, 0.7, 0.9):
        state = update_masks(state, flipped, ratio, exempt=[])
        for name in ("attn", "mlp"):
            assert not bool((state[0][name] & ~previous[0][name]).any())
        previous = state


def test_update_masks_ties_keep_one_and_do_not_mutate():
    masks = initial_masks(2, 4, 5)
    scores = {0: {"attn": torch.zeros(4), "mlp": torch.ones(5)}, 1: {"attn": torch.zeros(4), "mlp": torch.ones(5)}}
    before_masks = {k: {n: t.clone() for n, t in v.items()} for k, v in masks.items()}
    before_scores = {k: {n: t.clone() for n, t in v.items()} for k, v in scores.items()}
    new = update_masks(masks, scores, 0.5, exempt=[1])
    assert _pruned(new[0]["attn"]) == [0, 1]  # ties: lower index first
    assert _pruned(new[0]["mlp"]) == [0, 1]
    for k in masks:
        for n in masks[k]:
            assert torch.equal(masks[k][n], before_masks[k][n]) and torch.equal(scores[k][n], before_scores[k][n])
            assert new[k][n] is not masks[k][n]
    # ratio 1 keeps exactly one unit (the highest scoring; among ties the last)
    everything = update_masks(masks, {0: {"attn": torch.tensor([3.0, 9.0, 1.0, 2.0]), "mlp": torch.ones(5)}}, 1.0,
                              exempt=[1])
    assert everything[0]["attn"].tolist() == [False, True, False, False]
    assert everything[0]["mlp"].tolist() == [False, False, False, False, True]
    one = update_masks(initial_masks(1, 1, 1), {0: {"attn": torch.ones(1), "mlp": torch.ones(1)}}, 0.9, exempt=[])
    assert one[0]["attn"].tolist() == [True] and one[0]["mlp"].tolist() == [True]


def test_update_masks_errors():
    masks = initial_masks(2, 4, 5)
    with pytest.raises(ValueError, match="no scores for layer 1"):
        update_masks(masks, {0: {"attn": torch.zeros(4)}}, 0.5, exempt=[])
    with pytest.raises(ValueError, match="scores for"):
        update_masks(masks, {0: {"attn": torch.zeros(3)}}, 0.5, exempt=[1])
    with pytest.raises(ValueError, match="not finite"):
        update_masks(masks, {0: {"attn": torch.tensor([0.0, float("nan"), 1.0, 2.0])}}, 0.5, exempt=[1])
    with pytest.raises(ValueError, match="ratio"):
        update_masks(masks, {}, 1.5, exempt=[0, 1])


def test_mask_sparsity_over_all_layers():
    masks = initial_masks(2, 4, 10)
    masks[1]["attn"][:2] = False
    masks[1]["mlp"][:5] = False
    assert mask_sparsity(masks) == {"attn": 2 / 8, "mlp": 5 / 20}


# ---------------------------------------------------------------- smoothing

def test_ema_update():
    new = torch.tensor([3.0, 4.0])
    first = ema_update(None, new, 0.9)
    assert torch.equal(first, new)
    second = ema_update(torch.tensor([1.0, 2.0]), new, 0.9)
    torch.testing.assert_close(second, torch.tensor([0.9 * 1 + 0.1 * 3, 0.9 * 2 + 0.1 * 4]))  # [1.2, 2.2]
    old = torch.tensor([1.0, 2.0])
    assert torch.equal(ema_update(old, torch.tensor([float("nan"), 1.0]), 0.9), old)
    assert torch.equal(ema_update(old, torch.tensor([float("inf"), 1.0]), 0.9), old)
    assert ema_update(None, torch.tensor([1.0, float("nan")]), 0.9) is None


# ---------------------------------------------------------------- accounting and state

def test_pruned_param_count_hand_worked():
    # hidden 16, 8 heads, 4 KV heads -> n_rep 2, head_dim 2.
    # A group: q 2*2 = 4 rows, k 2 rows, v 2 rows, o 4 columns = 12 rows/columns of 16 = 192 weights.
    # A channel: gate row + up row + down column = 3 * 16 = 48 weights.
    masks = initial_masks(3, 4, 10)
    masks[0]["attn"] = torch.tensor([True, False, True, False])  # 2 groups: 384
    masks[0]["mlp"][[1, 4, 7]] = False  # 3 channels: 144
    masks[1]["attn"][3] = False  # 1 group: 192
    assert pruned_param_count(masks, hidden=16, num_heads=8, num_kv_heads=4, head_dim=2) == {
        "attn": 576, "mlp": 144, "total": 720}
    # MHA: a group is one head: q, k, v rows and o columns, head_dim each -> 4 * 2 * 16 = 128
    mha = initial_masks(1, 4, 10)
    mha[0]["attn"][0] = False
    assert pruned_param_count(mha, 16, 4, 4, 2) == {"attn": 128, "mlp": 0, "total": 128}


def test_prune_state_round_trip(tmp_path):
    from safetensors.torch import load_file, save_file

    masks = initial_masks(3, 4, 6)
    masks[1]["attn"][2] = False
    masks[2]["mlp"][[0, 5]] = False
    state = PruneState.new(masks)
    state.scores[1]["attn"] = torch.tensor([0.1, 0.2, 0.3, 0.4])
    state.scores[2]["mlp"] = torch.randn(6)
    state.scores[2]["attn"] = torch.randn(4, dtype=torch.float64)
    state.updates = 17
    tensors = state.to_tensors()
    assert tensors["masks.1.attn"].dtype == torch.uint8
    assert "scores.0.attn" not in tensors and "scores.1.attn" in tensors
    save_file(tensors, str(tmp_path / "prune.safetensors"))
    back = PruneState.from_tensors(load_file(str(tmp_path / "prune.safetensors")))
    assert back.updates == 17
    assert back.masks.keys() == state.masks.keys() and back.scores.keys() == state.scores.keys()
    for layer in state.masks:
        assert back.masks[layer].keys() == state.masks[layer].keys()
        for name in state.masks[layer]:
            assert back.masks[layer][name].dtype == torch.bool
            assert torch.equal(back.masks[layer][name], state.masks[layer][name])
            old, new = state.scores[layer][name], back.scores[layer][name]
            assert (old is None and new is None) or (old.dtype == new.dtype and torch.equal(old, new))
    with pytest.raises(ValueError, match="unexpected PruneState key"):
        PruneState.from_tensors({**tensors, "bogus": torch.zeros(1)})
