"""`ActorConfig`: the Megatron actor's parallel layout, optimiser and schedule, with validation.

`ActorConfig.validate()` checks what the fields alone decide. `check_layout(cfg, hf_config,
world_size)` checks the layout against a model and a world size (heads and KV groups divisible by
TP, layers by PP x VPP, world size by TP x PP, a supported architecture); the actor calls it before
any process group exists, and every error names the field and values that would work.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pipeline.actor.hf_mapping import MAPPINGS, SUPPORTED
from pipeline.errors import ConfigError
from pipeline.hf_io import DTYPES

LR_DECAY_STYLES = ("constant", "linear", "cosine", "inverse-square-root", "WSD")
RECOMPUTE_GRANULARITIES = ("none", "selective", "full")
RECOMPUTE_METHODS = ("uniform", "block")


@dataclass(kw_only=True, slots=True)
class ActorConfig:
    model_path: str = ""  # HF directory (config.json, *.safetensors); "" = set by the caller
    tp: int = 1  # tensor-parallel size
    pp: int = 1  # pipeline-parallel size
    vpp: int | None = None  # virtual pipeline chunks per PP rank (None = not interleaved)
    max_tokens_per_micro_batch: int | None = None  # token budget of a packed micro-batch (null = fixed rows)
    micro_batch_size: int = 1  # samples per micro-batch when max_tokens_per_micro_batch is null
    dtype: str = "float32"  # parameter/compute dtype: float32, bfloat16 or float16
    lr: float = 1e-6  # peak learning rate
    min_lr: float = 0.0  # learning rate at the end of the decay
    lr_warmup_steps: int = 0  # optimizer steps of linear warm-up
    lr_decay_steps: int = 1_000_000  # optimizer steps over which the LR decays to min_lr
    lr_decay_style: str = "constant"  # constant, linear, cosine, inverse-square-root or WSD
    weight_decay: float = 0.0  # AdamW weight decay
    adam_beta1: float = 0.9  # AdamW beta1
    adam_beta2: float = 0.999  # AdamW beta2
    adam_eps: float = 1e-8  # AdamW epsilon
    clip_grad: float = 1.0  # global gradient-norm clip (0 = off)
    use_distributed_optimizer: bool = True  # shard optimizer state over data-parallel ranks
    make_vocab_size_divisible_by: int = 128  # vocab padded to a multiple of this x tp
    temperature: float = 1.0  # logits are divided by this before log-prob/entropy (= rollout's)
    seed: int = 1234  # model-parallel RNG seed (dropout; random init when no weights are loaded)
    attention_dropout: float = 0.0  # dropout on attention probabilities (RL: keep 0)
    hidden_dropout: float = 0.0  # dropout on residual branches (RL: keep 0)
    # --- scale switches: the same numbers, less memory or more overlap (docs/actor.md) ------------
    sequence_parallel: bool = False  # norms, dropout and residuals sharded over TP ranks (tp >= 2)
    recompute_granularity: str = "none"  # none | selective (recompute_modules) | full (whole layers)
    recompute_method: str = "uniform"  # full: "uniform" chunks of n layers, or "block": the first n
    recompute_num_layers: int = 1  # full: layers per recomputed chunk (uniform) / per stage (block)
    recompute_modules: list[str] = field(default_factory=lambda: ["core_attn"])  # selective: what
    overlap_grad_reduce: bool = False  # reduce gradient buckets during the backward pass
    overlap_param_gather: bool = False  # all-gather updated weights during the next forward
    offload: bool = False  # weights, grads, optimizer state to host while colocated engines generate
    layer_spec: str = "auto"  # "auto": Transformer Engine where CUDA has it, else "local"; or force one

    def validate(self) -> None:
        for name in ("tp", "pp", "micro_batch_size", "make_vocab_size_divisible_by"):
            if getattr(self, name) < 1:
                raise ConfigError(f"actor.{name}={getattr(self, name)}: must be >= 1")
        if self.max_tokens_per_micro_batch is not None and self.max_tokens_per_micro_batch < 2:
            raise ConfigError(
                f"actor.max_tokens_per_micro_batch={self.max_tokens_per_micro_batch}: must be >= 2 tokens "
                "(at least the longest prompt plus a response), or null for fixed rows of micro_batch_size"
            )
        if self.vpp is not None:
            if self.vpp < 1:
                raise ConfigError(f"actor.vpp={self.vpp}: use null (no interleaving) or an integer >= 1")
            if self.vpp > 1 and self.pp < 2:
                raise ConfigError(
                    f"actor.vpp={self.vpp} needs actor.pp >= 2 (got pp={self.pp}); set vpp=null or pp>=2"
                )
        if self.dtype not in DTYPES:
            raise ConfigError(f"actor.dtype={self.dtype!r}: expected one of {list(DTYPES)}")
        if self.lr_decay_style not in LR_DECAY_STYLES:
            raise ConfigError(
                f"actor.lr_decay_style={self.lr_decay_style!r}: expected one of {list(LR_DECAY_STYLES)}"
            )
        if not (0 <= self.min_lr <= self.lr):
            raise ConfigError(f"actor.min_lr={self.min_lr}: must be in [0, actor.lr={self.lr}]")
        if self.lr_warmup_steps < 0 or self.lr_decay_steps < 1:
            raise ConfigError(
                f"actor.lr_warmup_steps={self.lr_warmup_steps}, actor.lr_decay_steps="
                f"{self.lr_decay_steps}: need warmup >= 0 and decay >= 1"
            )
        if self.lr_decay_style != "constant" and self.lr_warmup_steps >= self.lr_decay_steps:
            raise ConfigError(
                f"actor.lr_warmup_steps={self.lr_warmup_steps} must be < actor.lr_decay_steps="
                f"{self.lr_decay_steps}"
            )
        if self.clip_grad < 0 or self.weight_decay < 0:
            raise ConfigError("actor.clip_grad and actor.weight_decay must be >= 0")
        if self.temperature <= 0:
            raise ConfigError(f"actor.temperature={self.temperature}: must be > 0")
        self._validate_scale_switches()
        if self.layer_spec not in ("auto", "local", "transformer_engine"):
            raise ConfigError(
                f"actor.layer_spec={self.layer_spec!r}: expected 'auto', 'local' or 'transformer_engine'"
            )

    def _validate_scale_switches(self) -> None:
        if self.sequence_parallel and self.tp < 2:
            raise ConfigError(
                f"actor.sequence_parallel=true needs actor.tp >= 2 (got tp={self.tp}): it shards "
                "activations over the tensor-parallel ranks; set sequence_parallel=false"
            )
        if self.recompute_granularity not in RECOMPUTE_GRANULARITIES:
            raise ConfigError(
                f"actor.recompute_granularity={self.recompute_granularity!r}: expected one of "
                f"{list(RECOMPUTE_GRANULARITIES)}"
            )
        if self.recompute_method not in RECOMPUTE_METHODS:
            raise ConfigError(
                f"actor.recompute_method={self.recompute_method!r}: expected one of {list(RECOMPUTE_METHODS)}"
            )
        if self.recompute_num_layers < 1:
            raise ConfigError(f"actor.recompute_num_layers={self.recompute_num_layers}: must be >= 1")
        modules = ("core_attn", "mlp")  # megatron's "layernorm" recompute needs Transformer Engine
        if self.recompute_granularity == "selective" and (
            not self.recompute_modules or set(self.recompute_modules) - set(modules)
        ):
            raise ConfigError(
                f"actor.recompute_modules={self.recompute_modules}: a non-empty subset of {list(modules)} "
                "(megatron-core 0.16.1 recomputes norms only with Transformer Engine, where they are fused "
                "into the next linear layer anyway)"
            )
        if self.overlap_param_gather and not (self.use_distributed_optimizer and self.overlap_grad_reduce):
            raise ConfigError(
                "actor.overlap_param_gather=true needs actor.use_distributed_optimizer=true and "
                "actor.overlap_grad_reduce=true (the gather overlaps the next forward of the sharded "
                "optimizer's update); set overlap_param_gather=false or enable both"
            )

    @property
    def virtual_stages(self) -> int:
        return self.vpp or 1


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def check_model_features(hf_config: dict) -> None:
    """Raise ConfigError for an architecture, or a config.json feature of it, that the Megatron model
    cannot express exactly (the family description in pipeline/actor/hf_mapping decides)."""
    arch = hf_config.get("model_type")
    if arch not in MAPPINGS:
        raise ConfigError(
            f"actor.model_path: model_type={arch!r} is not supported; supported: "
            f"{list(SUPPORTED)} (add a mapping in pipeline/actor/hf_mapping)"
        )
    problem = MAPPINGS[arch].unsupported(hf_config)
    if problem:
        raise ConfigError(f"actor.model_path: {problem}")


def check_layout(cfg: ActorConfig, hf_config: dict, world_size: int) -> None:
    """Raise ConfigError if `cfg`'s layout cannot run `hf_config` on `world_size` processes."""
    cfg.validate()
    check_model_features(hf_config)
    heads = hf_config["num_attention_heads"]
    kv = hf_config.get("num_key_value_heads") or heads
    layers = hf_config["num_hidden_layers"]
    if heads % cfg.tp or kv % cfg.tp:
        ok = [d for d in _divisors(kv) if heads % d == 0]
        raise ConfigError(
            f"actor.tp={cfg.tp}: num_attention_heads={heads} and num_key_value_heads={kv} must both "
            f"be divisible by tp; tp in {ok} would work"
        )
    stages = cfg.pp * cfg.virtual_stages
    if layers % stages:
        ok = []
        for p in (p for p in _divisors(layers) if world_size % (cfg.tp * p) == 0):
            vpps = [v for v in _divisors(layers // p) if v > 1] if p > 1 else []
            ok.append(f"pp={p}" + (f" (vpp null or in {vpps})" if vpps else ""))
        raise ConfigError(
            f"actor.pp={cfg.pp} x actor.vpp={cfg.vpp}: num_hidden_layers={layers} must be divisible by "
            f"pp x vpp = {stages}; with tp={cfg.tp} on {world_size} ranks these work: "
            f"{', '.join(ok) or 'none (change trainer.world_size)'}"
        )
    per_chunk = layers // stages
    if cfg.recompute_granularity == "full" and cfg.recompute_num_layers > per_chunk:
        raise ConfigError(
            f"actor.recompute_num_layers={cfg.recompute_num_layers}: at most the {per_chunk} layers of one "
            f"model chunk (num_hidden_layers={layers} / pp x vpp = {stages})"
        )
    if world_size % (cfg.tp * cfg.pp):
        ok = [(t, p) for t in _divisors(world_size) for p in _divisors(world_size // t)]
        ok = [f"tp={t},pp={p}" for t, p in ok if heads % t == 0 and kv % t == 0 and layers % p == 0]
        raise ConfigError(
            f"actor.tp={cfg.tp} x actor.pp={cfg.pp} = {cfg.tp * cfg.pp} does not divide the world size "
            f"{world_size}; layouts that would work: {ok}"
        )
