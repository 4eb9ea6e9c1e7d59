"""The servers' lifecycle: start every engine (and sglang-router in front of several), restart the
ones that die, stop them all.

`servers` are objects with `EngineServer`'s methods: local `EngineServer`s (a CPU box, tests) or
`RemoteServer`s, one Ray actor per engine on the engine's node (`pipeline.cluster.rollout_group`).
A restarted server loads the newest weights that exist as a checkpoint (`loaded`: the model path, or
the last disk sync's directory) and is tagged with their version; `on_restart` is then called (the
broadcast group lost a member).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from pipeline.rollout.base import RolloutError
from pipeline.rollout.config import RolloutConfig
from pipeline.rollout.router import Router
from pipeline.rollout.server import EngineServer, free_port, http_json

log = logging.getLogger(__name__)


def local_servers(cfg: RolloutConfig, log_dir: Path) -> list[EngineServer]:
    """`cfg.num_engines` servers on this machine, on `cfg.base_port + i` or free ports."""
    host = cfg.host or "127.0.0.1"
    ports = [cfg.base_port + i if cfg.base_port else free_port(host) for i in range(cfg.num_engines)]
    return [EngineServer(cfg, i, host=host, port=port, log_dir=log_dir) for i, port in enumerate(ports)]


class ServerFleet:
    def __init__(self, cfg: RolloutConfig, servers: list, log_dir: Path, on_restart: Callable[[], None]):
        self.cfg, self.servers, self.log_dir, self.on_restart = cfg, list(servers), log_dir, on_restart
        self.router: Router | None = None
        self.restarts = [0] * len(self.servers)
        self.checkpoint, self.checkpoint_version = cfg.model_path, 0  # what a restarted server loads
        self._restart_lock = threading.Lock()
        self._recover_lock = threading.Lock()
        self._recovery: threading.Thread | None = None
        self._recovery_error: BaseException | None = None

    @property
    def urls(self) -> list[str]:
        return [s.url for s in self.servers]

    def start(self) -> None:
        """Start the servers and wait until each is healthy, then the router in front of several.

        On CPU one after the other: SGLang sizes its pools from the memory that disappears while it
        loads, and a neighbour loading at the same time makes that look like its own.
        """
        cfg = self.cfg
        if cfg.device == "cpu":
            for s in self.servers:
                s.start()
                s.wait_healthy(cfg.startup_timeout_s)
        else:
            for s in self.servers:
                s.start()
            with ThreadPoolExecutor(len(self.servers)) as pool:
                list(pool.map(lambda s: s.wait_healthy(cfg.startup_timeout_s), self.servers))
        if len(self.servers) > 1 and cfg.use_router:
            self.router = Router(cfg, self.urls, self.log_dir)
            self.router.start()

    def loaded(self, checkpoint: str, version: int) -> None:
        """The servers now serve `checkpoint` (a directory of HF weights) as `version`."""
        self.checkpoint, self.checkpoint_version = checkpoint, version

    # ---- liveness -----------------------------------------------------------------------------
    def all_alive(self) -> bool:
        return all(s.alive() for s in self.servers)

    def any_alive(self) -> bool:
        return any(s.alive() for s in self.servers)

    def alive_urls(self) -> list[str]:
        return [s.url for s in self.servers if s.alive()]

    def healthy(self) -> bool:
        servers = all(s.healthy() for s in self.servers)
        return servers and (self.router is None or self.router.healthy())

    # ---- recovery -----------------------------------------------------------------------------
    def recover(self) -> None:
        """Restart every engine whose process died (up to `max_restarts` each) and re-register it."""
        with self._recover_lock:
            for i, s in enumerate(self.servers):
                if s.alive():
                    continue
                if not self.cfg.restart_dead_engines or self.restarts[i] >= self.cfg.max_restarts:
                    raise RolloutError(f"{s.name} died and may not be restarted; log tail:\n{s.log_tail()}")
                self.restarts[i] += 1
                log.warning("%s died; restarting from %s", s.name, self.checkpoint)
                s.restart(self.checkpoint, self.cfg.startup_timeout_s)
                if self.checkpoint_version:
                    http_json(f"{s.url}/update_weight_version",
                              {"new_version": str(self.checkpoint_version), "abort_all_requests": False})  # fmt: skip
                self.on_restart()
            if self.router is not None:
                self.router.ensure_running()

    def kick_recovery(self) -> None:
        """Run `recover()` in a background thread unless one is already running."""
        with self._restart_lock:
            if self._recovery is not None and self._recovery.is_alive():
                return
            self._recovery_error = None
            self._recovery = threading.Thread(target=self._recover_in_background, daemon=True)
            self._recovery.start()

    def _recover_in_background(self) -> None:
        try:
            self.recover()
        except BaseException as e:  # reported by join_recovery
            self._recovery_error = e

    def join_recovery(self) -> None:
        if self._recovery is not None:
            self._recovery.join()
        if self._recovery_error is not None:
            raise self._recovery_error

    def stop(self) -> None:
        """The router, then every server."""
        if self.router is not None:
            self.router.stop()
        for s in self.servers:
            s.stop()
