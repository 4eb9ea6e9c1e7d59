"""Llama 2/3: biases only when config.json says `attention_bias` / `mlp_bias`."""

from pipeline.actor.hf_mapping.family import Family

FAMILY = Family("llama")
rules, hf_to_megatron, megatron_to_hf = FAMILY.rules, FAMILY.hf_to_megatron, FAMILY.megatron_to_hf
