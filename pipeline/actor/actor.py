"""The Megatron-core actor: forward log-probs/entropies, the RL training step, checkpoints.

One RL mini-batch on this data-parallel rank is a dict of tensors (verl's layout):

    input_ids       [B, S] int64   prompt (may be left-padded) followed by the response (right-padded)
    attention_mask  [B, S]         1 for real tokens (optional: all ones)
    position_ids    [B, S]         optional: cumsum(attention_mask) - 1
    response_mask   [B, R]         1 for response tokens that count (the last R columns of input_ids)
    old_log_prob, advantages [, ref_log_prob, sample_ids]   [B, R] (training only)

Position t's logits predict token t+1, so the log-probs of the response tokens ``input_ids[:, S-R:]``
come from logits ``[:, S-R-1 : S-1]``. The loss function receives this rank's vocab shard of the
logits and calls `pipeline.ops.vocab_parallel_logprob_entropy` (no gather of the vocab, no fp32 copy
of the shard) and then the loss library, scaled so that the schedule's division by the number of
micro-batches and DDP's averaging over data-parallel ranks are undone: the gradient is that of
Σ_micro-batches Σ_DP apply_loss, which the loss library defines as the global mini-batch loss.
"""

from __future__ import annotations

import contextlib
import functools
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, tensor_parallel
from megatron.core import parallel_state as ps
from megatron.core.dist_checkpointing.mapping import ShardedObject
from megatron.core.distributed import (
    DistributedDataParallel,
    DistributedDataParallelConfig,
    finalize_model_grads,
)
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.transformer.module import Float16Module

from pipeline.actor.config import ActorConfig, check_layout
from pipeline.actor.model import DTYPES, build_model, sequence_multiple
from pipeline.actor.offload import HostOffload
from pipeline.actor.weights import load_hf_weights, unwrap
from pipeline.ops import vocab_parallel_logprob_entropy


def initialize_parallel(cfg: ActorConfig, hf_config: dict) -> None:
    """Check the layout, then create megatron's TP/PP/DP groups and seed its RNG tracker.

    `torch.distributed` must be initialised; call `check_layout` yourself *before* that to fail
    without starting processes.
    """
    check_layout(cfg, hf_config, dist.get_world_size())
    vpp = cfg.vpp if (cfg.vpp or 1) > 1 else None
    ps.initialize_model_parallel(
        tensor_model_parallel_size=cfg.tp,
        pipeline_model_parallel_size=cfg.pp,
        virtual_pipeline_model_parallel_size=vpp,
    )
    tensor_parallel.model_parallel_cuda_manual_seed(cfg.seed)


def _position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    return (attention_mask.long().cumsum(-1) - 1).clamp_(min=0)


def _attention_mask(attention_mask: torch.Tensor | None) -> torch.Tensor | None:
    """[B, 1, S, S] bool, True = masked (causal + padding keys); None when there is no padding."""
    if attention_mask is None or bool(attention_mask.all()):
        return None  # megatron's default causal mask
    s = attention_mask.shape[1]
    causal = torch.ones(s, s, dtype=torch.bool).tril_()
    keep = causal[None] & attention_mask.bool()[:, None, :]
    return ~keep[:, None]


