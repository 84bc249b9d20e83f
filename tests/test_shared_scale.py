"""``loradrop.shared_scale``: each use of the shared LoRA with its own learned gain g
(``scaling * B diag(g) A x``; scalar: ``g * scaling * B A x``). One process on the tiny
fp32 model (no DeepSpeed) against references written from the definition, the adapter with
the gains baked into B against plain peft, and a real 2-rank ZeRO-3 run of the CLI whose
peft and compact exports reload to the trained model's logits."""

import json

import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import REPO, assert_adapter_reproduces_run, finished_run_args, run_ranks, run_ranks_many
from loradrop_ds.config import LoraConfig
from loradrop_ds.importance import sharing_plan
from workers.common import hand_selection

MODULES = ["q_proj", "v_proj", "down_proj"]
KEPT = [1, 3]  # layers 0 and 2 share one LoRA per module
R, ALPHA = 4, 8.0


def build(tiny_model, shared_scale: str, seed: int = 0):
    """The main stage's model with random B (shared ones included) and random gains."""
    from transformers import AutoModelForCausalLM

    from loradrop_ds.lora import build_main_lora

    base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).requires_grad_(False)
    plan = sharing_plan(hand_selection(4, MODULES, KEPT))
    model, users = build_main_lora(base, LoraConfig(r=R, alpha=ALPHA, dropout=0.0, target_modules=MODULES), seed,
                                   plan, True, shared_scale=shared_scale)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):  # each tied parameter once
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
            elif "loradrop_gain" in name:
                p.copy_(1.0 + torch.randn(p.shape, generator=gen))
    return model, users


def lora_of(model, layer: int, module: str):
    part = "mlp" if module == "down_proj" else "self_attn"
    return model.base_model.model.model.layers[layer].get_submodule(f"{part}.{module}")


@pytest.mark.parametrize("shared_scale", ["vector", "scalar"])
def test_each_shared_use_has_its_own_gain_and_gradients_reach_it(tiny_model, shared_scale):
    from loradrop_ds.lora import trainable_parameter_count

    model, users = build(tiny_model, shared_scale)
    assert users == {m: [0, 2] for m in MODULES}
    tied_only, _ = build(tiny_model, "none")
    n_uses = sum(len(v) for v in users.values())
    per_gain = R if shared_scale == "vector" else 1
    assert trainable_parameter_count(model) == trainable_parameter_count(tied_only) + n_uses * per_gain
    assert trainable_parameter_count(tied_only) == 3 * R * ((64 + 64) + (64 + 32) + (128 + 64))  # 2 kept + 1 shared

    # Capture every LoRA layer's input and output gradient on one forward/backward.
    seen: dict = {}

    def capture(key):
        def hook(module, inputs, output):
            x = inputs[0].detach()
            with torch.no_grad():
                base_out = module.base_layer(x)
            seen[key] = {"x": x, "delta": (output - base_out).detach()}
            output.register_hook(lambda g: seen[key].__setitem__("gy", g.detach()))
        return hook

    handles = [lora_of(model, layer, m).register_forward_hook(capture((layer, m))) for layer in range(4)
               for m in MODULES]
    ids = torch.randint(3, 100, (2, 7))
    model(input_ids=ids, labels=ids).loss.backward()
    for h in handles:
        h.remove()

    scaling = ALPHA / R
    for m in MODULES:
        a_shared = lora_of(model, 0, m).lora_A["default"].weight
        b_shared = lora_of(model, 0, m).lora_B["default"].weight
        grad_a, grad_b = torch.zeros_like(a_shared), torch.zeros_like(b_shared)
        for layer in range(4):
            lora = lora_of(model, layer, m)
            a, b = lora.lora_A["default"].weight.detach(), lora.lora_B["default"].weight.detach()
            x, gy = seen[(layer, m)]["x"], seen[(layer, m)]["gy"]
            h = x @ a.T  # [batch, seq, r]
            if layer in KEPT:
                assert not hasattr(lora.lora_A["default"], "loradrop_gain")
                want = scaling * h @ b.T
            else:
                gain = lora.lora_A["default"].loradrop_gain
                assert gain.shape == (per_gain,) and gain.requires_grad and gain.dtype == torch.float32
                g = gain.detach()
                assert (g - 1).abs().max() > 0.1  # randomised: the check below is not of g = 1
                want = scaling * (h * g) @ b.T
                # dL/dg by hand: per rank dimension sum over tokens of h_j * (scaling * gy B)_j.
                dg = (h * (scaling * gy @ b)).reshape(-1, R).sum(0)
                torch.testing.assert_close(gain.grad, dg if shared_scale == "vector" else dg.sum().reshape(1),
                                           rtol=1e-4, atol=1e-6)
                grad_b += (scaling * gy).reshape(-1, gy.shape[-1]).T @ (h * g).reshape(-1, R)
                grad_a += ((scaling * gy @ b) * g).reshape(-1, R).T @ x.reshape(-1, x.shape[-1])
            torch.testing.assert_close(seen[(layer, m)]["delta"], want, rtol=1e-4, atol=1e-6)
        # The shared A and B are one parameter each, with one gradient: the sum over both uses.
        assert lora_of(model, 2, m).lora_A["default"].weight is a_shared
        torch.testing.assert_close(a_shared.grad, grad_a, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(b_shared.grad, grad_b, rtol=1e-4, atol=1e-6)


def test_warm_start_with_gains_copies_kept_lora_and_starts_shared_uses_fresh(tiny_model):
    """Gains are only on shared uses: warm start copies the kept LoRAs as before; the shared
    LoRA starts fresh (B = 0) with every gain at 1."""
    from transformers import AutoModelForCausalLM

    from loradrop_ds.adapter_io import gather_lora_state
    from loradrop_ds.lora import add_lora, build_main_lora

    cfg = LoraConfig(r=R, alpha=ALPHA, dropout=0.0, target_modules=MODULES)
    sampled = add_lora(AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32), cfg, seed=3)
    with torch.no_grad():
        for n, p in sampled.named_parameters():
            if "lora_B" in n:
                p.normal_()
    warm = gather_lora_state(sampled)
    base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).requires_grad_(False)
    model, users = build_main_lora(base, cfg, 4, sharing_plan(hand_selection(4, MODULES, KEPT)), True, warm,
                                   shared_scale="vector")
    now = dict(model.named_parameters(remove_duplicate=False))
    for name, value in warm.items():
        layer = int(name.split(".layers.")[1].split(".")[0])
        if layer in KEPT:
            assert torch.equal(now[name], value), name
        elif "lora_B" in name:
            assert torch.count_nonzero(now[name]) == 0, name
    gains = {n: p for n, p in now.items() if "loradrop_gain" in n}
    assert len(gains) == sum(len(v) for v in users.values()) == 2 * len(MODULES)
    assert all(torch.equal(g, torch.ones(R)) for g in gains.values())


