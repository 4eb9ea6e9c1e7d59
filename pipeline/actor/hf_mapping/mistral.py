"""Mistral: the Llama layout without any bias (its config has no bias flags)."""

from pipeline.actor.hf_mapping.family import Family

FAMILY = Family("mistral", qkv_bias=False, o_bias=False, mlp_bias=False)
rules, hf_to_megatron, megatron_to_hf = FAMILY.rules, FAMILY.hf_to_megatron, FAMILY.megatron_to_hf
