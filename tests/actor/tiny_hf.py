"""Tiny random Hugging Face models made locally (no hub access) for the actor's tests."""

from __future__ import annotations

import os
from pathlib import Path

import torch

BASE = dict(
    vocab_size=250,  # not a multiple of 128: exercises vocab padding (256 at TP1 and TP2)
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    rms_norm_eps=1e-5,
)

FAMILIES = {
    "qwen2": dict(rope_theta=1_000_000.0, tie_word_embeddings=True),
    "qwen3": dict(rope_theta=1_000_000.0, head_dim=24, tie_word_embeddings=False),
    "llama": dict(
        rope_theta=500_000.0,
        tie_word_embeddings=False,
        rope_scaling=dict(
            rope_type="llama3",
            factor=8.0,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            original_max_position_embeddings=32,
        ),
    ),
    "mistral": dict(rope_theta=10_000.0, tie_word_embeddings=False, sliding_window=None),
}


def make_tiny_hf(path: str | Path, model_type: str, seed: int = 0, **overrides) -> Path:
    """Save a random `model_type` model with perturbed norms and biases to `path`; returns `path`."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import transformers

    path = Path(path)
    config_cls = transformers.AutoConfig.for_model(model_type).__class__
    config = config_cls(**{**BASE, **FAMILIES[model_type], **overrides})
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(0.2 * torch.randn_like(p))  # a swapped norm shows up
            elif name.endswith("bias"):
                p.normal_(0.0, 0.1)
            else:
                p.normal_(0.0, 0.08)  # larger than 0.02 so the logits are far from uniform
    model.save_pretrained(path, safe_serialization=True)
    return path


def hf_token_logprobs(path, input_ids, attention_mask=None, position_ids=None, temperature=1.0):
    """log p(token t+1) and full-vocabulary entropy at every position, from transformers in float64."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float64)
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids).logits
    logp = torch.log_softmax(logits[:, :-1] / temperature, dim=-1)
    tok = logp.gather(-1, input_ids[:, 1:, None]).squeeze(-1)
    ent = -(logp.exp() * logp).sum(-1)
    return tok, ent
