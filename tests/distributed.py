"""Run a function on several CPU processes joined in a gloo group on 127.0.0.1, from inside pytest.

`run_distributed(fn, world_size, *args)` spawns `world_size` processes, each calling
`fn(rank, world_size, *args)` after `init_process_group("gloo")` on a fresh free port, and returns the
list of their return values (rank order). An exception in any rank fails the caller with that rank's
traceback. `fn` must be importable (module-level) because processes are spawned, not forked.
"""

from __future__ import annotations

import os
import pickle
import socket
import tempfile
import time
import traceback

import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank, world_size, port, out_dir, fn, args):
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)
    result, error = None, None
    try:
        dist.init_process_group(
            "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size
        )
        result = fn(rank, world_size, *args)
    except BaseException:  # report every failure, including assertion errors, to the parent
        error = traceback.format_exc()
    finally:
        with open(os.path.join(out_dir, f"rank{rank}.pkl"), "wb") as f:
            pickle.dump((result, error), f)
        if dist.is_initialized():
            dist.destroy_process_group()


def run_distributed(fn, world_size: int, *args, timeout: float = 600.0):
    with tempfile.TemporaryDirectory() as out_dir:
        ctx = mp.spawn(
            _entry,
            args=(world_size, free_port(), out_dir, fn, args),
            nprocs=world_size,
            join=False,
        )
        deadline = time.monotonic() + timeout
        # join() returns False while some processes are still running; it raises if one failed.
        while not ctx.join(max(1.0, deadline - time.monotonic())):
            if time.monotonic() > deadline:
                for proc in ctx.processes:
                    proc.kill()
                raise AssertionError(f"distributed test did not finish within {timeout:.0f} s")
        results, errors = [], []
        for r in range(world_size):
            path = os.path.join(out_dir, f"rank{r}.pkl")
            if not os.path.exists(path):
                errors.append(f"rank {r} wrote no result (crashed?)")
                results.append(None)
                continue
            with open(path, "rb") as f:
                res, err = pickle.load(f)
            results.append(res)
            if err:
                errors.append(f"rank {r}:\n{err}")
        if errors:
            raise AssertionError("distributed test failed:\n" + "\n".join(errors))
        return results
