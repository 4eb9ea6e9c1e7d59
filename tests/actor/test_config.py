"""ActorConfig and check_layout: layout errors are caught before any process group, naming the fix."""

from __future__ import annotations

import subprocess
import sys

import pytest

from pipeline.actor.config import ActorConfig, check_layout
from pipeline.config import ConfigError

QWEN = {"model_type": "qwen2", "num_attention_heads": 14, "num_key_value_heads": 2, "num_hidden_layers": 24}


def test_valid_layout_passes():
    check_layout(ActorConfig(tp=2, pp=2, vpp=3), QWEN, world_size=8)


@pytest.mark.parametrize(
    "kwargs, world, match",
    [
        (dict(tp=4), 4, r"actor\.tp=4: .*num_key_value_heads=2.*tp in \[1, 2\]"),
        (dict(pp=5), 5, r"actor\.pp=5 .*num_hidden_layers=24.*divisible by pp x vpp = 5"),
        (
            dict(pp=2, vpp=5),
            2,
            r"pp x vpp = 10; with tp=1 on 2 ranks these work: pp=1, pp=2 \(vpp null or in \[2, 3, 4, 6, 12\]\)$",
        ),
        (dict(tp=2, pp=2), 6, r"does not divide the world size 6; layouts that would work: \['tp=1,pp=1'"),
    ],
)
def test_layout_errors_name_the_field_and_what_works(kwargs, world, match):
    with pytest.raises(ConfigError, match=match):
        check_layout(ActorConfig(**kwargs), QWEN, world_size=world)


def test_full_recompute_of_more_layers_than_a_chunk_has_is_refused():
    cfg = ActorConfig(pp=2, vpp=3, recompute_granularity="full", recompute_num_layers=5)
    with pytest.raises(ConfigError, match=r"recompute_num_layers=5: at most the 4 layers of one model chunk"):
        check_layout(cfg, QWEN, world_size=2)
    check_layout(ActorConfig(pp=2, vpp=3, recompute_granularity="full", recompute_num_layers=4), QWEN, 2)


@pytest.mark.parametrize(
    "tp, world, works",
    [
        (2, 2, "pp=1$"),
        (2, 6, "pp=1, pp=3$"),
        (1, 6, "pp=1, pp=3$"),
        (4, 6, "none \\(change trainer.world_size\\)"),
    ],
)
def test_pp_hint_on_a_three_layer_model_lists_layouts_that_work(tp, world, works):
    """The demo model has 3 layers: pp=2 used to say "pp x vpp in [] would work"."""
    tiny = {"model_type": "qwen2", "num_attention_heads": 4, "num_key_value_heads": 4, "num_hidden_layers": 3}
    with pytest.raises(
        ConfigError, match=f"num_hidden_layers=3 must be divisible by pp x vpp = 2; .*: {works}"
    ):
        check_layout(ActorConfig(tp=tp, pp=2), tiny, world_size=world)


