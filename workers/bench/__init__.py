"""``ehr-worker bench``: ehr-worker against a naive baseline (see ``measurements``)."""

from workers.bench.measurements import run_bench

__all__ = ["run_bench"]
