"""The Llama-style decoder shared by every family we support: its flags and its table of weight rules.

A family module (llama.py, mistral.py, qwen2.py, qwen3.py) declares only how it differs: which
biases exist and whether q/k are normalised. The `Family` is the one description of an architecture:
the actor builds megatron's `TransformerConfig` and layer spec from `megatron_flags(hf_config)` and
`qk_norm`, refuses what `unsupported(hf_config)` names, and `Family.rules(hf_config)` lists, in checkpoint order
(embedding, layer 0 .. L-1, final norm, output layer), one `Rule` per Megatron tensor: its global
Megatron name, the HF tensors it is made of with the shapes `config.json` implies, and the layout
transform between them. Import, export, the converters and live weight sync all walk this table, so a
tensor can be converted on its own (streaming) and a missing or misshapen one is named exactly.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pipeline.actor.hf_mapping.common import interleave_qkv, pad_vocab, split_qkv

# config.json's `hidden_act` -> the function megatron's gated MLP applies (SwiGLU: silu).
ACTIVATIONS = {"silu": F.silu}
# RoPE scalings whose frequencies pipeline.actor.model.rope_inv_freq computes as transformers does.
ROPE_SCALINGS = ("default", "linear", "llama3")


class WeightsMismatch(ValueError):
    """The HF weights disagree with `config.json` (a tensor missing, extra or of the wrong shape)."""


@dataclass(frozen=True)
class Rule:
    megatron: str  # global Megatron name, e.g. decoder.layers.3.self_attention.linear_qkv.weight
    hf: tuple[str, ...]  # the HF tensors it is built from, in transform order
    hf_shapes: tuple[tuple[int, ...] | None, ...]  # what config.json implies (None: not derivable)
    kind: str  # "copy" | "qkv" | "gate_up" | "vocab"
    export: bool = True  # False: a tied output layer, which HF does not store

    def to_megatron(self, tensors: list[torch.Tensor], dims: Dims, padded_vocab: int) -> torch.Tensor:
        if self.kind == "qkv":
            return interleave_qkv(*tensors, dims.groups)
        if self.kind == "gate_up":
            return torch.cat(tensors, dim=0)
        if self.kind == "vocab":
            return pad_vocab(tensors[0], padded_vocab)
        return tensors[0]

    def to_hf(self, full: torch.Tensor, dims: Dims) -> list[tuple[str, torch.Tensor]]:
        if self.kind == "qkv":
            parts = split_qkv(full, dims.heads, dims.groups, dims.head_dim)
        elif self.kind == "gate_up":
            parts = [p.contiguous() for p in torch.chunk(full, 2, dim=0)]
        elif self.kind == "vocab":
            parts = [full[: dims.vocab].contiguous()]
        else:
            parts = [full.contiguous()]
        return list(zip(self.hf, parts))


@dataclass(frozen=True)
class Dims:
    """Every dimension the layout needs, from config.json (head size from `head_dim` when given)."""

    hidden: int
    heads: int
    groups: int
    head_dim: int
    ffn: int | None
    vocab: int
    layers: int
    tied: bool

    @classmethod
    def of(cls, c: dict) -> Dims:
        heads = c["num_attention_heads"]
        return cls(
            hidden=c["hidden_size"],
            heads=heads,
            groups=c.get("num_key_value_heads") or heads,
            head_dim=c.get("head_dim") or c["hidden_size"] // heads,
            ffn=c.get("intermediate_size"),
            vocab=c["vocab_size"],
            layers=c["num_hidden_layers"],
            tied=bool(c.get("tie_word_embeddings", False)),
        )


@dataclass(frozen=True)
class Family:
    """One architecture family: which optional tensors exist (None = read the config's flag) and the
    model features megatron is built with. Pre-norm decoder with a gated MLP and RoPE throughout."""

    model_type: str
    qkv_bias: bool | None = None  # None: config["attention_bias"]
    o_bias: bool | None = None  # None: config["attention_bias"]
    mlp_bias: bool | None = None  # None: config["mlp_bias"]
    qk_norm: bool = False  # per-head norm of q and k (megatron's qk_layernorm)
    normalization: str = "RMSNorm"  # megatron's name; epsilon from config["rms_norm_eps"]
    rope_scalings: tuple[str, ...] = ROPE_SCALINGS  # config["rope_scaling"] types supported

    def _flag(self, value: bool | None, hf_config: dict, key: str) -> bool:
        return bool(hf_config.get(key, False)) if value is None else value

    def biases(self, hf_config: dict) -> tuple[bool, bool, bool]:
        """Whether (q/k/v, the output projection, the MLP) have biases in this `hf_config`."""
        return (
            self._flag(self.qkv_bias, hf_config, "attention_bias"),
            self._flag(self.o_bias, hf_config, "attention_bias"),
            self._flag(self.mlp_bias, hf_config, "mlp_bias"),
        )

    def unsupported(self, hf_config: dict) -> str | None:
        """What in `hf_config` megatron cannot express exactly (None: everything can)."""
        act = hf_config.get("hidden_act", "silu")
        if act not in ACTIVATIONS:  # megatron's gated MLP knows these
            return f"hidden_act={act!r}; supported: {', '.join(map(repr, ACTIVATIONS))}"
        scaling = hf_config.get("rope_scaling") or {}
        kind = scaling.get("rope_type", scaling.get("type", "default"))
        if kind not in self.rope_scalings:
            return f"rope_scaling type {kind!r} is not supported; supported: {list(self.rope_scalings)}"
        _, o_bias, mlp_bias = self.biases(hf_config)
        if o_bias != mlp_bias:
            return (
                f"attention_bias={o_bias} with mlp_bias={mlp_bias} is not expressible in "
                "megatron-core (add_bias_linear covers both); supported: both true or both false"
            )
        return None

    def megatron_flags(self, hf_config: dict) -> dict:
        """The `TransformerConfig` fields this family decides (the sizes come from `Dims`)."""
        qkv_bias, o_bias, _ = self.biases(hf_config)  # MLP bias == o_bias (`unsupported`)
        return dict(
            normalization=self.normalization,
            layernorm_epsilon=hf_config.get("rms_norm_eps", 1e-6),
            gated_linear_unit=True,
            activation_func=ACTIVATIONS[hf_config.get("hidden_act", "silu")],
            add_qkv_bias=qkv_bias,
            add_bias_linear=o_bias,
            qk_layernorm=self.qk_norm,
        )

    def rules(self, hf_config: dict, *, te: bool = False) -> list[Rule]:
        d = Dims.of(hf_config)
        h, q, kv, f = d.hidden, d.heads * d.head_dim, d.groups * d.head_dim, d.ffn
        qkv_bias, o_bias, mlp_bias = self.biases(hf_config)
        attn_norm, mlp_norm = (
            ("self_attention.linear_qkv.layer_norm_weight", "mlp.linear_fc1.layer_norm_weight")
            if te  # Transformer Engine fuses the pre-norms into the following linear layer
            else ("input_layernorm.weight", "pre_mlp_layernorm.weight")
        )
        out = [
            Rule("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), ((d.vocab, h),), "vocab")
        ]
        for i in range(d.layers):
            m, p = f"decoder.layers.{i}.", f"model.layers.{i}."
            a = p + "self_attn."
            out.append(Rule(m + attn_norm, (p + "input_layernorm.weight",), ((h,),), "copy"))
            qkv = (a + "q_proj", a + "k_proj", a + "v_proj")
            out.append(
                Rule(m + "self_attention.linear_qkv.weight", _w(qkv), ((q, h), (kv, h), (kv, h)), "qkv")
            )
            if qkv_bias:
                out.append(Rule(m + "self_attention.linear_qkv.bias", _b(qkv), ((q,), (kv,), (kv,)), "qkv"))
            if self.qk_norm:
                out.append(
                    Rule(
                        m + "self_attention.q_layernorm.weight",
                        (a + "q_norm.weight",),
                        ((d.head_dim,),),
                        "copy",
                    )
                )
                out.append(
                    Rule(
                        m + "self_attention.k_layernorm.weight",
                        (a + "k_norm.weight",),
                        ((d.head_dim,),),
                        "copy",
                    )
                )
            out.append(
                Rule(m + "self_attention.linear_proj.weight", (a + "o_proj.weight",), ((h, q),), "copy")
            )
            if o_bias:
                out.append(Rule(m + "self_attention.linear_proj.bias", (a + "o_proj.bias",), ((h,),), "copy"))
            out.append(Rule(m + mlp_norm, (p + "post_attention_layernorm.weight",), ((h,),), "copy"))
            gate_up = (p + "mlp.gate_proj", p + "mlp.up_proj")
            fc1_shape = (f, h) if f else None
            out.append(Rule(m + "mlp.linear_fc1.weight", _w(gate_up), (fc1_shape, fc1_shape), "gate_up"))
            if mlp_bias:
                out.append(
                    Rule(m + "mlp.linear_fc1.bias", _b(gate_up), ((f,) if f else None,) * 2, "gate_up")
                )
            fc2_shape = (h, f) if f else None
            out.append(Rule(m + "mlp.linear_fc2.weight", (p + "mlp.down_proj.weight",), (fc2_shape,), "copy"))
            if mlp_bias:
                out.append(Rule(m + "mlp.linear_fc2.bias", (p + "mlp.down_proj.bias",), ((h,),), "copy"))
        out.append(Rule("decoder.final_layernorm.weight", ("model.norm.weight",), ((h,),), "copy"))
        # Tied: Megatron keeps a copy of the embedding as the output layer on the last stage when
        # PP > 1 (and a model loader may ask for it); HF stores none, so it is never exported.
        head = "model.embed_tokens.weight" if d.tied else "lm_head.weight"
        out.append(Rule("output_layer.weight", (head,), ((d.vocab, h),), "vocab", export=not d.tied))
        return out

    # ------------------------------------------------------------------ whole-state conversions

    def hf_to_megatron(self, hf: Mapping, hf_config: dict, *, padded_vocab: int, te: bool = False):
        """Full (unsharded) Megatron tensors by global name from a HF state dict (or lazy Mapping)."""
        dims = Dims.of(hf_config)
        rules = self.rules(hf_config, te=te)
        check_hf_names(hf.keys(), rules, self.model_type)
        return {r.megatron: r.to_megatron(read_hf(hf, r), dims, padded_vocab) for r in rules}

    def megatron_to_hf(self, mc: Mapping, hf_config: dict, *, te: bool = False):
        """Inverse of `hf_to_megatron` over whichever Megatron tensors `mc` holds (vocab unpadded)."""
        dims = Dims.of(hf_config)
        return dict(self.iter_megatron_to_hf(mc, hf_config, dims=dims, te=te))

    def iter_megatron_to_hf(self, mc: Mapping, hf_config: dict, *, dims=None, te: bool = False) -> Iterator:
        dims = dims or Dims.of(hf_config)
        for r in self.rules(hf_config, te=te):
            if r.export and r.megatron in mc:
                yield from r.to_hf(mc[r.megatron], dims)


def _w(prefixes):
    return tuple(p + ".weight" for p in prefixes)


def _b(prefixes):
    return tuple(p + ".bias" for p in prefixes)


def read_hf(hf: Mapping, rule: Rule) -> list[torch.Tensor]:
    """The HF tensors of `rule`, each checked against the shape config.json implies."""
    tensors = []
    for name, shape in zip(rule.hf, rule.hf_shapes):
        t = hf[name]
        if shape is not None and tuple(t.shape) != tuple(shape):
            raise WeightsMismatch(
                f"{name}: config.json implies shape {tuple(shape)}, the weights have {tuple(t.shape)} "
                "(is config.json from the same model as the *.safetensors files?)"
            )
        tensors.append(t)
    return tensors


def check_hf_names(names, rules: list[Rule], model_type: str) -> None:
    """Every HF tensor the rules need is present and every present one is used (rotary buffers aside)."""
    names = set(names)
    needed = {n for r in rules for n in r.hf}
    missing = sorted(needed - names)
    # Rotary buffers are config, and some tied checkpoints also store the (identical) lm_head.
    ignorable = ("rotary_emb.inv_freq", "lm_head.weight")
    extra = sorted(n for n in names - needed if not n.endswith(ignorable))
    if missing or extra:
        msg = [f"the HF weights do not match config.json (model_type={model_type!r}):"]
        if missing:
            msg.append(f"missing {len(missing)} tensor(s), e.g. {missing[:5]}")
        if extra:
            msg.append(f"{len(extra)} unexpected tensor(s), e.g. {extra[:5]}")
        raise WeightsMismatch(" ".join(msg))
