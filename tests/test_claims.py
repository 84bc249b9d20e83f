"""The README's claims about what the settings do, checked through the real CLI (2 ranks,
tiny LLaMA) against references computed here from the definitions:

* the zero-shot score is the base model's, as plain transformers evaluates it;
* `loradrop.warm_start=true` starts the kept LoRAs from the sampling stage's weights (and
  `false` does not);
* `loradrop.train_shared=false` leaves the shared LoRA's B at zero (and `true` trains it).

The main stage runs one step at lr 1e-12, so "where it started" is read off the final
adapter: AdamW moves a weight by about lr per step, whatever the gradient's size.
"""

import json

import pytest
import torch
from safetensors.torch import load_file
from test_train_cli import tiny_args

from conftest import REPO, run_ranks_many

TRAIN = REPO / "launch" / "train.py"
EVAL_EXAMPLES = 24  # tiny_args sets data.max_eval_examples=24


def start_args(tiny_model, out, warm_start: bool, train_shared: bool) -> list[str]:
    return tiny_args(tiny_model, out, f"loradrop.warm_start={str(warm_start).lower()}",
                     f"loradrop.train_shared={str(train_shared).lower()}", "train.max_steps=1", "train.lr=1e-12",
                     "train.warmup_steps=0")


def start_of_main(out):
    selection = json.loads((out / "selection.json").read_text())
    final = load_file(out / "adapter" / "adapter_model.safetensors")
    [sampling_ckpt] = sorted((out / "checkpoints").glob("sampling-step*"))
    sampled = load_file(sampling_ckpt / "adapter" / "adapter_model.safetensors")
    return selection, final, sampled


def layer_of(key: str) -> int:
    return int(key.split(".layers.")[1].split(".")[0])


@pytest.fixture(scope="module")
def claim_runs(tiny_model, tmp_path_factory) -> dict:
    """Both runs, one after another in one set of rank processes (``run_ranks_many``)."""
    root = tmp_path_factory.mktemp("claims")
    runs = {"warm_frozen": (True, False), "fresh_trained": (False, True)}
    run_ranks_many([start_args(tiny_model, root / name, *flags) for name, flags in runs.items()], root / "logs")
    return {name: (root / name, *start_of_main(root / name)) for name in runs}


@pytest.fixture(scope="module")
def warm_frozen_shared(claim_runs):
    return claim_runs["warm_frozen"]


@pytest.fixture(scope="module")
def fresh_trained_shared(claim_runs):
    return claim_runs["fresh_trained"]


def test_warm_start_starts_kept_loras_from_the_sampling_stage(warm_frozen_shared, fresh_trained_shared):
    for (_, selection, final, sampled), warm in ((warm_frozen_shared, True), (fresh_trained_shared, False)):
        kept = {int(i) for i in selection["kept"]}
        assert kept and selection["shared"], selection  # both kinds of layer exist
        for key, value in final.items():
            if layer_of(key) not in kept:
                continue
            if warm:  # one step of lr 1e-12 away from the sampling stage's weights
                torch.testing.assert_close(value, sampled[key], rtol=0, atol=1e-9)
            elif "lora_A" in key:  # a fresh seeded initialisation, nothing like the trained one
                assert (value - sampled[key]).abs().max() > 1e-3, key


def test_train_shared_false_leaves_the_shared_b_at_zero(warm_frozen_shared, fresh_trained_shared):
    for (_, selection, final, _), trained in ((warm_frozen_shared, False), (fresh_trained_shared, True)):
        shared = {int(i) for i in selection["shared"]}
        shared_b = [v for k, v in final.items() if "lora_B" in k and layer_of(k) in shared]
        assert shared_b
        if trained:  # B starts at zero; one AdamW step moves every entry off it
            assert all(bool((b != 0).all()) for b in shared_b)
        else:
            assert all(bool((b == 0).all()) for b in shared_b)


def reference_zero_shot(model_dir, eval_rows, label_names):
    """The base model evaluated in plain transformers, from the README's definitions: loss
    averaged over response tokens (the response " {category}" and EOS); accuracy is the
    argmax over each label's first response token at the position that predicts the
    response."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    first_token = [tok(f" {name}", add_special_tokens=False)["input_ids"][0] for name in label_names]
    loss_sum, tokens, correct = 0.0, 0, 0
    for row in eval_rows:
        prompt = tok(f"Definition: {row['definition']}\nCategory:", add_special_tokens=True)["input_ids"]
        response = tok(f" {row['category']}", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        ids = torch.tensor([prompt + response])
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), dim=-1)
        for j, t in enumerate(response):
            loss_sum -= float(logp[len(prompt) + j - 1, t])
        tokens += len(response)
        scores = logp[len(prompt) - 1, first_token]
        correct += int(label_names[int(scores.argmax())] == row["category"])
    return loss_sum / tokens, correct / len(eval_rows)


def test_the_zero_shot_score_is_the_base_models(tiny_model, warm_frozen_shared):
    out = warm_frozen_shared[0]
    read = lambda name: [json.loads(line) for line in (REPO / "data/wordnet_categories" / name).read_text().splitlines()]
    label_names = sorted({r["category"] for r in read("train.jsonl")})
    loss, accuracy = reference_zero_shot(tiny_model, read("eval.jsonl")[:EVAL_EXAMPLES], label_names)
    zero_shot = json.loads((out / "summary.json").read_text())["zero_shot"]
    assert zero_shot["eval_loss"] == pytest.approx(loss, rel=1e-5)
    assert zero_shot["eval_accuracy"] == pytest.approx(accuracy, abs=1e-9)
