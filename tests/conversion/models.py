"""Tiny random HF models for the conversion tests: every family, tied and untied, GQA 1/2/4.

The vocab (250) is not a multiple of 128, so padding is added on import and trimmed on export.
"""

from __future__ import annotations

from pathlib import Path

from tests.actor.tiny_hf import make_tiny_hf

# name -> (model_type, overrides). GQA ratio 1: 4 heads, 4 KV; 2: 4 heads, 2 KV; 4: 8 heads, 2 KV
# (KV heads stay divisible by TP=2).
MODELS = {
    "llama_untied_gqa2": ("llama", dict()),
    "llama_tied_gqa1_bias": (
        "llama",
        dict(tie_word_embeddings=True, num_key_value_heads=4, attention_bias=True, mlp_bias=True),
    ),
    "qwen2_tied_gqa2": ("qwen2", dict()),
    "qwen2_untied_gqa4": (
        "qwen2",
        dict(tie_word_embeddings=False, num_attention_heads=8, num_key_value_heads=2),
    ),
    "qwen3_untied_gqa2_hd24": ("qwen3", dict()),
    "qwen3_tied_gqa4_hd24": (
        "qwen3",
        dict(tie_word_embeddings=True, num_attention_heads=8, num_key_value_heads=2),
    ),
    "mistral_untied_gqa4": ("mistral", dict(num_attention_heads=8, num_key_value_heads=2)),
}


def make_models(root: Path, names=None, **extra) -> dict[str, str]:
    out = {}
    for i, name in enumerate(names or MODELS):
        arch, overrides = MODELS[name]
        out[name] = str(
            make_tiny_hf(root / name, arch, seed=i, num_hidden_layers=2, **{**overrides, **extra})
        )
    return out
