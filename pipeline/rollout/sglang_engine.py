"""Rollout on SGLang servers: one `python -m sglang.launch_server` per engine, sglang-router in front.

    engine = SGLangEngine(RolloutConfig(model_path=..., num_engines=2))
    samples = engine.generate(prompt_ids, SamplingParams(max_new_tokens=64))
    engine.update_weights(export_hf_weights(actor, hf_config), version=step)   # rank 0 only
    engine.verify(probe_ids, prompt_len, trainer_logprobs)                     # or the step stops
    engine.shutdown()

Generation: prompts go out as `input_ids` (never text: tokenisers differ) in requests of
`batch_size` prompts, at most `max_inflight` at a time, through the router (or round-robin over the
engines without one). A request that fails (connection refused or reset, timeout, 5xx, or an abort
the client did not ask for) is resubmitted; before that, dead engines are restarted and put back
behind the router. Each prompt gets exactly one sample: results are written once, by prompt index.

Weight sync takes the `(hf_name, tensor)` stream of the export generator (`pipeline.actor.export`)
and sends it in buckets of `bucket_bytes`, by `cfg.sync_method`:
  - "distributed": a process group with the servers (`init_weights_update_group`, the trainer is
    rank 0; gloo on CPU, NCCL on GPU), one broadcast per tensor, `update_weights_from_distributed`
    announcing each bucket's names, dtypes and shapes;
  - "tensor": `update_weights_from_tensor` for servers on the trainer's machine (tensors travel as
    shared-memory handles; this process switches torch to the `file_system` sharing strategy, without
    which a CPU server dies deserialising them);
  - "disk": safetensors shards + the checkpoint's config files, then `update_weights_from_disk`.
All three are wrapped in `begin_weight_update` / `end_weight_update` and tag the servers with the new
weight version, which every sample then carries. `verify()` compares the servers' teacher-forced
log-probs of a probe with the trainer's and raises `WeightSyncError` beyond the tolerance.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import logging
import shutil
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from datetime import timedelta
from pathlib import Path

import aiohttp
import torch
import torch.distributed as dist

from pipeline.rollout.base import RolloutAborted, RolloutError, Sample, SamplingParams
from pipeline.rollout.config import RolloutConfig, RolloutConfigError
from pipeline.rollout.server import (
    EngineServer,
    ManagedProcess,
    ServerError,
    free_port,
    http_json,
    router_command,
    server_env,
)

log = logging.getLogger(__name__)

GROUP_NAME = "pipeline_weight_sync"
_MB = 1024**2


class WeightSyncError(RuntimeError):
    """A weight sync that failed or whose result does not match the trainer: the step must stop."""


def bucketed(named: Iterable[tuple[str, torch.Tensor]], bucket_bytes: int) -> Iterator[list]:
    """Group `(name, tensor)` pairs into lists of at most `bucket_bytes` (a bigger tensor goes alone)."""
    bucket, size = [], 0
    for name, tensor in named:
        nbytes = tensor.numel() * tensor.element_size()
        if bucket and size + nbytes > bucket_bytes:
            yield bucket
            bucket, size = [], 0
        bucket.append((name, tensor))
        size += nbytes
    if bucket:
        yield bucket


def sampling_payload(params: SamplingParams, eos_token_ids: Iterable[int] = ()) -> dict:
    """Our SamplingParams as SGLang's `sampling_params` (top_k -1 = off in both)."""
    out = {
        "temperature": params.temperature,
        "top_p": params.top_p,
        "top_k": params.top_k,
        "max_new_tokens": params.max_new_tokens,
        "stop_token_ids": sorted(set(params.stop_token_ids) | set(eos_token_ids)),
        "skip_special_tokens": False,
        "no_stop_trim": True,  # keep the stop token in output_ids, like LocalEngine
    }
    if params.seed is not None:
        out["sampling_seed"] = params.seed
    return out


def _version(meta: dict, default: int) -> int:
    v = meta.get("weight_version")
    return int(v) if isinstance(v, str | int) and str(v).isdigit() else default


