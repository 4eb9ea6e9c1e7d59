"""In-process rollout engine: a Hugging Face transformers model on CPU, same interface as SGLang.

The default for the CPU demo and fast tests. Its weights arrive through the same export generator
as every other engine (`update_weights(named_tensors, version)`), so weight sync is exercised even
without a server. Sampling is batched (left padding, KV cache) and seeded; log-probs are those of
the sampling distribution, `log_softmax(logits / T)` in float32 after top-k/top-p filtering.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable

import torch

from pipeline.rollout.base import RolloutAborted, Sample, SamplingParams


def _filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, idx = torch.sort(logits, dim=-1, descending=True)
        cum = torch.softmax(sorted_logits, -1).cumsum(-1)
        drop = cum - torch.softmax(sorted_logits, -1) > top_p  # keep the token that crosses top_p
        logits = logits.masked_fill(drop.scatter(-1, idx, drop), float("-inf"))
    return logits


class LocalEngine:
    def __init__(
        self,
        model,
        tokenizer=None,
        *,
        eos_token_ids: list[int] | None = None,
        seed: int = 0,
        batch_size: int = 64,
    ):
        self.model = model.eval()
        self.tokenizer = tokenizer
        eos = eos_token_ids if eos_token_ids is not None else []
        if not eos and tokenizer is not None and tokenizer.eos_token_id is not None:
            eos = [tokenizer.eos_token_id]
        self.eos_token_ids = list(eos)
        self.pad_id = (tokenizer.pad_token_id if tokenizer is not None else None) or 0
        self.generator = torch.Generator().manual_seed(seed)
        self.batch_size = batch_size
        self.weight_version = 0
        self._paused = threading.Event()
        self._released = False
        self._aborting = False

    @classmethod
    def from_pretrained(cls, path: str, **kwargs):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32)
        return cls(model, AutoTokenizer.from_pretrained(path), **kwargs)

    # ---- generation -------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[Sample]:
        if self._released:
            raise RuntimeError("LocalEngine.generate after release_memory(): call resume_memory() first")
        self._aborting = False
        out: list[Sample] = []
        for lo in range(0, len(prompts), self.batch_size):
            out.extend(self._generate_batch(prompts[lo : lo + self.batch_size], params))
        return out

    def _generate_batch(self, prompts: list[list[int]], params: SamplingParams) -> list[Sample]:
        if any(len(p) == 0 for p in prompts):
            raise ValueError("LocalEngine.generate: empty prompt")
        gen = self.generator if params.seed is None else torch.Generator().manual_seed(params.seed)
        b, width = len(prompts), max(len(p) for p in prompts)
        ids = torch.full((b, width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((b, width), dtype=torch.long)
        for i, p in enumerate(prompts):  # left padding keeps the next position aligned
            ids[i, width - len(p) :] = torch.tensor(p)
            mask[i, width - len(p) :] = 1
        stop = set(self.eos_token_ids) | set(params.stop_token_ids)
        responses: list[list[int]] = [[] for _ in range(b)]
        logps: list[list[float]] = [[] for _ in range(b)]
        finished = torch.zeros(b, dtype=torch.bool)
        reasons = ["length"] * b
        past = None
        cur_ids, cur_mask = ids, mask
        for _ in range(params.max_new_tokens):
            if self._aborting:
                raise RolloutAborted("rollout aborted")
            pos = (cur_mask.cumsum(-1) - 1).clamp_min(0)
            out = self.model(
                input_ids=cur_ids if past is None else cur_ids[:, -1:],
                attention_mask=cur_mask,
                position_ids=pos if past is None else pos[:, -1:],
                past_key_values=past,
                use_cache=True,
            )
            past = out.past_key_values
            logits = out.logits[:, -1, :].float() / params.temperature
            logits = _filter_logits(logits, params.top_k, params.top_p)
            logp = torch.log_softmax(logits, -1)
            nxt = torch.multinomial(logp.exp(), 1, generator=gen).squeeze(1)
            tok_logp = logp.gather(1, nxt[:, None]).squeeze(1)
            for i in range(b):
                if finished[i]:
                    continue
                t = int(nxt[i])
                responses[i].append(t)
                logps[i].append(float(tok_logp[i]))
                if t in stop:
                    finished[i] = True
                    reasons[i] = "stop"
            if bool(finished.all()):
                break
            nxt = torch.where(finished, torch.full_like(nxt, self.pad_id), nxt)
            cur_ids = torch.cat([cur_ids, nxt[:, None]], 1)
            cur_mask = torch.cat([cur_mask, (~finished).long()[:, None]], 1)
        return [
            Sample(list(p), r, lp, reason, self.weight_version)
            for p, r, lp, reason in zip(prompts, responses, logps, reasons, strict=True)
        ]

    def abort(self) -> None:
        """Stop a `generate` running in another thread before its next token (RolloutAborted)."""
        self._aborting = True

    # ---- weights ----------------------------------------------------------------------------
    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> None:
        """Copy HF-named tensors (from the export generator) into the model; every name must exist."""
        self.begin_weight_update()
        self.load_weights(named_tensors)
        self.end_weight_update(version)

    def begin_weight_update(self) -> None:
        """Start a streamed update: `load_weights` per bucket, then `end_weight_update(version)`."""
        self._seen: set[str] = set()

    @torch.no_grad()
    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy one bucket of HF-named tensors into the model (names and shapes checked)."""
        params = dict(self.model.named_parameters())
        params.update(dict(self.model.named_buffers()))
        for name, tensor in named_tensors:
            if name not in params:
                raise KeyError(f"LocalEngine.update_weights: unknown tensor {name!r}")
            dst = params[name]
            if tuple(dst.shape) != tuple(tensor.shape):
                raise ValueError(
                    f"LocalEngine.update_weights: {name} has shape {tuple(tensor.shape)}, model expects {tuple(dst.shape)}"
                )
            dst.copy_(tensor.to(dst.dtype))
            self._seen.add(name)

    def end_weight_update(self, version: int) -> None:
        """Check that every parameter arrived (a tied lm_head excepted) and tag `version`."""
        tied = getattr(self.model.config, "tie_word_embeddings", False)
        missing = {n for n, _ in self.model.named_parameters()} - self._seen
        if tied:
            missing.discard("lm_head.weight")
        if missing:
            raise ValueError(
                f"LocalEngine.update_weights: no values for {sorted(missing)[:5]} ({len(missing)} tensors)"
            )
        self.weight_version = int(version)

    @torch.no_grad()
    def logprobs(
        self, sequences: list[list[int]], prompt_lens: list[int], temperature: float = 1.0
    ) -> list[list[float]]:
        """Teacher-forced log-probs of each sequence's response tokens (for sync verification)."""
        out = []
        for seq, n in zip(sequences, prompt_lens, strict=True):
            ids = torch.tensor([seq])
            logits = self.model(input_ids=ids).logits[0, :-1].float() / temperature
            lp = torch.log_softmax(logits, -1).gather(1, ids[0, 1:, None]).squeeze(1)
            out.append(lp[n - 1 :].tolist())
        return out

    def engine_logprobs(
        self, sequences: list[list[int]], prompt_lens: list[int], temperature: float = 1.0
    ) -> list[list[list[float]]]:
        """`logprobs` as the one engine's entry (the weight-sync check's view of every engine)."""
        return [self.logprobs(sequences, prompt_lens, temperature)]

    # ---- lifecycle --------------------------------------------------------------------------
    def pause(self) -> None:
        self._paused.set()

    def resume(self) -> None:
        self._paused.clear()

    def release_memory(self, tags: list[str] | None = None) -> None:
        """Mark the engine released (whatever `tags`). On CPU there is no device memory to give back:
        weights and the per-call KV cache live in host memory (the cache is freed after each generate)."""
        self._released = True

    def resume_memory(self, tags: list[str] | None = None) -> None:
        self._released = False

    def health(self) -> bool:
        return not self._released

    def shutdown(self) -> None:
        self._released = True
