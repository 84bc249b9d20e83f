"""The memory planner: parameter counts, ZeRO-3 rules, activation formulas and the check,
against numbers worked out by hand from the definitions (or measured from autograd), not
against the planner's own output."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from loradrop_ds import planner
from loradrop_ds.config import ConfigError, load_config

REPO = Path(__file__).resolve().parents[1]
RECIPES = sorted((REPO / "recipes").glob("*.yaml"))
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def tiny_llama(layers: int = 2, tied: bool = True, device: str = "meta", **dims) -> torch.nn.Module:
    """hidden 8, MLP 16, 2 heads of 4 (one KV head), vocab 10 unless ``dims`` say otherwise."""
    from transformers import AutoConfig, AutoModelForCausalLM

    values = dict(hidden_size=8, intermediate_size=16, num_hidden_layers=layers, num_attention_heads=2,
                  num_key_value_heads=1, vocab_size=10, tie_word_embeddings=tied)
    values.update(dims)
    with torch.device(device):
        return AutoModelForCausalLM.from_config(AutoConfig.for_model("llama", **values))


def tiny_spec(layers: int = 2, targets: tuple[str, ...] = ("q_proj", "v_proj"), **changes) -> planner.RunSpec:
    shape = planner.ModelDims.from_model(tiny_llama(layers), list(targets))
    spec = planner.RunSpec(model=shape, world_size=2, gpus_per_node=2, device="cuda", dtype="bfloat16", lora_r=2,
                           lora_dropout=0.1, target_modules=targets, micro_batch_size=1, seq_len=4, grad_accum=1,
                           packing=False, gradient_checkpointing=False, attn_implementation="flash_attention_2",
                           zero=planner.ZeroSettings(param_persistence_threshold=10))
    return replace(spec, **changes)


# ----------------------------------------------------------------------------- counting


def test_parameters_are_counted_from_the_config_and_a_tied_embedding_once():
    # By hand, hidden 8, MLP 16, head_dim 4, one KV head, vocab 10:
    # embedding 10*8 = 80; a layer: q 8*8=64, k 8*4=32, v 32, o 64, gate/up/down 16*8=128 each, 2 norms of 8
    # = 592; final norm 8; an untied lm_head another 80.
    layer = 64 + 32 + 32 + 64 + 3 * 128 + 2 * 8
    tied = planner.ModelDims.from_model(tiny_llama(tied=True), ["q_proj", "v_proj"])
    untied = planner.ModelDims.from_model(tiny_llama(tied=False), ["q_proj", "v_proj"])
    assert tied.total_params == 80 + 2 * layer + 8 == 1272
    assert untied.total_params == 80 + 2 * layer + 8 + 80 == 1352
    assert tied.tied_embeddings and not untied.tied_embeddings
    assert sum(tied.layer_param_numels) == layer
    assert tied.target_shapes == {"q_proj": (8, 8), "v_proj": (8, 4)}
    assert tied.largest_weight_numel == 128 and (tied.num_heads, tied.num_kv_heads, tied.head_dim) == (2, 1, 4)


def test_shipped_configs_give_the_published_parameter_counts():
    # Published sizes (model cards): Llama-2-7B 6,738,415,616; Llama-2-13B 13,015,864,320;
    # Llama-2-70B 68,976,648,192; Llama-3-70B 70,553,706,496; SmolLM2-135M 134,515,008 (tied embeddings).
    published = {"meta-llama/Llama-2-7b-hf": 6_738_415_616, "meta-llama/Llama-2-13b-hf": 13_015_864_320,
                 "meta-llama/Llama-2-70b-hf": 68_976_648_192,
                 "meta-llama/Meta-Llama-3-70B": 70_553_706_496, "builtin:smollm2-135m-instruct": 134_515_008}
    from transformers import AutoConfig, AutoModelForCausalLM

    for name, count in published.items():
        values = dict(planner.KNOWN_MODEL_CONFIGS[name])
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(AutoConfig.for_model(values.pop("model_type"), **values))
        assert planner.ModelDims.from_model(model, ["q_proj"]).total_params == count, name


def test_lora_counts_per_stage():
    # r=2 on q (8->8) and v (8->4): A is r x in, B is out x r: q 16+16, v 16+8 = 56 per layer.
    spec = tiny_spec(layers=4)
    per_layer = 2 * 8 + 8 * 2 + 2 * 8 + 4 * 2
    sampling, frozen = planner.lora_matrix_numels(spec, "sampling")
    assert sum(sampling) == 4 * per_layer and not frozen
    assert sum(planner.lora_matrix_numels(spec, "main")[0]) == 4 * per_layer  # all kept: no shared LoRA
    half = replace(spec, kept_fraction=0.5)
    assert sum(planner.lora_matrix_numels(half, "main")[0]) == 3 * per_layer  # 2 kept + 1 shared per type
    frozen_shared = replace(half, train_shared=False)
    trainable, frozen = planner.lora_matrix_numels(frozen_shared, "main")
    assert (sum(trainable), sum(frozen)) == (2 * per_layer, per_layer)
    assert planner.stages_of(replace(spec, loradrop=False)) == ["main"]


def test_loraprune_update_buffers_by_hand():
    # r=2; q 8->8: A 2x8 + B 8x2 = 32 elements per layer. Scoring q in 3 of 4 layers: fp32
    # gradients, A/B copies and the flat all-reduce copy = 3 x 4 bytes x 32 x 3 = 1152. Scratch:
    # q is 8 x 8, one row block of all 8 rows = 64 elements, 6 float32 blocks = 1536.
    spec = tiny_spec(layers=4, prune_layers=3, prune_modules=("q_proj",))
    assert planner.stage_estimate(spec, "main").device_rows["LoRAPrune update buffers"] == 1152 + 1536
    assert planner.stage_estimate(spec, "sampling").device_rows["LoRAPrune update buffers"] == 0
    assert "LoRAPrune update buffers" not in planner.stage_estimate(tiny_spec(layers=4), "main").device_rows


def test_loraprune_scores_the_recipes_layers_and_modules(no_network):
    # The builtin SmolLM2-135M has 30 layers; 10% exempts int(3.0) = 3 first layers, plus the last.
    recipe = REPO / "recipes" / "smollm2_loraprune.yaml"
    cfg = load_config(recipe, ["prune.exempt_first_fraction=0.1", "prune.exempt_last=true"])
    spec = planner.plan_for_config(cfg, 2, 2, 80 * 10**9, None).spec
    assert spec.prune_layers == 26
    assert spec.prune_modules == ("gate_proj", "up_proj", "down_proj")  # the recipe's prune.heads=false
    plain = planner.plan_for_config(load_config(recipe, ["prune.target_sparsity=0"]), 2, 2, 80 * 10**9, None).spec
    assert (plain.prune_layers, plain.prune_modules) == (0, ())


# ----------------------------------------------------------------------------- ZeRO-3


def test_partition_is_ceil_of_numel_over_world():
    assert [planner.partition_numel(n, 4) for n in (1, 4, 10, 12, 13)] == [1, 1, 3, 3, 4]


def test_base_shard_partitions_each_parameter_and_keeps_persistent_ones_whole():
    # world 3, persistence threshold 10, bf16 (2 bytes). Tied tiny model:
    # embedding 80 -> ceil(80/3)=27; a layer: q 64->22, k 32->11, v 32->11, o 64->22, gate/up/down
    # 128->43 each, and two norms of 8 (<= 10: persistent, so whole plus their partition of 3);
    # the final norm likewise.
    shape = planner.ModelDims.from_model(tiny_llama(), ["q_proj"])
    zero = planner.ZeroSettings(param_persistence_threshold=10)
    elements = 27 + 2 * (22 + 11 + 11 + 22 + 3 * 43 + 2 * (8 + 3)) + (8 + 3)
    assert planner.zero3_param_bytes(shape.param_numels, 2, 3, zero) == 2 * elements


def test_hpz_secondary_partition_is_the_padded_size_over_the_group():
    # 100 elements on 16 ranks pad to 112; a group of 8 holds 112/8 = 14 each. The persistent
    # 5-element parameter has no secondary copy.
    hpz = planner.ZeroSettings(param_persistence_threshold=10, hpz_partition_size=8)
    assert planner.hpz_secondary_bytes([100, 5], 2, 16, hpz) == 14 * 2
    assert planner.hpz_secondary_bytes([100], 2, 16, replace(hpz, hpz_partition_size=1)) == 0


def test_gathered_working_set_follows_reuse_distance_prefetch_and_max_live():
    # Partitioned elements (threshold 10): embedding 80 + 2 layers of 64+32+32+64+3*128 = 576 -> 1232.
    spec = tiny_spec()
    assert planner.gathered_numel(spec) == 1232  # reuse distance 1e9: everything used stays gathered
    # reuse 100 -> 50 held + the working layer 576 + prefetch up to max live 700: 74 more.
    small = replace(spec, zero=replace(spec.zero, max_reuse_distance=100, max_live_parameters=700,
                                       prefetch_bucket_size=1000))
    assert planner.gathered_numel(small) == 50 + 576 + 74
    no_room = replace(small, zero=replace(small.zero, max_live_parameters=100))
    assert planner.gathered_numel(no_room) == 50 + 576


def test_optimizer_state_reuses_an_fp32_lora_partition_as_master():
    # world 2; LoRA matrices per layer 16, 16, 16, 8 -> partitions 8, 8, 8, 4 = 28 per layer, 2 layers.
    # fp32 adapters: exp_avg + exp_avg_sq (stage3 reuses the fp32 partition as master);
    # bf16 adapters: plus an fp32 master copy.
    partitions = 2 * 28
    fp32 = planner.stage_estimate(tiny_spec(), "sampling").device_rows["AdamW state (fp32)"]
    bf16 = planner.stage_estimate(tiny_spec(lora_dtype="bfloat16"), "sampling").device_rows["AdamW state (fp32)"]
    assert fp32 == partitions * 4 * 2
    assert bf16 == partitions * 4 * 3


def test_parameter_offload_moves_partitions_to_host_ram():
    # world 2, threshold 10, bf16 base: partitions are embedding 40 + per layer (32+16+16+32+3*64 + norms 4+4)
    # = 296, twice, + final norm 4 = 636 elements; the five persistent norms keep their partitions (5 * 4)
    # on the GPU with their whole copies (5 * 8): (20 + 40) * 2 = 120 bytes there, and 616 * 2 = 1232
    # bytes on the host. fp32 LoRA partitions 2 * (8+8+8+4) = 56, of which v's B (8 elements, persistent)
    # stays on the GPU: partitions 2 * 4 and whole 2 * 8 -> (8 + 16) * 4 = 96 bytes; 48 * 4 = 192 on the
    # host. The fp32 master is cloned (3 x 4 bytes per LoRA element) because the partition no longer
    # sits on the optimizer's device.
    spec = tiny_spec(zero=planner.ZeroSettings(param_persistence_threshold=10, offload_param="cpu"))
    rows = planner.stage_estimate(spec, "sampling")
    assert rows.device_rows["frozen base shard"] == 120
    assert rows.device_rows["LoRA parameters"] == 96
    assert rows.host_rows["offloaded state, 2 ranks"] == 2 * (1232 + 192)
    assert rows.device_rows["AdamW state (fp32)"] == 56 * 4 * 3


def test_one_rank_gathers_nothing_and_holds_a_persistent_parameter_once():
    # World 1: a gathered parameter is its partition (partition_parameters._no_gather_coalesced),
    # so the tiny model's 1232 + 5 * 8 elements count once, persistent or not, and nothing is
    # gathered; with parameter offload the partitions sit in host memory and gathering copies.
    shape = planner.ModelDims.from_model(tiny_llama(), ["q_proj"])
    zero = planner.ZeroSettings(param_persistence_threshold=10**9)  # every parameter persistent
    assert planner.zero3_param_bytes(shape.param_numels, 2, 1, zero) == 2 * (1232 + 40)
    # two ranks: each holds its half (every size here is even) and, persistent, the whole
    assert planner.zero3_param_bytes(shape.param_numels, 2, 2, zero) == 2 * ((1232 + 40) // 2 + 1232 + 40)
    one_rank = tiny_spec(world_size=1, gpus_per_node=1)
    assert planner.gathered_numel(one_rank) == 0
    assert planner.gathered_numel(replace(one_rank, zero=replace(one_rank.zero, offload_param="cpu"))) == 1232
    # With offload and every parameter persistent (the one-rank "auto" threshold), every partition
    # stays on the device (ds_persist), once: nothing is offloaded and nothing gathered.
    offload_all = replace(one_rank, zero=replace(zero, offload_param="cpu"))
    rows = planner.stage_estimate(offload_all, "sampling")
    assert rows.device_rows["frozen base shard"] == 2 * (1232 + 40) and rows.device_rows["gathered working set"] == 0
    assert rows.host_rows["offloaded state, 1 ranks"] == 0


def test_torch_linear_without_checkpointing_holds_every_gathered_weight():
    # tiny_spec (world 2, threshold 10) with reuse distance 100: 50 held + the working layer 576
    # normally; with torch's linear and no checkpointing, all 1232 partitioned elements.
    spec = tiny_spec(zero=planner.ZeroSettings(param_persistence_threshold=10, max_reuse_distance=100,
                                               max_live_parameters=626, memory_efficient_linear=True))
    assert planner.gathered_numel(spec) == 50 + 576
    torch_linear = replace(spec, zero=replace(spec.zero, memory_efficient_linear=False))
    assert planner.gathered_numel(torch_linear) == 1232
    assert planner.gathered_numel(replace(torch_linear, gradient_checkpointing=True)) == 50 + 576


def test_memory_efficient_linear_auto_and_its_settings():
    # "auto" is resolved by the engine (tests/test_engine.py checks the rule); the planner reads
    # the resolved bool and refuses an unresolved one.
    read = planner.ZeroSettings.from_ds_config
    assert read({"zero_optimization": {"stage": 3}}).memory_efficient_linear is True  # DeepSpeed's default
    assert read({"zero_optimization": {"memory_efficient_linear": False}}).memory_efficient_linear is False
    with pytest.raises(ConfigError, match="memory_efficient_linear"):
        read({"zero_optimization": {"memory_efficient_linear": "auto"}})
    # Through a recipe: the 70B recipe checkpoints, so on 8 GPUs "auto" (or DeepSpeed's default)
    # gives what the JSON says; an explicit bool in an override JSON wins.
    cfg = load_config(REPO / "recipes" / "llama3_70b_loradrop.yaml")
    shape = planner.read_model_dims(cfg.model, cfg.lora.target_modules)
    spec = planner.spec_from_config(cfg, shape, 8, 8, "cuda")
    zero_json = json.loads((REPO / cfg.deepspeed).read_text())["zero_optimization"]
    expected = {"auto": False, None: True}.get(zero_json.get("memory_efficient_linear"), zero_json.get("memory_efficient_linear"))
    assert spec.zero.memory_efficient_linear is expected


def test_zero_settings_take_deepspeed_defaults_and_the_engine_auto_rules():
    defaults = planner.ZeroSettings.from_ds_config({"zero_optimization": {"stage": 3}})
    # deepspeed/runtime/zero/config.py defaults
    assert (defaults.prefetch_bucket_size, defaults.param_persistence_threshold, defaults.max_live_parameters,
            defaults.max_reuse_distance, defaults.reduce_bucket_size) == (5e7, 1e5, 1e9, 1e9, 5e8)
    cfg = load_config(REPO / "recipes" / "llama3_70b_loradrop.yaml")
    shape = planner.read_model_dims(cfg.model, cfg.lora.target_modules)
    spec = planner.spec_from_config(cfg, shape, 8, 8, "cuda")
    # "auto" (engine.zero3_auto_values): prefetch max(0.9 * 8192^2, 28672 * 8192) = 234,881,024;
    # persistence max(10 * 8192, 16 * 28672) = 458,752; reduce bucket 8192^2.
    assert spec.zero.prefetch_bucket_size == 28672 * 8192
    assert spec.zero.param_persistence_threshold == 16 * 28672
    assert spec.zero.reduce_bucket_size == 8192 * 8192
    assert spec.zero.communication_data_type == "fp32"


# ----------------------------------------------------------------------------- activations


def test_layer_activations_by_hand():
    # bf16 base (a=2), fp32 LoRA (c=4), dropout on CUDA (bool mask, 1 byte), flash-attn, r=2 on all
    # seven modules; h=8, f=16, 2 query heads and 1 KV head of 4. With torch's linear:
    #   norms 2*(4*8 + 4) = 72; attention 2*(2*8 + 2*4) + 4*2 = 56; MLP 3*2*16 = 96;
    #   LoRA: (4+1)*8 for each of the six modules reading width 8, (4+1)*16 for down, r*4 = 8 each: 376.
    spec = tiny_spec(targets=tuple(ALL_LINEAR), zero=planner.ZeroSettings(memory_efficient_linear=False))
    assert planner.layer_activation_bytes_per_token(spec) == 72 + 56 + 96 + (6 * 40 + 80 + 7 * 8) == 600
    # DeepSpeed's linear also saves the frozen Linears' inputs: the attention input and the mlp
    # input (a*8 each) and the product (a*16); the attention output is flash-attn's saved output.
    mel = replace(spec, zero=planner.ZeroSettings(memory_efficient_linear=True))
    assert planner.layer_activation_bytes_per_token(mel) == 600 + 16 + 16 + 32 == 664
    # The first layer's input carries no gradient: no input norm (36), no attention input (16),
    # no dropout masks on q/k/v (3 * 8); the dropout outputs stay (A's weight gradient needs them).
    assert planner.layer_activation_bytes_per_token(mel, input_requires_grad=False) == 664 - 36 - 16 - 24
    # sdpa with a padding mask: key/value repeated to both heads (+2*2*4) and the mask row a*s (+2*4).
    sdpa = replace(spec, attn_implementation="sdpa")
    assert planner.layer_activation_bytes_per_token(sdpa) == 600 + 16 + 8
    # LoRA computing in bf16: dropout outputs of 2 bytes, A outputs r*2: (2+1)*8*6 + (2+1)*16 + 7*4 = 220.
    bf16 = replace(spec, lora_compute_dtype="bfloat16")
    assert planner.layer_activation_bytes_per_token(bf16) == 72 + 56 + 96 + 220
    # ... and without dropout it reads the frozen Linears' own inputs (shared): a*8 + a*8 + a*16.
    bf16_no_dropout = replace(bf16, lora_dropout=0.0)
    assert planner.layer_activation_bytes_per_token(bf16_no_dropout) == 72 + 56 + 96 + 7 * 4 + 16 + 16 + 32
    # Liger: each norm saves its bf16 input and fp32 rstd (2*8 + 4), SwiGLU its two factors (2*2*16).
    liger = replace(spec, liger=True)
    assert planner.layer_activation_bytes_per_token(liger) == 2 * 20 + 56 + 64 + 376
    # The per-use bf16 casts of A and B, per layer: 2 bytes * r * (in + out) per module.
    casts = sum(2 * 2 * (i + o) for i, o in spec.model.target_shapes.values())
    assert planner.lora_weight_cast_bytes_per_layer(bf16) == casts and planner.lora_weight_cast_bytes_per_layer(spec) == 0


def test_checkpointing_stores_only_layer_inputs():
    # With torch's linear, a layer keeps 600 bytes per token and the first 540 (no input norm, no
    # q/k/v masks); with checkpointing, the layer input (a*h = 16 bytes) and one layer rebuilt at a
    # time.
    spec = tiny_spec(targets=tuple(ALL_LINEAR), micro_batch_size=3, seq_len=5,
                     zero=planner.ZeroSettings(memory_efficient_linear=False))
    tokens = 15
    off = planner.activation_estimate(spec, checkpointing=False)
    on = planner.activation_estimate(spec, checkpointing=True)
    assert off.stored_layers == (600 + 540) * tokens and on.stored_layers == 2 * 16 * tokens
    assert on.recomputed_layer == 600 * tokens and off.recomputed_layer == 0
    # the head: fp32 copy in the final norm (4*8+4) saved, bf16 logits (2*10) held; the loss saves
    # its fp32 log-softmax and int64 targets (4*10 + 8) and peaks at 12*V + 8 per token.
    assert on.head_saved == 36 * tokens and on.logits == 20 * tokens
    assert (on.loss_saved, on.loss) == (48 * tokens, 128 * tokens)
    assert on.saved == (2 * 16 + 36 + 48) * tokens and on.mask == 0  # flash-attn: no 4-D mask
    assert on.peak < off.peak
    # an fp32 base: the input norm saves the layer input itself, which checkpointing keeps anyway
    fp32 = planner.activation_estimate(replace(spec, dtype="float32"), checkpointing=True)
    assert fp32.recomputed_layer == (planner.layer_activation_bytes_per_token(replace(spec, dtype="float32")) - 32) * tokens


def test_backward_workspace_by_hand():
    # tiny_spec, all seven modules, DeepSpeed's linear, bf16 base (a=2), fp32 LoRA (c=4), dropout
    # with a 1-byte mask; h=8, f=16. down_proj saves its A output (r*c = 8), dropout output (4*16)
    # and mask (16), and the product (2*16): 120. The MLP steps: 3*a*f = 96; the dropout step
    # c*f + 120 = 184; less the 120 freed: 64. Plus the incoming gradient (a*h = 16) and down_proj's
    # output gradient on both branches (a*h + c*h = 48).
    spec = tiny_spec(targets=tuple(ALL_LINEAR))
    assert planner.backward_workspace_bytes_per_token(spec) == 16 + 48 + 64
    # Recomputing down_proj's forward under checkpointing: the residual (16), down_proj's frozen
    # output (16), its fp32 cast input (64) and LoRA B's output (c*h = 32) on top: 128 > 64.
    assert planner.backward_workspace_bytes_per_token(replace(spec, gradient_checkpointing=True)) == 16 + 48 + 128
    # ... as the estimate asked for checkpointing sees it, whatever the recipe says.
    assert planner.activation_estimate(spec, checkpointing=True).workspace == (16 + 48 + 128) * spec.tokens_per_micro_batch


def test_liger_fused_loss_keeps_no_logits():
    # tiny_spec with Liger: 15 tokens, V=10, H=8 -> ceil(10/8) = 2, ceil(15/2) = 8 rows per chunk
    # (a power of two). The loss: a chunk of bf16 logits (8*10*2) and the fp32 loss and bool mask
    # per token; the head keeps the final norm's input and rstd (2*8+4) and the hidden states'
    # gradient (2*8), computed in the forward.
    spec = tiny_spec(targets=tuple(ALL_LINEAR), micro_batch_size=3, seq_len=5, liger=True)
    act = planner.activation_estimate(spec)
    assert planner.liger_loss_chunk_tokens(spec) == 8
    assert act.logits == 0 and act.loss_saved == 0 and act.loss == 8 * 10 * 2 + 5 * 15
    assert act.head_saved == (20 + 16) * 15


def _saved_bytes_of_layer(model: torch.nn.Module, layer: torch.nn.Module, **inputs) -> int:
    """Bytes of the tensors autograd saves for backward that ``layer`` adds (each storage
    once; parameters, and tensors an earlier layer saved already, such as the rotary
    tables, excluded): measured, independently of the planner."""
    earlier = {p.untyped_storage().data_ptr() for p in model.parameters()}
    added: dict[int, int] = {}
    inside = [False]

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if not inside[0]:
            earlier.add(storage.data_ptr())
        elif storage.data_ptr() not in earlier:
            added.setdefault(storage.data_ptr(), storage.nbytes())
        return t

    layer.register_forward_pre_hook(lambda *_: inside.__setitem__(0, True))
    layer.register_forward_hook(lambda *_: inside.__setitem__(0, False))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(**inputs)
    return sum(added.values())


@pytest.mark.parametrize("dtype,dropout,attn", [("bfloat16", 0.1, "sdpa"), ("float32", 0.0, "sdpa"),
                                                ("bfloat16", 0.0, "eager")])
def test_layer_activation_formula_matches_what_autograd_saves(dtype, dropout, attn):
    """A real tiny LLaMA with peft LoRA (fp32 adapters) on CPU, without DeepSpeed (torch's own
    linear: ``memory_efficient_linear`` false), a padded batch: the planner's per-layer bytes
    equal the storages autograd keeps for the middle layer. The DeepSpeed path is checked by
    test_activation_estimate_matches_a_real_zero3_step."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = tiny_llama(layers=3, tied=False, device="cpu", hidden_size=64, intermediate_size=176,
                       num_attention_heads=4, num_key_value_heads=2, vocab_size=128).to(getattr(torch, dtype))
    model.config._attn_implementation = attn
    shape = planner.ModelDims.from_model(model, ALL_LINEAR)
    for p in model.parameters():
        p.requires_grad_(False)
    model.enable_input_require_grads()  # every layer's input carries a gradient
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=ALL_LINEAR))
    model.train()
    batch, seq = 2, 32
    ids = torch.randint(0, 128, (batch, seq))
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[0, -5:] = 0
    layer = model.base_model.model.model.layers[1]
    measured = _saved_bytes_of_layer(model, layer, input_ids=ids, attention_mask=mask, labels=ids)
    spec = planner.RunSpec(model=shape, world_size=1, gpus_per_node=1, device="cpu", dtype=dtype, lora_r=4,
                           lora_dropout=dropout, target_modules=tuple(ALL_LINEAR), micro_batch_size=batch,
                           seq_len=seq, grad_accum=1, packing=False, gradient_checkpointing=False,
                           attn_implementation=attn, zero=planner.ZeroSettings(memory_efficient_linear=False))
    assert planner.layer_activation_bytes_per_token(spec) * batch * seq == measured


