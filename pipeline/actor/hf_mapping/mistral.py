"""Mistral: the Llama layout without any bias (its config has no bias flags)."""

from pipeline.actor.hf_mapping.family import Family

FAMILY = Family("mistral", qkv_bias=False, o_bias=False, mlp_bias=False)
