"""LoRAPrune in training (``prune:``, loradrop_ds.prune_zero3) against references written from the
rule: a 2-rank ZeRO-3 step's scores and masks against a single-process brute force in plain
transformers; the CLI's masked model against plain peft with the pruned structures removed
by hand; an exact resume after SIGKILL; the settings' checks."""

import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, finished_run_args, run_python, run_ranks, run_ranks_many
from loradrop_ds import config as config_lib
from loradrop_ds.prune_algorithm import PruneState
from loradrop_ds.prune_zero3 import update_steps
from workers.common import rank_batches, tiny_config
from workers.prune_step import PRUNE, TOTAL_STEPS

ATTN, MLP = ["q_proj", "k_proj", "v_proj", "o_proj"], ["gate_proj", "up_proj", "down_proj"]
HEADS, KV_HEADS, HEAD_DIM, LAYERS = 4, 2, 16, 4  # tests/tiny.py's model


def module_of(model, layer: int, name: str):
    block = model.model.layers[layer]
    return getattr(block.self_attn if name in ATTN else block.mlp, name)


def reference_use_grads(model_dir, lora: dict, batches: list[dict], scaling: float) -> dict:
    """Plain transformers in fp32; every target Linear gets ``+ scaling * x A^T B^T`` from
    leaf tensors of its own (a shared LoRA gets one copy per use, so each use's gradient is
    its own). Returns {(layer, module): (W, A, B, dA, dB)} for the mean of the batches' losses
    (DeepSpeed averages the ranks' gradients)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    leaves = {}
    for layer in range(LAYERS):
        for name in ATTN + MLP:
            prefix = f"base_model.model.model.layers.{layer}.{'self_attn' if name in ATTN else 'mlp'}.{name}"
            a = lora[f"{prefix}.lora_A.default.weight"].clone().requires_grad_(True)
            b = lora[f"{prefix}.lora_B.default.weight"].clone().requires_grad_(True)
            leaves[(layer, name)] = (a, b)
            module_of(model, layer, name).register_forward_hook(
                lambda m, i, o, a=a, b=b: o + scaling * (i[0] @ a.T @ b.T))
    loss = sum(model(**batch).loss for batch in batches) / len(batches)
    loss.backward()
    return {key: (module_of(model, *key).weight.detach(), a.detach(), b.detach(), a.grad, b.grad)
            for key, (a, b) in leaves.items()}


def brute_force_scores(uses: dict, scaling: float) -> dict:
    """Per layer: attention KV-group scores and MLP channel scores, by explicit loops over
    heads and channels, from |(dB A + B dA - dB dA) * (W + scaling B A)| (authors' code)."""
    n_rep = HEADS // KV_HEADS
    out = {}
    for layer in range(LAYERS):
        vectors = {}
        for name in ATTN + MLP:
            w, a, b, da, db = uses[(layer, name)]
            s = ((db @ a + b @ da - db @ da) * (w + scaling * b @ a)).abs()
            if name in ATTN:
                v = torch.zeros(KV_HEADS, dtype=torch.float64)
                for g in range(KV_HEADS):
                    if name in ("k_proj", "v_proj"):
                        v[g] = s[g * HEAD_DIM:(g + 1) * HEAD_DIM, :].sum()
                    for h in range(g * n_rep, (g + 1) * n_rep):  # query heads of group g
                        if name == "q_proj":
                            v[g] += s[h * HEAD_DIM:(h + 1) * HEAD_DIM, :].sum()
                        elif name == "o_proj":
                            v[g] += s[:, h * HEAD_DIM:(h + 1) * HEAD_DIM].sum()
            else:
                channels = s.shape[1] if name == "down_proj" else s.shape[0]
                v = torch.tensor([float(s[:, c].sum() if name == "down_proj" else s[c, :].sum())
                                  for c in range(channels)], dtype=torch.float64)
            vectors[name] = v / v.norm()
        out[layer] = {"attn": sum(vectors[n] for n in ATTN), "mlp": sum(vectors[n] for n in MLP)}
    return out


@pytest.fixture(scope="module")
def prune_steps(tiny_model, tmp_path_factory) -> dict:
    """tests/workers/prune_step.py without and with activation checkpointing, one after the
    other in one set of rank processes: each mode's output directory."""
    root = tmp_path_factory.mktemp("prune_step")
    dirs = {mode: root / mode for mode in ("plain", "checkpointing")}
    for d in dirs.values():
        d.mkdir()
    run_ranks(REPO / "tests" / "workers" / "prune_step.py",
              [str(tiny_model), *(arg for mode, d in dirs.items() for arg in (str(d), mode))])
    return dirs


@pytest.mark.parametrize("mode", ["plain", "checkpointing"])
def test_two_rank_zero3_scores_and_masks_equal_a_brute_force_reference(tiny_model, prune_steps, mode):
    """With activation checkpointing the recomputed forwards must neither add gradients twice
    nor lose the saved inputs."""
    from loradrop_ds.model import load_tokenizer

    tmp_path = prune_steps[mode]
    before = load_file(tmp_path / "before.safetensors")
    # The worker tied layers 0 and 2 (saved once, under layer 0's names).
    lora = dict(before)
    lora.update({n.replace("layers.0.", "layers.2."): w for n, w in before.items() if "layers.0." in n})
    cfg = tiny_config(str(tiny_model), *PRUNE)
    scaling = cfg.lora.alpha / cfg.lora.r
    batches = rank_batches(cfg, load_tokenizer(str(tiny_model)), per_rank=2, world=2)
    want = brute_force_scores(reference_use_grads(tiny_model, lora, batches, scaling), scaling)
    states = [PruneState.from_tensors(load_file(tmp_path / f"state_rank{r}.safetensors")) for r in (0, 1)]
    for r in (0, 1):  # masks and scores agree on every rank, bit for bit
        for layer in range(LAYERS):
            for st in ("attn", "mlp"):
                assert torch.equal(states[r].masks[layer][st], states[0].masks[layer][st])
                assert torch.equal(states[r].scores[layer][st], states[0].scores[layer][st])
    state = states[0]
    assert state.updates == 1
    for layer in range(LAYERS):
        for st, n_pruned in (("attn", 1), ("mlp", 64)):  # ratio 0.5 at step 1 of 2 (the schedule's target)
            got = state.scores[layer][st].double()
            torch.testing.assert_close(got, want[layer][st], rtol=1e-4, atol=1e-6,
                                       msg=lambda m, k=(layer, st): f"{k}: {m}")
            expected_pruned = set(torch.argsort(want[layer][st])[:n_pruned].tolist())
            assert set(torch.nonzero(~state.masks[layer][st]).flatten().tolist()) == expected_pruned
    assert TOTAL_STEPS == 2


def masked_reference_logits(model_dir, run_dir, input_ids, attention_mask):
    """Plain transformers + peft (the run's adapter), merged, with the pruned KV groups'
    query-head columns of o_proj and the pruned channels' columns of down_proj deleted
    (set to zero: a deleted input column contributes nothing)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, run_dir / "adapter").merge_and_unload().eval()
    masks = load_file(run_dir / "prune" / "masks.safetensors")
    n_rep = HEADS // KV_HEADS
    with torch.no_grad():
        for layer in range(LAYERS):
            block = model.model.layers[layer]
            for g, kept in enumerate(masks[f"layers.{layer}.attn"].tolist()):
                if not kept:
                    for h in range(g * n_rep, (g + 1) * n_rep):
                        block.self_attn.o_proj.weight[:, h * HEAD_DIM:(h + 1) * HEAD_DIM] = 0
            for c, kept in enumerate(masks[f"layers.{layer}.mlp"].tolist()):
                if not kept:
                    block.mlp.down_proj.weight[:, c] = 0
        return model(input_ids=input_ids, attention_mask=attention_mask).logits


CLI_PRUNE = ["lora.target_modules=[q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj]", "lora.dropout=0.0",
             "prune.target_sparsity=0.5", "prune.every=2", "prune.exempt_first_fraction=0.25", "train.max_steps=8"]


@pytest.fixture(scope="module")
def prune_runs(tiny_model, tmp_path_factory) -> dict:
    """"killed": the LoRAPrune CLI run killed in main step 5 in processes of its own (SIGKILL):
    its output_dir, its exit code and whether it wrote summary.json; then, in one set of rank
    processes (run_ranks_many), the uninterrupted run ("run") and the killed run's resume
    ("resumed": its result)."""
    root = tmp_path_factory.mktemp("prune")
    out, killed = root / "run", root / "killed"
    kill = run_ranks(REPO / "launch" / "train.py", finished_run_args(tiny_model, killed, *CLI_PRUNE), check=False,
                     extra_env={"LORADROP_TEST_SIGKILL_AT": "main:5"})
    kill_left = (killed, kill.returncode, (killed / "summary.json").exists())
    done, resumed = run_ranks_many([finished_run_args(tiny_model, out, *CLI_PRUNE),
                                    finished_run_args(tiny_model, killed, *CLI_PRUNE)], root / "logs", check=False)
    assert done.returncode == 0, done.stderr[-4000:]
    return {"run": out, "killed": kill_left, "resumed": resumed}


@pytest.fixture(scope="module")
def prune_run(prune_runs):
    return prune_runs["run"]


def test_cli_prunes_on_schedule_and_the_masked_model_is_the_pruned_one(tiny_model, prune_run):
    info = json.loads((prune_run / "prune" / "prune.json").read_text())
    # 4 layers: the first int(0.25 * 4) = 1 and the last are exempt; the others lose half.
    assert info["exempt_layers"] == [0, 3]
    assert info["kept_groups"] == [2, 1, 1, 2] and info["kept_channels"] == [128, 64, 64, 128]
    hidden = 64
    assert info["base_params_removed"] == 2 * ((2 * 2 * HEAD_DIM + 2 * HEAD_DIM) * hidden + 64 * 3 * hidden)
    updates = [json.loads(line) for line in (prune_run / "metrics.jsonl").read_text().splitlines()
               if '"prune"' in line]
    assert [u["step"] for u in updates] == update_steps(8, 2, 0.9) == [2, 4, 6, 8]
    ratios = [u["prune_ratio"] for u in updates]
    assert ratios == sorted(ratios) and ratios[-1] == 0.5
    assert all(u["prune_update_seconds"] > 0 for u in updates)  # each update's own time (not in step times)
    summary = json.loads((prune_run / "summary.json").read_text())
    assert summary["prune"]["kept_groups"] == info["kept_groups"]
    # The final eval ran the masked model: its probe logits are plain peft's with the pruned
    # structures removed by hand.
    probe = load_file(prune_run / "probe_logits.safetensors")
    want = masked_reference_logits(tiny_model, prune_run, probe["input_ids"], probe["attention_mask"])
    mask = probe["attention_mask"].bool()
    torch.testing.assert_close(probe["logits"][mask], want[mask], rtol=1e-4, atol=1e-4)
    # Every checkpoint of the main stage carries the masks and the state it resumes from.
    for ckpt in sorted((prune_run / "checkpoints").glob("main-step*")):
        assert (ckpt / "prune" / "state.safetensors").is_file() and (ckpt / "prune" / "masks.safetensors").is_file()


def test_sigkill_resume_gives_the_same_masks_scores_and_adapter(prune_runs, prune_run):
    out, kill_code, summary_written = prune_runs["killed"]
    assert kill_code != 0 and not summary_written
    resumed = prune_runs["resumed"]
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert "main-step0000004" in resumed.stderr
    got, want = (PruneState.from_tensors(load_file(d / "prune" / "state.safetensors")) for d in (out, prune_run))
    assert got.updates == want.updates == 4
    for layer in range(LAYERS):
        for st in ("attn", "mlp"):
            assert torch.equal(got.masks[layer][st], want.masks[layer][st])
            if want.scores[layer][st] is not None:
                torch.testing.assert_close(got.scores[layer][st], want.scores[layer][st], rtol=1e-5, atol=1e-7)
    a, b = (load_file(d / "adapter" / "adapter_model.safetensors") for d in (out, prune_run))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-7)


def test_update_steps_by_hand():
    assert update_steps(100, 10, 0.9) == [10, 20, 30, 40, 50, 60, 70, 80, 90]
    assert update_steps(50, 10, 0.9) == [10, 20, 30, 40, 45]  # 45: where the cubic reaches the target
    assert update_steps(8, 2, 0.9) == [2, 4, 6, 8]
    assert update_steps(3, 10, 0.9) == [3]


@pytest.mark.parametrize(("overrides", "message"), [
    (["prune.target_sparsity=1.0"], "prune.target_sparsity must be in [0, 1)"),
    (["prune.target_sparsity=0.5"], "add at least one of gate_proj, up_proj, down_proj"),
    (["prune.target_sparsity=0.5", "prune.channels=false", "prune.heads=false"], "enable at least one"),
    (["prune.target_sparsity=0.5", "prune.channels=false", "prune.every=0"], "prune.every must be >= 1"),
    (["prune.target_sparsity=0.5", "prune.channels=false", "prune.start_fraction=0.9", "prune.end_fraction=0.5"],
     "need 0 <= start < end <= 1"),
    (["prune.target_sparsity=0.5", "prune.channels=false", "loradrop.train_shared=false"],
     "set loradrop.train_shared=true"),
    (["prune.target_sparsity=0.5", "prune.channels=false", "lora.variant=allora", "lora.dropout=0", "lora.alpha=8"],
     "use lora.variant=lora"),
    (["prune.target_sparsity=0.5", "prune.channels=false", "loradrop.shared_scale=vector"],
     "set loradrop.shared_scale=none"),
])
def test_bad_prune_settings_are_refused_with_the_fix(overrides, message):
    with pytest.raises(config_lib.ConfigError, match=message.replace("[", r"\[").replace(")", r"\)")):
        config_lib.load_config(None, overrides)


def test_bad_prune_setting_exits_2_in_one_line_and_writes_nothing(tiny_model, tmp_path):
    out = tmp_path / "run"
    proc = run_python([str(REPO / "launch" / "train.py"),
                       *finished_run_args(tiny_model, out, "prune.target_sparsity=0.5", "prune.every=0")])
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert proc.returncode == 2 and len(lines) == 1 and "prune.every must be >= 1" in lines[0], proc.stderr[-2000:]
    assert not out.exists()


def test_pruned_export_of_a_cli_run_reloads_to_its_logits_in_plain_transformers(prune_run, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "pruned"
    proc = run_python([str(REPO / "launch" / "export.py"), str(prune_run), "--out", str(out), "--format", "pruned"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    # Layers 0 and 3 are exempt (full width), so every layer is written at full width and
    # layers 1 and 2 carry their pruned units as exact zeros (the uniform-per-layer scheme).
    assert model.config.num_key_value_heads == KV_HEADS and model.config.intermediate_size == 128
    probe = load_file(prune_run / "probe_logits.safetensors")
    with torch.no_grad():
        logits = model(input_ids=probe["input_ids"], attention_mask=probe["attention_mask"]).logits
    mask = probe["attention_mask"].bool()
    torch.testing.assert_close(logits[mask], probe["logits"][mask], rtol=1e-4, atol=1e-4)
    down = model.model.layers[1].mlp.down_proj.weight
    masks = load_file(prune_run / "prune" / "masks.safetensors")
    assert bool((down[:, ~masks["layers.1.mlp"].bool()] == 0).all())


@pytest.mark.parametrize("module_name", ["q_proj", "o_proj", "down_proj", "up_proj"])
def test_chunked_importance_sums_reduce_like_the_full_matrix(module_name, monkeypatch):
    """The update reduces each module's importance block by block of rows (bounded scratch):
    its group vector equals the one from the full [out, in] matrix, formed here by hand."""
    from loradrop_ds import prune_zero3
    from loradrop_ds.prune_algorithm import module_group_scores

    gen = torch.Generator().manual_seed(3)
    out_f, in_f, r = (48, 64, 4) if module_name == "down_proj" else (64, 64, 4)
    w, a, b = (torch.randn(s, generator=gen) for s in ((out_f, in_f), (r, in_f), (out_f, r)))
    da, db = torch.randn(r, in_f, generator=gen), torch.randn(out_f, r, generator=gen)
    full = ((db @ a + b @ da - db @ da) * (w + 2.0 * b @ a)).abs()
    monkeypatch.setattr(prune_zero3, "CHUNK_ELEMENTS", 5 * in_f)  # 5-row blocks: the last one is short
    reduced = prune_zero3.importance_sums(module_name, w, a, b, da, db, 2.0)
    heads = (4, 2, 16)
    torch.testing.assert_close(module_group_scores(module_name, reduced, *heads),
                               module_group_scores(module_name, full, *heads), rtol=1e-5, atol=1e-5)
