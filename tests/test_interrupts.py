"""Ctrl-C (SIGINT, KeyboardInterrupt) stops training promptly and leaves no worker thread behind."""

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest
import torch

from dist_harness import free_port
from avalanche_distributed_rehearsal.core import RehearsalPipeline, ShardedRehearsalBuffer

pytest.importorskip("avalanche")
from avalanche.core import SupervisedPlugin  # noqa: E402
from avalanche.training import Naive  # noqa: E402

from avalanche_distributed_rehearsal import DistributedReplayPlugin  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def worker_threads():
    return [t for t in threading.enumerate() if t.name.startswith("rehearsal-worker")]


# --------------------------------------------------------------------------- helpers
# A process inherits its parent's SIGINT disposition, and a shell that runs the suite as a
# background job (or a CI runner) hands it SIGINT *ignored*; Python then installs no
# KeyboardInterrupt handler. So every child these tests start, and every test here that
# signals itself, sets the handler it relies on explicitly.
CHILD_PREAMBLE = "import signal\nsignal.signal(signal.SIGINT, signal.default_int_handler)\n"


@pytest.fixture(autouse=True)
def ctrl_c_raises():
    """SIGINT raises KeyboardInterrupt in this process during the test, whatever pytest
    inherited."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, signal.SIG_DFL if previous is None else previous)


def start(script: str, tmp_path, name: str, env=None, inherit_sigint=None) -> subprocess.Popen:
    """Run ``script`` in a child Python. ``inherit_sigint``: the SIGINT disposition the
    child inherits (``signal.SIG_IGN`` is what a shell's background job gets); None: ours."""
    path = tmp_path / name
    path.write_text(CHILD_PREAMBLE + textwrap.dedent(script))
    preexec = None if inherit_sigint is None else (
        lambda: signal.signal(signal.SIGINT, inherit_sigint))
    return subprocess.Popen([sys.executable, str(path)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, cwd=ROOT, preexec_fn=preexec,
                            env={**os.environ, "PYTHONUNBUFFERED": "1",
                                 # this checkout's package, not whichever one is installed
                                 "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
                                 **(env or {})})


def wait_for_line(proc: subprocess.Popen, marker: str, timeout: float) -> list:
    """Read ``proc``'s output until a line holds ``marker``; kill it and fail after ``timeout``."""
    lines = []
    timer = threading.Timer(timeout, proc.kill)
    timer.start()
    try:
        for line in proc.stdout:
            lines.append(line)
            if marker in line:
                return lines
    finally:
        timer.cancel()
    pytest.fail(f"no {marker!r} line within {timeout} s (rc {proc.poll()}):\n"
                + "".join(lines)[-3000:])


def finish(proc: subprocess.Popen, timeout: float) -> tuple:
    """Wait for ``proc`` to exit; kill it and fail if it takes longer than ``timeout``."""
    start = time.monotonic()
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        pytest.fail(f"the process did not exit within {timeout} s of Ctrl-C:\n{out[-3000:]}")
    return out, time.monotonic() - start


def interrupt(proc: subprocess.Popen, timeout: float, again_after: float = 10.0) -> tuple:
    """Ctrl-C ``proc`` and wait for it to exit (see :func:`finish`); press again every
    ``again_after`` seconds, as a user would. A KeyboardInterrupt raised while a
    third-party garbage-collection callback runs (JAX, which Avalanche imports, installs
    one) is reported as "Exception ignored" and lost: not the package's doing. Returns
    ``(output, seconds, presses)``."""
    start, presses = time.monotonic(), 0
    while True:
        proc.send_signal(signal.SIGINT)
        presses += 1
        try:
            proc.wait(timeout=min(again_after, max(0.1, timeout - (time.monotonic() - start))))
            break
        except subprocess.TimeoutExpired:
            if time.monotonic() - start >= timeout:
                break
    out, _ = finish(proc, timeout=max(1.0, timeout - (time.monotonic() - start)))
    return out, time.monotonic() - start, presses


SLEEPER_SCRIPT = """
    import time
    print("READY", flush=True)
    time.sleep(60)
"""


@pytest.mark.timeout(60)
@pytest.mark.parametrize("inherited", [signal.SIG_IGN, signal.SIG_DFL], ids=["ignored", "default"])
def test_children_get_ctrl_c_whatever_sigint_disposition_they_inherit(tmp_path, inherited):
    """The Ctrl-C tests below send SIGINT to children; a suite run as a background job
    hands them SIGINT ignored, so each child must set the handler it relies on itself."""
    proc = start(SLEEPER_SCRIPT, tmp_path, "sleeper.py", inherit_sigint=inherited)
    wait_for_line(proc, "READY", timeout=30)
    proc.send_signal(signal.SIGINT)
    out, seconds = finish(proc, timeout=10)
    assert proc.returncode == -signal.SIGINT and "KeyboardInterrupt" in out, out[-3000:]


# A training script: Naive + the asynchronous plugin on the digits, endless epochs. It
# prints TRAINING once steps are running; at exit it prints the threads still alive (its
# atexit hook is registered first, so it runs last, after the package's own exit hook).
TRAINING_SCRIPT = """
    import atexit, os, sys, threading
    atexit.register(lambda: print("EXIT_THREADS", sorted(t.name for t in threading.enumerate()),
                                  flush=True))
    import torch
    from avalanche.core import SupervisedPlugin
    from avalanche.training import Naive
    from avalanche_distributed_rehearsal.app.data import digits_benchmark
    from avalanche_distributed_rehearsal import DistributedReplayPlugin

    class Marker(SupervisedPlugin):
        steps = 0
        def after_training_iteration(self, strategy, **kwargs):
            Marker.steps += 1
            if Marker.steps == 5:
                print("TRAINING", flush=True)

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10))
    plugin = DistributedReplayPlugin(mem_size=80, batch_size_mem=8, async_mode=True)
    strategy = Naive(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                     train_mb_size=32, train_epochs=100000, plugins=[plugin, Marker()],
                     evaluator=None)
    try:
        strategy.train(digits_benchmark().train_stream[0])
    except KeyboardInterrupt:
        print("INTERRUPTED at step", Marker.steps, flush=True)
        if os.environ["CLOSE"] == "1":
            plugin.close()
            print("AFTER_CLOSE", sorted(t.name for t in threading.enumerate()), flush=True)
        raise
"""


@pytest.mark.timeout(120)
@pytest.mark.parametrize("close", [True, False], ids=["close", "no-close"])
def test_ctrl_c_stops_async_training_promptly_with_no_thread_left(tmp_path, close):
    proc = start(TRAINING_SCRIPT, tmp_path, "train.py",
                 env={"CLOSE": "1" if close else "0"})
    wait_for_line(proc, "TRAINING", timeout=60)
    out, seconds, presses = interrupt(proc, timeout=60)
    assert presses <= 3, out[-3000:]
    # Python re-raises an unhandled KeyboardInterrupt as death by SIGINT.
    assert proc.returncode == -signal.SIGINT, out[-3000:]
    assert "Traceback" in out and "KeyboardInterrupt" in out, out[-3000:]
    assert "INTERRUPTED" in out
    if close:
        assert "AFTER_CLOSE ['MainThread']" in out, out[-3000:]
    assert "EXIT_THREADS ['MainThread']" in out, out[-3000:]
    assert seconds < 30


# Two ranks of the core pipeline; rank 1 stops calling the buffer (alive, but stuck
# elsewhere), so rank 0's background job blocks in a collective. Ctrl-C on rank 0 must not
# wait for that collective's timeout (120 s here) before the process exits.
STUCK_PEER_SCRIPT = """
    import os, time
    import torch, torch.distributed as dist
    from avalanche_distributed_rehearsal.core import RehearsalPipeline, ShardedRehearsalBuffer
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    buf = ShardedRehearsalBuffer(40, seed=0, timeout=120)
    pipe = RehearsalPipeline(buf, 4, 4, async_mode=True, timeout=120)
    for step in range(10 ** 9):
        if rank == 1 and step == 10:
            print("STUCK", flush=True)
            time.sleep(600)
        if rank == 0 and step == 11:
            print("WAITING", flush=True)  # its job for step 11 waits for rank 1
        pipe.augment(torch.randn(8, 3), torch.randint(0, 3, (8,)))
"""


@pytest.mark.timeout(120)
def test_ctrl_c_does_not_wait_for_a_collective_blocked_on_a_stuck_rank(tmp_path):
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "WORLD_SIZE": "2"}
    procs = [start(STUCK_PEER_SCRIPT, tmp_path, f"rank{r}.py", env={**env, "RANK": str(r)})
             for r in range(2)]
    try:
        wait_for_line(procs[1], "STUCK", timeout=60)
        wait_for_line(procs[0], "WAITING", timeout=30)
        time.sleep(1.0)  # rank 0 now waits in augment() for a job blocked in all_gather
        procs[0].send_signal(signal.SIGINT)
        out, seconds = finish(procs[0], timeout=60)
        assert procs[0].returncode == -signal.SIGINT, out[-3000:]
        assert "KeyboardInterrupt" in out
        # Without the fix the interpreter joined the worker thread at exit: 120 s.
        assert seconds < 20, f"exit took {seconds:.1f} s"
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.communicate()


# --------------------------------------------------------------------------- in process
class InterruptAfter(SupervisedPlugin):
    """Raises KeyboardInterrupt (what Ctrl-C does) after ``n`` training iterations."""

    def __init__(self, n):
        super().__init__()
        self.n, self.steps = n, 0

    def after_training_iteration(self, strategy, **kwargs):
        self.steps += 1
        if self.steps == self.n:
            raise KeyboardInterrupt


@pytest.mark.timeout(60)
def test_keyboard_interrupt_in_a_hook_then_close_leaves_no_worker_thread():
    from avalanche_distributed_rehearsal.app.data import digits_benchmark

    bench = digits_benchmark()
    before = set(worker_threads())
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10))
    plugin = DistributedReplayPlugin(mem_size=80, batch_size_mem=8, async_mode=True, timeout=20)
    strategy = Naive(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                     train_mb_size=32, train_epochs=3, plugins=[plugin, InterruptAfter(7)],
                     evaluator=None)
    with pytest.raises(KeyboardInterrupt):
        strategy.train(bench.train_stream[0])
    pipeline = plugin.pipeline
    thread = pipeline.worker.thread
    assert pipeline.step == 7 and thread is not None and thread.is_alive()
    assert set(worker_threads()) - before == {thread}

    start = time.monotonic()
    plugin.close()
    plugin.close()  # idempotent
    assert time.monotonic() - start < 5
    assert not thread.is_alive() and pipeline.worker.closed
    assert set(worker_threads()) <= before
    assert plugin.storage_policy.local_size() > 0  # the buffer is still readable


