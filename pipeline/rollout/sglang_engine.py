"""Rollout on SGLang servers: one `python -m sglang.launch_server` per engine, sglang-router in front.

    engine = SGLangEngine(RolloutConfig(model_path=..., num_engines=2))
    samples = engine.generate(prompt_ids, SamplingParams(max_new_tokens=64))
    engine.update_weights(export_hf_weights(actor, hf_config), version=step)   # rank 0 only
    check_weight_sync(engine, probe_ids, prompt_lens, trainer_logprobs)        # or the step stops
    engine.shutdown()

`SGLangEngine` composes the parts, each in its own module:
  - `lifecycle.ServerFleet`: starts and owns the servers (`server.EngineServer`, local or one Ray
    actor per engine) and `router.Router`; restarts the ones that die;
  - `client.EngineClient`: the HTTP side: generation with retries, teacher-forced log-probs, abort,
    pause/resume, memory release/resume, health;
  - `transports.*`: weight sync by `cfg.sync_method` ("distributed", "tensor", "disk"), each send
    wrapped in `begin_weight_update` / `end_weight_update` and tagging the servers with the new
    weight version, which every sample then carries.
A client of servers someone else owns (`attach`) has no fleet: it restarts nothing.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path

import torch

from pipeline.rollout.base import Sample, SamplingParams
from pipeline.rollout.client import EngineClient
from pipeline.rollout.config import RolloutConfig, RolloutConfigError
from pipeline.rollout.lifecycle import ServerFleet, local_servers
from pipeline.rollout.transports import make_transport

_MB = 1024**2


class SGLangEngine:
    """`Engine` on SGLang servers started and owned by this object (see the module docstring)."""

    def __init__(
        self,
        cfg: RolloutConfig,
        *,
        eos_token_ids: list[int] | None = None,
        attach_urls: list[str] | None = None,
        servers: list | None = None,
    ):
        """Start and own `servers` (objects with `EngineServer`'s methods, e.g. one Ray actor per
        engine on the engine's node; default: `cfg.num_engines` local `EngineServer`s), or only talk
        to `attach_urls` (someone else owns them: no start, stop or restart)."""
        self.cfg = cfg.validate()
        if not cfg.model_path and attach_urls is None:
            raise RolloutConfigError("rollout.model_path: set the HF checkpoint directory the servers load")
        self.weight_version = 0
        self.metrics: dict[str, float] = {}
        self.abort_check = None  # called every second during a rollout; True aborts it (preemption)
        self._tmp = tempfile.mkdtemp(prefix="sglang-engine-")
        self._transports: dict = {}
        self.fleet: ServerFleet | None = None
        eos = list(eos_token_ids or [])
        if attach_urls is not None:  # a client of servers someone else owns: no start, stop or restart
            self.client = EngineClient(cfg, attach_urls, eos_token_ids=eos, metrics=self.metrics)
            return
        log_dir = Path(cfg.log_dir or self._tmp) / "logs"
        servers = local_servers(cfg, log_dir) if servers is None else servers
        self.fleet = ServerFleet(cfg, servers, log_dir, on_restart=self._engine_restarted)
        try:
            self.fleet.start()
        except BaseException:
            self.shutdown()
            raise
        self.client = EngineClient(
            cfg, self.fleet.urls, eos_token_ids=eos, fleet=self.fleet, metrics=self.metrics
        )

    @classmethod
    def attach(cls, cfg: RolloutConfig, urls: list[str], **kwargs) -> SGLangEngine:
        """A client of running servers (another process owns them): generate, sync, verify; no restarts.

        This is how a trainer rank that did not start the servers (a spawned or Ray worker) syncs them.
        """
        return cls(cfg, attach_urls=urls, **kwargs)

    @property
    def servers(self) -> list:
        return self.fleet.servers if self.fleet is not None else []

    @property
    def router(self):
        return self.fleet.router if self.fleet is not None else None

    @property
    def engine_urls(self) -> list[str]:
        return list(self.client.urls)

    @property
    def url(self) -> str:
        """The router's address, or the first engine's without a router."""
        return self.client.url

    # ---- generation and log-probs -------------------------------------------------------------
    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[Sample]:
        return asyncio.run(self.agenerate(prompts, params))

    async def agenerate(self, prompts: list[list[int]], params: SamplingParams) -> list[Sample]:
        return await self.client.agenerate(
            prompts, params, version=self.weight_version, abort_check=self.abort_check
        )

    def abort(self) -> None:
        """Abort every running request; `generate` then fails with RolloutAborted instead of retrying."""
        self.client.abort()

    def logprobs(
        self, sequences: list[list[int]], prompt_lens: list[int], temperature: float = 1.0, *, engine: int = 0
    ) -> list[list[float]]:
        """Teacher-forced log-probs of each sequence's tokens after its prompt, from server `engine`."""
        return self.client.logprobs(sequences, prompt_lens, temperature, engine=engine)

    def engine_logprobs(
        self, sequences: list[list[int]], prompt_lens: list[int], temperature: float = 1.0
    ) -> list[list[list[float]]]:
        """`logprobs` from every server (what `check_weight_sync` compares)."""
        return [
            self.logprobs(sequences, prompt_lens, temperature, engine=e) for e in range(len(self.client.urls))
        ]

    # ---- weight sync --------------------------------------------------------------------------
    def update_weights(
        self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int, *, method: str | None = None
    ) -> None:
        """Push the `(hf_name, tensor)` stream to every engine and tag `version`.

        `method` overrides `cfg.sync_method` for this call ("distributed", "tensor" or "disk").
        """
        method = method or self.cfg.sync_method
        if method not in self._transports:
            self._transports[method] = make_transport(method, self.client, self.cfg, self._tmp)
        t0 = time.perf_counter()
        self.client.control("begin_weight_update", {})
        try:
            sent = self._transports[method].send(named_tensors, str(int(version)))
        finally:
            self.client.control("end_weight_update", {})
        dt = time.perf_counter() - t0
        self.weight_version = int(version)
        if sent.checkpoint is not None and self.fleet is not None:
            self.fleet.loaded(sent.checkpoint, int(version))
        self.metrics.update(
            {
                "sync/time_s": dt,
                "sync/mb": sent.nbytes / _MB,
                "sync/mb_per_s": sent.nbytes / _MB / dt if dt > 0 else 0.0,
                "sync/tensors": sent.ntensors,
                "sync/version": int(version),
            }
        )

    def _engine_restarted(self) -> None:
        if "distributed" in self._transports:
            self._transports["distributed"].reset()

    # ---- lifecycle ----------------------------------------------------------------------------
    def pause(self) -> None:
        """Stop scheduling; running requests are retracted and continue after resume()."""
        self.client.pause()

    def resume(self) -> None:
        self.client.resume()

    def release_memory(self, tags: list[str] | None = None) -> None:
        """Give device memory back: `tags` of "weights", "kv_cache", "cuda_graph" (None: all)."""
        self.client.release_memory(tags)

    def resume_memory(self, tags: list[str] | None = None) -> None:
        """Take back what `release_memory(tags)` gave (None: all)."""
        self.client.resume_memory(tags)

    def health(self) -> bool:
        return self.fleet.healthy() if self.fleet is not None else self.client.health()

    def shutdown(self) -> None:
        """Close the transports (leaving the weight-update group), then stop the router and the
        servers this object started."""
        for transport in getattr(self, "_transports", {}).values():
            transport.close()
        self._transports = {}
        if getattr(self, "fleet", None) is not None:
            self.fleet.stop()
        shutil.rmtree(self._tmp, ignore_errors=True)

    def __enter__(self) -> SGLangEngine:
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()