# The calibration against the project's real path: a LLaMA-shaped model (the MLP 2.75 times the
# hidden size, grouped-query attention, vocabulary 8 times the hidden size, like Llama-2-7B's
# proportions) loaded under zero.Init, peft LoRA on all seven projections, the DeepSpeed engine,
# one CPU rank (tests/workers/activation_memory.py). Two sequence lengths and two micro-batches.
CALIBRATION_MODEL = dict(vocab_size=512, hidden_size=64, intermediate_size=176, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=False)
CALIBRATION_SHAPES = [[1, 96], [3, 48]]
# name -> (model.dtype, lora.dropout, lora.compute_dtype): fp32 with no dropout (every LoRA
# shares its input with the frozen Linear); the GPU recipes' bf16 base with fp32 adapters and
# dropout (cast copies and masks); and LoRA computing in bf16 (lora.compute_dtype).
CALIBRATION_PATHS = {"fp32": ("float32", 0.0, "float32"), "bf16": ("bfloat16", 0.05, "float32"),
                     "bf16-compute": ("bfloat16", 0.05, "bfloat16")}
# (path, memory_efficient_linear, checkpointing): every combination on the recipes' path; on the
# others, the combinations a run resolves to by default ("auto": DeepSpeed's linear only without
# checkpointing on several ranks) and its opposite.
CALIBRATION_CASES = [("bf16", mel, ckpt) for mel in (False, True) for ckpt in (False, True)]
CALIBRATION_CASES += [("fp32", False, False), ("fp32", True, True), ("bf16-compute", False, False),
                      ("bf16-compute", False, True)]
