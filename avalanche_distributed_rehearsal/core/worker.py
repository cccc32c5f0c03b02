"""A single background thread that runs buffer jobs in submission order."""

from __future__ import annotations

import atexit
import concurrent.futures as cf
import itertools
import queue
import threading
import time
import warnings
import weakref
from typing import Any, Callable, Optional

import torch

#: Seconds the interpreter waits at exit for a job still running (normally milliseconds;
#: a job still running after this is blocked in a collective on a rank that stopped).
EXIT_GRACE_SECONDS = 2.0

_names = itertools.count()
_live: "set[_JobThread]" = set()
_live_lock = threading.Lock()


class WorkerTimeoutError(TimeoutError):
    """The background worker did not finish a job within the configured timeout."""


def _serve(jobs: "queue.SimpleQueue", threads: int) -> None:
    """The thread's loop: run ``(future, fn, args)`` items in order until ``None``.

    The thread first sets its own intra-op thread count: each thread that runs torch ops
    has an OpenMP team of its own, and a worker left at the process default would fight
    the training thread's team for the same cores."""
    torch.set_num_threads(threads)
    while True:
        item = jobs.get()
        if item is None:
            return
        future, fn, args = item
        item = None
        if future.set_running_or_notify_cancel():
            try:
                result = fn(*args)
            except BaseException as exc:  # noqa: BLE001 - handed to the waiting thread
                future.set_exception(exc)
            else:
                future.set_result(result)
            result = None
        future = fn = args = None  # hold no tensor while idle


class _JobThread:
    """The queue and the daemon thread behind one :class:`BackgroundWorker`.

    It holds no reference to the worker, so the worker can be garbage-collected (which
    stops the thread). The thread starts at the first job.
    """

    def __init__(self, name: str, threads: int = 1):
        self.name = name
        self.threads = threads
        self.queue: "queue.SimpleQueue" = queue.SimpleQueue()
        self.thread: Optional[threading.Thread] = None
        self.lock = threading.Lock()
        self.stopping = False

    def submit(self, fn: Callable[..., Any], args: tuple) -> cf.Future:
        future: cf.Future = cf.Future()
        with self.lock:
            if self.stopping:
                raise RuntimeError("the background worker is closed")
            self.queue.put((future, fn, args))
            if self.thread is None:
                # A daemon: a job blocked in a collective (a peer rank stopped) must not
                # keep the interpreter alive after Ctrl-C; see _stop_all_at_exit.
                self.thread = threading.Thread(target=_serve, args=(self.queue, self.threads),
                                               name=self.name, daemon=True)
                with _live_lock:
                    _live.add(self)
                self.thread.start()
        return future

    def stop(self, cancel: bool = False) -> None:
        """Refuse new jobs and tell the thread to end after the queued ones (or, with
        ``cancel``, after the running one: queued jobs are cancelled)."""
        with self.lock:
            if self.stopping:
                return
            self.stopping = True
            if cancel:
                while True:
                    try:
                        item = self.queue.get_nowait()
                    except queue.Empty:
                        break
                    if item is not None:
                        item[0].cancel()
            self.queue.put(None)

    def join(self, timeout: Optional[float]) -> bool:
        """Wait for the thread to end (at most ``timeout`` seconds); True if it has."""
        thread = self.thread
        if thread is threading.current_thread():
            return True  # closed from within a job: the thread ends after it
        if thread is not None:
            thread.join(timeout)
        ended = thread is None or not thread.is_alive()
        if ended:
            with _live_lock:
                _live.discard(self)
        return ended

    def close(self, timeout: Optional[float]) -> bool:
        self.stop()
        return self.join(timeout)


def _stop_all_at_exit() -> None:
    """At interpreter exit: cancel queued jobs, give running ones a short grace, move on.

    Registered with :mod:`atexit` after torch is imported, so it runs before torch's own
    exit handlers. A thread still running after the grace period is a daemon blocked in
    a collective; the interpreter exits without it instead of waiting up to ``timeout``.
    """
    with _live_lock:
        threads = list(_live)
    for jobs in threads:
        jobs.stop(cancel=True)
    deadline = time.monotonic() + EXIT_GRACE_SECONDS
    for jobs in threads:
        jobs.join(max(0.0, deadline - time.monotonic()))


atexit.register(_stop_all_at_exit)


