"""The application layer: the class-incremental main job (``python -m avalanche_distributed_rehearsal``).

Modules, one job each: :mod:`.cli` (arguments and their validation), :mod:`.data`
(datasets and the class-incremental benchmark), :mod:`.models` (networks),
:mod:`.methods` (the compared methods), :mod:`.experiment` (the run, in one process or
under torchrun), :mod:`.report` (table, JSON, plots).
"""
