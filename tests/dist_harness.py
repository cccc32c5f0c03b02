"""Run a function on N local ranks over gloo, from pytest, with a hard timeout."""

from __future__ import annotations

import io
import os
import socket
import traceback

import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank, world, port, fn, args, queue):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    import torch
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world)
        result = fn(rank, world, *args)
        buf = io.BytesIO()
        torch.save(result, buf)  # plain bytes: shared-memory tensors die with the rank
        queue.put((rank, "ok", buf.getvalue()))
    except BaseException:  # noqa: BLE001 - report everything to the parent
        queue.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_ranks(fn, world: int, *args, timeout: float = 120.0, may_die=()):
    """Run ``fn(rank, world, *args)`` on ``world`` spawned ranks; return results by rank.

    ``fn`` must be importable (module level). Ranks in ``may_die`` may exit without
    reporting (their result is None). Raises AssertionError with the rank's
    traceback on failure, and TimeoutError (after killing the ranks) on a hang.
    """
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_entry, args=(r, world, port, fn, args, queue), daemon=True)
             for r in range(world)]
    for p in procs:
        p.start()
    results, errors = {}, []
    import queue as _q
    import time
    deadline = time.monotonic() + timeout
    try:
        while len(results) + len(errors) < world:
            for r in may_die:
                if procs[r].exitcode not in (None, 0) and r not in results:
                    results[r] = None
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"ranks did not finish within {timeout} s")
            try:
                rank, status, payload = queue.get(timeout=min(remaining, 1.0))
            except _q.Empty:
                if any(p.exitcode not in (None, 0) for p in procs) and queue.empty():
                    dead = [i for i, p in enumerate(procs)
                            if p.exitcode not in (None, 0) and i not in may_die]
                    if dead:
                        raise AssertionError(f"rank(s) {dead} died without reporting")
                continue
            if status == "ok":
                import torch
                results[rank] = torch.load(io.BytesIO(payload), weights_only=False)
            else:
                errors.append(f"rank {rank}:\n{payload}")
        if errors:
            raise AssertionError("\n".join(errors))
        return [results[r] for r in range(world)]
    finally:
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
                p.join()