class BackgroundWorker:
    """Runs jobs on one background thread, in order, and hands back their results.

    Args:
        timeout: seconds :meth:`result` waits before raising :class:`WorkerTimeoutError`,
            and the longest :meth:`close` waits for a running job; default the default
            process group's timeout (30 minutes without one).
        device: when a CUDA device, jobs run on a dedicated CUDA stream of that device
            (:meth:`use_device` sets it later, e.g. at the first CUDA batch of a CPU
            shard). A job waits (on the GPU, not the host) for the work the submitting
            thread's current stream had queued at submission, and that stream waits for
            the job's work when the result is taken; tensors crossing streams are marked
            with ``record_stream`` so the caching allocator never reuses them too early.
            Host synchronisations inside a job (a copy to the CPU, a value read) wait for
            the worker's stream only, never for the queued training kernels.

    threads: the intra-op (OpenMP) threads of the worker's torch operations (default 1):
        set by the worker thread for itself, so its small operations never compete with
        the training thread's team for the cores (the training thread keeps its own count).

    An exception raised by a job is re-raised by :meth:`result` in the calling thread,
    with the job's original traceback attached. The thread (named ``rehearsal-worker-N``)
    starts at the first job and ends on :meth:`close` or when the worker is
    garbage-collected. It never delays interpreter exit (Ctrl-C, an exception, the end of
    the script) by more than :data:`EXIT_GRACE_SECONDS`: at exit, queued jobs are
    cancelled and a job still running after the grace period (one blocked in a collective
    on a rank that stopped) is abandoned with the process, whose buffer dies with it anyway.
    """

    def __init__(self, timeout: Optional[float] = None, device: Optional[torch.device] = None,
                 name: str = "rehearsal-worker", threads: int = 1):
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise ValueError(f"threads must be an int >= 1, got {threads!r}")
        if timeout is None:
            from .exchange import process_group_timeout

            timeout = process_group_timeout()
        self.timeout = float(timeout)
        self.threads = threads
        self._jobs = _JobThread(f"{name}-{next(_names)}", threads)
        self._finalizer = weakref.finalize(self, self._jobs.close, self.timeout)
        self._finalizer.atexit = False  # exit is handled by _stop_all_at_exit
        self.device = None
        self.stream = None
        if device is not None:
            self.use_device(device)

    def use_device(self, device: torch.device) -> None:
        """Run jobs on a side stream of CUDA ``device`` from now on (no-op for a CPU
        device, or once a stream exists)."""
        device = torch.device(device)
        if self.stream is not None or device.type != "cuda":
            return
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        self.device = device
        self.stream = torch.cuda.Stream(device=device)

    @property
    def closed(self) -> bool:
        return not self._finalizer.alive

    @property
    def thread(self) -> Optional[threading.Thread]:
        """The background thread, or None before the first job."""
        return self._jobs.thread

    def submit(self, fn: Callable[..., Any], *tensors_in: torch.Tensor) -> cf.Future:
        """Queue ``fn(*tensors_in)``; the tensors must not be modified until the job ends."""
        if self.closed:
            raise RuntimeError("the background worker is closed")
        if self.stream is None:
            return self._jobs.submit(fn, tensors_in)
        ready = torch.cuda.Event()
        ready.record(torch.cuda.current_stream(self.device))
        for t in tensors_in:
            if t.is_cuda:
                t.record_stream(self.stream)
        return self._jobs.submit(self._run_on_stream, (fn, ready, tensors_in))

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

    def close(self, wait: bool = True) -> None:
        """Finish queued jobs and stop the thread, waiting at most ``timeout`` seconds.

        Idempotent. No job runs after it returns, unless one was still running after
        ``timeout`` seconds (blocked in a collective): that one is left to fail on its
        own, with a ``RuntimeWarning``. ``wait=False`` stops the thread after its current
        job without waiting for it (after an error or an interrupt). A thread left running
        never delays interpreter exit by more than :data:`EXIT_GRACE_SECONDS`.
        """
        if self._finalizer.detach() is None:
            return
        if not self._jobs.close(self.timeout if wait else 0.0) and wait:
            warnings.warn(f"the rehearsal worker was still running a job {self.timeout:.0f} s "
                          "after close(); leaving it to end on its own", RuntimeWarning,
                          stacklevel=2)


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
    elif hasattr(obj, "tensors"):  # e.g. a PreparedDraw
        for v in obj.tensors():
            _record_all(v, stream)