@pytest.mark.parametrize("shared_scale", ["vector", "scalar"])
def test_adapter_with_baked_gains_loads_in_plain_peft(tiny_model, tmp_path, shared_scale):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from loradrop_ds.adapter_io import gather_lora_state, save_adapter
    from loradrop_ds.lora import GAINS_FILE

    model, users = build(tiny_model, shared_scale)
    model.eval()
    state = gather_lora_state(model)
    save_adapter(model, tmp_path / "adapter", is_main=True, state=state)
    written = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert not any("gain" in k for k in written)
    assert len(written) == 2 * 4 * len(MODULES)  # every (layer, module) materialised, nothing else
    extras = load_file(tmp_path / "adapter" / GAINS_FILE)
    assert sorted(extras) == sorted([f"gain.{layer}.{m}" for m in MODULES for layer in users[m]]
                                    + [f"shared.{m}.lora_B.weight" for m in MODULES])

    ids = torch.randint(3, 100, (2, 9))
    with torch.no_grad():
        trained = model(input_ids=ids).logits
        base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
        reloaded = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
        torch.testing.assert_close(reloaded(input_ids=ids).logits, trained, rtol=1e-5, atol=1e-5)
        # The gains matter: without them (g = 1) the tied model's logits are others.
        for m in MODULES:
            for layer in users[m]:
                lora_of(model, layer, m).lora_A["default"].loradrop_gain.fill_(1.0)
        assert (model(input_ids=ids).logits - trained).abs().max() > 1e-3


@pytest.fixture(scope="module")
def gain_runs(tiny_model, tmp_path_factory) -> dict:
    """The module's finished 2-rank runs, one after another in one set of rank processes
    (``run_ranks_many``): vector gains, and scalar gains under a weight decay of 10."""
    root = tmp_path_factory.mktemp("gain_runs")
    runs = {"vector": ["loradrop.shared_scale=vector"],
            "decay": ["loradrop.shared_scale=scalar", "train.weight_decay=10.0"]}
    run_ranks_many([finished_run_args(tiny_model, root / name, *extra) for name, extra in runs.items()], root / "logs")
    return {name: root / name for name in runs}


