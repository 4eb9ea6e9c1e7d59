"""Task rewards scored in worker processes, each response under a deadline.

    pool = RewardPool("math", workers=2, timeout_s=5.0)
    scores = pool.score(responses, ground_truths)   # [TaskScore(acc, status, error)], in order
    pool.metrics()   # {"reward/timeouts": n, "reward/errors": m} since the last call
    pool.close()

A reward function is user code (or sympy, behind math-verify) and may hang or raise. math-verify's
own timeout is a `signal.alarm`, which works only on a process's main thread and cannot interrupt
C code (a regular expression that backtracks forever never returns to the interpreter); it is off,
and the pool enforces the deadline from outside instead: a response still running after
`timeout_s` scores as incorrect with status "timeout", its worker is killed (SIGKILL, whatever it is
stuck in) and replaced, and the rest of that worker's share goes to the others. A response whose function raises (or returns no
`acc`) scores as incorrect with status "error". The run goes on either way; only a function that
raises on every response of a call stops it (`RewardFnError`), since that is a bug, not a response.

Workers are spawned (fresh interpreters: the driver holds Ray's and torch's threads, which a fork
would copy mid-flight) and get a share of the responses at a time, streaming back one result per
response, so the deadline is per response while a message carries many. They start in the
background (the driver starts Ray meanwhile); `score` gives work to each as it becomes ready.
`workers=0` scores in this process, without deadlines (debugging, and callers that have no pool).
"""

from __future__ import annotations

import contextlib
import logging
import math
import multiprocessing as mp
import signal
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait

from pipeline.errors import ConfigError

log = logging.getLogger("pipeline.rewards")

OK, TIMEOUT, ERROR = "ok", "timeout", "error"
_LOGGED_PER_CALL = 3  # responses named in the log per call and kind; the rest are counted


class RewardFnError(ConfigError):
    """The configured reward function failed on every response: it is broken, not the responses."""


@dataclass(slots=True)
class TaskScore:
    acc: float  # task correctness in [0, 1] (0 for a timeout or an error)
    status: str = OK  # "ok", "timeout" or "error"
    error: str | None = None  # what went wrong, for the log


def score_one(fn: Callable, response: str, truth: str) -> TaskScore:
    """`fn(response, truth)` -> {"acc": x, ...} or x, as a TaskScore; an exception is an error score."""
    try:
        result = fn(response, truth)
        return TaskScore(float(result["acc"] if isinstance(result, dict) else result))
    except Exception as e:  # the reward function's own failure, whatever it is
        return TaskScore(0.0, ERROR, f"{type(e).__name__}: {e}"[:300])


def _serve(conn: Connection, fn_path: str) -> None:
    """A worker: load the function once, then score (index, response, truth) triples as they come."""
    from pipeline.rewards.compute import load_reward_fn

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the driver's to handle
    try:
        fn = load_reward_fn(fn_path)
    except Exception as e:
        conn.send(("failed", f"{type(e).__name__}: {e}"))
        return
    conn.send(("ready", None))
    while True:
        try:
            share = conn.recv()
        except (EOFError, OSError):  # the driver is gone
            return
        if share is None:
            return
        for i, response, truth in share:
            s = score_one(fn, response, truth)
            conn.send((i, (s.acc, s.status, s.error)))  # a tuple pickles in a fraction of the time


class _Worker:
    def __init__(self, ctx, fn_path: str):
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_serve, args=(child, fn_path), daemon=True, name="reward-worker")
        self.proc.start()
        child.close()
        self.born, self.ready = time.monotonic(), False
        self.share: deque = deque()  # (i, response, truth) sent and not answered; the first is running
        self.started = 0.0  # when the running one started (the previous answer, or the send)

    def give(self, share: list) -> None:
        self.share.extend(share)
        self.started = time.monotonic()
        self.conn.send(share)

    def kill(self) -> None:
        self.proc.kill()
        self.proc.join(5)
        self.conn.close()


