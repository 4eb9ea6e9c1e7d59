"""Qwen2 / Qwen2.5: q/k/v biases always, no output-projection or MLP bias."""

from pipeline.actor.hf_mapping.family import Family

FAMILY = Family("qwen2", qkv_bias=True, o_bias=False, mlp_bias=False)
