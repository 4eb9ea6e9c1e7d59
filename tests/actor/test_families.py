"""The family description (pipeline/actor/hf_mapping) decides every per-architecture Megatron flag.

The golden values were computed from the code before the flags moved into `Family` (when
actor/model.py and actor/config.py branched on model_type); the TransformerConfig built for each
family's tiny HF config must keep them.
"""

from __future__ import annotations

import pytest

from pipeline.actor.config import ActorConfig, check_model_features
from pipeline.actor.hf_mapping import MAPPINGS, SUPPORTED, get_mapping
from pipeline.errors import ConfigError
from tests.actor.tiny_hf import BASE, FAMILIES

CASES = {f: {**BASE, **FAMILIES[f], "model_type": f} for f in FAMILIES}
CASES["llama_bias"] = {**CASES["llama"], "attention_bias": True, "mlp_bias": True}
CASES["qwen2_attention_bias_false"] = {**CASES["qwen2"], "attention_bias": False}

SIZES = dict(num_layers=4, hidden_size=64, ffn_hidden_size=96, num_attention_heads=4, num_query_groups=2)
COMMON = dict(SIZES, normalization="RMSNorm", layernorm_epsilon=1e-5, gated_linear_unit=True)
COMMON.update(activation_func="silu", init_method_std=0.02)
# case -> (kv_channels, add_qkv_bias, add_bias_linear, qk_layernorm, the local spec's q_layernorm)
GOLDEN = {
    "qwen2": (16, True, False, False, "IdentityOp"),
    "qwen3": (24, False, False, True, "WrappedTorchNorm"),
    "llama": (16, False, False, False, "IdentityOp"),
    "mistral": (16, False, False, False, "IdentityOp"),
    "llama_bias": (16, True, True, False, "IdentityOp"),
    "qwen2_attention_bias_false": (16, True, False, False, "IdentityOp"),
}
LAYOUTS = [ActorConfig(), ActorConfig(dtype="bfloat16", tp=2, pp=2, vpp=2, sequence_parallel=True)]


@pytest.mark.parametrize("case", sorted(GOLDEN))
@pytest.mark.parametrize("cfg", LAYOUTS, ids=["default", "bf16_tp2_pp2_vpp2_sp"])
def test_transformer_config_per_family_is_unchanged(case, cfg):
    from pipeline.actor.model import layer_spec, transformer_config

    kv_channels, qkv_bias, linear_bias, qk_norm, q_norm_module = GOLDEN[case]
    tc = transformer_config(CASES[case], cfg)
    got = {k: getattr(tc, k) for k in COMMON}
    got["activation_func"] = tc.activation_func.__name__
    assert got == COMMON
    assert (tc.kv_channels, tc.add_qkv_bias, tc.add_bias_linear, tc.qk_layernorm) == (
        kv_channels,
        qkv_bias,
        linear_bias,
        qk_norm,
    )
    q_norm = layer_spec(CASES[case], "local").submodules.self_attention.submodules.q_layernorm
    assert q_norm.__name__ == q_norm_module


def test_every_family_module_is_registered_under_its_model_type():
    import importlib
    import pkgutil

    import pipeline.actor.hf_mapping as pkg

    modules = {m.name for m in pkgutil.iter_modules(pkg.__path__)} - {"common", "family"}
    for name in modules:
        family = importlib.import_module(f"{pkg.__name__}.{name}").FAMILY
        assert MAPPINGS[family.model_type] is family
    assert len(MAPPINGS) == len(modules) and tuple(sorted(MAPPINGS)) == SUPPORTED


@pytest.mark.parametrize("arch", SUPPORTED)
@pytest.mark.parametrize(
    "change, match",
    [
        ({"hidden_act": "gelu"}, r"^actor\.model_path: hidden_act='gelu'; supported: 'silu'$"),
        (
            {"rope_scaling": {"type": "dynamic", "factor": 2.0}},
            r"rope_scaling type 'dynamic' is not supported",
        ),
    ],
)
def test_features_no_family_supports_are_refused_for_every_family(arch, change, match):
    with pytest.raises(ConfigError, match=match):
        check_model_features({**CASES["llama"], "model_type": arch, **change})


def test_a_bias_megatron_cannot_express_is_refused_only_where_the_family_reads_the_flags():
    odd = {"attention_bias": True, "mlp_bias": False}
    with pytest.raises(ConfigError, match=r"attention_bias=True with mlp_bias=False is not expressible"):
        check_model_features({**CASES["llama"], **odd})
    check_model_features({**CASES["qwen2"], **odd})  # qwen2: q/k/v biases always, nothing else
    assert get_mapping("qwen2").biases({}) == (True, False, False)
    assert get_mapping("mistral").biases({"attention_bias": True, "mlp_bias": True}) == (False, False, False)
