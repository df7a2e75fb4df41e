"""Run a function on N local gloo processes: for tests, benchmarks and demos on one machine.

The rendezvous binds to 127.0.0.1 on a port the OS picked as free (bound to port 0), each
rank's exception comes back with its traceback, and a deadline stops hung runs.
"""

from __future__ import annotations

import datetime
import os
import queue
import socket
import traceback
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from haloseg.errors import HalosegError

__all__ = ["DistributedRunError", "free_port", "run_distributed"]


class DistributedRunError(RuntimeError):
    """A rank failed or the run passed its deadline."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that the OS reports free (bind to port 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(
    fn: Callable[..., Any],
    rank: int,
    world_size: int,
    port: int,
    threads: int,
    args: tuple,
    env: dict[str, str],
    results: Any,
) -> None:
    os.environ.update(env)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(threads)
    try:
        dist.init_process_group(
            "gloo",
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(seconds=int(os.environ.get("HALOSEG_GLOO_TIMEOUT", "120"))),
        )
        results.put((rank, True, fn(*args)))
    except HalosegError as e:  # bad input: the parent raises the same one-line error
        results.put((rank, False, e))
    except BaseException:  # noqa: BLE001 - every failure must reach the parent
        results.put((rank, False, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_distributed(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    timeout: float = 300.0,
    threads: int = 1,
    env: dict[str, str] | None = None,
) -> list[Any]:
    """Run ``fn(*args)`` on ``world_size`` fresh gloo processes; return each rank's result.

    ``fn`` must be importable (module level). ``env`` is set in each process before start.
    """
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(
            target=_worker,
            args=(fn, r, world_size, port, threads, args, env or {}, results),
            daemon=True,
        )
        for r in range(world_size)
    ]
    saved = {k: os.environ.get(k) for k in env or {}}
    # Set in the parent while starting: some variables (glibc's MALLOC_*) are read only
    # when a process starts, too early for the child to set them itself.
    os.environ.update(env or {})
    try:
        for p in procs:
            p.start()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    out: dict[int, Any] = {}
    deadline = datetime.datetime.now() + datetime.timedelta(seconds=timeout)
    try:
        while len(out) < world_size:
            left = (deadline - datetime.datetime.now()).total_seconds()
            if left <= 0:
                raise DistributedRunError(
                    f"{fn.__name__} on {world_size} ranks passed its {timeout:.0f} s deadline; "
                    f"finished ranks: {sorted(out)}"
                )
            try:
                rank, ok, value = results.get(timeout=min(left, 1.0))
            except queue.Empty:
                dead = [r for r, p in enumerate(procs) if p.exitcode not in (None, 0)]
                if dead and not any(r in out for r in dead):
                    raise DistributedRunError(
                        f"rank {dead[0]} of {fn.__name__} died with exit code "
                        f"{procs[dead[0]].exitcode}"
                    ) from None
                continue
            if not ok:
                if isinstance(value, HalosegError):
                    raise value
                raise DistributedRunError(f"rank {rank} of {fn.__name__} failed:\n{value}")
            out[rank] = value
    finally:
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.terminate()
    return [out[r] for r in range(world_size)]