# What autograd saves: within 1%. Measured: exact to the byte with checkpointing (the saved
# layer inputs, final norm and loss), 0.1-0.7% under without it: the rotary cos/sin tables (saved
# once per step, 2 s head_dim a bytes) are not counted.
SAVED_TOLERANCE = 0.01
# The allocator's peak of the step: within 5%. Measured -2.7% to +1.1%: a few tens of kB of
# small per-step allocations (the rotary tables, DeepSpeed's gradient bookkeeping) are not
# counted, which only shows at these tiny sizes.
PEAK_TOLERANCE = 0.05


def _calibration_overrides(path: str, ckpt: bool) -> list[str]:
    dtype, dropout, compute = CALIBRATION_PATHS[path]
    return [f"model.dtype={dtype}", f"model.gradient_checkpointing={str(ckpt).lower()}", "model.attn_implementation=sdpa",
            "deepspeed=ds_configs/zero3.json", f"lora.dropout={dropout}", f"lora.compute_dtype={compute}", "lora.r=4",
            f"lora.target_modules=[{','.join(ALL_LINEAR)}]"]


@pytest.fixture(scope="module")
def zero3_step_memory(tmp_path_factory) -> tuple[Path, dict]:
    """Every calibration case measured in one single-rank process: the model directory and
    ``{(path, memory_efficient_linear, checkpointing): the worker's result}``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from conftest import run_ranks

    root = tmp_path_factory.mktemp("zero3_step_memory")
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**CALIBRATION_MODEL)).save_pretrained(root / "model")
    # Without memory_efficient_linear first: once a zero.Init enables it, it stays for the process.
    cases = sorted(CALIBRATION_CASES, key=lambda c: c[1])
    (root / "cases.json").write_text(json.dumps([
        {"key": list(case), "overrides": _calibration_overrides(case[0], case[2]), "memory_efficient_linear": case[1],
         "shapes": CALIBRATION_SHAPES} for case in cases]))
    run_ranks(REPO / "tests" / "workers" / "activation_memory.py",
              [str(root / "model"), str(root / "cases.json"), str(root / "out.json")], nproc=1)
    return root / "model", {tuple(r["key"]): r for r in json.loads((root / "out.json").read_text())}


@pytest.mark.parametrize("path,mel,ckpt", CALIBRATION_CASES,
                         ids=[f"{p}-{'mel' if m else 'torch_linear'}-{'ckpt' if c else 'no_ckpt'}"
                              for p, m, c in CALIBRATION_CASES])
def test_activation_estimate_matches_a_real_zero3_step(zero3_step_memory, path, mel, ckpt):
    """The planner's activation figures for exactly these settings against one training
    micro-batch on the project's own ZeRO-3 path: what autograd saves (``Activations.saved``)
    and the allocator's peak over forward and backward (``Activations.peak``)."""
    model_dir, results = zero3_step_memory
    result = results[(path, mel, ckpt)]
    # The lever really was pulled: DeepSpeed's linear replaced torch's, or did not.
    assert result["linear"] == ("zero3_linear_wrap" if mel else "linear")
    compute = CALIBRATION_PATHS[path][2]
    assert result["lora_input_dtypes"] == [f"torch.{compute}"]
    cfg = load_config(None, [f"model.path={model_dir}", *_calibration_overrides(path, ckpt)])
    dims = planner.read_model_dims(cfg.model, cfg.lora.target_modules)
    spec = planner.spec_from_config(cfg, dims, 1, 1, "cpu", "sdpa")
    assert len(result["measured"]) == len(CALIBRATION_SHAPES)
    for m in result["measured"]:
        at = replace(spec, micro_batch_size=m["micro_batch_size"], seq_len=m["seq_len"],
                     zero=replace(spec.zero, memory_efficient_linear=mel))
        estimate = planner.activation_estimate(at)
        where = f"{m['micro_batch_size']} x {m['seq_len']}"
        assert abs(estimate.saved / m["saved"] - 1) <= SAVED_TOLERANCE, (where, estimate.saved, m["saved"])
        assert abs(estimate.peak / m["peak"] - 1) <= PEAK_TOLERANCE, (where, estimate.peak, m["peak"])