def parse_output(prompt: list[int], out: dict, default_version: int) -> Sample:
    """One `/generate` result -> Sample. `output_token_logprobs` rows are `[logprob, token_id, text]`."""
    meta = out["meta_info"]
    ids = list(out["output_ids"])
    rows = meta.get("output_token_logprobs") or []
    if len(rows) != len(ids) or any(int(r[1]) != t for r, t in zip(rows, ids)):
        raise RolloutError(f"SGLang returned {len(rows)} log-probs for {len(ids)} tokens (or other ids)")
    reason = (meta.get("finish_reason") or {}).get("type", "length")
    return Sample(
        prompt_ids=list(prompt),
        response_ids=ids,
        logprobs=[float(r[0]) for r in rows],
        finish_reason="length" if reason == "length" else "stop",
        weight_version=_version(meta, default_version),
        meta={"engine_finish_reason": reason},
    )


class _RetryableError(Exception):
    pass


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
        self.eos_token_ids = list(eos_token_ids or [])
        self.weight_version = 0
        self.metrics: dict[str, float] = {}
        self._tmp = tempfile.mkdtemp(prefix="sglang-engine-")
        self._log_dir = Path(cfg.log_dir or self._tmp) / "logs"
        self._latest_checkpoint = cfg.model_path  # what a restarted server loads
        self._latest_checkpoint_version = 0
        self._restarts = [0] * cfg.num_engines
        self._restart_lock = threading.Lock()
        self._recover_lock = threading.Lock()
        self._recovery: threading.Thread | None = None
        self._recovery_error: BaseException | None = None
        self._group = None  # the weight-update process group, made at the first distributed sync
        self._aborting = False
        self.abort_check = None  # called every second during a rollout; True aborts it (preemption)
        self._rr = 0
        self.router: ManagedProcess | None = None
        self._attached_urls: list[str] | None = None
        if attach_urls is not None:  # a client of servers someone else owns: no start, stop or restart
            self._attached_urls = list(attach_urls)
            self.servers = []
            return
        try:
            if servers is None:
                host = cfg.host or "127.0.0.1"
                ports = [
                    cfg.base_port + i if cfg.base_port else free_port(host) for i in range(cfg.num_engines)
                ]
                servers = [
                    EngineServer(cfg, i, host=host, port=port, log_dir=self._log_dir)
                    for i, port in enumerate(ports)
                ]
            self.servers = list(servers)
            self._start(self.servers)
            if len(self.servers) > 1 and cfg.use_router:
                self._start_router()
        except BaseException:
            self.shutdown()
            raise

    def _start(self, servers: list) -> None:
        """Start the servers and wait until each is healthy.

        On CPU one after the other: SGLang sizes its pools from the memory that disappears while it
        loads, and a neighbour loading at the same time makes that look like its own.
        """
        if self.cfg.device == "cpu":
            for s in servers:
                s.start()
                s.wait_healthy(self.cfg.startup_timeout_s)
            return
        for s in servers:
            s.start()
        with ThreadPoolExecutor(len(servers)) as pool:
            list(pool.map(lambda s: s.wait_healthy(self.cfg.startup_timeout_s), servers))

    def _start_router(self) -> None:
        """sglang-router in front of every engine, on this process's machine (only it sends requests)."""
        cfg = self.cfg
        host = "127.0.0.1"
        port = cfg.router_port or free_port(host)
        rcfg = replace(cfg, host=host)
        self.router = ManagedProcess(
            "sglang-router",
            router_command(rcfg, port, self.engine_urls),
            server_env(cfg),
            self._log_dir / "router.log",
            f"http://{host}:{port}/health",
        )
        self.router.start()
        self.router.wait_healthy(cfg.startup_timeout_s)
        self._wait_router_workers(cfg.startup_timeout_s)

    def _wait_router_workers(self, deadline_s: float) -> None:
        """Until the router lists every engine as healthy (its /health answers before it knows any).

        A restarted engine that the router dropped is registered again.
        """
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

    @classmethod
    def attach(cls, cfg: RolloutConfig, urls: list[str], **kwargs) -> SGLangEngine:
        """A client of running servers (another process owns them): generate, sync, verify; no restarts.

        This is how a trainer rank that did not start the servers (a spawned or Ray worker) syncs them.
        """
        return cls(cfg, attach_urls=urls, **kwargs)

    @property
    def engine_urls(self) -> list[str]:
        if self._attached_urls is not None:
            return list(self._attached_urls)
        return [s.url for s in self.servers]

    @property
    def url(self) -> str:
        """The router's address, or the first engine's without a router."""
        return self.router.health_url.rsplit("/", 1)[0] if self.router is not None else self.engine_urls[0]

    # ---- generation -------------------------------------------------------------------------
    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[Sample]:
        return asyncio.run(self.agenerate(prompts, params))

    async def agenerate(self, prompts: list[list[int]], params: SamplingParams) -> list[Sample]:
        if any(len(p) == 0 for p in prompts):
            raise ValueError("SGLangEngine.generate: empty prompt")
        self._aborting = False
        results: list[Sample | None] = [None] * len(prompts)
        chunks = [list(range(lo, min(lo + self.cfg.batch_size, len(prompts)))) for lo in range(0, len(prompts), self.cfg.batch_size)]  # fmt: skip
        # Every request at once unless capped: SGLang's scheduler queues and batches them itself.
        inflight = self.cfg.max_inflight or len(chunks)
        sem = asyncio.Semaphore(inflight)
        stats = {"retries": 0}
        t0 = time.perf_counter()
        timeout = aiohttp.ClientTimeout(total=self.cfg.request_timeout_s)
        monitor = asyncio.create_task(self._watch_engines())
        try:
            connector = aiohttp.TCPConnector(limit=inflight)  # aiohttp's default caps at 100
            async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
                await asyncio.gather(
                    *(self._run_chunk(session, sem, idx, prompts, params, results, stats) for idx in chunks)
                )
        finally:
            monitor.cancel()
        dt = time.perf_counter() - t0
        if self._attached_urls is None:  # leave every engine up for the next rollout
            if not all(s.alive() for s in self.servers):
                self._kick_recovery()
            await asyncio.get_running_loop().run_in_executor(None, self._join_recovery)
        tokens = sum(len(s.response_ids) for s in results)
        self.metrics.update(
            {
                "rollout/time_s": dt,
                "rollout/samples": len(prompts),
                "rollout/response_tokens": tokens,
                "rollout/tokens_per_s": tokens / dt if dt > 0 else 0.0,
                "rollout/retries": stats["retries"],
                "rollout/engine_restarts": sum(self._restarts),
                "rollout/max_inflight_requests": inflight,
            }
        )
        return results  # type: ignore[return-value]

    async def _run_chunk(self, session, sem, idx, prompts, params, results, stats) -> None:
        payload = {
            "input_ids": [prompts[i] for i in idx],
            "sampling_params": sampling_payload(params, self.eos_token_ids),
            "return_logprob": True,
        }
        delay = self.cfg.retry_backoff_s
        for attempt in range(self.cfg.max_retries + 1):
            if self._aborting:
                raise RolloutAborted("rollout aborted")
            async with sem:
                url = self._next_url()
                try:
                    outs = await self._post_generate(session, url, payload)
                    samples = [parse_output(prompts[i], o, self.weight_version) for i, o in zip(idx, outs)]
                except (_RetryableError, aiohttp.ClientError, TimeoutError, ConnectionError) as e:
                    if attempt == self.cfg.max_retries:
                        raise RolloutError(
                            f"request for prompts {idx[0]}..{idx[-1]} failed {attempt + 1} times: {e!r}"
                        ) from e
                    stats["retries"] += 1
                    log.warning("rollout request to %s failed (%r); recovering and resubmitting", url, e)
                else:
                    for i, s in zip(idx, samples, strict=True):
                        assert results[i] is None, f"prompt {i} answered twice"
                        results[i] = s
                    return
            self._kick_recovery()  # in the background: the other engines keep serving meanwhile
            if self._attached_urls is None and not any(s.alive() for s in self.servers):
                await asyncio.get_running_loop().run_in_executor(None, self._join_recovery)
            await asyncio.sleep(delay)
            delay *= 2

    async def _watch_engines(self, every_s: float = 1.0) -> None:
        """Once a second: abort the rollout if `abort_check()` asks (a preemption); restart a dead
        engine as soon as its process is gone, even while the router hides it."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(every_s)
            if self.abort_check is not None and not self._aborting and self.abort_check():
                log.warning("aborting the running rollout (abort requested, e.g. preemption)")
                await loop.run_in_executor(None, self.abort)
                continue
            if self._attached_urls is None:
                alive = await loop.run_in_executor(None, lambda: all(s.alive() for s in self.servers))
                if not alive:
                    self._kick_recovery()

    def _kick_recovery(self) -> None:
        """Run `recover()` in a background thread unless one is already running."""
        if self._attached_urls is not None:
            return
        with self._restart_lock:
            if self._recovery is not None and self._recovery.is_alive():
                return
            self._recovery_error = None
            self._recovery = threading.Thread(target=self._recover_in_background, daemon=True)
            self._recovery.start()

    def _recover_in_background(self) -> None:
        try:
            self.recover()
        except BaseException as e:  # reported by _join_recovery
            self._recovery_error = e

    def _join_recovery(self) -> None:
        if self._recovery is not None:
            self._recovery.join()
        if self._recovery_error is not None:
            raise self._recovery_error

    async def _post_generate(self, session: aiohttp.ClientSession, url: str, payload: dict) -> list[dict]:
        async with session.post(f"{url}/generate", json=payload) as resp:
            text = await resp.text()
            if resp.status >= 500 or resp.status in (408, 429):
                raise _RetryableError(f"HTTP {resp.status}: {text[:300]}")
            if resp.status != 200:
                raise RolloutError(f"/generate answered HTTP {resp.status}: {text[:500]}")
        outs = json.loads(text)
        outs = outs if isinstance(outs, list) else [outs]
        if len(outs) != len(payload["input_ids"]):
            raise _RetryableError(f"{len(outs)} outputs for {len(payload['input_ids'])} prompts")
        for o in outs:
            if (o.get("meta_info", {}).get("finish_reason") or {}).get("type") == "abort":
                raise _RetryableError(f"request aborted by the server: {o['meta_info']['finish_reason']}")
        return outs

    def _next_url(self) -> str:
        urls = self.engine_urls
        if (self.router is not None and self.cfg.use_router) or len(urls) == 1:
            return self.url
        alive = [u for u, s in zip(urls, self.servers) if s.alive()] or urls
        self._rr += 1
        return alive[self._rr % len(alive)]

    def recover(self) -> None:
        """Restart every engine whose process died (up to `max_restarts` each) and re-register it."""
        if self._attached_urls is not None:
            return  # not ours to restart: retry only
        with self._recover_lock:
            for i, s in enumerate(self.servers):
                if s.alive():
                    continue
                if not self.cfg.restart_dead_engines or self._restarts[i] >= self.cfg.max_restarts:
                    raise RolloutError(f"{s.name} died and may not be restarted; log tail:\n{s.log_tail()}")
                self._restarts[i] += 1
                log.warning("%s died; restarting from %s", s.name, self._latest_checkpoint)
                s.restart(self._latest_checkpoint, self.cfg.startup_timeout_s)
                if self._latest_checkpoint_version:
                    http_json(f"{self.engine_urls[i]}/update_weight_version",
                              {"new_version": str(self._latest_checkpoint_version), "abort_all_requests": False})  # fmt: skip
                self._group = None  # the broadcast group lost a member: rebuild it at the next sync
            if self.router is not None:
                if not self.router.alive():
                    self.router.start()
                    self.router.wait_healthy(self.cfg.startup_timeout_s)
                self._wait_router_workers(self.cfg.startup_timeout_s)

    def abort(self) -> None:
        """Abort every running request; `generate` then fails with RolloutError instead of retrying."""
        self._aborting = True
        self._control("abort_request", {"abort_all": True})

    # ---- teacher-forced log-probs (sync verification) ------------------------------------------
    def logprobs(
        self, sequences: list[list[int]], prompt_lens: list[int], temperature: float = 1.0, *, engine: int = 0
    ) -> list[list[float]]:
        """Log-probs of each sequence's tokens after its prompt, as the server computes them (prefill)."""
        if temperature != 1.0:
            raise ValueError("SGLangEngine.logprobs: prefill log-probs are at temperature 1")
        payload = {
            "input_ids": sequences,
            "sampling_params": {"max_new_tokens": 1, "temperature": 1.0},
            "return_logprob": True,
            "logprob_start_len": [max(n - 1, 0) for n in prompt_lens],
        }
        status, outs = http_json(
            f"{self.engine_urls[engine]}/generate", payload, timeout=self.cfg.request_timeout_s
        )
        if status != 200:
            raise ServerError(f"teacher-forced /generate answered HTTP {status}: {outs}")
        result = []
        for seq, n, o in zip(sequences, prompt_lens, outs, strict=True):
            rows = o["meta_info"]["input_token_logprobs"]
            rows = [r for r in rows if r[0] is not None]  # the first prompt token has none
            lp = [float(r[0]) for r in rows][-(len(seq) - n) :]
            if len(lp) != len(seq) - n:
                raise ServerError(f"expected {len(seq) - n} input log-probs, got {len(rows)}")
            result.append(lp)
        return result

    def verify(
        self,
        sequences: list[list[int]],
        prompt_lens: list[int],
        trainer_logprobs: list[list[float]],
        tolerance: float | None = None,
    ) -> float:
        """Max |engine - trainer| log-prob over the probe and every engine; WeightSyncError if too large."""
        tol = self.cfg.verify_tolerance if tolerance is None else tolerance
        worst = 0.0
        for i in range(len(self.engine_urls)):
            got = self.logprobs(sequences, prompt_lens, engine=i)
            for a, b in zip(got, trainer_logprobs, strict=True):
                if len(a) != len(b):
                    raise WeightSyncError(f"probe lengths differ: engine {len(a)}, trainer {len(b)}")
                worst = max([worst, *(abs(x - y) for x, y in zip(a, b))])
        self.metrics["sync/logprob_max_abs_diff"] = worst
        if not worst <= tol:
            raise WeightSyncError(
                f"after syncing weight version {self.weight_version}, the engines' log-probs of the probe "
                f"differ from the trainer's by {worst:.3g} (tolerance rollout.verify_tolerance={tol:g}): "
                "names, layouts or dtypes of the exported weights do not match the served model"
            )
        return worst

    # ---- weight sync ------------------------------------------------------------------------
    def update_weights(
        self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int, *, method: str | None = None
    ) -> None:
        """Push the `(hf_name, tensor)` stream to every engine and tag `version`.

        `method` overrides `cfg.sync_method` for this call ("distributed", "tensor" or "disk").
        """
        methods = {
            "distributed": self._sync_distributed,
            "tensor": self._sync_tensor,
            "disk": self._sync_disk,
        }
        sync = methods[method or self.cfg.sync_method]
        t0 = time.perf_counter()
        self._control("begin_weight_update", {})
        try:
            nbytes, ntensors = sync(named_tensors, str(int(version)))
        finally:
            self._control("end_weight_update", {})
        dt = time.perf_counter() - t0
        self.weight_version = int(version)
        self.metrics.update(
            {
                "sync/time_s": dt,
                "sync/mb": nbytes / _MB,
                "sync/mb_per_s": nbytes / _MB / dt if dt > 0 else 0.0,
                "sync/tensors": ntensors,
                "sync/version": int(version),
            }
        )

    def _control(
        self, endpoint: str, payload: dict, *, urls: list[str] | None = None, timeout: float = 600.0
    ):
        """POST to every engine at once; raise ServerError naming the engine that refused."""

        def one(url):
            status, body = http_json(f"{url}/{endpoint}", payload, timeout=timeout)
            ok = status == 200 and not (isinstance(body, dict) and body.get("success") is False)
            if not ok:
                raise ServerError(f"{url}/{endpoint} answered HTTP {status}: {body}")
            return body

        urls = urls or self.engine_urls
        with ThreadPoolExecutor(len(urls)) as pool:
            return list(pool.map(one, urls))

    def _ensure_group(self) -> None:
        if self._group is not None:
            return
        cfg, tp = self.cfg, self.cfg.tp_size
        port = cfg.sync_master_port or free_port(cfg.sync_master_addr)
        world = 1 + tp * len(self.engine_urls)
        with ThreadPoolExecutor(len(self.engine_urls)) as pool:
            futures = [
                pool.submit(
                    self._control,
                    "init_weights_update_group",
                    {
                        "master_address": cfg.sync_master_addr,
                        "master_port": port,
                        "rank_offset": 1 + i * tp,
                        "world_size": world,
                        "group_name": GROUP_NAME,
                        "backend": cfg.backend,
                    },  # fmt: skip
                    urls=[url],
                )
                for i, url in enumerate(self.engine_urls)
            ]
            self._group = init_custom_group(
                cfg.backend, f"tcp://{cfg.sync_master_addr}:{port}", world, 0, GROUP_NAME
            )
            for f in futures:
                f.result()

    def _sync_distributed(self, named, version: str) -> tuple[int, int]:
        self._ensure_group()
        device = "cpu" if self.cfg.backend == "gloo" else f"cuda:{torch.cuda.current_device()}"
        nbytes = ntensors = 0
        with ThreadPoolExecutor(1) as pool:
            for bucket in bucketed(named, self.cfg.bucket_bytes):
                tensors = [t.detach().to(device).contiguous() for _, t in bucket]  # gloo: contiguous only
                meta = {
                    "names": [n for n, _ in bucket],
                    "dtypes": [str(t.dtype).removeprefix("torch.") for t in tensors],
                    "shapes": [list(t.shape) for t in tensors],
                    "group_name": GROUP_NAME,
                    "weight_version": version,
                    "flush_cache": True,
                }
                announced = pool.submit(self._control, "update_weights_from_distributed", meta)
                for t in tensors:  # same order as announced: the servers post one receive per name
                    dist.broadcast(t, group_src=0, group=self._group)
                announced.result()
                nbytes += sum(t.numel() * t.element_size() for t in tensors)
                ntensors += len(tensors)
        return nbytes, ntensors

    def _sync_tensor(self, named, version: str) -> tuple[int, int]:
        from multiprocessing.reduction import ForkingPickler

        # CPU tensors cross to the server as shared-memory files; the default file_descriptor strategy
        # kills the receiving server (cpu-recipes.md). Process-wide, as torch allows no other scope.
        torch.multiprocessing.set_sharing_strategy("file_system")
        nbytes = ntensors = 0
        for bucket in bucketed(named, self.cfg.bucket_bytes):
            tensors = [(n, t.detach().cpu().contiguous()) for n, t in bucket]
            buf = io.BytesIO()
            ForkingPickler(buf).dump(tensors)
            payload = base64.b64encode(buf.getvalue()).decode()
            self._control(
                "update_weights_from_tensor",
                {
                    "serialized_named_tensors": [payload] * self.cfg.tp_size,
                    "weight_version": version,
                    "flush_cache": True,
                },  # fmt: skip
            )
            del tensors  # the servers copied them during the call
            nbytes += sum(t.numel() * t.element_size() for _, t in bucket)
            ntensors += len(bucket)
        return nbytes, ntensors

    def _sync_disk(self, named, version: str) -> tuple[int, int]:
        from safetensors.torch import save_file

        root = Path(self.cfg.sync_dir or self._tmp)
        path = root / f"weights-v{version}"
        shutil.rmtree(path, ignore_errors=True)
        path.mkdir(parents=True)
        for f in Path(self.cfg.model_path).iterdir():  # config, generation config, tokenizer
            if (
                f.is_file()
                and not f.name.endswith((".safetensors", ".bin", ".pt"))
                and ".safetensors" not in f.name
            ):
                shutil.copy2(f, path / f.name)
        nbytes = ntensors = 0
        index = {}
        buckets = list(bucketed(named, self.cfg.bucket_bytes))
        for k, bucket in enumerate(buckets):
            shard = f"model-{k + 1:05d}-of-{len(buckets):05d}.safetensors"
            save_file(
                {n: t.detach().cpu().contiguous() for n, t in bucket}, str(path / shard), {"format": "pt"}
            )
            for n, t in bucket:
                index[n] = shard
                nbytes += t.numel() * t.element_size()
                ntensors += 1
        (path / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": nbytes}, "weight_map": index})
        )
        self._control("update_weights_from_disk", {"model_path": str(path), "weight_version": version})
        previous, self._latest_checkpoint = self._latest_checkpoint, str(path)
        self._latest_checkpoint_version = int(version)
        if previous != self.cfg.model_path and Path(previous).parent == root:
            shutil.rmtree(previous, ignore_errors=True)
        return nbytes, ntensors

    # ---- lifecycle --------------------------------------------------------------------------
    def pause(self) -> None:
        """Stop scheduling; running requests are retracted and continue after resume()."""
        self._control("pause_generation", {"mode": "retract"})

    def resume(self) -> None:
        self._control("continue_generation", {})

    def release_memory(self, tags: list[str] | None = None) -> None:
        """Give device memory back: `tags` of "weights", "kv_cache", "cuda_graph" (None: all).

        On GPU this needs the servers started with `--enable-memory-saver` (colocated engines are);
        released weights are gone, not kept: the next sync fills them again.
        """
        self._control("release_memory_occupation", {"tags": list(tags)} if tags else {})

    def resume_memory(self, tags: list[str] | None = None) -> None:
        """Take back what `release_memory(tags)` gave (None: all)."""
        self._control("resume_memory_occupation", {"tags": list(tags)} if tags else {})

    def health(self) -> bool:
        if self._attached_urls is not None:
            return all(http_json(f"{u}/health_generate", timeout=30)[0] == 200 for u in self._attached_urls)
        servers = all(s.healthy() for s in self.servers)
        return servers and (self.router is None or self.router.healthy())

    def shutdown(self) -> None:
        """Leave the weight-update group, then stop the router and the servers this object started."""
        if getattr(self, "_group", None) is not None:
            try:  # the servers first: another trainer process may sync them later (an attached client)
                self._control("destroy_weights_update_group", {"group_name": GROUP_NAME}, timeout=60)
            except (ServerError, OSError) as e:
                log.warning("servers did not leave the weight-update group: %r", e)
            try:
                dist.destroy_process_group(self._group)
            except (RuntimeError, ValueError) as e:  # a custom group unknown to the default world
                log.warning("destroying the weight-update group: %r", e)
            self._group = None
        if getattr(self, "router", None) is not None:
            self.router.stop()
        for s in getattr(self, "servers", []):
            s.stop()
        shutil.rmtree(self._tmp, ignore_errors=True)

    def __enter__(self) -> SGLangEngine:
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()


def init_custom_group(backend: str, init_method: str, world_size: int, rank: int, group_name: str):
    """A process group outside the default one, joined by ranks of other programs (the SGLang servers).

    The mirror image of SGLang's `init_custom_process_group`: the servers build the group the same way
    (a rendezvous store prefixed with the group name, identity rank mapping), so both sides agree.
    Works whether or not this process already has a default group (a Megatron trainer does).
    """
    from torch.distributed.distributed_c10d import (
        Backend,
        PrefixStore,
        _new_process_group_helper,
        _world,
        rendezvous,
    )

    timeout = timedelta(minutes=10)
    store, rank, world_size = next(rendezvous(init_method, rank, world_size, timeout=timeout))
    store.set_timeout(timeout)
    store = PrefixStore(group_name, store)
    pg, _ = _new_process_group_helper(
        world_size, rank, [], Backend(backend), store, group_name=group_name, timeout=timeout
    )
    _world.pg_group_ranks[pg] = {i: i for i in range(world_size)}
    return pg