class MegatronActor:
    """This rank's model chunks, optimizer and LR schedule, and the verbs of the RL loop."""

    def __init__(self, cfg: ActorConfig, hf_config: dict, *, hf_dir: str | Path | None = None):
        self.cfg = cfg
        self.hf_config = hf_config
        chunks = build_model(hf_config, cfg)
        if hf_dir is not None:
            load_hf_weights(chunks, hf_dir, hf_config)
        self.config = chunks[0].config
        dtype = DTYPES[cfg.dtype]
        if dtype != torch.float32:
            chunks = [Float16Module(self.config, c) for c in chunks]
        ddp_config = DistributedDataParallelConfig(
            grad_reduce_in_fp32=True,
            overlap_grad_reduce=cfg.overlap_grad_reduce,
            overlap_param_gather=cfg.overlap_param_gather,
            use_distributed_optimizer=cfg.use_distributed_optimizer,
        )
        self.chunks = [
            DistributedDataParallel(self.config, ddp_config, module=c, disable_bucketing=i > 0)
            for i, c in enumerate(chunks)
        ]
        self.optimizer = get_megatron_optimizer(
            OptimizerConfig(
                optimizer="adam",
                lr=cfg.lr,
                min_lr=cfg.min_lr,
                weight_decay=cfg.weight_decay,
                adam_beta1=cfg.adam_beta1,
                adam_beta2=cfg.adam_beta2,
                adam_eps=cfg.adam_eps,
                clip_grad=cfg.clip_grad,
                bf16=dtype == torch.bfloat16,
                fp16=dtype == torch.float16,
                params_dtype=dtype,
                use_distributed_optimizer=cfg.use_distributed_optimizer,
            ),
            self.chunks,
        )
        self.scheduler = OptimizerParamScheduler(
            self.optimizer,
            init_lr=0.0 if cfg.lr_warmup_steps else cfg.lr,
            max_lr=cfg.lr,
            min_lr=cfg.min_lr,
            lr_warmup_steps=cfg.lr_warmup_steps,
            lr_decay_steps=cfg.lr_decay_steps,
            lr_decay_style=cfg.lr_decay_style,
            start_wd=cfg.weight_decay,
            end_wd=cfg.weight_decay,
            wd_incr_steps=cfg.lr_decay_steps,
            wd_incr_style="constant",
            wsd_decay_steps=cfg.lr_decay_steps - cfg.lr_warmup_steps if cfg.lr_decay_style == "WSD" else None,
            lr_wsd_decay_style="linear" if cfg.lr_decay_style == "WSD" else None,
        )
        self.config.finalize_model_grads_func = finalize_model_grads
        self.config.grad_scale_func = self.optimizer.scale_loss
        no_sync = [c.no_sync for c in self.chunks]
        self.config.no_sync_func = no_sync[0] if len(no_sync) == 1 else no_sync
        self.step_count = 0
        self._reference: list[torch.Tensor] | None = None  # host copy of the frozen reference policy
        self._offload = HostOffload(self)  # actor.offload: the rank's memory to host and back

    # ------------------------------------------------------------------ memory (colocated engines)

    def sync_params(self) -> None:
        """Finish the distributed optimizer's all-gather of the updated weights now.

        With `overlap_param_gather` the gather after an optimizer step is deferred to the next
        forward (megatron's forward pre-hooks); whatever reads the weights without a forward
        (export, checkpoints, offload, the reference swap) calls this first, or it reads other ranks'
        shards of the previous step.
        """
        for c in self.chunks:
            if getattr(c, "use_forward_hook", False):
                c.start_param_sync(force_sync=True)

    def offload(self, parts: tuple[str, ...] = ("weights", "grads", "optimizer")) -> dict:
        """Move `parts` of this rank's state to host memory and free their device storage.

        For colocated engines (`actor.offload`): the GPU holds the engines' weights and KV cache
        while they generate, and the actor's state again before it trains (`onload`). Returns the
        bytes moved per part. On CPU the "device" is host memory too: the storage is still freed
        and refilled, which is what the tests check.
        """
        self.sync_params()
        return self._offload.offload(parts)

    def onload(self, parts: tuple[str, ...] | None = None) -> dict:
        """Bring the offloaded `parts` (all: None) back, bit for bit, before the actor computes."""
        return self._offload.onload(parts)

    @property
    def offloaded(self) -> tuple[str, ...]:
        return self._offload.offloaded

    @contextlib.contextmanager
    def resident(self, needs: tuple[str, ...] = ("weights", "grads", "optimizer")):
        """`needs` on the device for the duration (onloaded, and offloaded again if they were out).

        For work between the phases (an evaluation's entropy forward, a checkpoint, the weight
        export while the actor is offloaded): correct at the price of one round trip.
        """
        parts = tuple(p for p in self.offloaded if p in needs)
        if parts:
            self.onload(parts)
        try:
            yield
        finally:
            if parts:
                self.offload(parts)

    # ------------------------------------------------------------------ reference policy

    def _params(self) -> list[torch.nn.Parameter]:
        return [p for c in self.chunks for p in unwrap(c).parameters()]

    @torch.no_grad()
    def snapshot_reference(self) -> None:
        """Keep a host copy of the current weights as the frozen reference policy (KL terms).

        Like slime's weight backup: one extra copy of this rank's shard in host memory instead of a
        second model on the device; `compute_log_prob(..., weights="reference")` swaps it in.
        """
        self.sync_params()
        self._reference = [p.detach().to("cpu", copy=True) for p in self._params()]

    @contextlib.contextmanager
    def _reference_weights(self):
        if self._reference is None:
            raise RuntimeError(
                "no reference policy: call snapshot_reference() first (on the initial weights)"
            )
        self.sync_params()
        params = self._params()
        current = [p.detach().to("cpu", copy=True) for p in params]
        with torch.no_grad():
            for p, r in zip(params, self._reference, strict=True):
                p.copy_(r)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, c in zip(params, current, strict=True):
                    p.copy_(c)

    # ------------------------------------------------------------------ micro-batches and the schedule

    @property
    def is_last_stage(self) -> bool:
        return ps.is_pipeline_last_stage(ignore_virtual=True)

    def _micro_batches(self, batch: dict) -> list[dict]:
        ids = batch["input_ids"]
        b, mbs = ids.shape[0], self.cfg.micro_batch_size
        r = batch["response_mask"].shape[-1]
        if ids.dim() != 2 or batch["response_mask"].shape[0] != b or not 0 < r < ids.shape[1]:
            raise ValueError(
                f"input_ids {tuple(ids.shape)} and response_mask {tuple(batch['response_mask'].shape)}: "
                "expected [B, S] and [B, R] with 0 < R < S (the response is the last R tokens)"
            )
        if b % mbs:
            raise ValueError(f"mini-batch of {b} rows is not a multiple of actor.micro_batch_size={mbs}")
        mask = batch.get("attention_mask")
        pos = batch.get("position_ids")
        if pos is None:
            pos = _position_ids(mask) if mask is not None else torch.arange(ids.shape[1]).expand_as(ids)
        out = []
        for start in range(0, b, mbs):
            rows = slice(start, start + mbs)
            mb = {k: v[rows] for k, v in batch.items() if isinstance(v, torch.Tensor) and v.shape[:1] == (b,)}
            mb["position_ids"] = pos[rows].contiguous()
            mb["attn"] = _attention_mask(mask[rows] if mask is not None else None)
            mb["index"] = torch.arange(start, start + mbs)
            out.append(mb)
        return out

    def _run_schedule(self, micro_batches: list[dict], loss_fn, *, forward_only: bool):
        """Run `micro_batches` through the pipeline schedule; returns the last stage's loss outputs."""
        fwd_kwargs = {} if DTYPES[self.cfg.dtype] == torch.float32 else {"fp32_output": False}
        multiple = sequence_multiple(self.cfg)

        def forward_step(data_iterator, model):
            mb = next(data_iterator)
            s = mb["input_ids"].shape[1]
            logits = model(*_pad_sequence(mb, multiple), **fwd_kwargs)[:, :s]
            return logits, functools.partial(loss_fn, mb)

        seq = -(-micro_batches[0]["input_ids"].shape[1] // multiple) * multiple
        return get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=[iter(micro_batches) for _ in self.chunks],
            model=self.chunks,
            num_microbatches=len(micro_batches),
            seq_length=seq,
            micro_batch_size=self.cfg.micro_batch_size,
            forward_only=forward_only,
        )

    def _token_stats(self, mb: dict, logits: torch.Tensor, *, entropy: bool = True, influence: bool = False):
        """Log-prob and entropy of the response tokens from this rank's logits shard [b, S, V/tp]."""
        s = mb["input_ids"].shape[1]
        r = mb["response_mask"].shape[1]
        return vocab_parallel_logprob_entropy(
            logits[:, s - r - 1 : s - 1],
            mb["input_ids"][:, s - r :],
            tp_group=ps.get_tensor_model_parallel_group(),
            temperature=self.cfg.temperature,
            valid_vocab_size=self.hf_config["vocab_size"],
            entropy=entropy,
            influence=influence,
        )

    # ------------------------------------------------------------------ verbs

    @torch.no_grad()
    def compute_log_prob(
        self,
        batch: dict,
        *,
        entropy: bool = True,
        influence: bool = False,
        broadcast: bool = True,
        weights: str = "current",
    ) -> dict:
        """Per-token log-probs (and entropies) of the response tokens, no graph: {"log_prob": [B, R], ...}.

        Computed on the last pipeline stage; with `broadcast` every rank of the pipeline gets them.
        `influence` adds the op's first-order entropy influence of each sampled token (telemetry).
        `weights="reference"` uses the frozen reference policy (`snapshot_reference`).
        """
        if weights == "reference":
            with self._reference_weights():
                return self.compute_log_prob(batch, entropy=entropy, influence=influence, broadcast=broadcast)
        if weights != "current":
            raise ValueError(f"weights={weights!r}: expected 'current' or 'reference'")
        for c in self.chunks:
            c.eval()

        def loss_fn(mb, logits):
            out = self._token_stats(mb, logits, entropy=entropy, influence=influence)
            stats = {"log_prob": out.logprob}
            if entropy:
                stats["entropy"] = out.entropy
            if influence:
                stats["influence"] = out.influence
            return logits.new_zeros((), dtype=torch.float32), stats

        try:
            outputs = self._run_schedule(self._micro_batches(batch), loss_fn, forward_only=True)
        finally:
            for c in self.chunks:
                c.train()
        result = {k: torch.cat([o[k] for o in outputs]) for k in outputs[0]} if self.is_last_stage else None
        if broadcast and ps.get_pipeline_model_parallel_world_size() > 1:
            holder = [result]
            dist.broadcast_object_list(
                holder,
                src=ps.get_pipeline_model_parallel_last_rank(),
                group=ps.get_pipeline_model_parallel_group(),
            )
            result = holder[0]
        return result

    def train_step(self, batch: dict, loss_cfg, *, step: int | None = None, inject_nan: bool = False) -> dict:
        """One optimizer step on this rank's mini-batch with the loss library's `loss_cfg`.

        Returns metrics (the same on every rank): `loss` (the global mini-batch loss before the
        step), `grad_norm` (before clipping), `lr` (used by this step; megatron's warm-up starts
        at `init_lr` = 0, so the first warm-up step does not move the parameters), and the loss
        library's metrics.

        A non-finite current log-prob/entropy, loss or gradient on any rank skips the step on every
        rank (no parameter, optimizer or LR-schedule change) and returns `update_successful=False`
        with `nonfinite=1`; megatron's optimizers check for inf/NaN only under fp16 loss scaling.
        `inject_nan` multiplies the loss by NaN (fault injection, to test that path end to end).
        """
        from pipeline.algorithms import apply_loss, prepare_loss

        step = self.step_count if step is None else step
        micro_batches = self._micro_batches(batch)
        n_mb, dp = len(micro_batches), ps.get_data_parallel_world_size()
        plan = None
        current = None
        if self.is_last_stage:
            # The current policy over the whole mini-batch: parameters do not change within it,
            # so these equal the training forward's values; the loss library's global statistics
            # (normalisers, covariance centring, quantiles) are computed from them over DP.
            current = self.compute_log_prob(batch, entropy=True, broadcast=False)
        else:
            self.compute_log_prob(batch, entropy=True, broadcast=False)
        mask = batch["response_mask"].bool()
        if _any_rank(current is not None and not _finite(current["log_prob"], current["entropy"], mask=mask)):
            return self._skipped_step()
        if self.is_last_stage:
            plan = prepare_loss(
                loss_cfg,
                current["log_prob"],
                batch["old_log_prob"],
                batch["advantages"],
                batch["response_mask"],
                entropy=current["entropy"],
                ref_log_prob=batch.get("ref_log_prob"),
                sample_ids=batch.get("sample_ids"),
                step=step,
                dp_group=ps.get_data_parallel_group(),
            )

        def loss_fn(mb, logits):
            out = self._token_stats(mb, logits, entropy=True)
            loss, metrics = apply_loss(
                loss_cfg,
                plan.rows(mb["index"]),
                out.logprob,
                mb["old_log_prob"],
                mb["advantages"],
                mb["response_mask"],
                entropy=out.entropy,
                ref_log_prob=mb.get("ref_log_prob"),
            )
            if inject_nan:
                loss = loss * float("nan")
            # The schedule divides by n_mb and DDP averages over dp: multiply both back so the
            # gradient is that of the sum of apply_loss over micro-batches and DP ranks.
            return loss * (n_mb * dp), {"loss": loss.detach(), **metrics}

        for c in self.chunks:
            c.zero_grad_buffer()
        self.optimizer.zero_grad()
        outputs = self._run_schedule(micro_batches, loss_fn, forward_only=False)
        bad_loss = self.is_last_stage and not _finite(*(o["loss"] for o in outputs))
        if _any_rank(bad_loss or not self._grads_finite()):
            for c in self.chunks:
                c.zero_grad_buffer()
            self.optimizer.zero_grad()
            return self._skipped_step()
        lr = float(self.optimizer.param_groups[0]["lr"])  # the rate this step uses
        ok, grad_norm, _ = self.optimizer.step()
        self.scheduler.step(increment=1)
        self.step_count += 1
        metrics = None
        if self.is_last_stage:
            # apply_loss's metrics are additive parts (`*_sum`): sum them over micro-batches and
            # DP ranks; plan.metrics are already global.
            keys = [k for k in outputs[0] if k == "loss" or k.endswith("_sum")]
            sums = torch.tensor([[_as_float(o[k]) for k in keys] for o in outputs], dtype=torch.float64).sum(
                0
            )
            dist.all_reduce(sums, group=ps.get_data_parallel_group())
            metrics = {**_floats(plan.metrics or {}), **dict(zip(keys, sums.tolist(), strict=True))}
            metrics["update_successful"] = bool(ok)
        holder = [metrics]
        if ps.get_pipeline_model_parallel_world_size() > 1:
            dist.broadcast_object_list(
                holder,
                src=ps.get_pipeline_model_parallel_last_rank(),
                group=ps.get_pipeline_model_parallel_group(),
            )
        metrics = holder[0]
        metrics["grad_norm"] = float(grad_norm) if grad_norm is not None else float("nan")
        metrics["lr"] = lr
        metrics["nonfinite"] = 0
        return metrics

    def _grads_finite(self) -> bool:
        """Whether this rank's reduced gradients (the DDP buffers the optimizer reads) are finite."""
        for c in self.chunks:
            for buf in [*c.buffers, *c.expert_parallel_buffers]:
                if not bool(torch.isfinite(buf.grad_data).all()):
                    return False
        return True

    def _skipped_step(self) -> dict:
        """Metrics of a step skipped for a non-finite value (the same on every rank)."""
        return {
            "loss": float("nan"),
            "update_successful": False,
            "nonfinite": 1,
            "grad_norm": float("nan"),
            "lr": float(self.optimizer.param_groups[0]["lr"]),
        }

    # ------------------------------------------------------------------ checkpoints

    def _layout(self) -> dict:
        return {
            "tp": ps.get_tensor_model_parallel_world_size(),
            "pp": ps.get_pipeline_model_parallel_world_size(),
            "dp": ps.get_data_parallel_world_size(),
            "vpp": len(self.chunks),
        }

    def _sharded_state_dict(self, *, is_loading: bool, with_rng: bool) -> dict:
        state = {}
        for i, c in enumerate(self.chunks):
            state[f"model{i}" if len(self.chunks) > 1 else "model"] = unwrap(c).sharded_state_dict()
        # The optimizer finds each parameter's ShardedTensor in the (nested) model state dicts.
        # "fully_reshardable": optimizer state in model space, so a checkpoint loads at another
        # TP/PP/DP layout (0.16.1 rejects the older "fully_sharded_model_space" format).
        state["optimizer"] = self.optimizer.sharded_state_dict(
            dict(state), is_loading=is_loading, metadata=_CKPT_METADATA
        )
        if with_rng:
            layout = self._layout()
            rank = (
                ps.get_pipeline_model_parallel_rank(),
                ps.get_tensor_model_parallel_rank(),
                ps.get_data_parallel_rank(),
            )
            state["rng_state"] = ShardedObject(
                "rng_state",
                _rng_state(),
                (layout["pp"], layout["tp"], layout["dp"]),
                rank,
                replica_id=0,
            )
        return state

    def save_checkpoint(self, path: str | Path, extra: dict | None = None) -> None:
        """Save model, optimizer, LR schedule, RNG and `extra` (e.g. controller states) to `path`."""
        path = Path(path)
        self.sync_params()
        if dist.get_rank() == 0:
            path.mkdir(parents=True, exist_ok=True)
        dist.barrier()
        state = self._sharded_state_dict(is_loading=False, with_rng=True)
        state["scheduler"] = self.scheduler.state_dict()
        state["extra"] = {"controllers": extra or {}, "step_count": self.step_count, "layout": self._layout()}
        dist_checkpointing.save(state, str(path))
        dist.barrier()

    def load_checkpoint(self, path: str | Path) -> dict:
        """Load a checkpoint saved at any TP/PP layout; returns the `extra` dict given to save.

        RNG states are restored only when the layout is the one saved (they are per rank).
        """
        common = dist_checkpointing.load_common_state_dict(str(path))
        same_layout = common["extra"]["layout"] == self._layout()
        state = self._sharded_state_dict(is_loading=True, with_rng=same_layout)
        loaded = dist_checkpointing.load(state, str(path))
        for i, c in enumerate(self.chunks):
            unwrap(c).load_state_dict(loaded[f"model{i}" if len(self.chunks) > 1 else "model"])
        self.optimizer.load_state_dict(loaded["optimizer"])
        self.scheduler.load_state_dict(loaded["scheduler"])
        if same_layout:
            _set_rng_state(loaded["rng_state"])
        self.step_count = loaded["extra"]["step_count"]
        return loaded["extra"]["controllers"]


