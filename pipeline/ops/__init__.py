"""Vocab-parallel math on tensor-parallel-sharded logits (log-prob, entropy, entropy influence)."""

from pipeline.ops.vocab_parallel import LogProbEntropy, vocab_parallel_logprob_entropy

__all__ = ["LogProbEntropy", "vocab_parallel_logprob_entropy"]
