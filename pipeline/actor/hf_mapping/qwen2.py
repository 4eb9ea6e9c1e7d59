"""Qwen2 / Qwen2.5: q/k/v biases always, no output-projection or MLP bias."""

from pipeline.actor.hf_mapping.family import Family

FAMILY = Family("qwen2", qkv_bias=True, o_bias=False, mlp_bias=False)
rules, hf_to_megatron, megatron_to_hf = FAMILY.rules, FAMILY.hf_to_megatron, FAMILY.megatron_to_hf
