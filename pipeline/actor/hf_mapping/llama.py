"""Llama 2/3: biases only when config.json says `attention_bias` / `mlp_bias`."""

from pipeline.actor.hf_mapping.family import Family

FAMILY = Family("llama")