_CKPT_METADATA = {"distrib_optim_sharding_type": "fully_reshardable"}


def _pad_sequence(mb: dict, multiple: int) -> tuple:
    """(input_ids, position_ids, attention mask) right-padded to a multiple of `multiple` tokens.

    Sequence parallelism splits the sequence evenly over the TP ranks. Padding at the end is
    invisible to the real tokens (causal attention; a padding mask also hides the new keys), and
    the caller cuts the logits back to the real length.
    """
    ids, pos, attn = mb["input_ids"], mb["position_ids"], mb["attn"]
    pad = -ids.shape[1] % multiple
    if pad == 0:
        return ids, pos, attn
    ids = torch.nn.functional.pad(ids, (0, pad))
    pos = torch.cat([pos, pos[:, -1:] + torch.arange(1, pad + 1, device=pos.device)], dim=1)
    if attn is not None:  # [b, 1, s, s], True = masked: the padding keys stay masked
        s = attn.shape[-1]
        attn = torch.nn.functional.pad(attn, (0, pad, 0, pad), value=True)
        idx = torch.arange(s, s + pad, device=attn.device)
        attn[:, :, idx, idx] = False  # a padding query sees itself (no all-masked row)
    return ids, pos, attn


def _finite(*tensors: torch.Tensor, mask: torch.Tensor | None = None) -> bool:
    for t in tensors:
        t = t.detach()
        if mask is not None:
            t = t[mask]
        if not bool(torch.isfinite(t).all()):
            return False
    return True


def _any_rank(flag: bool) -> bool:
    """True on every rank if `flag` is true on any rank of the world (one tiny all-reduce)."""
    t = torch.tensor([1.0 if flag else 0.0])
    if torch.cuda.is_available() and dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def _rng_state() -> dict:
    return {
        "cpu": torch.get_rng_state(),
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
    }


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["cpu"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _as_float(v) -> float:
    return float(v.detach().float().mean()) if isinstance(v, torch.Tensor) else float(v)


def _floats(d: dict) -> dict:
    out = {}
    for k, v in d.items():
        with contextlib.suppress(TypeError, ValueError, RuntimeError):
            out[k] = _as_float(v)
    return out
