"""The Megatron-core actor: forward log-probs/entropies, the RL training step, checkpoints.

Its input is this data-parallel rank's samples as a packed `pipeline.batch.Batch` (flat token vectors
with `cu_seqlens`): `compute_log_prob` needs the tokens, `train_step` also `loss_mask`,
`old_log_prob`, `advantages` (and `ref_log_prob` when the loss needs it). Samples are binned into
micro-batches under `actor.max_tokens_per_micro_batch` (`pipeline/actor/packing.py`); each micro-batch
is packed: rows [k, L] of samples with a block-diagonal causal mask and per-sequence RoPE positions
on the local spec, one THD row with `PackedSeqParams` with Transformer Engine. Token t's log-prob comes from the logits at t - 1 of the
same sample; a sample's first token gets none (0). Every result is a flat [T] vector aligned with the
batch's tokens.

The loss function receives this rank's vocab shard of the logits and calls
`pipeline.ops.vocab_parallel_logprob_entropy` (no gather of the vocab, no fp32 copy of the shard) and
then the loss library, scaled so that the schedule's division by the number of micro-batches and DDP's
averaging over data-parallel ranks are undone: the gradient is that of Σ_micro-batches Σ_DP
apply_loss, which the loss library defines as the global mini-batch loss.
"""

from __future__ import annotations

import contextlib
import functools
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
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

from pipeline.actor import packing
from pipeline.actor.config import ActorConfig, check_layout
from pipeline.actor.model import build_model, sequence_multiple, uses_transformer_engine
from pipeline.actor.offload import HostOffload
from pipeline.actor.weights import load_hf_weights, unwrap
from pipeline.batch import Batch
from pipeline.hf_io import torch_dtype
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


