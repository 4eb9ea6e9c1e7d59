"""Per-GPU memory of a job, estimated from the model's config.json and the recipe, before submitting.

An estimate to plan with (slime, verl and NeMo-RL have none; people find out by OOM), never a
measurement: it counts the big tensors and adds a fixed allowance per process. Formulas, per GPU,
bytes (p = parameters on the GPU, d = data-parallel size, t = actor TP, T = engine TP):

  actor    weights p x 2 (bf16; 4 in fp32); gradients p x 4 (DDP reduces in fp32); optimizer p x 12 / d
           with the distributed optimizer (fp32 master copy + Adam's two moments; 8 / d in fp32),
           p x 12 (8 in fp32) without it. p = the worst pipeline stage: its layers plus one
           vocabulary matrix (two at pp = 1 with untied embeddings), / t.
  activations per layer and token, in the compute dtype: 4h (two norms' inputs and outputs) +
           (2h + 2 g d_head + 3f) / t (q, k, v and attention output; the MLP's two-part input and its
           product), with sequence parallelism all of it / t (Korthikanti et al. 2022, counted for
           SwiGLU and GQA; fused attention stores no s x s scores). Full recompute keeps one input
           per recomputed chunk plus one chunk being recomputed; selective recompute of "mlp" drops
           the 3f / t term ("core_attn" saves nothing more under fused attention). The first
           pipeline stage holds min(pp, micro-batches) micro-batches in flight under 1F1B (x (1 +
           (pp - 1) / (pp vpp)) interleaved). Logits and their gradient: 2 x tokens x V / t.
  engines  SGLang reserves mem_fraction_static x GPU for weights (2 P / T) and the KV cache (the
           rest: 2 (K, V) x layers x max(g / T, 1) x d_head x 2 bytes per token).
  allowance 1.5 GiB per process (CUDA context, NCCL, allocator slack); SGLang's CUDA graphs and
           activations live in the (1 - mem_fraction_static) it leaves free.

Colocated phases share a GPU: rollout (engines' static + the actor's residue: nothing but its
allowance when `actor.offload`, else weights + gradients + optimizer), training (the actor + the
engines' allowance: their memory is released), sync (actor weights [+ gradients + optimizer] +
engine weights + two weight-sync buckets).
"""

from __future__ import annotations

from pipeline.actor.hf_mapping.family import Dims

GIB = 1024**3
PROCESS_GIB = 1.5  # CUDA context, NCCL buffers, allocator slack per process
FIT_FRACTION = 0.95  # a plan must leave 5 % of the GPU for fragmentation


def layer_params(d: Dims) -> int:
    """Parameters of one decoder layer: attention (with q/k/v biases), SwiGLU MLP, two norms."""
    attention = d.hidden * d.heads * d.head_dim * 2 + d.hidden * d.groups * d.head_dim * 2
    return attention + (d.heads + 2 * d.groups) * d.head_dim + 3 * d.hidden * d.ffn + 2 * d.hidden


def params(d: Dims) -> int:
    """Parameters of the whole model (one or two vocabulary matrices, the final norm)."""
    return d.layers * layer_params(d) + d.vocab * d.hidden * (1 if d.tied else 2) + d.hidden


def actor(cfg, shape: Dims, *, world_size: int, tokens_per_micro_batch: int, micro_batches: int) -> dict:
    """GiB per GPU of one Megatron rank on the worst pipeline stage while it trains."""
    t, pp, vpp = cfg.tp, cfg.pp, cfg.vpp or 1
    dp = world_size // (t * pp)
    wbytes = 4 if cfg.dtype == "float32" else 2
    layers = shape.layers // pp
    # Stage 0 holds the embedding, the last stage the output layer (both at pp = 1, unless tied).
    vocab_mats = 1 if pp > 1 or shape.tied else 2
    p = (layers * layer_params(shape) + vocab_mats * shape.vocab * shape.hidden) / t
    opt_bytes = (8 if cfg.dtype == "float32" else 12) / (dp if cfg.use_distributed_optimizer else 1)
    h, f = shape.hidden, shape.ffn
    kv = 2 * shape.groups * shape.head_dim
    shard = t if cfg.sequence_parallel else 1
    per_layer = 4 * h / shard + (2 * h + kv + 3 * f) / t  # elements per token
    if cfg.recompute_granularity == "selective" and "mlp" in cfg.recompute_modules:
        per_layer -= 3 * f / t
    tokens = tokens_per_micro_batch
    chunk_layers = layers // vpp
    if cfg.recompute_granularity == "full":
        n = cfg.recompute_num_layers
        if cfg.recompute_method == "uniform":
            kept = -(-chunk_layers // n) * vpp * h / shard + n * per_layer
        else:  # block: the first n layers of each chunk recomputed, the rest stored
            kept = vpp * (n * h / shard + (chunk_layers - n) * per_layer) + per_layer
    else:
        kept = layers * per_layer
    in_flight = min(pp, micro_batches) * (1 + (pp - 1) / (pp * vpp) if vpp > 1 else 1)
    activations = kept * tokens * wbytes * in_flight
    logits = 2 * tokens * shape.vocab / t * wbytes
    out = {
        "weights": p * wbytes / GIB,
        "grads": p * 4 / GIB,
        "optimizer": p * opt_bytes / GIB,
        "activations": activations / GIB,
        "logits": logits / GIB,
        "process": PROCESS_GIB,
    }
    out["total"] = sum(out.values())
    out["params_per_gpu"] = p
    return out


def engine(rcfg, shape: Dims, *, gpu_gib: float, sequence_tokens: int) -> dict:
    """GiB per GPU of one SGLang engine (its static reservation) and what its KV cache holds."""
    tp = rcfg.tp_size
    weights = params(shape) * 2 / tp / GIB  # bf16 serving
    static = rcfg.mem_fraction_static * gpu_gib
    kv_per_token = 2 * shape.layers * max(shape.groups // tp, 1) * shape.head_dim * 2
    kv = max(static - weights, 0.0)
    kv_tokens = int(kv * GIB / kv_per_token)
    return {
        "weights": weights,
        "kv_cache": kv,
        "static": static,
        "process": PROCESS_GIB,
        "total": static + PROCESS_GIB,
        "kv_tokens": kv_tokens,
        "sequences": kv_tokens // max(sequence_tokens, 1),
    }


def phases(actor_gib: dict, engine_gib: dict, *, colocate: bool, offload: bool, bucket_gib: float) -> dict:
    """Per-GPU GiB in each phase of a step, and the peak."""
    resident = actor_gib["weights"] + actor_gib["grads"] + actor_gib["optimizer"]
    if not colocate:
        out = {"training": actor_gib["total"], "rollout": engine_gib["total"]}
    else:
        out = {
            "rollout": engine_gib["total"] + (PROCESS_GIB if offload else resident + PROCESS_GIB),
            "training": actor_gib["total"] + PROCESS_GIB,
            "sync": (actor_gib["weights"] if offload else resident)
            + engine_gib["weights"]
            + 2 * bucket_gib
            + 2 * PROCESS_GIB,
        }
    out["peak"] = max(out.values())
    return out
