"""The unit that flows from rollout to the actor: samples as flat token vectors.

Sample i is `tokens[cu_seqlens[i] : cu_seqlens[i + 1]]` (its prompt, then its response; a multi-turn
sample is the whole conversation). Every per-token field is aligned with `tokens`: its value at index t
concerns *predicting* token t from the tokens before it in the same sample (the log-prob of token t,
the entropy of the distribution it was drawn from, its advantage, whether the loss trains on it). A
sample's first token has no prediction: its values are 0 and it never counts.

    tokens           [T] int64    every sample's tokens, back to back
    cu_seqlens       [n + 1]      sample boundaries (cumulative lengths, starting at 0)
    loss_mask        [T] float32  1 on the tokens the loss trains on (any spans: the response, or the
                                  model's turns of a conversation; 0 on prompts, tool output, masked samples)
    sample_ids       [n] int64    stable ids (the loss library's random picks and tie-breaks use them)
    advantages       [T] | None   per-token advantages (0 where loss_mask is 0)
    old_log_prob     [T] | None   the policy that generated the batch (actor forward, before any update)
    old_entropy      [T] | None   its full-vocabulary entropies
    ref_log_prob     [T] | None   the frozen reference policy
    rollout_log_prob [T] | None   the engine's log-probs (train/rollout mismatch metric)

The actor packs samples into micro-batches by a token budget (`pipeline/actor/packing.py`); nothing
here knows how. `to_rows` / `from_rows` give a padded [n, max length] view for code that works per
row (the advantage estimators).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from pipeline.rollout.base import Sample

Tensor = torch.Tensor
PER_TOKEN = ("loss_mask", "advantages", "old_log_prob", "old_entropy", "ref_log_prob", "rollout_log_prob")


@dataclass(kw_only=True)
class Batch:
    tokens: Tensor
    cu_seqlens: Tensor
    loss_mask: Tensor
    sample_ids: Tensor
    advantages: Tensor | None = None
    old_log_prob: Tensor | None = None
    old_entropy: Tensor | None = None
    ref_log_prob: Tensor | None = None
    rollout_log_prob: Tensor | None = None

    def __post_init__(self) -> None:
        t, n = self.tokens.shape[0], self.sample_ids.shape[0]
        if self.tokens.dim() != 1 or self.cu_seqlens.shape != (n + 1,) or int(self.cu_seqlens[-1]) != t:
            raise ValueError(
                f"Batch: tokens {tuple(self.tokens.shape)}, cu_seqlens {tuple(self.cu_seqlens.shape)} and "
                f"sample_ids {tuple(self.sample_ids.shape)} do not describe {n} samples of {t} tokens"
            )
        for name in PER_TOKEN:
            v = getattr(self, name)
            if v is not None and v.shape != (t,):
                raise ValueError(f"Batch.{name} has shape {tuple(v.shape)}, expected [{t}] (one per token)")

    # ---- construction ------------------------------------------------------------------------
    @classmethod
    def from_samples(
        cls, samples: list[Sample], *, sample_ids: list[int] | None = None, mask_truncated: bool = False
    ) -> Batch:
        """Prompt + response per sample; the loss trains on the response (none of it for a truncated
        sample when `mask_truncated`, DAPO's overlong filtering); the engine's log-probs kept."""
        if not samples:
            raise ValueError("Batch.from_samples: no samples")
        lengths = [len(s.prompt_ids) + len(s.response_ids) for s in samples]
        tokens, mask, rollout = [], [], []
        for s in samples:
            n_p, n_r = len(s.prompt_ids), len(s.response_ids)
            if n_p < 1:
                raise ValueError(
                    "Batch.from_samples: a sample without prompt tokens has nothing to condition on"
                )
            keep = 0.0 if mask_truncated and s.truncated else 1.0
            tokens += [*s.prompt_ids, *s.response_ids]
            mask += [0.0] * n_p + [keep] * n_r
            rollout += [0.0] * n_p + [float(x) for x in s.logprobs]
        ids = sample_ids if sample_ids is not None else list(range(len(samples)))
        return cls(
            tokens=torch.tensor(tokens, dtype=torch.long),
            cu_seqlens=_cumulative(lengths),
            loss_mask=torch.tensor(mask, dtype=torch.float32),
            sample_ids=torch.tensor(ids, dtype=torch.long),
            rollout_log_prob=torch.tensor(rollout, dtype=torch.float32),
        )

    # ---- shape -------------------------------------------------------------------------------
    def __len__(self) -> int:
        return self.sample_ids.shape[0]

    @property
    def num_tokens(self) -> int:
        return self.tokens.shape[0]

    @property
    def lengths(self) -> list[int]:
        return (self.cu_seqlens[1:] - self.cu_seqlens[:-1]).tolist()

    def segments(self) -> Tensor:
        """[T]: the index of each token's sample."""
        sizes = self.cu_seqlens[1:] - self.cu_seqlens[:-1]
        return torch.arange(len(self), device=self.tokens.device).repeat_interleave(sizes)

    def positions(self) -> Tensor:
        """[T]: each token's position in its sample (0 at its first token)."""
        seg = self.segments()
        return torch.arange(self.num_tokens, device=self.tokens.device) - self.cu_seqlens[seg]

    # ---- selection ---------------------------------------------------------------------------
    def token_index(self, samples) -> Tensor:
        """[sum of their lengths]: the token indices of `samples` (in that order) in this batch."""
        dev = self.cu_seqlens.device
        samples = torch.as_tensor(samples, dtype=torch.long, device=dev).reshape(-1)
        starts, ends = self.cu_seqlens[samples], self.cu_seqlens[samples + 1]
        sizes = ends - starts
        offsets = torch.arange(int(sizes.sum()), device=dev) - (sizes.cumsum(0) - sizes).repeat_interleave(
            sizes
        )
        return starts.repeat_interleave(sizes) + offsets

    def select(self, samples) -> Batch:
        """The samples at indices `samples`, in that order."""
        samples = torch.as_tensor(samples, dtype=torch.long, device=self.cu_seqlens.device).reshape(-1)
        index = self.token_index(samples)
        sizes = self.cu_seqlens[samples + 1] - self.cu_seqlens[samples]
        per_token = {k: None if getattr(self, k) is None else getattr(self, k)[index] for k in PER_TOKEN}
        return Batch(
            tokens=self.tokens[index],
            cu_seqlens=_cumulative(sizes.tolist()).to(self.cu_seqlens.device),
            sample_ids=self.sample_ids[samples],
            **per_token,
        )

    def split(self, n: int) -> list[Batch]:
        """`n` consecutive parts whose sample counts differ by at most one (mini-batches)."""
        if not 1 <= n <= len(self):
            raise ValueError(f"cannot split {len(self)} samples into {n} non-empty parts")
        bounds = [len(self) * i // n for i in range(n + 1)]
        return [self.select(range(a, b)) for a, b in zip(bounds, bounds[1:], strict=False)]

    def replace(self, **fields) -> Batch:
        return dataclasses.replace(self, **fields)

    def to(self, device) -> Batch:
        return dataclasses.replace(
            self, **{f.name: _to(getattr(self, f.name), device) for f in dataclasses.fields(self)}
        )

    # ---- a padded view for per-row code ------------------------------------------------------
    def to_rows(self, values: Tensor) -> Tensor:
        """[n, longest]: per-token `values` as one left-aligned row per sample (0 past its end)."""
        rows = values.new_zeros(len(self), max(self.lengths))
        rows[self.segments(), self.positions()] = values
        return rows

    def from_rows(self, rows: Tensor) -> Tensor:
        """The inverse of `to_rows`: [T] from [n, >= longest]."""
        return rows[self.segments(), self.positions()]


def _cumulative(lengths) -> Tensor:
    out = torch.zeros(len(lengths) + 1, dtype=torch.long)
    out[1:] = torch.tensor(list(lengths), dtype=torch.long).cumsum(0)
    return out


def _to(v, device):
    return v.to(device) if isinstance(v, Tensor) else v
