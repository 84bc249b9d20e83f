"""Export round trips from a finished 2-rank run and from its checkpoints, on CPU with
no DeepSpeed: peft and compact reload to the trained model's logits, merged matches
peft applied to the base; bad input is refused without overwriting anything."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, run_python
from loradrop_ds.export import ExportError, export, load_compact

EXPORT = REPO / "launch" / "export.py"


def probe_logits(model, probe):
    with torch.no_grad():
        return model(input_ids=probe["input_ids"], attention_mask=probe["attention_mask"]).logits


def base(tiny_model):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()


def test_peft_and_compact_reload_to_the_trained_logits(finished_run, tiny_model, tmp_path):
    from peft import PeftModel

    probe = load_file(finished_run / "probe_logits.safetensors")
    mask = probe["attention_mask"].bool()

    peft_dir = export(finished_run, tmp_path / "peft", "peft")
    got = probe_logits(PeftModel.from_pretrained(base(tiny_model), peft_dir).eval(), probe)
    torch.testing.assert_close(got[mask], probe["logits"][mask], rtol=1e-5, atol=1e-5)

    compact_dir = export(finished_run, tmp_path / "compact", "compact")
    model = load_compact(base(tiny_model), compact_dir).eval()
    torch.testing.assert_close(probe_logits(model, probe)[mask], probe["logits"][mask], rtol=1e-5, atol=1e-5)

    # Compact stores each shared LoRA once: smaller in proportion to the layers shared.
    selection = json.loads((finished_run / "selection.json").read_text())
    n_shared, n_layers = len(selection["shared"]), selection["num_layers"]
    assert n_shared >= 1
    peft_size = (peft_dir / "adapter_model.safetensors").stat().st_size
    compact_size = (compact_dir / "loradrop_compact.safetensors").stat().st_size
    assert compact_size < peft_size * (n_layers - n_shared + 1) / n_layers * 1.1
    assert compact_size < peft_size


def test_merged_matches_peft_applied_to_the_base(finished_run, tiny_model, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = export(finished_run, tmp_path / "merged", "merged", max_shard_size="300KB")
    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) >= 2 and (out / "model.safetensors.index.json").is_file()
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    assert merged.dtype == torch.float32  # the base dtype
    assert not any("lora" in n for n, _ in merged.named_parameters())
    probe = load_file(finished_run / "probe_logits.safetensors")
    reference = PeftModel.from_pretrained(base(tiny_model), finished_run / "adapter").eval()
    mask = probe["attention_mask"].bool()
    torch.testing.assert_close(probe_logits(merged, probe)[mask], probe_logits(reference, probe)[mask],
                               rtol=1e-4, atol=1e-4)
    assert AutoTokenizer.from_pretrained(out)("a dog")["input_ids"]


def test_every_checkpoint_export_agrees_with_the_final_adapter(finished_run, tmp_path):
    final = load_file(finished_run / "adapter" / "adapter_model.safetensors")
    from_ckpt = export(finished_run / "checkpoints" / "main-step0000006", tmp_path / "ck", "peft")
    got = load_file(from_ckpt / "adapter_model.safetensors")
    assert got.keys() == final.keys()
    for k in final:
        assert torch.equal(got[k], final[k]), k
    earlier = load_file(export(finished_run / "checkpoints" / "main-step0000002", tmp_path / "ck2", "peft")
                        / "adapter_model.safetensors")
    assert any(not torch.equal(earlier[k], final[k]) for k in final)  # a real, earlier state


def test_model_card(finished_run, tmp_path):
    out = export(finished_run, tmp_path / "card", "peft")
    card = (out / "README.md").read_text()
    selection = json.loads((finished_run / "selection.json").read_text())
    summary = json.loads((finished_run / "summary.json").read_text())
    assert card.startswith("---\nbase_model: ")
    assert f"| kept layers | {selection['kept_layers']} |" in card
    assert f"{summary['trainable_params']:,}" in card and f"{summary['plain_lora_params']:,}" in card
    assert "## Evaluation" in card and "eval_accuracy" in card
    assert (out / "importance.png").is_file() and (out / "selection.json").is_file()


def test_bad_export_input(finished_run, tiny_model, tmp_path):
    with pytest.raises(ExportError, match="neither a loradrop_ds run"):
        export(tmp_path, tmp_path / "x", "peft")
    with pytest.raises(ExportError, match="no such directory"):
        export(tmp_path / "missing", tmp_path / "x", "peft")
    # Another base model: same architecture, different config.
    from tiny import make_tiny_llama

    other = make_tiny_llama(tmp_path / "other", num_layers=2)
    with pytest.raises(ExportError, match="is not the base model this adapter was trained on"):
        export(finished_run, tmp_path / "m", "merged", base_model=str(other))
    assert not (tmp_path / "m").exists()
    # An output directory that already holds something is not touched.
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    with pytest.raises(ExportError, match="already exists and is not empty"):
        export(finished_run, busy, "peft")
    assert [p.name for p in busy.iterdir()] == ["keep.txt"]
    # An output path that cannot be written (its parent is a file).
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ExportError, match="cannot write there"):
        export(finished_run, blocker / "out", "peft")


def test_cli_push_without_network_fails_clearly_and_keeps_the_export(finished_run, tmp_path):
    out = tmp_path / "pushed"
    secret = "hf_DoNotPrintThisToken123"
    env = {"HF_TOKEN": secret, "HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_DISABLE_TELEMETRY": "1"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        proc = run_python([str(EXPORT), str(finished_run), "--out", str(out), "--push-to-hub", "me/loradrop-test"])
    finally:
        for k, v in old.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "could not push to the Hub repository 'me/loradrop-test'" in proc.stderr
    assert "the local export in" in proc.stderr
    assert secret not in proc.stderr + proc.stdout
    assert (out / "adapter_model.safetensors").is_file() and (out / "README.md").is_file()


def test_cli_rejects_a_path_that_is_not_a_run(tmp_path):
    proc = run_python([str(EXPORT), str(tmp_path), "--out", str(tmp_path / "o")])
    assert proc.returncode == 2 and "neither a loradrop_ds run" in proc.stderr
    assert "Traceback" not in proc.stderr
