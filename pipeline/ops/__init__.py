"""Vocab-parallel math on tensor-parallel-sharded logits (log-prob, entropy, entropy influence)."""
