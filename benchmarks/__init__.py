"""Benchmark suite for avalanche_distributed_rehearsal (application layer, not shipped).

One command runs everything and writes ``results.json``, ``results.md`` and ``scaling.png``::

    python -m benchmarks.run --out results/          # full suite (about 6 min on 2 idle CPU cores)
    python -m benchmarks.run --smoke --out results/smoke/  # tiny sizes, seconds (run by the tests)

Modules: :mod:`.timing` (the only timers), :mod:`.launch` (multi-rank spawning),
:mod:`.step_overhead` (training-step overhead, online continual learning),
:mod:`.memory` (buffer bytes per rank), :mod:`.buffer_ops` (insert / draw / exchange),
:mod:`.exchange` (exchange step against a bare all-to-all), :mod:`.scaling` (bytes and
time against world size), :mod:`.report` (Markdown, targets, plot).
"""
