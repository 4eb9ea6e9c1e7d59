"""Start and stop one SGLang server as a child process in its own process group (`router.py` uses
`ManagedProcess` for sglang-router; `lifecycle.py` owns a fleet of servers).

A server is `python -m sglang.launch_server` with arguments from `RolloutConfig`; it is healthy once
`GET /health_generate` answers 200 (a real one-token generation). If it dies while starting, the error
shows the tail of its log. `stop()` ends the whole process group (SGLang forks a scheduler and a
detokenizer), SIGTERM first, SIGKILL after a grace period.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from pipeline.rollout.config import RolloutConfig


class ServerError(RuntimeError):
    """A server that did not start, died, or answered a control request with an error."""


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def http_json(url: str, payload: dict | None = None, *, timeout: float = 60.0, method: str | None = None):
    """POST `payload` (or GET without one) and return (status, parsed JSON or text)."""
    data = None if payload is None else json.dumps(payload).encode()
    req = urllib.request.Request(url, data=data, method=method or ("GET" if data is None else "POST"))
    req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            status, body = resp.status, resp.read()
    except urllib.error.HTTPError as e:
        status, body = e.code, e.read()
    try:
        return status, json.loads(body) if body else None
    except ValueError:
        return status, body.decode(errors="replace")


def post_checked(url: str, endpoint: str, payload: dict, *, timeout: float = 600.0):
    """POST a control request to one server; ServerError naming it unless it answered success."""
    status, body = http_json(f"{url}/{endpoint}", payload, timeout=timeout)
    if status != 200 or (isinstance(body, dict) and body.get("success") is False):
        raise ServerError(f"{url}/{endpoint} answered HTTP {status}: {body}")
    return body


def _tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


class ManagedProcess:
    """A child process in its own session, logging to a file, stopped by its process group."""

    def __init__(self, name: str, cmd: list[str], env: dict[str, str], log_path: Path, health_url: str):
        self.name, self.cmd, self.env, self.log_path, self.health_url = name, cmd, env, log_path, health_url
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")  # noqa: SIM115 - the child keeps writing after we return
        try:
            self.proc = subprocess.Popen(
                self.cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        finally:
            log.close()

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def healthy(self, timeout: float = 10.0) -> bool:
        if not self.alive():
            return False
        try:
            status, _ = http_json(self.health_url, timeout=timeout)
        except (OSError, urllib.error.URLError):
            return False
        return status == 200

    def wait_healthy(self, deadline_s: float) -> None:
        end = time.monotonic() + deadline_s
        while time.monotonic() < end:
            if not self.alive():
                code = self.proc.returncode if self.proc is not None else None
                raise ServerError(
                    f"{self.name} exited with code {code} while starting; log tail ({self.log_path}):\n"
                    + _tail(self.log_path)
                )
            if self.healthy(timeout=min(10.0, max(1.0, end - time.monotonic()))):
                return
            time.sleep(1.0)
        self.stop()
        raise ServerError(
            f"{self.name} not healthy after {deadline_s:.0f} s; log tail ({self.log_path}):\n"
            + _tail(self.log_path)
        )

    def stop(self, grace_s: float = 10.0) -> None:
        """SIGTERM the process group, then SIGKILL what is left after `grace_s`."""
        if self.proc is None:
            return
        pgid = self.proc.pid  # start_new_session: the child leads its own group
        for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(pgid, sig)
            except ProcessLookupError:
                break
            end = time.monotonic() + wait
            while time.monotonic() < end and _group_alive(pgid):
                time.sleep(0.1)
            if not _group_alive(pgid):
                break
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=5)

    def log_tail(self, lines: int = 40) -> str:
        return _tail(self.log_path, lines)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    # Zombies still count for killpg; reap what is ours and look again.
    try:
        while os.waitpid(-pgid, os.WNOHANG)[0]:
            pass
    except ChildProcessError:
        pass
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def server_env(cfg: RolloutConfig, gpus: list[int] | None = None) -> dict[str, str]:
    """The parent's whole environment (a job reaper finds the servers by what they inherit), plus
    `cfg.env`, `cfg.pythonpath`, the CPU recipe's variables, and the engine's GPUs when given."""
    env = dict(os.environ)
    env.update(cfg.env)
    if gpus is not None:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(str(g) for g in gpus)
    if cfg.pythonpath:
        env["PYTHONPATH"] = os.pathsep.join([*cfg.pythonpath, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    if cfg.device == "cpu":
        env.setdefault("SGLANG_USE_CPU_ENGINE", "1")
        if cfg.tp_size > 1:  # one OpenMP thread per TP rank, each bound to its own core
            env.setdefault("SGLANG_CPU_OMP_THREADS_BIND", "|".join(str(i) for i in range(cfg.tp_size)))
    return env


def server_command(
    cfg: RolloutConfig,
    model_path: str,
    port: int,
    *,
    host: str | None = None,
    gpus: list[int] | None = None,
    memory_saver: bool = False,
) -> list[str]:
    """`python -m sglang.launch_server ...` for one engine.

    `gpus`: the engine's GPUs, made visible as its only devices (`server_env`), so it starts at
    `--base-gpu-id 0`. `memory_saver`: `--enable-memory-saver`, which lets
    `release_memory_occupation` give the weights' and KV cache's GPU memory back (colocated).
    """
    python = cfg.python or sys.executable
    cmd = [
        python, "-m", "sglang.launch_server",
        "--model-path", model_path,
        "--host", host or cfg.host or "127.0.0.1",
        "--port", str(port),
        "--tp-size", str(cfg.tp_size),
        "--dtype", cfg.dtype,
        "--mem-fraction-static", str(cfg.mem_fraction_static),
        "--skip-server-warmup",
    ]  # fmt: skip
    if cfg.max_total_tokens:
        cmd += ["--max-total-tokens", str(cfg.max_total_tokens)]
    if gpus is not None:
        cmd += ["--base-gpu-id", "0"]
    if memory_saver:
        cmd += ["--enable-memory-saver"]
    if cfg.device == "cpu":  # the CPU path of the recipe: torch-native attention and sampling
        cmd += [
            "--device", "cpu",
            "--attention-backend", "torch_native",
            "--sampling-backend", "pytorch",
            "--disable-cuda-graph",
        ]  # fmt: skip
    return cmd + list(cfg.extra_args)


def port_is_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
        return True


def pick_port(host: str, preferred: int, limit: int) -> int:
    """`preferred`, or the next free port below `limit`, or any free port (another job holds it)."""
    for port in range(preferred, max(preferred + 1, limit)):
        if port_is_free(host, port):
            return port
    return free_port(host)


class EngineServer:
    """One SGLang server: its command, environment, process, health and restarts.

    The same object runs in the process that owns the server: the SGLang client itself (a CPU box,
    tests) or one Ray actor per engine on the engine's node (`pipeline.cluster.rollout_group`).
    """

    def __init__(
        self,
        cfg: RolloutConfig,
        index: int,
        *,
        host: str,
        port: int,
        log_dir: str | Path,
        gpus: list[int] | None = None,
        memory_saver: bool = False,
    ):
        self.cfg, self.index, self.host, self.port = cfg, index, host, port
        self.gpus, self.memory_saver = gpus, memory_saver
        self.log_path = Path(log_dir) / f"engine{index}.log"
        self.process: ManagedProcess | None = None

    @property
    def name(self) -> str:
        return f"sglang engine {self.index} ({self.host}:{self.port})"

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    def command(self, model_path: str | None = None) -> list[str]:
        return server_command(
            self.cfg,
            model_path or self.cfg.model_path,
            self.port,
            host=self.host,
            gpus=self.gpus,
            memory_saver=self.memory_saver,
        )

    def env(self) -> dict[str, str]:
        return server_env(self.cfg, self.gpus)

    def spec(self) -> dict:
        """What would start: the command, the variables added to the inherited environment, the URL."""
        env = self.env()
        added = {k: v for k, v in env.items() if os.environ.get(k) != v}
        return {"command": self.command(), "env": added, "url": self.url, "log": str(self.log_path)}

    def start(self, model_path: str | None = None) -> None:
        self.process = ManagedProcess(
            self.name, self.command(model_path), self.env(), self.log_path, f"{self.url}/health_generate"
        )
        self.process.start()

    def wait_healthy(self, deadline_s: float) -> None:
        self.process.wait_healthy(deadline_s)

    def alive(self) -> bool:
        return self.process is not None and self.process.alive()

    def healthy(self) -> bool:
        return self.process is not None and self.process.healthy()

    def restart(self, model_path: str, deadline_s: float) -> None:
        """Stop what is left of the server, start it again from `model_path`, wait until healthy."""
        self.stop(grace_s=1.0)
        self.start(model_path)
        self.wait_healthy(deadline_s)

    def stop(self, grace_s: float = 10.0) -> None:
        if self.process is not None:
            self.process.stop(grace_s)

    def log_tail(self, lines: int = 40) -> str:
        return _tail(self.log_path, lines)
