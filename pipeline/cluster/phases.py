"""Who holds the GPUs of a colocated job, the engines or the actor, and the hand-over between them.

    phases.training()            after a rollout: the engines give their memory back (weights, KV
                                 cache, CUDA graphs), then the actor's offloaded state comes back
    phases.rollout(sync, moved)  after training: the actor's gradients and optimizer state go to host
                                 memory, the engines take their weights' memory back, the new
                                 weights are synced (also when the step was skipped but the engines'
                                 weights were released: they are gone), the actor's weights go to
                                 host memory, and the engines take their KV cache back

Disaggregated jobs do none of this (their devices are their own): `rollout()` only syncs when the
weights moved. Without `actor.offload` the actor stays resident and only the engines release and
resume. `torch.cuda.empty_cache()` runs on the actor's side whenever it gives memory away (in
`MegatronActor.offload`); SGLang empties its own cache when it releases.
"""

from __future__ import annotations

from collections.abc import Callable


class MemoryPhases:
    def __init__(self, actors, rollout, *, colocate: bool, offload: bool):
        self.actors, self.rollout_group = actors, rollout
        self.colocate, self.offload = colocate, offload

    def training(self) -> None:
        """The actor's turn: engines release everything, the actor comes back on its devices."""
        if not self.colocate:
            return
        self.rollout_group.release_memory()
        if self.offload:
            self.actors.onload()

    def rollout(self, sync: Callable[[], object], moved: bool) -> object:
        """The engines' turn; `sync()` pushes the actor's weights (returns its metrics, or None)."""
        result = None
        if not self.colocate:
            return sync() if moved else None
        if self.offload:
            self.actors.offload(("grads", "optimizer"))  # room for the engines' weights during the sync
        self.rollout_group.resume_memory(("weights",))
        if moved or self.rollout_group.needs_weight_sync:
            result = sync()
            self.rollout_group.weights_synced()
        if self.offload:
            self.actors.offload(("weights",))
        self.rollout_group.resume_memory(("kv_cache", "cuda_graph"))
        return result
