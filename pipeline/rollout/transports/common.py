"""What every weight transport shares: buckets of `(name, tensor)` pairs and the transport interface.

Free of torch imports, so `pipeline.actor.export` and the rollout side both use this one `bucketed`.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Protocol

DEFAULT_BUCKET_BYTES = 512 * 1024**2  # rollout.bucket_bytes


def nbytes(tensor) -> int:
    return tensor.numel() * tensor.element_size()


def bucketed(named: Iterable, bucket_bytes: int = DEFAULT_BUCKET_BYTES) -> Iterator[list]:
    """Group `(name, tensor)` pairs into lists of at most `bucket_bytes` (a bigger tensor goes alone)."""
    bucket, size = [], 0
    for name, tensor in named:
        n = nbytes(tensor)
        if bucket and size + n > bucket_bytes:
            yield bucket
            bucket, size = [], 0
        bucket.append((name, tensor))
        size += n
    if bucket:
        yield bucket


@dataclass(slots=True)
class Sent:
    """What one weight update moved; `checkpoint`: a directory a restarted server can load these
    weights from, when the transport wrote one (disk)."""

    nbytes: int
    ntensors: int
    checkpoint: str | None = None


class Transport(Protocol):
    """One way of moving weights into the servers, inside the engine's begin/end_weight_update.

    Made as `cls(client, cfg, workdir)`: the `EngineClient` it posts through, the `RolloutConfig`, and
    a scratch directory the engine owns.
    """

    def send(self, named: Iterable, version: str) -> Sent: ...

    def close(self) -> None: ...