def test_unsupported_architecture_lists_the_supported_ones():
    with pytest.raises(ConfigError, match=r"model_type='gpt2' is not supported; supported: \['llama'"):
        check_layout(ActorConfig(), {**QWEN, "model_type": "gpt2"}, world_size=1)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(vpp=2), r"actor\.vpp=2 needs actor\.pp >= 2"),
        (dict(dtype="fp8"), r"actor\.dtype='fp8'"),
        (dict(lr_decay_style="cosine", lr_warmup_steps=10, lr_decay_steps=5), r"lr_warmup_steps=10"),
        (dict(tp=0), r"actor\.tp=0"),
        (dict(sequence_parallel=True), r"actor\.sequence_parallel=true needs actor\.tp >= 2"),
        (dict(recompute_granularity="some"), r"actor\.recompute_granularity='some'.*'selective', 'full'"),
        (dict(recompute_method="all"), r"actor\.recompute_method='all'"),
        (dict(recompute_num_layers=0), r"actor\.recompute_num_layers=0"),
        (
            dict(recompute_granularity="selective", recompute_modules=["layernorm"]),
            r"recompute_modules=\['layernorm'\].*Transformer Engine",
        ),
        (dict(overlap_param_gather=True), r"overlap_param_gather=true needs .*overlap_grad_reduce=true"),
        (
            dict(overlap_param_gather=True, overlap_grad_reduce=True, use_distributed_optimizer=False),
            r"use_distributed_optimizer=true",
        ),
    ],
)
def test_field_errors(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        ActorConfig(**kwargs).validate()


def test_config_check_needs_neither_megatron_nor_a_process_group():
    code = (
        "import sys\n"
        "from pipeline.actor.config import ActorConfig, check_layout\n"
        "check_layout(ActorConfig(tp=2), {'model_type': 'llama', 'num_attention_heads': 8,"
        " 'num_key_value_heads': 8, 'num_hidden_layers': 4}, world_size=2)\n"
        "assert 'megatron.core' not in sys.modules, 'config check imported megatron'\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr[-2000:]


def test_hf_mapping_round_trip_is_exact():
    import torch

    from pipeline.actor.hf_mapping import get_mapping
    from pipeline.actor.hf_mapping.common import padded_vocab_size, tp_shard, tp_unshard

    cfg = {
        "model_type": "qwen3",
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "hidden_size": 8,
        "head_dim": 3,
        "num_hidden_layers": 1,
        "vocab_size": 5,
        "tie_word_embeddings": False,
    }
    g = torch.Generator().manual_seed(0)
    shapes = {
        "model.embed_tokens.weight": (5, 8),
        "lm_head.weight": (5, 8),
        "model.norm.weight": (8,),
        "model.layers.0.input_layernorm.weight": (8,),
        "model.layers.0.post_attention_layernorm.weight": (8,),
        "model.layers.0.self_attn.q_proj.weight": (12, 8),
        "model.layers.0.self_attn.k_proj.weight": (6, 8),
        "model.layers.0.self_attn.v_proj.weight": (6, 8),
        "model.layers.0.self_attn.o_proj.weight": (8, 12),
        "model.layers.0.self_attn.q_norm.weight": (3,),
        "model.layers.0.self_attn.k_norm.weight": (3,),
        "model.layers.0.mlp.gate_proj.weight": (4, 8),
        "model.layers.0.mlp.up_proj.weight": (4, 8),
        "model.layers.0.mlp.down_proj.weight": (8, 4),
    }
    hf = {k: torch.randn(*s, generator=g) for k, s in shapes.items()}
    mapping = get_mapping("qwen3")
    for te in (False, True):
        mc = mapping.hf_to_megatron(hf, cfg, padded_vocab=padded_vocab_size(5, 2), te=te)
        assert mc["embedding.word_embeddings.weight"].shape[0] == 256
        # per-TP-rank pieces joined back give the full tensor (fc1 is [gate_r; up_r] per rank)
        fc1 = mc["decoder.layers.0.mlp.linear_fc1.weight"]
        pieces = [
            tp_shard(fc1, "decoder.layers.0.mlp.linear_fc1.weight", 0, r, 2, gated=True) for r in range(2)
        ]
        assert torch.equal(pieces[0][:2], hf["model.layers.0.mlp.gate_proj.weight"][:2])
        assert torch.equal(tp_unshard(pieces, "decoder.layers.0.mlp.linear_fc1.weight", 0, gated=True), fc1)
        back = mapping.megatron_to_hf(mc, cfg, te=te)
        assert back.keys() == hf.keys() and all(torch.equal(back[k], hf[k]) for k in hf)


def test_config_check_accepts_exactly_the_families_with_a_weight_mapping():
    from pipeline.actor.hf_mapping import SUPPORTED

    assert set(SUPPORTED) == {"llama", "mistral", "qwen2", "qwen3"}
    for arch in SUPPORTED:
        check_layout(ActorConfig(), {**QWEN, "model_type": arch}, world_size=1)
    with pytest.raises(ConfigError, match=r"model_type='gpt2' is not supported; supported: \['llama', "):
        check_layout(ActorConfig(), {**QWEN, "model_type": "gpt2"}, world_size=1)


@pytest.mark.parametrize(
    "change, match",
    [
        (
            {"rope_scaling": {"rope_type": "yarn", "factor": 4.0}},
            r"rope_scaling type 'yarn' is not supported",
        ),
        ({"hidden_act": "gelu"}, r"hidden_act='gelu'; supported: 'silu'"),
        ({"model_type": "llama", "attention_bias": True}, r"attention_bias=True with mlp_bias=False"),
    ],
)
def test_model_features_megatron_cannot_express_are_rejected_before_start(change, match):
    with pytest.raises(ConfigError, match=match):
        check_layout(ActorConfig(), {**QWEN, **change}, world_size=1)
