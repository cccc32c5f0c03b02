"""Run a function on N local ranks (spawned processes), one process group each.

Application-layer tooling shared by the benchmarks, the study command and the
multi-rank tests. World size 1 runs in a spawned process too (same isolation and thread
settings as the others), by default without a process group, the way a laptop or a
notebook runs the buffer.
"""

from __future__ import annotations

import datetime
import importlib
import io
import os
import queue as _queue
import socket
import time
import traceback
import warnings
from typing import Any, Callable, List, Optional, Sequence, Type

import torch
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def threads_per_rank(world: int) -> int:
    """Intra-op threads per rank: the machine's cores shared out, at least one."""
    return max(1, (os.cpu_count() or 1) // world)


def _quiet_warnings() -> None:
    """Drop Deprecation/User warnings (Avalanche re-enables and emits them on every call)."""
    show = warnings.showwarning

    def quiet(message, category, *args, **kwargs):
        if not issubclass(category, (DeprecationWarning, UserWarning)):
            show(message, category, *args, **kwargs)

    warnings.showwarning = quiet


def _entry(rank, world, port, backend, threads, preimport, group_at_world_1, group_timeout,
           fn, args, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    import torch.distributed as dist

    torch.set_num_threads(threads)
    _quiet_warnings()
    try:
        for name in preimport:  # e.g. Avalanche refuses to import on a rank > 0 once
            importlib.import_module(name)  # a process group exists (it builds loggers)
        if world > 1 or group_at_world_1:
            if backend == "nccl":
                torch.cuda.set_device(rank)
            timeout = None if group_timeout is None else datetime.timedelta(seconds=group_timeout)
            dist.init_process_group(backend, rank=rank, world_size=world, timeout=timeout)
        value = fn(rank, world, *args)
        buf = io.BytesIO()
        torch.save(value, buf)  # plain bytes: shared-memory tensors die with the rank
        results.put((rank, "ok", buf.getvalue()))
    except BaseException:  # noqa: BLE001 - everything goes back to the parent
        results.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def spawn(fn: Callable[..., Any], world: int, *args: Any, backend: str = "gloo",
          threads: Optional[int] = None, timeout: float = 600.0,
          preimport: Sequence[str] = (), group_at_world_1: bool = False,
          group_timeout: Optional[float] = None,
          may_die: Sequence[int] = (), fail_fast: bool = True,
          error: Type[Exception] = RuntimeError, start_method: str = "spawn") -> List[Any]:
    """Run ``fn(rank, world, *args)`` on ``world`` spawned ranks; return results by rank.

    Args:
        fn: defined at module level (it is pickled by name).
        threads: intra-op threads per rank; default :func:`threads_per_rank`.
        preimport: modules imported before the process group is created.
        group_timeout: seconds of the process group's timeout (default: torch's).
        group_at_world_1: create a process group even for one rank (default: none, the
            way a notebook runs the buffer).
        may_die: ranks that may exit without reporting; their result is None.
        fail_fast: raise at the first rank error (the others may be stuck in a
            collective); False waits for every rank and reports all errors together.
        error: the exception type raised for rank errors (carrying the tracebacks) and
            for ranks that died without reporting.
        start_method: ``"spawn"`` (default: a fresh interpreter per rank) or
            ``"forkserver"``: ranks are forked from one server process that imported
            ``preimport`` once, so later calls start ranks in well under a second instead
            of re-importing (Avalanche takes about 10 s and 1 GB per process) and the ranks
            share those pages. The server is single-threaded, so forking it is safe.

    Raises ``TimeoutError`` after killing the ranks if they do not finish in ``timeout``.
    A ``KeyboardInterrupt`` in the caller terminates the ranks at once and propagates.
    """
    if start_method not in ("spawn", "forkserver"):
        raise ValueError(f"start_method must be 'spawn' or 'forkserver', got {start_method!r}")
    ctx = mp.get_context(start_method)
    if start_method == "forkserver":  # effective when the server starts (the first call)
        ctx.set_forkserver_preload(list(preimport))
    results = ctx.Queue()
    port = free_port()
    threads = threads if threads is not None else threads_per_rank(world)
    procs = [ctx.Process(target=_entry, daemon=True,
                         args=(r, world, port, backend, threads, tuple(preimport),
                               group_at_world_1, group_timeout, fn, args, results))
             for r in range(world)]
    for p in procs:
        p.start()
    done, errors = {}, []
    deadline = time.monotonic() + timeout
    try:
        while len(done) + len(errors) < world:
            for r in may_die:
                if procs[r].exitcode not in (None, 0) and r not in done:
                    done[r] = None
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"{fn.__name__} on {world} ranks did not finish in {timeout:.0f} s")
            try:
                rank, status, payload = results.get(timeout=min(left, 1.0))
            except _queue.Empty:
                dead = [i for i, p in enumerate(procs)
                        if p.exitcode not in (None, 0) and i not in may_die]
                if dead and results.empty():
                    raise error(f"rank(s) {dead} of {fn.__name__} died without reporting")
                continue
            if status == "ok":
                done[rank] = torch.load(io.BytesIO(payload), weights_only=False)
            elif fail_fast:  # the other ranks may be stuck in a collective
                raise error(f"{fn.__name__} failed on rank {rank} of {world}:\n{payload}")
            else:
                errors.append(f"rank {rank}:\n{payload}")
        if errors:
            raise error("\n".join(errors))
        return [done[r] for r in range(world)]
    except KeyboardInterrupt:  # Ctrl-C: stop the ranks now, do not wait for them
        for p in procs:
            if p.is_alive():
                p.terminate()
        raise
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
                p.join()