class MegatronActor:
    """This rank's model chunks, optimizer and LR schedule, and the verbs of the RL loop."""

    def __init__(self, cfg: ActorConfig, hf_config: dict, *, hf_dir: str | Path | None = None):
        self.cfg = cfg
        self.hf_config = hf_config
        chunks = build_model(hf_config, cfg)
        # Packed rows: THD with Transformer Engine, else a block-diagonal mask and RoPE at each
        # token's position in its own sample (megatron's RoPE would use the row's positions).
        self.thd = uses_transformer_engine(cfg.layer_spec)  # the spec build_model used
        for c in chunks:
            if not self.thd and getattr(c, "rotary_pos_emb", None) is not None:
                packing.sequence_positions(c.rotary_pos_emb)
        if hf_dir is not None:
            load_hf_weights(chunks, hf_dir, hf_config)
        self.config = chunks[0].config
        # Micro-batches hold different numbers of tokens: the pipeline sends shapes ahead of tensors,
        # except under the interleaved schedule, where rows are padded to one length (packing.py).
        self.pad_rows = cfg.virtual_stages > 1
        self.config.variable_seq_lengths = cfg.pp > 1 and not self.pad_rows
        dtype = torch_dtype(cfg.dtype)
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
        # An extension point: loss_hook(step, mini_batch, loss) -> loss, called on every micro-batch's
        # loss (the tests' fault injection installs one); None in production.
        self.loss_hook = None
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

    def _bins(self, batch: Batch, count: int | None = None) -> list[list[int]]:
        """Sample indices per micro-batch under the token budget (fixed rows without one); at least
        `count`; under the interleaved schedule a multiple of PP (megatron runs micro-batches in
        groups of PP per virtual stage)."""
        budget, rows = self.cfg.max_tokens_per_micro_batch, self.cfg.micro_batch_size
        bins = packing.micro_batches(batch.lengths, budget, rows=rows)
        least = max(len(bins), count or 0)
        if self.pad_rows:
            least = -(-least // self.cfg.pp) * self.cfg.pp
        return (
            bins
            if len(bins) == least
            else packing.micro_batches(batch.lengths, budget, rows=rows, count=least)
        )

    def _pack(self, batch: Batch, bins: list[list[int]]) -> tuple[Batch, list[int], list[dict]]:
        """(the batch reordered so each micro-batch is a consecutive token range, the order, micro-batches).

        A micro-batch: its packed model inputs (rows: `packing.row_layout`) and its token range in the
        reordered batch (None for an empty micro-batch, which runs two pad tokens so that every rank
        runs the same count).
        """
        lengths = batch.lengths
        layouts = []  # per micro-batch: its samples in row order, and the samples of each row
        for b in bins:
            rows = packing.row_layout([lengths[i] for i in b], self.thd) if b else []
            layouts.append(([b[j] for row in rows for j in row], [len(row) for row in rows]))
        order = [i for samples, _ in layouts for i in samples]
        packed = batch.select(order)
        cu = packed.cu_seqlens
        multiple = sequence_multiple(self.cfg)  # sequence parallel splits every row over the TP ranks
        pad_to = None
        if self.pad_rows:  # one shape for the whole schedule: as many rows, each as long, as the largest
            shapes = [(len(r), max(lengths[i] for i in s)) for s, r in layouts if s]
            pad_to = (max(k for k, _ in shapes), max(n for _, n in shapes))
        out, first = [], 0
        for samples, row_sizes in layouts:
            if not samples:  # an empty micro-batch: two pad tokens
                inputs = packing.packed_inputs(
                    cu.new_zeros(2), cu.new_tensor([0, 2]), thd=self.thd, pad_to=pad_to, multiple=multiple
                )
                out.append({"inputs": inputs, "tokens": None})
                continue
            last = first + len(samples)
            t0, t1 = int(cu[first]), int(cu[last])
            inputs = packing.packed_inputs(
                packed.tokens[t0:t1],
                cu[first : last + 1] - t0,
                row_sizes=row_sizes,
                thd=self.thd,
                pad_to=pad_to,
                multiple=multiple,
            )
            out.append({"inputs": inputs, "tokens": slice(t0, t1)})
            first = last
        return packed, order, out

    def _run_schedule(self, micro_batches: list[dict], loss_fn, *, forward_only: bool):
        """Run `micro_batches` through the pipeline schedule; returns the last stage's loss outputs."""
        fwd_kwargs = {} if torch_dtype(self.cfg.dtype) == torch.float32 else {"fp32_output": False}

        def forward_step(data_iterator, model):
            mb = next(data_iterator)
            x = mb["inputs"]
            rotary = getattr(unwrap(model), "rotary_pos_emb", None)
            if rotary is not None and hasattr(rotary, "packed_positions"):
                rotary.packed_positions = x.position_ids
            logits = model(
                x.input_ids,
                x.position_ids,
                x.attention_mask,
                packed_seq_params=x.packed_seq_params,
                **fwd_kwargs,
            )
            return logits, functools.partial(loss_fn, mb)

        return get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=[iter(micro_batches) for _ in self.chunks],
            model=self.chunks,
            num_microbatches=len(micro_batches),
            seq_length=max(mb["inputs"].input_ids.shape[1] for mb in micro_batches),
            micro_batch_size=max(mb["inputs"].input_ids.shape[0] for mb in micro_batches),
            forward_only=forward_only,
        )

    def _token_stats(self, mb: dict, logits: torch.Tensor, *, entropy: bool = True, influence: bool = False):
        """Per token of the micro-batch's samples (flat, their order): log-prob (entropy, influence) of
        predicting token t from the logits at t - 1 of this rank's shard [k, L, V/tp]; 0 at every
        sample's first token."""
        x = mb["inputs"]
        out = vocab_parallel_logprob_entropy(
            logits[:, :-1],
            x.input_ids[:, 1:],
            tp_group=ps.get_tensor_model_parallel_group(),
            temperature=self.cfg.temperature,
            valid_vocab_size=self.hf_config["vocab_size"],
            entropy=entropy,
            influence=influence,
        )

        def aligned(v):  # position t - 1 predicts token t; across a sample boundary it predicts nothing
            if v is None:
                return None
            return torch.where(x.first, 0.0, F.pad(v, (1, 0))).reshape(-1)[x.real].to(v.dtype)

        return type(out)(*(aligned(v) for v in out))

    def _forward_stats(self, micro_batches: list[dict], *, entropy: bool, influence: bool = False):
        """No-grad forward of the micro-batches: per-token stats concatenated in their order (last stage)."""
        for c in self.chunks:
            c.eval()

        def loss_fn(mb, logits):
            if mb["tokens"] is None:
                return logits.new_zeros((), dtype=torch.float32), {}
            out = self._token_stats(mb, logits, entropy=entropy, influence=influence)
            stats = {"log_prob": out.logprob}
            if entropy:
                stats["entropy"] = out.entropy
            if influence:
                stats["influence"] = out.influence
            return logits.new_zeros((), dtype=torch.float32), stats

        try:
            with torch.no_grad():
                outputs = self._run_schedule(micro_batches, loss_fn, forward_only=True)
        finally:
            for c in self.chunks:
                c.train()
        if not self.is_last_stage:
            return None
        outputs = [o for o in outputs if o]
        return {k: torch.cat([o[k] for o in outputs]) for k in outputs[0]}

    # ------------------------------------------------------------------ verbs

    @torch.no_grad()
    def compute_log_prob(
        self,
        batch: Batch,
        *,
        entropy: bool = True,
        influence: bool = False,
        broadcast: bool = True,
        weights: str = "current",
    ) -> dict | None:
        """Per-token log-probs (and entropies) of `batch`, no graph: {"log_prob": [T], ...} in its order.

        Computed on the last pipeline stage; with `broadcast` every rank of the pipeline gets them.
        `influence` adds the op's first-order entropy influence of each sampled token (telemetry).
        `weights="reference"` uses the frozen reference policy (`snapshot_reference`).
        """
        if weights == "reference":
            with self._reference_weights():
                return self.compute_log_prob(batch, entropy=entropy, influence=influence, broadcast=broadcast)
        if weights != "current":
            raise ValueError(f"weights={weights!r}: expected 'current' or 'reference'")
        result = None
        if len(batch):
            _, order, micro_batches = self._pack(batch, self._bins(batch))
            flat = self._forward_stats(micro_batches, entropy=entropy, influence=influence)
            if flat is not None:  # back to the batch's order
                index = batch.token_index(order)
                result = {k: v.new_zeros(batch.num_tokens).index_copy_(0, index, v) for k, v in flat.items()}
        elif self.is_last_stage:
            names = ["log_prob"] + ["entropy"] * entropy + ["influence"] * influence
            result = {k: batch.tokens.new_zeros(0, dtype=torch.float32) for k in names}
        if broadcast and ps.get_pipeline_model_parallel_world_size() > 1:
            holder = [result]
            dist.broadcast_object_list(
                holder,
                src=ps.get_pipeline_model_parallel_last_rank(),
                group=ps.get_pipeline_model_parallel_group(),
            )
            result = holder[0]
        return result

    def train_step(
        self,
        batch: Batch,
        loss_cfg,
        *,
        step: int | None = None,
        on_policy: bool = False,
        mini_batch: int = 0,
    ) -> dict:
        """One optimizer step on this rank's samples with the loss library's `loss_cfg`.

        The loss library declares what it needs before the training forward (`loss_needs`): methods
        that select tokens by the current policy (Clip-Cov, KL-Cov, top-entropy, Archer, entropy-shaped
        advantages) get a no-grad forward of the whole mini-batch first, except `on_policy` (the
        weights are those that computed `batch.old_log_prob` and `old_entropy`), where those are the
        current policy's values; ppo and cispo need only token counts. Every data-parallel rank runs
        the same number of micro-batches.

        Returns metrics (the same on every rank): `loss` (the global mini-batch loss before the
        step), `grad_norm` (before clipping), `lr` (used by this step; megatron's warm-up starts
        at `init_lr` = 0, so the first warm-up step does not move the parameters), the loss
        library's metrics, and `packing` (this rank's tokens, token slots and micro-batches).

        A non-finite current log-prob/entropy, loss or gradient on any rank skips the step on every
        rank (no parameter, optimizer or LR-schedule change) and returns `update_successful=False`
        with `nonfinite=1`; megatron's optimizers check for inf/NaN only under fp16 loss scaling.
        """
        from pipeline.algorithms import apply_loss, finish_metrics, loss_needs, prepare_loss, total_sums

        step = self.step_count if step is None else step
        needs = loss_needs(loss_cfg)
        dp_group, dp = ps.get_data_parallel_group(), ps.get_data_parallel_world_size()
        bins = self._bins(batch)
        count, fewest = _max_over(dp_group, len(bins), -len(batch))
        if -fewest == 0:
            raise ValueError("train_step: a data-parallel rank has no samples; give every rank at least one")
        packed, _, micro_batches = self._pack(batch, self._bins(batch, count))
        stats = {
            "tokens": packed.num_tokens,
            "slots": sum(mb["inputs"].input_ids.numel() for mb in micro_batches),
            "micro_batches": len(micro_batches),
        }
        current: dict = {}
        if on_policy:  # the weights that computed old_log_prob: their values are the current policy's
            if needs.entropy and packed.old_entropy is None:
                raise ValueError("train_step(on_policy=True): this loss needs batch.old_entropy")
            current = {"log_prob": packed.old_log_prob, "entropy": packed.old_entropy}
        elif needs.current_policy:
            current = self._forward_stats(micro_batches, entropy=True) or {}
        mask = packed.loss_mask.bool()
        given = [v for v in current.values() if v is not None]
        if _any_rank(bool(given) and not _finite(*given, mask=mask)):
            return self._skipped_step(stats)
        plan = None
        if self.is_last_stage:
            plan = prepare_loss(
                loss_cfg,
                current.get("log_prob"),
                packed.old_log_prob,
                packed.advantages,
                packed.loss_mask,
                segments=packed.segments(),
                positions=packed.positions(),
                entropy=current.get("entropy"),
                ref_log_prob=packed.ref_log_prob,
                sample_ids=packed.sample_ids,
                step=step,
                dp_group=dp_group,
            )
        n_mb = len(micro_batches)

        def loss_fn(mb, logits):
            t = mb["tokens"]
            if t is None:  # an empty micro-batch: no loss, no gradient
                return logits[..., :1].sum() * 0.0, {"loss": logits.new_zeros(()), "sums": None}
            out = self._token_stats(mb, logits, entropy=True)
            if not _finite(out.logprob, out.entropy, mask=mask[t]):  # skipped below, on every rank
                loss = logits[..., :1].sum() * float("nan")
                return loss, {"loss": loss.detach(), "sums": None}
            ref = packed.ref_log_prob
            loss, sums = apply_loss(
                loss_cfg,
                plan.rows(t),
                out.logprob,
                packed.old_log_prob[t],
                packed.advantages[t],
                packed.loss_mask[t],
                entropy=out.entropy,
                ref_log_prob=None if ref is None else ref[t],
            )
            if self.loss_hook is not None:
                loss = self.loss_hook(step, mini_batch, loss)
            # The schedule divides by n_mb and DDP averages over dp: multiply both back so the
            # gradient is that of the sum of apply_loss over micro-batches and DP ranks.
            return loss * (n_mb * dp), {"loss": loss.detach(), "sums": sums}

        for c in self.chunks:
            c.zero_grad_buffer()
        self.optimizer.zero_grad()
        outputs = self._run_schedule(micro_batches, loss_fn, forward_only=False)
        bad_loss = self.is_last_stage and not _finite(*(o["loss"] for o in outputs))
        if _any_rank(bad_loss or not self._grads_finite()):
            for c in self.chunks:
                c.zero_grad_buffer()
            self.optimizer.zero_grad()
            return self._skipped_step(stats)
        lr = float(self.optimizer.param_groups[0]["lr"])  # the rate this step uses
        ok, grad_norm, _ = self.optimizer.step()
        self.scheduler.step(increment=1)
        self.step_count += 1
        metrics = None
        if self.is_last_stage:
            # apply_loss's sums are additive: add them over micro-batches and DP ranks, then normalise
            totals = total_sums([o["sums"] for o in outputs if o["sums"] is not None], dp_group)
            metrics = _floats(finish_metrics(loss_cfg, plan, totals))
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
        metrics["packing"] = stats
        return metrics

    def _grads_finite(self) -> bool:
        """Whether this rank's reduced gradients (the DDP buffers the optimizer reads) are finite."""
        for c in self.chunks:
            for buf in [*c.buffers, *c.expert_parallel_buffers]:
                if not bool(torch.isfinite(buf.grad_data).all()):
                    return False
        return True

    def _skipped_step(self, stats: dict) -> dict:
        """Metrics of a step skipped for a non-finite value (the same on every rank)."""
        return {
            "loss": float("nan"),
            "update_successful": False,
            "nonfinite": 1,
            "grad_norm": float("nan"),
            "lr": float(self.optimizer.param_groups[0]["lr"]),
            "packing": stats,
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
    return _max_over(None, int(flag))[0] > 0


def _max_over(group, *values: int) -> list[int]:
    """The maximum of each integer over `group` (None = the world), in one all-reduce."""
    t = torch.tensor(values, dtype=torch.int64)
    if torch.cuda.is_available() and dist.get_backend(group) == "nccl":
        t = t.cuda()
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return t.tolist()


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
