"""Llama-family layout: Llama 2/3, Mistral, Qwen2/Qwen2.5 (q/k/v biases) and Qwen3 (q/k RMSNorm).

All four share Hugging Face's ``model.layers.{i}.self_attn.{q,k,v,o}_proj`` /
``mlp.{gate,up,down}_proj`` / ``{input,post_attention}_layernorm`` names; they differ only in which
optional tensors exist (biases, ``q_norm``/``k_norm``, ``lm_head`` when untied), which this module
reads from the state dict itself. Megatron names are global (layer index over the whole model).
"""

from __future__ import annotations

import torch

from pipeline.actor.hf_mapping.common import interleave_qkv, pad_vocab, split_qkv


def _dims(hf_config: dict):
    heads = hf_config["num_attention_heads"]
    groups = hf_config.get("num_key_value_heads") or heads
    head_dim = hf_config.get("head_dim") or hf_config["hidden_size"] // heads
    return heads, groups, head_dim


def _norm_names(te: bool) -> tuple[str, str]:
    """Megatron names of the two pre-norms: TE fuses them into the following linear layer."""
    if te:
        return "self_attention.linear_qkv.layer_norm_weight", "mlp.linear_fc1.layer_norm_weight"
    return "input_layernorm.weight", "pre_mlp_layernorm.weight"


def hf_to_megatron(hf: dict[str, torch.Tensor], hf_config: dict, *, padded_vocab: int, te: bool = False):
    """Full (unsharded) Megatron tensors, by global Megatron name, from a HF state dict."""
    heads, groups, head_dim = _dims(hf_config)
    attn_norm, mlp_norm = _norm_names(te)
    out = {"embedding.word_embeddings.weight": pad_vocab(hf["model.embed_tokens.weight"], padded_vocab)}
    for i in range(hf_config["num_hidden_layers"]):
        h, m = f"model.layers.{i}.", f"decoder.layers.{i}."
        sa = h + "self_attn."
        out[m + attn_norm] = hf[h + "input_layernorm.weight"]
        out[m + "self_attention.linear_qkv.weight"] = interleave_qkv(
            hf[sa + "q_proj.weight"], hf[sa + "k_proj.weight"], hf[sa + "v_proj.weight"], groups
        )
        if sa + "q_proj.bias" in hf:
            out[m + "self_attention.linear_qkv.bias"] = interleave_qkv(
                hf[sa + "q_proj.bias"], hf[sa + "k_proj.bias"], hf[sa + "v_proj.bias"], groups
            )
        if sa + "q_norm.weight" in hf:
            out[m + "self_attention.q_layernorm.weight"] = hf[sa + "q_norm.weight"]
            out[m + "self_attention.k_layernorm.weight"] = hf[sa + "k_norm.weight"]
        out[m + "self_attention.linear_proj.weight"] = hf[sa + "o_proj.weight"]
        if sa + "o_proj.bias" in hf:
            out[m + "self_attention.linear_proj.bias"] = hf[sa + "o_proj.bias"]
        out[m + mlp_norm] = hf[h + "post_attention_layernorm.weight"]
        for suffix in ("weight", "bias"):
            if f"{h}mlp.gate_proj.{suffix}" in hf:
                out[f"{m}mlp.linear_fc1.{suffix}"] = torch.cat(
                    [hf[f"{h}mlp.gate_proj.{suffix}"], hf[f"{h}mlp.up_proj.{suffix}"]], dim=0
                )
            if f"{h}mlp.down_proj.{suffix}" in hf:
                out[f"{m}mlp.linear_fc2.{suffix}"] = hf[f"{h}mlp.down_proj.{suffix}"]
    out["decoder.final_layernorm.weight"] = hf["model.norm.weight"]
    lm_head = hf.get("lm_head.weight", hf["model.embed_tokens.weight"])
    out["output_layer.weight"] = pad_vocab(lm_head, padded_vocab)  # tied: a copy of the embedding
    return out


def megatron_to_hf(mc: dict[str, torch.Tensor], hf_config: dict, *, te: bool = False):
    """Inverse of `hf_to_megatron`: full Megatron tensors -> HF state dict (vocab unpadded)."""
    heads, groups, head_dim = _dims(hf_config)
    vocab = hf_config["vocab_size"]
    attn_norm, mlp_norm = _norm_names(te)
    out = {"model.embed_tokens.weight": mc["embedding.word_embeddings.weight"][:vocab]}
    for i in range(hf_config["num_hidden_layers"]):
        h, m = f"model.layers.{i}.", f"decoder.layers.{i}."
        sa = h + "self_attn."
        out[h + "input_layernorm.weight"] = mc[m + attn_norm]
        q, k, v = split_qkv(mc[m + "self_attention.linear_qkv.weight"], heads, groups, head_dim)
        out[sa + "q_proj.weight"], out[sa + "k_proj.weight"], out[sa + "v_proj.weight"] = q, k, v
        if m + "self_attention.linear_qkv.bias" in mc:
            q, k, v = split_qkv(mc[m + "self_attention.linear_qkv.bias"], heads, groups, head_dim)
            out[sa + "q_proj.bias"], out[sa + "k_proj.bias"], out[sa + "v_proj.bias"] = q, k, v
        if m + "self_attention.q_layernorm.weight" in mc:
            out[sa + "q_norm.weight"] = mc[m + "self_attention.q_layernorm.weight"]
            out[sa + "k_norm.weight"] = mc[m + "self_attention.k_layernorm.weight"]
        out[sa + "o_proj.weight"] = mc[m + "self_attention.linear_proj.weight"]
        if m + "self_attention.linear_proj.bias" in mc:
            out[sa + "o_proj.bias"] = mc[m + "self_attention.linear_proj.bias"]
        out[h + "post_attention_layernorm.weight"] = mc[m + mlp_norm]
        for suffix in ("weight", "bias"):
            if f"{m}mlp.linear_fc1.{suffix}" in mc:
                gate, up = torch.chunk(mc[f"{m}mlp.linear_fc1.{suffix}"], 2, dim=0)
                out[f"{h}mlp.gate_proj.{suffix}"], out[f"{h}mlp.up_proj.{suffix}"] = gate, up
            if f"{m}mlp.linear_fc2.{suffix}" in mc:
                out[f"{h}mlp.down_proj.{suffix}"] = mc[f"{m}mlp.linear_fc2.{suffix}"]
    out["model.norm.weight"] = mc["decoder.final_layernorm.weight"]
    if not hf_config.get("tie_word_embeddings", False) and "output_layer.weight" in mc:
        out["lm_head.weight"] = mc["output_layer.weight"][:vocab]
    return {k: v.contiguous() for k, v in out.items()}
