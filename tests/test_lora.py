"""LoRA injection, the importance recorder and the tied shared LoRA, in one process
on a tiny fp32 model (no DeepSpeed)."""

import pytest
import torch

from loradrop_ds.config import LoraConfig
from loradrop_ds.importance import sharing_plan
from loradrop_ds.lora import ImportanceRecorder, add_lora, lora_layers, tie_shared_lora, trainable_parameter_count
from loradrop_ds.model import ModelError
from loradrop_ds.model_dims import dims_from_config
from workers.common import hand_selection, randomize_lora_b

MODULES = ["q_proj", "v_proj", "down_proj"]


@pytest.fixture
def peft_model(tiny_model):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    model.requires_grad_(False)
    model = add_lora(model, LoraConfig(r=4, alpha=8.0, dropout=0.0, target_modules=MODULES), seed=0)
    randomize_lora_b(model, seed=1)
    return model


def test_add_lora_is_seeded(tiny_model, peft_model):
    from transformers import AutoModelForCausalLM

    other = add_lora(AutoModelForCausalLM.from_pretrained(tiny_model), LoraConfig(r=4, alpha=8.0, dropout=0.0,
                     target_modules=MODULES), seed=0)
    a = dict(peft_model.named_parameters())
    for name, p in other.named_parameters():
        if "lora_A" in name:
            assert torch.equal(p, a[name])


def test_recorder_counts_only_recorded_forwards_and_real_tokens(peft_model):
    rec = ImportanceRecorder(peft_model, MODULES, "cpu")
    ids = torch.randint(3, 100, (2, 7))
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, 4:] = 0
    peft_model(input_ids=ids, attention_mask=mask)  # outside recording(): not counted
    assert rec.stats.sq_norm_sums.abs().sum() == 0
    with rec.recording(mask):
        peft_model(input_ids=ids, attention_mask=mask)
    once = rec.stats.sq_norm_sums.clone()
    assert (once > 0).all()
    assert rec.stats.token_counts.unique().tolist() == [11.0]
    # Padding positions do not count: changing pad tokens leaves the sums unchanged.
    ids2 = ids.clone()
    ids2[1, 4:] = 5
    with rec.recording(mask):
        peft_model(input_ids=ids2, attention_mask=mask)
    torch.testing.assert_close(rec.stats.sq_norm_sums, 2 * once)
    rec.remove()
    with rec.recording(mask):
        peft_model(input_ids=ids, attention_mask=mask)
    torch.testing.assert_close(rec.stats.sq_norm_sums, 2 * once)


def test_tied_lora_shares_parameters_not_modules_and_counts_them_once(peft_model):
    before = trainable_parameter_count(peft_model)
    per_layer = before // 4
    plan = sharing_plan(hand_selection(4, MODULES, [1, 3]))
    users = tie_shared_lora(peft_model, plan, train_shared=True)
    assert users == {m: [0, 2] for m in MODULES}
    layers = lora_layers(peft_model, MODULES)
    for m in MODULES:
        for ab in ("lora_A", "lora_B"):
            shared0, shared2 = getattr(layers[(0, m)], ab)["default"], getattr(layers[(2, m)], ab)["default"]
            # One parameter, two modules: ZeRO-3 registers each module once (see tie_shared_lora).
            assert shared0 is not shared2 and shared0.weight is shared2.weight
            assert getattr(layers[(1, m)], ab)["default"].weight is not getattr(layers[(3, m)], ab)["default"].weight
    assert trainable_parameter_count(peft_model) == 3 * per_layer  # 2 kept + 1 shared

    # Gradients of a shared weight are the sum over its uses.
    ids = torch.randint(3, 100, (2, 6))
    peft_model(input_ids=ids, labels=ids).loss.backward()
    shared_grad = layers[(0, "q_proj")].lora_A["default"].weight.grad
    assert shared_grad is not None and shared_grad.abs().sum() > 0


