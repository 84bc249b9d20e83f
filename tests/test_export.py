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
    assert card.startswith("---\nlibrary_name: peft\n")  # a local base and no --base-model-id: no base_model
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


# ------------------------------------------------- bad input through the CLI: one line, exit 2, nothing written


def _tree(root):
    """Every file under ``root`` with its bytes: what a failed export must leave as it was."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def run_copy(finished_run, tmp_path):
    """A copy of the finished run to damage (the session's run stays whole for other tests)."""
    import shutil

    return shutil.copytree(finished_run, tmp_path / "run", symlinks=True)


@pytest.fixture
def base_copy(tiny_model, tmp_path):
    import shutil

    return shutil.copytree(tiny_model, tmp_path / "base")


def _truncate(path, keep):
    data = path.read_bytes()
    path.write_bytes(data[:keep] if keep >= 0 else data[:len(data) + keep])


def _nan_adapter(path):
    """Same size and a valid header, but the first tensor's bytes are all 0xFF (NaN in fp32/bf16)."""
    data = bytearray(path.read_bytes())
    length = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + length])
    start, end = next(v["data_offsets"] for k, v in header.items() if k != "__metadata__")
    data[8 + length + start:8 + length + end] = b"\xff" * (end - start)
    path.write_bytes(bytes(data))


def _garbled_header(path):
    """Same size: the tensors' offsets in the header no longer add up (one digit changed)."""
    data = bytearray(path.read_bytes())
    length = int.from_bytes(data[:8], "little")
    header = data[8:8 + length].decode()
    at = header.index('"data_offsets":[') + len('"data_offsets":[')
    at = header.index(",", at) + 1  # the first tensor's end offset
    digit = header[at]
    header = header[:at] + ("1" if digit != "1" else "2") + header[at + 1:]
    data[8:8 + length] = header.encode()
    path.write_bytes(bytes(data))


BAD_INPUTS = {
    # name: (damage(run, base) -> extra CLI args, words the one error line must hold)
    "adapter truncated": (lambda run, base: _truncate(run / "adapter" / "adapter_model.safetensors", -100) or [],
                          ["adapter_model.safetensors", "truncated"]),
    "adapter header garbled": (lambda run, base: _garbled_header(run / "adapter" / "adapter_model.safetensors") or [],
                               ["adapter_model.safetensors", "corrupt"]),
    "adapter not safetensors": (lambda run, base: (run / "adapter" / "adapter_model.safetensors").write_bytes(
        b"PK\x03\x04 a zip, not safetensors") and [], ["adapter_model.safetensors"]),
    "adapter nan": (lambda run, base: _nan_adapter(run / "adapter" / "adapter_model.safetensors") or [],
                    ["adapter_model.safetensors", "non-finite"]),
    "adapter compact truncated": (
        lambda run, base: _truncate(run / "adapter" / "adapter_model.safetensors", -7) or ["--format", "compact"],
        ["adapter_model.safetensors", "truncated"]),
    "adapter_config.json": (lambda run, base: (run / "adapter" / "adapter_config.json").write_text('{"r": 8,') and [],
                            ["adapter_config.json", "does not parse"]),
    "adapter_config.json not lora": (
        lambda run, base: (run / "adapter" / "adapter_config.json").write_text('{"peft_type": "IA3"}') and [],
        ["adapter_config.json", "not a LoRA adapter config"]),
    "config.yaml": (lambda run, base: (run / "config.yaml").write_text("model:\n  path: [unclosed\n") and [],
                    ["config.yaml", "does not parse", "line 3"]),
    "config.yaml tab": (lambda run, base: (run / "config.yaml").write_text("model:\n\tpath: x\n") and [],
                        ["config.yaml", "does not parse", "line 2"]),
    "config.yaml not utf-8": (lambda run, base: (run / "config.yaml").write_bytes(b"model:\n  path: \xff\xfe\n") and [],
                              ["config.yaml", "does not parse", "line 2"]),
    "config.yaml a list": (lambda run, base: (run / "config.yaml").write_text("- a\n- b\n") and [],
                           ["config.yaml", "YAML mapping"]),
    "max-shard-size": (lambda run, base: ["--format", "merged", "--max-shard-size", "5 gigs"], ["--max-shard-size"]),
    "max-shard-size inf": (lambda run, base: ["--max-shard-size", "infGB"], ["--max-shard-size"]),
    "max-shard-size no unit": (lambda run, base: ["--max-shard-size", "5"], ["--max-shard-size"]),
    "base-model missing": (lambda run, base: ["--base-model", str(base / "nowhere")], ["--base-model", "no such directory"]),
    "base-model missing merged": (lambda run, base: ["--format", "merged", "--base-model", str(base / "nowhere")],
                                  ["--base-model", "no such directory"]),
    "base-model not a model": (lambda run, base: ["--base-model", str(run / "adapter" / "..")], ["no config.json"]),
    "base weights truncated": (lambda run, base: _truncate(base / "model.safetensors", -1000)
                               or ["--format", "merged", "--base-model", str(base)], ["model.safetensors", "truncated"]),
    "base weights missing": (lambda run, base: (base / "model.safetensors").unlink()
                             or ["--format", "merged", "--base-model", str(base)], ["holds no model weights"]),
    "base-model-id": (lambda run, base: ["--base-model-id", "not a hub id"], ["--base-model-id", "owner/name"]),
    "format": (lambda run, base: ["--format", "gguf"], ["--format", "invalid choice"]),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_cli_bad_input_is_one_line_and_writes_nothing(case, run_copy, base_copy, tmp_path):
    damage, words = BAD_INPUTS[case]
    extra = damage(run_copy, base_copy)
    before = _tree(tmp_path)
    out = tmp_path / "new" / "deeper" / "export"  # the directories above it do not exist either
    proc = run_python([str(EXPORT), str(run_copy), "--out", str(out), *extra])
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-3000:]
    for word in words:
        assert word in lines[0], lines[0]
    assert not (tmp_path / "new").exists()
    assert _tree(tmp_path) == before  # the run, the base and everything else as they were