def test_two_rank_run_with_vector_gains_exports_to_its_logits(tiny_model, tmp_path, gain_runs):
    """The real CLI on 2 ZeRO-3 ranks (zero3_tiny.json: persistence threshold 0, so the gains
    are partitioned and gathered like any weight)."""
    from transformers import AutoModelForCausalLM

    from loradrop_ds import run_checkpoint as ckpt
    from loradrop_ds import training_state
    from loradrop_ds.export import export, load_compact

    out = gain_runs["vector"]
    selection = json.loads((out / "selection.json").read_text())
    config = yaml.safe_load((out / "config.yaml").read_text())
    r, modules = config["lora"]["r"], config["lora"]["target_modules"]
    shared = [int(x) for x in selection["shared"]]
    assert selection["granularity"] == "layer" and len(shared) >= 2, selection  # gains on several uses

    # summary.json: the tied count plus one gain of size r per shared use, by hand.
    shape = {"q_proj": 64 + 64, "v_proj": 64 + 32, "up_proj": 64 + 128}  # in + out of the tiny model
    per_layer = r * sum(shape[m] for m in modules)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["trainable_params"] == (4 - len(shared) + 1) * per_layer + len(shared) * len(modules) * r

    # The run's adapter (gains baked into B) reloads in plain transformers + peft to the probe logits.
    assert not any("gain" in k for k in load_file(out / "adapter" / "adapter_model.safetensors"))
    assert_adapter_reproduces_run(tiny_model, out)

    probe = load_file(out / "probe_logits.safetensors")
    mask = probe["attention_mask"].bool()

    def logits(model):
        with torch.no_grad():
            return model(input_ids=probe["input_ids"], attention_mask=probe["attention_mask"]).logits

    def base():
        return AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()

    from peft import PeftModel

    peft_dir = export(out, tmp_path / "peft", "peft")
    torch.testing.assert_close(logits(PeftModel.from_pretrained(base(), peft_dir).eval())[mask],
                               probe["logits"][mask], rtol=1e-5, atol=1e-5)

    compact_dir = export(out, tmp_path / "compact", "compact")
    sharing = json.loads((compact_dir / "sharing.json").read_text())
    assert sharing["shared_scale"] == "vector"
    weights = load_file(compact_dir / "loradrop_compact.safetensors")
    gains = {k: v for k, v in weights.items() if k.startswith("gain.")}
    assert sorted(gains) == sorted(f"gain.{layer}.{m}" for m in modules for layer in shared)
    assert all(g.shape == (r,) for g in gains.values())
    assert max(float((g - 1).abs().max()) for g in gains.values()) > 1e-3  # trained: they moved from 1
    model = load_compact(base(), compact_dir).eval()
    torch.testing.assert_close(logits(model)[mask], probe["logits"][mask], rtol=1e-5, atol=1e-5)

    # merged is built from the peft adapter, so it has the gains too.
    merged = AutoModelForCausalLM.from_pretrained(export(out, tmp_path / "merged", "merged")).eval()
    torch.testing.assert_close(logits(merged)[mask], probe["logits"][mask], rtol=1e-4, atol=1e-4)

    # The rank-independent checkpoint state (resume on another world size) holds every gain.
    newest = ckpt.list_checkpoints(out, warn=False)[0][0]
    full = load_file(newest / training_state.TENSORS)  # flattened: "fp32/<name>", "exp_avg/<name>", ...
    in_full = sorted(k.removeprefix("fp32/") for k in full if k.startswith("fp32/") and k.endswith("loradrop_gain"))
    assert len(in_full) == len(shared) * len(modules)
    for name in in_full:
        layer, m = int(name.split(".layers.")[1].split(".")[0]), name.split(".lora_A.")[0].rsplit(".", 1)[-1]
        torch.testing.assert_close(full[f"fp32/{name}"], gains[f"gain.{layer}.{m}"].flatten(), rtol=0, atol=0)


def test_killed_run_with_gains_resumes_on_another_number_of_ranks(tiny_model, tmp_path):
    """The gains are trainable parameters like A and B: a 2-rank run killed in the main stage
    resumes on 1 rank from its rank-independent training state (gains included) and ends
    as the uninterrupted 1-rank run (same global batch), gains and all."""
    from test_resume import assert_same_run

    from loradrop_ds import run_checkpoint as ckpt
    from loradrop_ds.lora import GAINS_FILE

    train = REPO / "launch" / "train.py"

    def args(out, ranks):
        return finished_run_args(tiny_model, out, "lora.dropout=0.0", "loradrop.shared_scale=vector",
                                 f"train.grad_accum={3 - ranks}")

    ref = tmp_path / "ref"
    out = tmp_path / "run"
    proc = run_ranks(train, args(out, 2), nproc=2, check=False, extra_env={"LORADROP_TEST_SIGKILL_AT": "main:5"})
    assert proc.returncode != 0, "the run was meant to be killed"
    path, state = ckpt.find_resume_checkpoint("auto", out)
    assert path.name == "main-step0000004" and state.world_size == 2
    # The resume (in processes of its own, after the kill) and the uninterrupted 1-rank run, one
    # after the other in one 1-rank process (run_ranks_many).
    resumed, _ = run_ranks_many([args(out, 1), args(ref, 1)], tmp_path / "logs", nproc=1)
    assert "resumed on 1 ranks from a checkpoint of 2" in resumed.stderr
    assert_same_run(out, ref, 1e-5)
    mine, theirs = (load_file(d / "adapter" / GAINS_FILE) for d in (out, ref))
    assert mine.keys() == theirs.keys() and any(k.startswith("gain.") for k in mine)
    for k in theirs:
        torch.testing.assert_close(mine[k], theirs[k], rtol=1e-5, atol=1e-6)


def test_gains_get_no_weight_decay(gain_runs):
    """AdamW moves a parameter by about lr (0.01 here) per step at most: after 6 steps a gain
    is within 0.06 of 1. Weight decay 10 would also shrink it by lr x 10 = 10% per step (to
    about 0.53): the gains are left out of weight decay."""
    out = gain_runs["decay"]
    gains = {k: v for k, v in load_file(out / "adapter" / "loradrop_shared_scale.safetensors").items() if "gain" in k}
    assert gains and all((g - 1.0).abs().max() < 0.07 for g in gains.values()), gains
