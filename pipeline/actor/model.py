"""Build a megatron-core `GPTModel` (one chunk per virtual pipeline stage) from a HF `config.json`.

Covers the Llama family as Hugging Face writes it: Llama 2/3 (RoPE scaling "linear"/"llama3"),
Mistral, Qwen2/Qwen2.5 (q/k/v biases) and Qwen3 (q/k RMSNorm, explicit `head_dim`): GQA, RMSNorm,
SwiGLU, tied or untied embeddings, the vocab padded to a multiple of 128 x TP. What differs between
families (biases, q/k norm, activation, ...) is read from the family's description in
`pipeline.actor.hf_mapping`, never decided here. The layer spec is chosen in `layer_spec` only.
Call after `parallel_state.initialize_model_parallel`.
"""

from __future__ import annotations

import math

import torch
from megatron.core import parallel_state as ps
from megatron.core.models.gpt import GPTModel, gpt_layer_specs
from megatron.core.transformer import TransformerConfig

from pipeline.actor.config import ActorConfig, check_model_features
from pipeline.actor.hf_mapping import get_mapping
from pipeline.actor.hf_mapping.common import padded_vocab_size
from pipeline.errors import ConfigError
from pipeline.hf_io import torch_dtype


def uses_transformer_engine(choice: str = "auto") -> bool:
    """Whether the Transformer Engine spec is used: `actor.layer_spec` "transformer_engine", or
    "auto" where CUDA is present and TE importable ("local": never)."""
    have = torch.cuda.is_available() and bool(getattr(gpt_layer_specs, "HAVE_TE", False))
    if choice == "transformer_engine" and not have:
        raise ConfigError(
            "actor.layer_spec=transformer_engine: needs CUDA and Transformer Engine importable here "
            "(tools/setup_gpu_env.sh); use auto or local"
        )
    return have if choice == "auto" else choice == "transformer_engine"


def layer_spec(hf_config: dict, choice: str = "auto"):
    """The one place that picks the transformer-layer spec (TE on CUDA when importable, else local)."""
    family = get_mapping(hf_config["model_type"])
    if uses_transformer_engine(choice):
        return gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec(qk_layernorm=family.qk_norm)
    return gpt_layer_specs.get_gpt_layer_local_spec(
        qk_layernorm=family.qk_norm, normalization=family.normalization
    )


def transformer_config(hf_config: dict, cfg: ActorConfig) -> TransformerConfig:
    """Megatron `TransformerConfig` for `hf_config` under `cfg`'s layout and dtype."""
    check_model_features(hf_config)
    heads = hf_config["num_attention_heads"]
    dtype = torch_dtype(cfg.dtype)
    return TransformerConfig(
        num_layers=hf_config["num_hidden_layers"],
        hidden_size=hf_config["hidden_size"],
        ffn_hidden_size=hf_config["intermediate_size"],
        num_attention_heads=heads,
        num_query_groups=hf_config.get("num_key_value_heads") or heads,
        kv_channels=hf_config.get("head_dim") or hf_config["hidden_size"] // heads,
        **get_mapping(hf_config["model_type"]).megatron_flags(hf_config),
        init_method_std=hf_config.get("initializer_range", 0.02),
        hidden_dropout=cfg.hidden_dropout,
        attention_dropout=cfg.attention_dropout,
        tensor_model_parallel_size=cfg.tp,
        pipeline_model_parallel_size=cfg.pp,
        virtual_pipeline_model_parallel_size=cfg.vpp if (cfg.vpp or 1) > 1 else None,
        sequence_parallel=cfg.sequence_parallel,
        **recompute_kwargs(cfg),
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        use_cpu_initialization=not torch.cuda.is_available(),
        perform_initialization=True,
        bias_activation_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        attention_softmax_in_fp32=True,
    )


def recompute_kwargs(cfg: ActorConfig) -> dict:
    """Activation recompute as megatron spells it: "selective" checkpoints `recompute_modules` of
    every layer (core attention by default), "full" whole layers (`recompute_method` uniform: chunks
    of `recompute_num_layers` layers keep only their input; block: the first n layers per stage)."""
    if cfg.recompute_granularity == "none":
        return {}
    if cfg.recompute_granularity == "selective":
        return {"recompute_granularity": "selective", "recompute_modules": list(cfg.recompute_modules)}
    return {
        "recompute_granularity": "full",
        "recompute_method": cfg.recompute_method,
        "recompute_num_layers": cfg.recompute_num_layers,
    }


def sequence_multiple(cfg: ActorConfig) -> int:
    """Sequences must be a multiple of this (sequence parallel splits them over the TP ranks)."""
    return cfg.tp if cfg.sequence_parallel else 1


def rope_inv_freq(hf_config: dict) -> torch.Tensor:
    """RoPE inverse frequencies exactly as transformers computes them ("default", "linear", "llama3")."""
    heads = hf_config["num_attention_heads"]
    dim = hf_config.get("head_dim") or hf_config["hidden_size"] // heads
    base = float(hf_config.get("rope_theta", 10000.0))
    inv = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    scaling = hf_config.get("rope_scaling") or {}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return inv
    if kind == "linear":
        return inv / scaling["factor"]
    if kind == "llama3":
        factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        old = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > old / low, inv / factor, inv)
        smooth = (old / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < old / high) * ~(wavelen > old / low)
        return torch.where(medium, smoothed, scaled)
    raise ConfigError(
        f"actor.model_path: rope_scaling type {kind!r} is not supported; supported: default, linear, llama3"
    )


def build_model(hf_config: dict, cfg: ActorConfig) -> list[GPTModel]:
    """This rank's model chunks (one per virtual stage), randomly initialised, not wrapped."""
    config = transformer_config(hf_config, cfg)
    inv_freq = rope_inv_freq(hf_config)
    vocab = padded_vocab_size(hf_config["vocab_size"], cfg.tp, cfg.make_vocab_size_divisible_by)
    tie = bool(hf_config.get("tie_word_embeddings", False))
    chunks = []
    vpp = cfg.vpp if (cfg.vpp or 1) > 1 else None
    for stage in range(vpp or 1):
        vp_stage = stage if vpp else None
        model = GPTModel(
            config,
            layer_spec(hf_config, cfg.layer_spec),
            vocab_size=vocab,
            max_sequence_length=hf_config.get("max_position_embeddings", 4096),
            pre_process=ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage),
            post_process=ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage),
            parallel_output=True,
            share_embeddings_and_output_weights=tie,
            position_embedding_type="rope",
            rotary_base=int(hf_config.get("rope_theta", 10000)),
            vp_stage=vp_stage,
        )
        if getattr(model, "rotary_pos_emb", None) is not None:
            model.rotary_pos_emb.inv_freq = inv_freq.clone()  # HF's scaling, whatever its parameters
        chunks.append(model)
    return chunks
