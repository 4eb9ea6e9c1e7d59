"""Qwen3: per-head RMSNorm on q and k (`q_norm`/`k_norm`), explicit `head_dim`, no MLP bias."""

from pipeline.actor.hf_mapping.family import Family

FAMILY = Family("qwen3", mlp_bias=False, qk_norm=True)
