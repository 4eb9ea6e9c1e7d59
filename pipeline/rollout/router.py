"""sglang-router in front of several engines, on the machine of the process that sends the requests.

Its `/health` answers before it knows any worker, so `wait_workers` polls `/workers` until every
engine is listed as healthy, registering again an engine it dropped (a restarted one).
"""

from __future__ import annotations

import sys
import time
from dataclasses import replace
from pathlib import Path

from pipeline.rollout.config import RolloutConfig
from pipeline.rollout.server import ManagedProcess, ServerError, free_port, http_json, server_env


def router_command(cfg: RolloutConfig, port: int, worker_urls: list[str]) -> list[str]:
    python = cfg.python or sys.executable
    return [
        python, "-m", "sglang_router.launch_router",
        "--host", cfg.host or "127.0.0.1",
        "--port", str(port),
        "--worker-urls", *worker_urls,
        "--policy", "round_robin",
    ]  # fmt: skip


class Router:
    """One sglang-router process over `engine_urls`, listening on 127.0.0.1."""

    def __init__(self, cfg: RolloutConfig, engine_urls: list[str], log_dir: Path):
        self.cfg, self.engine_urls = cfg, list(engine_urls)
        host = "127.0.0.1"
        port = cfg.router_port or free_port(host)
        self.url = f"http://{host}:{port}"
        self.process = ManagedProcess(
            "sglang-router",
            router_command(replace(cfg, host=host), port, self.engine_urls),
            server_env(cfg),
            Path(log_dir) / "router.log",
            f"{self.url}/health",
        )

    def start(self) -> None:
        self.process.start()
        self.process.wait_healthy(self.cfg.startup_timeout_s)
        self.wait_workers(self.cfg.startup_timeout_s)

    def ensure_running(self) -> None:
        """Start the router again if it died; make sure it lists every engine as healthy."""
        if not self.process.alive():
            self.process.start()
            self.process.wait_healthy(self.cfg.startup_timeout_s)
        self.wait_workers(self.cfg.startup_timeout_s)

    def wait_workers(self, deadline_s: float) -> None:
        """Until the router lists every engine as healthy; a dropped engine is registered again."""
        end = time.monotonic() + deadline_s
        workers: list = []
        while time.monotonic() < end:
            status, body = http_json(f"{self.url}/workers", timeout=10)
            workers = body.get("workers", []) if status == 200 and isinstance(body, dict) else []
            healthy = {w.get("url") for w in workers if w.get("is_healthy")}
            listed = {w.get("url") for w in workers}
            for url in set(self.engine_urls) - listed:
                http_json(f"{self.url}/workers", {"url": url}, timeout=30)
            if healthy >= set(self.engine_urls):
                return
            time.sleep(0.5)
        raise ServerError(f"sglang-router does not list every engine as healthy: {workers}")

    def healthy(self) -> bool:
        return self.process.healthy()

    def stop(self) -> None:
        self.process.stop()