def block_inserts(buf):
    """Make the insertion stage of ``buf``'s steps wait for ``release`` (set ``entered``
    first); return both events and the original method, to put back."""
    release, entered = threading.Event(), threading.Event()
    original = buf._insert

    def slow_insert(*args, **kwargs):
        entered.set()
        release.wait(20)
        return original(*args, **kwargs)

    buf._insert = slow_insert
    return release, entered, original


@pytest.mark.timeout(60)
def test_interrupted_wait_keeps_the_job_until_it_ends():
    """Ctrl-C while the training thread waits for the worker: the job keeps running, so
    the pipeline must not forget it: drain(), state_dict() (saving a checkpoint on
    interrupt) and the next step wait for it instead of using the buffer alongside it."""
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    buf = ShardedRehearsalBuffer(30, seed=0)
    pipe = RehearsalPipeline(buf, 4, 4, async_mode=True, timeout=20)
    gen = torch.Generator().manual_seed(0)

    def batch():
        return torch.randn(8, 3, generator=gen), torch.randint(0, 3, (8,), generator=gen)

    pipe.augment(*batch())
    pipe.drain()
    release, entered, original = block_inserts(buf)
    pipe.augment(*batch())  # submits a job that blocks in slow_insert
    assert entered.wait(10)
    main = threading.main_thread().ident
    threading.Timer(0.3, signal.pthread_kill, (main, signal.SIGINT)).start()
    with pytest.raises(KeyboardInterrupt):
        pipe.augment(*batch())  # waits for the blocked job; Ctrl-C arrives
    size = len(buf)
    threading.Timer(0.5, release.set).start()
    start = time.monotonic()
    state = pipe.state_dict()  # must wait for the job, not read the buffer alongside it
    assert time.monotonic() - start > 0.3
    assert len(buf) == size + 4 and state["step"] == pipe.step
    buf._insert = original
    for _ in range(3):  # training can go on after the interrupt
        x, _, _ = pipe.augment(*batch())
        assert x.shape[0] == 8 + 4
    pipe.close()
    assert pipe.worker.thread is None or not pipe.worker.thread.is_alive()


@pytest.mark.timeout(60)
def test_ctrl_c_during_close_does_not_wait_twice():
    """A second Ctrl-C while close() waits for a stuck job: close() gives up at once, the
    worker is closed, and its thread ends by itself once the job does."""
    buf = ShardedRehearsalBuffer(30, seed=0)
    pipe = RehearsalPipeline(buf, 4, 4, async_mode=True, timeout=30)
    release, entered, original = block_inserts(buf)
    pipe.augment(torch.randn(8, 3), torch.randint(0, 3, (8,)))
    assert entered.wait(10)
    thread = pipe.worker.thread
    main = threading.main_thread().ident
    threading.Timer(0.3, signal.pthread_kill, (main, signal.SIGINT)).start()
    start = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        pipe.close()
    assert time.monotonic() - start < 5 and pipe.worker.closed
    assert thread.is_alive()  # still in its job, which nothing waits for any more
    release.set()
    thread.join(10)
    assert not thread.is_alive()
    pipe.close()  # idempotent
    with pytest.raises(RuntimeError, match="closed"):
        pipe.augment(torch.randn(8, 3), torch.randint(0, 3, (8,)))