# ------------------------------------------------------------------------ model card metadata


def _card_metadata(text):
    from huggingface_hub import ModelCard

    return ModelCard(text).data.to_dict()


def test_card_metadata_builtin_base_is_its_hub_id(finished_run):
    import dataclasses

    from loradrop_ds.export import HUB_ID, model_card, open_source

    src = open_source(finished_run)
    src = dataclasses.replace(src, base_model={"path": "builtin:smollm2-135m-instruct", "config_sha256": None})
    for fmt, library in (("peft", "peft"), ("compact", "peft"), ("merged", "transformers")):
        data = _card_metadata(model_card(src, fmt))
        assert data["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct" and HUB_ID.fullmatch(data["base_model"])
        assert data["library_name"] == library and data["pipeline_tag"] == "text-generation"
        assert {"lora", "loradrop"} <= set(data["tags"]) and (("peft" in data["tags"]) == (fmt != "merged"))
    # An id given with --base-model-id wins; a base the run read from the Hub is its own id.
    assert _card_metadata(model_card(src, "peft", "me/my-base"))["base_model"] == "me/my-base"
    src = dataclasses.replace(src, base_model={"path": "HuggingFaceTB/SmolLM2-360M", "config_sha256": None})
    assert _card_metadata(model_card(src, "peft"))["base_model"] == "HuggingFaceTB/SmolLM2-360M"


def test_card_metadata_local_base_with_and_without_id(finished_run, tmp_path):
    plain = tmp_path / "plain"
    proc = run_python([str(EXPORT), str(finished_run), "--out", str(plain)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = _card_metadata((plain / "README.md").read_text())
    assert "base_model" not in data  # a local directory is no Hub id
    assert data["library_name"] == "peft" and data["pipeline_tag"] == "text-generation"

    named = tmp_path / "named"
    proc = run_python([str(EXPORT), str(finished_run), "--out", str(named), "--base-model-id", "me/tiny-llama.v2"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    card = (named / "README.md").read_text()
    assert _card_metadata(card)["base_model"] == "me/tiny-llama.v2"
    assert 'AutoModelForCausalLM.from_pretrained("me/tiny-llama.v2")' in card


def test_card_metadata_is_checked():
    from loradrop_ds.export import check_card_metadata

    good = {"base_model": "me/base", "library_name": "peft"}
    check_card_metadata("---\nbase_model: me/base\nlibrary_name: peft\n---\n\n# x\n", good)
    with pytest.raises(ExportError, match="not a Hub model id"):
        check_card_metadata("---\nbase_model: /home/me/base\n---\n\n# x\n", {"base_model": "/home/me/base"})
    with pytest.raises(ExportError, match="does not round-trip"):
        check_card_metadata("---\nbase_model: me/base\nlibrary_name: peft\n---\n\n# x\n", {**good, "tags": ["lora"]})


def test_push_failure_names_the_hf_command(tmp_path, monkeypatch):
    from loradrop_ds import export as export_module

    class Refused(Exception):
        response = type("R", (), {"status_code": 401})()

    class Api:
        def __init__(self, token=None):
            pass

        def create_repo(self, *a, **k):
            raise Refused("401 Unauthorized")

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "HfApi", Api)
    with pytest.raises(ExportError) as e:
        export_module.push_to_hub(tmp_path, "me/repo")
    assert "hf auth login" in str(e.value) and f"hf upload me/repo {tmp_path}" in str(e.value)
    assert "huggingface-cli" not in str(e.value)


def test_cli_failure_while_writing_leaves_nothing(run_copy, tmp_path):
    """An error found only while writing (a compact export whose shared LoRAs differ) removes the
    temporary directory and the directories it created above --out."""
    from safetensors.torch import save_file

    path = run_copy / "adapter" / "adapter_model.safetensors"
    weights = load_file(path)
    save_file({k: v + 0.01 * i for i, (k, v) in enumerate(sorted(weights.items()))}, path, metadata={"format": "pt"})
    before = _tree(tmp_path)
    proc = run_python([str(EXPORT), str(run_copy), "--out", str(tmp_path / "new" / "export"), "--format", "compact"])
    assert proc.returncode == 2 and "does not match its selection" in proc.stderr, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "new").exists() and _tree(tmp_path) == before


def test_card_of_a_share_all_run_says_nothing_was_measured(finished_run):
    """share_all has no sampling stage: no importance to tabulate, and the card says so
    instead of a T / sampling-steps line that did not apply."""
    import dataclasses

    from loradrop_ds.export import model_card, open_source
    from loradrop_ds.importance import share_all_selection

    src = open_source(finished_run)
    assert f"| selection | {src.selection.method} |" in model_card(src, "peft")  # a measured selection
    selection = share_all_selection(src.selection.num_layers, src.selection.module_names, "layer", 0.9)
    card = model_card(dataclasses.replace(src, selection=selection, importance_png=None), "peft")
    assert "| selection | share_all (no sampling stage) |" in card and "threshold T" not in card
    assert "| kept layers | [] |" in card and "| item | importance | LoRA |" not in card
    assert "Every layer uses the shared LoRA (selection share_all" in card