class RewardPool:
    def __init__(
        self, fn: str = "math", workers: int = 2, timeout_s: float = 5.0, start_timeout_s: float = 120.0
    ):
        from pipeline.rewards.compute import load_reward_fn

        self.fn_path, self.timeout_s, self.start_timeout_s = fn, timeout_s, start_timeout_s
        self._fn = load_reward_fn(fn)  # a clear ConfigError here, before any worker starts
        self.counts = {TIMEOUT: 0, ERROR: 0}
        self._ctx = mp.get_context("spawn")
        self._workers = [_Worker(self._ctx, fn) for _ in range(workers)]
        self._todo: deque = deque()  # (i, response, truth) not yet given to a worker
        self._out: list[TaskScore | None] = []

    def wait_ready(self) -> None:
        """Until every worker has loaded the function (`score` waits for the first one itself:
        the workers start while the driver starts Ray)."""
        while not all(w.ready for w in self._workers):
            self._receive(time.monotonic() + 1.0)

    def score(self, responses: list[str], truths: list[str]) -> list[TaskScore]:
        """Task scores of `responses` against `truths`, in order; never raises for one response."""
        if len(responses) != len(truths):
            raise ValueError(f"{len(responses)} responses but {len(truths)} ground truths")
        if not self._workers:
            out = [score_one(self._fn, r, t) for r, t in zip(responses, truths, strict=True)]
        else:
            out = self._score_in_workers(responses, truths)
        self._report(out, responses)
        return out

    def _score_in_workers(self, responses: list[str], truths: list[str]) -> list[TaskScore]:
        self._todo = deque((i, r, t) for i, (r, t) in enumerate(zip(responses, truths, strict=True)))
        self._out = [None] * len(responses)
        size = max(1, math.ceil(len(self._todo) / (4 * len(self._workers))))  # a few shares per worker
        while self._todo or any(w.share for w in self._workers):
            for w in self._workers:
                if w.ready and not w.share and self._todo:
                    w.give([self._todo.popleft() for _ in range(min(size, len(self._todo)))])
            busy = [w for w in self._workers if w.share]
            self._receive(min((w.started + self.timeout_s for w in busy), default=time.monotonic() + 1.0))
            now = time.monotonic()
            for w in [w for w in self._workers if w.share and now > w.started + self.timeout_s]:
                i, _, _ = w.share.popleft()
                self._out[i] = TaskScore(0.0, TIMEOUT, f"longer than reward.timeout_s={self.timeout_s:g}")
                self._replace(w)
        out, self._out = self._out, []
        return out

    def _receive(self, deadline: float) -> None:
        """Handle the messages that arrive before `deadline` (returns at the first that do)."""
        conns = {w.conn: w for w in self._workers}
        for conn in wait(list(conns), timeout=max(0.0, deadline - time.monotonic())):
            w = conns[conn]
            try:
                while conn.poll():
                    self._handle(w, conn.recv())
            except (EOFError, OSError):  # the worker died (os._exit, a crash, the OOM killer)
                self._died(w)
        for w in self._workers:
            if not w.ready and time.monotonic() > w.born + self.start_timeout_s:
                self.close()
                raise ConfigError(
                    f"reward.fn={self.fn_path!r}: a reward worker did not start within {self.start_timeout_s:g} s"
                )

    def _handle(self, w: _Worker, msg) -> None:
        kind, payload = msg
        if kind == "ready":
            w.ready = True
        elif kind == "failed":
            self.close()
            raise ConfigError(f"reward.fn={self.fn_path!r}: a reward worker cannot load it: {payload}")
        else:  # (index, (acc, status, error)) of the response the worker was running
            w.share.popleft()
            w.started = time.monotonic()
            self._out[kind] = TaskScore(*payload)

    def _died(self, w: _Worker) -> None:
        w.proc.join(5)
        if not w.ready:
            code = w.proc.exitcode
            self.close()
            raise ConfigError(f"reward.fn={self.fn_path!r}: a reward worker exited with code {code} at start")
        if w.share:
            i, _, _ = w.share.popleft()
            self._out[i] = TaskScore(0.0, ERROR, f"the reward worker exited with code {w.proc.exitcode}")
        self._replace(w)

    def _replace(self, w: _Worker) -> None:
        """Kill `w` and start another in its place; what it still held goes back to the queue."""
        self._todo.extendleft(reversed(w.share))
        w.share.clear()
        w.kill()
        self._workers[self._workers.index(w)] = _Worker(self._ctx, self.fn_path)

    def _report(self, out: list[TaskScore], responses: list[str]) -> None:
        for status in (TIMEOUT, ERROR):
            bad = [i for i, s in enumerate(out) if s.status == status]
            self.counts[status] += len(bad)
            for i in bad[:_LOGGED_PER_CALL]:
                log.warning(
                    "reward %s on response %d (%r...): %s; scored as incorrect",
                    status,
                    i,
                    responses[i][:60],
                    out[i].error,
                )
            if len(bad) > _LOGGED_PER_CALL:
                log.warning("reward %s on %d responses of %d in all", status, len(bad), len(out))
        if out and all(s.status == ERROR for s in out):
            raise RewardFnError(
                f"reward.fn={self.fn_path!r} failed on every one of {len(out)} responses, "
                f"e.g. {out[0].error}; fix the function"
            )

    def metrics(self, prefix: str = "reward/") -> dict:
        """Timeouts and errors since the last call."""
        out = {f"{prefix}timeouts": self.counts[TIMEOUT], f"{prefix}errors": self.counts[ERROR]}
        self.counts = {TIMEOUT: 0, ERROR: 0}
        return out

    def close(self) -> None:
        for w in self._workers:
            with contextlib.suppress(OSError):  # already dead
                w.conn.send(None)
        for w in self._workers:
            w.proc.join(2)
            if w.proc.is_alive():
                w.proc.kill()
                w.proc.join(2)
            w.conn.close()
        self._workers = []

    def __enter__(self) -> RewardPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
