"""Move a Megatron rank's weights, gradients and optimizer state to host memory and back.

Colocated with rollout engines, a GPU holds either the engines' weights and KV cache (while they
generate) or the actor's state (while it trains), not both. `HostOffload` does the actor's half,
the way verl and slime's `offload` do it: every device tensor of a part is a view of some storage
(Megatron's DDP keeps weights and gradients in a few contiguous buffers; the optimizer keeps fp32
master weights and Adam moments), so each distinct storage is copied to a (pinned) host buffer and
resized to zero bytes. The tensors and views stay valid objects; `onload` resizes the storages
back and copies the bytes in, bit for bit. Gradients carry no information between steps (each
step zeroes them), so they are freed without a copy and come back as zeros.

    parts   "weights"    the model's parameters (DDP's param buffers where it has them)
            "grads"      DDP's gradient buffers (`main_grad`)
            "optimizer"  the optimizer's master weights and state (Adam's exp_avg, exp_avg_sq)

A storage is counted in the first part that names it (fp32 training without the distributed
optimizer updates the parameters themselves: they are "weights", not "optimizer").
"""

from __future__ import annotations

import torch

PARTS = ("weights", "grads", "optimizer")


def _tensors(actor, part: str) -> list[torch.Tensor]:
    from pipeline.actor.weights import unwrap

    if part == "weights":
        out = [p.data for c in actor.chunks for p in unwrap(c).parameters()]
        for c in actor.chunks:
            for buf in [*c.buffers, *c.expert_parallel_buffers]:
                if buf.param_data is not None:
                    out.append(buf.param_data)
        return out
    if part == "grads":
        return [buf.grad_data for c in actor.chunks for buf in [*c.buffers, *c.expert_parallel_buffers]]
    out = []
    for opt in _inner_optimizers(actor.optimizer):
        for group in opt.param_groups:
            out += [p.data for p in group["params"]]
        for state in opt.state.values():
            out += [v for v in state.values() if isinstance(v, torch.Tensor)]
    return out


def _inner_optimizers(optimizer) -> list[torch.optim.Optimizer]:
    """The torch optimizers under megatron's wrappers (chained, distributed, mixed precision)."""
    chained = getattr(optimizer, "chained_optimizers", None)
    if chained is not None:
        return [o for c in chained for o in _inner_optimizers(c)]
    inner = getattr(optimizer, "optimizer", None)
    return [inner] if isinstance(inner, torch.optim.Optimizer) else []


class HostOffload:
    """The offload state of one actor: which parts are on the host, and their host copies."""

    def __init__(self, actor):
        self.actor = actor
        # part -> [(storage, its size in bytes, host copy or None for gradients)]
        self._host: dict[str, list[tuple[torch.UntypedStorage, int, torch.Tensor | None]]] = {}

    @property
    def offloaded(self) -> tuple[str, ...]:
        return tuple(p for p in PARTS if p in self._host)

    def _storages(self, part: str, taken: set[int]) -> list[torch.UntypedStorage]:
        out = []
        for t in _tensors(self.actor, part):
            storage = t.untyped_storage()
            if storage.nbytes() == 0 or storage._cdata in taken:
                continue
            taken.add(storage._cdata)
            out.append(storage)
        return out

    def _claimed(self) -> set[int]:
        """Storages of the parts already offloaded (never offloaded twice under another part)."""
        return {s._cdata for entries in self._host.values() for s, _, _ in entries}

    def offload(self, parts: tuple[str, ...]) -> dict:
        unknown = [p for p in parts if p not in PARTS]
        if unknown:
            raise ValueError(f"offload parts {unknown}: expected some of {list(PARTS)}")
        pin = torch.cuda.is_available()
        taken = self._claimed()
        moved = {}
        for part in PARTS:  # in this order: a storage belongs to the first part that names it
            storages = self._storages(part, taken)
            if part not in parts or part in self._host:
                continue
            entries = []
            for storage in storages:
                host = None
                if part != "grads":
                    host = torch.empty(storage.nbytes(), dtype=torch.uint8, pin_memory=pin)
                    host.untyped_storage().copy_(storage, non_blocking=pin)
                entries.append((storage, storage.nbytes(), host))
            if pin:
                torch.cuda.synchronize()  # the copies are done before the device memory goes
            for storage, _, _ in entries:
                storage.resize_(0)
            self._host[part] = entries
            moved[part] = sum(n for _, n, _ in entries)
        if pin:
            torch.cuda.empty_cache()  # hand the freed blocks back to the driver (the engines' turn)
        return moved

    def onload(self, parts: tuple[str, ...] | None = None) -> dict:
        moved = {}
        for part in self.offloaded:
            if parts is not None and part not in parts:
                continue
            nbytes = 0
            for storage, size, host in self._host.pop(part):
                storage.resize_(size)
                if host is None:  # gradients: zeros of the original size
                    torch.empty(0, dtype=torch.uint8, device=storage.device).set_(storage).zero_()
                else:
                    storage.copy_(host.untyped_storage(), non_blocking=host.is_pinned())
                nbytes += size
            moved[part] = nbytes
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return moved