def test_frozen_shared_lora(peft_model):
    plan = sharing_plan(hand_selection(4, MODULES, [1]))
    tie_shared_lora(peft_model, plan, train_shared=False)
    layers = lora_layers(peft_model, MODULES)
    assert not layers[(0, "q_proj")].lora_A["default"].weight.requires_grad
    assert layers[(1, "q_proj")].lora_A["default"].weight.requires_grad


def test_target_modules_are_checked_on_a_weightless_model(tiny_model):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(tiny_model)
    info = dims_from_config(config, ["q_proj", "down_proj"])
    assert info.num_layers == 4
    assert info.shapes == {"q_proj": (64, 64), "down_proj": (128, 64)}
    expected = r"lora.target_modules \['wq'\] not found in decoder layer 0; linear modules there are \["
    with pytest.raises(ModelError, match=expected):
        dims_from_config(config, ["q_proj", "wq"])


def test_warm_start_copies_kept_lora_and_leaves_shared_fresh(tiny_model, peft_model, tmp_path):
    from transformers import AutoModelForCausalLM

    from loradrop_ds.adapter_io import gather_lora_state, save_adapter
    from loradrop_ds.lora import adapter_as_module_state, warm_start_kept

    sampled = gather_lora_state(peft_model)  # "sampling-stage" weights: B randomised
    save_adapter(peft_model, tmp_path / "adapter", is_main=True)
    from_disk = adapter_as_module_state(tmp_path / "adapter")
    assert from_disk.keys() == sampled.keys()
    assert all(torch.equal(from_disk[k], sampled[k]) for k in sampled)

    fresh = add_lora(AutoModelForCausalLM.from_pretrained(tiny_model), LoraConfig(r=4, alpha=8.0, dropout=0.0,
                     target_modules=MODULES), seed=1)
    plan = sharing_plan(hand_selection(4, MODULES, [1, 3]))
    warm_start_kept(fresh, from_disk, plan)
    tie_shared_lora(fresh, plan, train_shared=True)
    now = dict(fresh.named_parameters(remove_duplicate=False))
    for name, value in sampled.items():
        layer = int(name.split(".layers.")[1].split(".")[0])
        if layer in (1, 3):
            assert torch.equal(now[name], value), name
        elif "lora_B" in name:
            assert torch.count_nonzero(now[name]) == 0, name  # the shared LoRA starts fresh: B = 0


def test_strip_lora_gives_back_the_base_model_unchanged(tiny_model):
    """The rebuild's first half without DeepSpeed: LoRA removed, nothing merged, the same
    base parameter objects, and a fresh LoRA on it equals a fresh LoRA on a newly loaded
    base (same seed)."""
    from transformers import AutoModelForCausalLM

    from loradrop_ds.lora import build_main_lora, strip_lora

    cfg = LoraConfig(r=4, alpha=8.0, dropout=0.0, target_modules=MODULES)
    base = AutoModelForCausalLM.from_pretrained(tiny_model).requires_grad_(False)
    base_params = {n: id(p) for n, p in base.named_parameters()}
    sampled = add_lora(base, cfg, seed=0)
    with torch.no_grad():
        for n, p in sampled.named_parameters():
            if "lora_B" in n:
                p.normal_()  # trained: stripping must not merge this into the base
    stripped = strip_lora(sampled)
    assert not any("lora_" in n for n, _ in stripped.named_parameters())
    assert {n: id(p) for n, p in stripped.named_parameters()} == base_params  # same objects, same names
    plan = sharing_plan(hand_selection(4, MODULES, [1, 3]))
    rebuilt, users = build_main_lora(stripped, cfg, seed=5, plan=plan, train_shared=True)
    fresh, _ = build_main_lora(AutoModelForCausalLM.from_pretrained(tiny_model).requires_grad_(False), cfg, seed=5,
                               plan=plan, train_shared=True)
    assert users == {m: [0, 2] for m in MODULES}
    ids = torch.randint(3, 100, (2, 7))
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(input_ids=ids).logits, fresh(input_ids=ids).logits, rtol=0, atol=0)
    got, want = dict(rebuilt.named_parameters()), dict(fresh.named_parameters())
    assert got.keys() == want.keys()
    for n in want:
        assert torch.equal(got[n], want[n]), n
