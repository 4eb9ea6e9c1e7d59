"""One Ray actor per SGLang engine, on the engine's node: it owns the server process.

Placed on its engine's first bundle with no GPU of its own; its server is a child process that sees
exactly the engine's GPUs (`CUDA_VISIBLE_DEVICES`, `--base-gpu-id 0`) and listens on the node's
address. Deliberately light (no torch): sixteen of them start in seconds. The SGLang client on the
driver (`SGLangEngine`) reaches them through `RemoteServer`, which has `EngineServer`'s methods.
"""

from __future__ import annotations

import contextlib

import ray

from pipeline.rollout.server import EngineServer, pick_port


@ray.remote
class EngineServerActor:
    def __init__(self, cfg, index: int, *, host: str, port: int, port_limit: int, log_dir: str,
                 gpus: list[int] | None, memory_saver: bool):  # fmt: skip
        host = host or ray.util.get_node_ip_address()  # the node's address: reachable from every node
        self.server = EngineServer(
            cfg,
            index,
            host=host,
            port=pick_port(host, port, port_limit),
            log_dir=log_dir,
            gpus=gpus,
            memory_saver=memory_saver,
        )

    def where(self) -> dict:
        """This actor's node and what Ray made visible to it (the test's view of the placement)."""
        import os

        ctx = ray.get_runtime_context()
        return {
            "node_id": ctx.get_node_id(),
            "node_ip": ray.util.get_node_ip_address(),
            "actor_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        }

    def spec(self) -> dict:
        return self.server.spec()

    def name(self) -> str:
        return self.server.name

    def url(self) -> str:
        return self.server.url

    def start(self, model_path: str | None = None) -> None:
        self.server.start(model_path)

    def wait_healthy(self, deadline_s: float) -> None:
        self.server.wait_healthy(deadline_s)

    def alive(self) -> bool:
        return self.server.alive()

    def healthy(self) -> bool:
        return self.server.healthy()

    def restart(self, model_path: str, deadline_s: float) -> None:
        self.server.restart(model_path, deadline_s)

    def stop(self, grace_s: float = 10.0) -> None:
        self.server.stop(grace_s)

    def log_tail(self, lines: int = 40) -> str:
        return self.server.log_tail(lines)


class RemoteServer:
    """`EngineServer`'s interface over an `EngineServerActor` (what `SGLangEngine` manages)."""

    def __init__(self, actor):
        self.actor = actor
        self.name, self.url = ray.get([actor.name.remote(), actor.url.remote()])

    def start(self, model_path: str | None = None) -> None:
        ray.get(self.actor.start.remote(model_path))

    def wait_healthy(self, deadline_s: float) -> None:
        ray.get(self.actor.wait_healthy.remote(deadline_s))

    def alive(self) -> bool:
        try:
            return ray.get(self.actor.alive.remote(), timeout=60)
        except (ray.exceptions.RayError, TimeoutError):  # the owner (or its node) is gone
            return False

    def healthy(self) -> bool:
        return ray.get(self.actor.healthy.remote())

    def restart(self, model_path: str, deadline_s: float) -> None:
        ray.get(self.actor.restart.remote(model_path, deadline_s))

    def stop(self, grace_s: float = 10.0) -> None:
        with contextlib.suppress(ray.exceptions.RayError):  # a dead owner took its server's group along
            ray.get(self.actor.stop.remote(grace_s))

    def log_tail(self, lines: int = 40) -> str:
        return ray.get(self.actor.log_tail.remote(lines))
