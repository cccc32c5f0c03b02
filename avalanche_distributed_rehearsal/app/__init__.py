"""The application layer: the class-incremental main job (``python -m avalanche_distributed_rehearsal``)
and the trade-off study (``python -m avalanche_distributed_rehearsal.study``).

Modules, one job each: :mod:`.cli` (arguments and their validation), :mod:`.data`
(datasets and the class-incremental benchmark), :mod:`.models` (networks), :mod:`.methods`
(the compared methods), :mod:`.stock` (Avalanche's stock plugin as the main job runs it),
:mod:`.split` (the skewed rank split), :mod:`.experiment` (the run, in one process or
under torchrun), :mod:`.evaluation`, :mod:`.traffic`, :mod:`.report` (table, JSON,
plots), :mod:`.main` (the entry point), :mod:`.launch` (ranks as spawned processes); the
study: :mod:`.study_grid` (settings, points, runs, records) below :mod:`.study` (the
runner) and :mod:`.study_report` (tables and plots).
"""
