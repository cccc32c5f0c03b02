"""A single background thread that runs buffer jobs in submission order."""

from __future__ import annotations

import concurrent.futures as cf
import threading
import weakref
from typing import Any, Callable, Optional

import torch


class WorkerTimeoutError(TimeoutError):
    """The background worker did not finish a job within the configured timeout."""


def _shutdown(executor: cf.ThreadPoolExecutor) -> None:
    executor.shutdown(wait=True, cancel_futures=True)


class BackgroundWorker:
    """Runs jobs on one daemon-free thread, in order, and hands back their results.

    Args:
        timeout: seconds :meth:`result` waits before raising :class:`WorkerTimeoutError`.
        device: when a CUDA device, jobs run on a dedicated CUDA stream of that device.
            A job waits (on the GPU, not the host) for the work the training stream had
            queued at submission, and the training stream waits for the job's work when
            the result is taken; tensors crossing streams are marked with
            ``record_stream`` so the caching allocator never reuses them too early.

    An exception raised by a job is re-raised by :meth:`result` in the calling thread,
    with the job's original traceback attached. The thread ends on :meth:`close`, when
    the worker is garbage-collected, or at interpreter exit.
    """

    def __init__(self, timeout: float = 300.0, device: Optional[torch.device] = None,
                 name: str = "rehearsal-worker"):
        self.timeout = float(timeout)
        self._executor = cf.ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
        self._finalizer = weakref.finalize(self, _shutdown, self._executor)
        self.device = torch.device(device) if device is not None else None
        self.stream = None
        if self.device is not None and self.device.type == "cuda":
            self.stream = torch.cuda.Stream(device=self.device)
        self._lock = threading.Lock()

    @property
    def closed(self) -> bool:
        return not self._finalizer.alive

    def submit(self, fn: Callable[..., Any], *tensors_in: torch.Tensor) -> cf.Future:
        """Queue ``fn(*tensors_in)``; the tensors must not be modified until the job ends."""
        if self.closed:
            raise RuntimeError("the background worker is closed")
        if self.stream is None:
            return self._executor.submit(fn, *tensors_in)
        ready = torch.cuda.Event()
        ready.record(torch.cuda.current_stream(self.device))
        for t in tensors_in:
            if t.is_cuda:
                t.record_stream(self.stream)
        return self._executor.submit(self._run_on_stream, fn, ready, tensors_in)

    def _run_on_stream(self, fn, ready, tensors_in):
        with torch.cuda.stream(self.stream):
            self.stream.wait_event(ready)
            out = fn(*tensors_in)
            done = torch.cuda.Event()
            done.record(self.stream)
        return out, done

    def result(self, future: cf.Future) -> Any:
        """Wait for ``future`` (at most ``timeout`` seconds) and return its value.

        On CUDA the training stream is made to wait for the job's stream; no host
        synchronisation with the GPU happens here.
        """
        try:
            value = future.result(timeout=self.timeout)
        except cf.TimeoutError:
            raise WorkerTimeoutError(
                f"the rehearsal worker did not finish within {self.timeout:.0f} s; a rank may "
                "have died or stopped calling the buffer (raise `timeout` for slow steps)") from None
        if self.stream is None:
            return value
        out, done = value
        current = torch.cuda.current_stream(self.device)
        current.wait_event(done)
        _record_all(out, current)
        return out

    def run_inline(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run ``fn`` in the calling thread (the synchronous mode's path)."""
        return fn(*args)

    def close(self) -> None:
        """Finish queued jobs and stop the thread. Idempotent."""
        self._finalizer()


def _record_all(obj: Any, stream) -> None:
    if isinstance(obj, torch.Tensor):
        if obj.is_cuda:
            obj.record_stream(stream)
    elif isinstance(obj, dict):
        for v in obj.values():
            _record_all(v, stream)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            _record_all(v, stream)