# ----------------------------------------------------------------------------- recipes and the check


@pytest.fixture
def no_network(monkeypatch, tmp_path):
    """Any connection attempt fails the test; the builtin model counts as not yet converted."""
    def refuse(*args, **kwargs):
        raise AssertionError(f"the planner tried to reach the network: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setenv("LORADROP_CACHE", str(tmp_path / "empty-cache"))


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_every_recipe_resolves_through_the_planner_without_network(recipe, no_network):
    cfg = load_config(recipe)
    plan = planner.plan_for_config(cfg, 8, 8, 80 * 10**9, None)
    assert plan.spec.model.source == "shipped copy of the public config.json"
    assert [s.stage for s in plan.stages] == (["sampling", "main"] if cfg.loradrop.enabled else ["main"])
    assert all(s.device_total > 0 for s in plan.stages)
    assert "verdict:" in planner.format_plan(plan)


def test_check_refuses_70b_on_one_24gb_gpu_and_says_what_to_change(no_network):
    cfg = load_config(REPO / "recipes" / "llama3_70b_loradrop.yaml")
    message = planner.check_memory(cfg, 1, 1, 24 * 10**9, None)
    assert message is not None and "\n" not in message
    assert "train.skip_memory_check=true" in message
    assert "deepspeed=ds_configs/zero3_offload_param.json" in message or "GPUs" in message
    assert planner.check_memory(cfg, 8, 8, 80 * 10**9, None) is None


def test_check_on_cpu_counts_every_rank_against_host_ram(no_network):
    cfg = load_config(REPO / "recipes" / "default.yaml")
    assert planner.check_memory(cfg, 2, 2, None, 24 * planner.GiB) is None
    message = planner.check_memory(cfg, 2, 2, None, 2 * planner.GiB)
    assert message is not None and "host RAM" in message and "train.skip_memory_check=true" in message
    assert "GPUs" not in message  # no GPU advice for a CPU run


def test_peft_anchor_llama2_70b_on_8_h100_is_within_15_percent_of_64_gib():
    """peft docs: Llama-2-70B LoRA, ZeRO-3, 8 x H100 80GB, 2048 packed, micro-batch 8,
    checkpointing, flash-attn: about 64 GB per GPU (see planner.PEFT_ANCHOR_BYTES)."""
    plan = planner.estimate(planner.peft_anchor_spec(), 80 * planner.GiB, None)
    (stage,) = plan.stages
    assert abs(stage.device_total / planner.PEFT_ANCHOR_BYTES - 1) <= 0.15
    assert stage.lora_params == 80 * 8 * (2 * (8192 + 8192) + 2 * (8192 + 1024) + 3 * (8192 + 28672))


def test_sizes_parse_with_their_units():
    assert planner.parse_size("80GB") == 80 * 10**9
    assert planner.parse_size("80GiB") == 80 * 2**30
    assert planner.parse_size("1.5 tb") == 1_500_000_000_000
    for bad in ("80", "eighty GB", "80 GBs", ""):
        with pytest.raises(ValueError):
            planner.parse_size(bad)


# ----------------------------------------------------------------------------- the CLI


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    sys.path.insert(0, str(REPO / "launch"))
    import plan as plan_cli

    code = plan_cli.main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_prints_a_table_per_stage_and_a_verdict(capsys, no_network):
    code, out, err = run_cli(capsys, "--config", str(REPO / "recipes" / "llama2_7b_loradrop.yaml"), "--nodes", "1",
                             "--gpus-per-node", "8", "--gpu-mem", "80GB")
    assert code == 0, err
    for row in ("frozen base shard", "gathered working set", "LoRA parameters", "AdamW state", "activations",
                "total per GPU", "host RAM", "sampling (LoRA everywhere)", "main (all layers kept"):
        assert row in out, row
    assert out.rstrip().splitlines()[-1].startswith("verdict: fits")


def test_cli_exit_codes_and_one_line_errors(capsys, no_network):
    code, out, err = run_cli(capsys, "--config", str(REPO / "recipes" / "llama3_70b_loradrop.yaml"),
                             "--gpus-per-node", "1", "--gpu-mem", "24GB")
    assert code == 1 and "verdict: does not fit" in out and "train.skip_memory_check=true" in out
    for args, needle in ((["--config", "recipes/missing.yaml", "--gpu-mem", "80GB"], "no such file"),
                         (["--gpu-mem", "eighty"], "not a memory size"),
                         (["--nodes", "x", "--gpu-mem", "80GB"], "--nodes"),
                         ([], "--gpu-mem is required")):
        code, out, err = run_cli(capsys, *args)
        assert code == 2 and not out, args
        assert err.count("\n") == 1 and err.startswith("error:") and needle in err, err


def test_cli_runs_as_a_script():
    proc = subprocess.run([sys.executable, str(REPO / "launch" / "plan.py"), "--gpu-mem", "80"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip().startswith("error:") and proc.stderr.count("\n") == 1
