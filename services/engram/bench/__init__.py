"""``engram bench``: the ingest/recall benchmark of Engram Stream, measured against the limits of
the machine it runs on (raw hnswlib, WAL fsync, loopback gRPC) and against peers (Chroma,
Milvus Lite) in the same run.

Modules, in the order a run uses them: :mod:`.config` (options), :mod:`.workload` (what is
written), :mod:`.limits`, :mod:`.target` (the cluster), :mod:`.compare` and :mod:`.peers`
(side-by-side), :mod:`.load` with :mod:`.workers` and :mod:`.monitor` (the timed phase),
:mod:`.search` (``--find-max``: the highest rate holding the SLO), :mod:`.quality` (recall@10,
during the backlog and after the drain), :mod:`.profiling` (py-spy), :mod:`.report` with
:mod:`.targets`, :mod:`.cost` (core-seconds per million) and :mod:`.tradeoff` (what the service
gave up), :mod:`.markdown` and :mod:`.plots` (results). :mod:`.run` strings them together.
"""

from __future__ import annotations


def main(argv: list[str] | None = None) -> int:
    """Runs ``engram bench`` (imported lazily: the submodules also run as scripts)."""
    from engram.bench.run import main as run_main

    return run_main(argv)


__all__ = ["main"]
