"""Position-coded weights through every family's mapping: each element holds its own source index,
so a wrong permutation, a swapped gate/up or a misplaced head changes values, not just statistics."""

from __future__ import annotations

import pytest
import torch

from pipeline.actor.hf_mapping import SUPPORTED, UnsupportedArchitecture, get_mapping
from pipeline.actor.hf_mapping.common import padded_vocab_size, tp_shard, tp_unshard
from pipeline.actor.hf_mapping.family import WeightsMismatch

CASES = [  # (model_type, heads, kv heads, head_dim or None, tied, extra config)
    ("llama", 4, 4, None, False, dict(attention_bias=True, mlp_bias=True)),
    ("llama", 4, 2, None, True, {}),
    ("mistral", 8, 2, None, False, {}),
    ("qwen2", 4, 2, None, True, {}),
    ("qwen2", 8, 2, None, False, {}),
    ("qwen3", 4, 2, 6, False, {}),
    ("qwen3", 8, 2, 6, True, {}),
]


def config(arch, heads, kv, head_dim, tied, extra):
    c = dict(
        model_type=arch,
        hidden_size=16,
        intermediate_size=12,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        num_hidden_layers=2,
        vocab_size=250,
        tie_word_embeddings=tied,
        **extra,
    )
    if head_dim:
        c["head_dim"] = head_dim
    return c


def position_coded(hf_config: dict) -> dict[str, torch.Tensor]:
    """Every HF tensor the config implies, element k of the whole model holding the value k."""
    mapping = get_mapping(hf_config["model_type"])
    out, start = {}, 0
    for rule in mapping.rules(hf_config):
        for name, shape in zip(rule.hf, rule.hf_shapes):
            if name not in out:
                n = torch.Size(shape).numel()
                out[name] = torch.arange(start, start + n, dtype=torch.float64).reshape(shape)
                start += n
    return out


def expected_qkv(q, k, v, heads, groups, d):
    """Megatron's fused QKV written out row by row: per group, its query heads, then K, then V."""
    rows, per = [], heads // groups
    for g in range(groups):
        rows += [q[(g * per + h) * d + i] for h in range(per) for i in range(d)]
        rows += [k[g * d + i] for i in range(d)] + [v[g * d + i] for i in range(d)]
    return torch.stack(rows)


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-h{c[1]}kv{c[2]}-hd{c[3]}-tied{c[4]}")
@pytest.mark.parametrize("te", [False, True], ids=["local", "te"])
def test_position_coded_weights_survive_every_mapping_and_tp_split(case, te):
    cfg = config(*case)
    arch, heads, kv, head_dim, tied, _ = case
    d = head_dim or cfg["hidden_size"] // heads
    hf = position_coded(cfg)
    assert ("lm_head.weight" in hf) != tied
    mapping = get_mapping(arch)
    for tp in (1, 2):
        padded = padded_vocab_size(250, tp)
        mc = mapping.hf_to_megatron(hf, cfg, padded_vocab=padded, te=te)
        # Layout, written independently of the implementation.
        for i in range(2):
            a, m = f"model.layers.{i}.self_attn.", f"decoder.layers.{i}."
            qkv = expected_qkv(
                hf[a + "q_proj.weight"], hf[a + "k_proj.weight"], hf[a + "v_proj.weight"], heads, kv, d
            )
            assert torch.equal(mc[m + "self_attention.linear_qkv.weight"], qkv)
            if a + "q_proj.bias" in hf:
                b = expected_qkv(
                    hf[a + "q_proj.bias"], hf[a + "k_proj.bias"], hf[a + "v_proj.bias"], heads, kv, d
                )
                assert torch.equal(mc[m + "self_attention.linear_qkv.bias"], b)
            fc1 = mc[m + "mlp.linear_fc1.weight"]
            gate, up = (
                hf[f"model.layers.{i}.mlp.gate_proj.weight"],
                hf[f"model.layers.{i}.mlp.up_proj.weight"],
            )
            for r in range(tp):  # each TP rank holds [its gate rows; its up rows]
                piece = tp_shard(fc1, m + "mlp.linear_fc1.weight", 0, r, tp, gated=True)
                assert torch.equal(piece, torch.cat([gate.chunk(tp)[r], up.chunk(tp)[r]]))
            norm = "self_attention.linear_qkv.layer_norm_weight" if te else "input_layernorm.weight"
            assert torch.equal(mc[m + norm], hf[f"model.layers.{i}.input_layernorm.weight"])
        emb = mc["embedding.word_embeddings.weight"]
        assert emb.shape[0] == padded and torch.equal(emb[:250], hf["model.embed_tokens.weight"])
        assert not emb[250:].any(), "padding rows are zero"
        head = hf["model.embed_tokens.weight" if tied else "lm_head.weight"]
        assert torch.equal(mc["output_layer.weight"][:250], head)
        # Through TP pieces and back: bit-exact, same names.
        joined = {}
        for name, full in mc.items():
            dim = 1 if name.endswith(("linear_proj.weight", "linear_fc2.weight")) else 0
            if name.endswith(("norm.weight", "layer_norm_weight", "linear_proj.bias", "linear_fc2.bias")):
                dim = None
            pieces = [tp_shard(full, name, dim, r, tp, gated=True) for r in range(tp)]
            joined[name] = tp_unshard(pieces, name, dim, gated=True)
        back = mapping.megatron_to_hf(joined, cfg, te=te)
        assert back.keys() == hf.keys()
        assert all(torch.equal(back[k], hf[k]) for k in hf), [
            k for k in hf if not torch.equal(back[k], hf[k])
        ]


def test_unknown_architecture_lists_the_supported_ones():
    with pytest.raises(UnsupportedArchitecture) as e:
        get_mapping("gpt_neox")
    assert "gpt_neox" in str(e.value) and all(a in str(e.value) for a in SUPPORTED)


def test_weights_that_disagree_with_the_config_name_the_tensor_and_both_shapes():
    cfg = config("qwen2", 4, 2, None, True, {})
    hf = position_coded(cfg)
    mapping = get_mapping("qwen2")
    bad = dict(hf, **{"model.layers.1.self_attn.k_proj.weight": torch.zeros(16, 16)})
    with pytest.raises(
        WeightsMismatch, match=r"model\.layers\.1\.self_attn\.k_proj\.weight.*\(8, 16\).*\(16, 16\)"
    ):
        mapping.hf_to_megatron(bad, cfg, padded_vocab=256)
    missing = {k: v for k, v in hf.items() if k != "model.layers.0.self_attn.q_proj.bias"}
    with pytest.raises(WeightsMismatch, match=r"missing 1 .*q_proj\.bias"):
        mapping.hf_to_megatron(missing, cfg, padded_vocab=256)
    # The classic silent failure: an untied config whose checkpoint has no lm_head.
    with pytest.raises(WeightsMismatch, match=r"missing 1 .*lm_head\.weight"):
        mapping.hf_to_megatron(hf, dict(cfg, tie_word_embeddings=False), padded_vocab=256)
    with pytest.raises(WeightsMismatch, match=r"unexpected .*mlp\.gate_proj\.bias"):
        mapping.hf_to_megatron(
            dict(hf, **{"model.layers.0.mlp.gate_proj.bias": torch.zeros(12)}), cfg, padded_vocab=256
        )
