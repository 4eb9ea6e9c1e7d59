"""The engine interface every rollout backend implements, and the sample it returns."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Protocol

import torch


class RolloutError(RuntimeError):
    """A rollout request that still failed after every retry and restart."""


class RolloutAborted(RolloutError):
    """The rollout was aborted on request (`abort()`, or a preemption request while it ran)."""


@dataclass(kw_only=True, slots=True)
class SamplingParams:
    max_new_tokens: int = 64
    temperature: float = 1.0  # the trainer computes log-probs at this temperature too
    top_p: float = 1.0
    top_k: int = -1  # -1 = off
    stop_token_ids: list[int] = field(default_factory=list)  # besides the tokenizer's EOS
    seed: int | None = None  # per-request seed; None = the engine's generator


@dataclass(slots=True)
class Sample:
    prompt_ids: list[int]
    response_ids: list[int]
    logprobs: list[float]  # per response token, under the sampling distribution (temperature applied)
    finish_reason: str  # "stop" (EOS or stop token) or "length"
    weight_version: int
    meta: dict = field(default_factory=dict)

    @property
    def truncated(self) -> bool:
        return self.finish_reason == "length"


class Engine(Protocol):
    """What the trainer, the step verbs and the rollout group need from a rollout engine
    (`SGLangEngine`, `LocalEngine`; tests/rollout/test_engine_protocol.py checks both)."""

    weight_version: int

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[Sample]: ...

    def abort(self) -> None:
        """Stop a running `generate`: it raises RolloutAborted."""

    def logprobs(
        self, sequences: list[list[int]], prompt_lens: list[int], temperature: float = 1.0
    ) -> list[list[float]]:
        """Teacher-forced log-probs of each sequence's tokens after its prompt."""

    def engine_logprobs(
        self, sequences: list[list[int]], prompt_lens: list[int], temperature: float = 1.0
    ) -> list[list[list[float]]]:
        """`logprobs` from every engine behind this object (the weight-sync check compares each)."""

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> None: ...

    def pause(self) -> None: ...

    def resume(self) -> None: ...

    def release_memory(self, tags: list[str] | None = None) -> None:
        """Give device memory back: `tags` of "weights", "kv_cache", "cuda_graph" (None: all)."""

    def resume_memory(self, tags: list[str] | None = None) -> None: ...

    def health(self) -> bool: ...

    def shutdown(self) -> None: ...


def logprob_mismatch(rollout: list[list[float]], trainer: list[list[float]]) -> dict[str, float]:
    """Train/rollout mismatch of one step, to log every step (architecture: "where the hard parts are").

    `rollout`: each sample's per-token log-probs from the engine; `trainer`: the actor's log-probs of
    the same tokens at the same temperature. Returns the mean and max |difference| over all tokens and
    the k3 estimate of KL(rollout || trainer), mean over tokens of exp(d) - 1 - d with d = trainer - rollout.
    """
    diffs = [t - r for rs, ts in zip(rollout, trainer, strict=True) for r, t in zip(rs, ts, strict=True)]
    if not diffs:
        return {"mismatch/logprob_mean_abs": 0.0, "mismatch/logprob_max_abs": 0.0, "mismatch/kl_k3": 0.0}
    d = torch.tensor(diffs, dtype=torch.float64)
    return {
        "mismatch/logprob_mean_abs": d.abs().mean().item(),
        "mismatch/logprob_max_abs": d.abs().max().item(),
        "mismatch/kl_k3": (d.exp() - 1 - d).mean().item(),
    }
