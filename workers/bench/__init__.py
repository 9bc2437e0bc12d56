"""``ehr-worker bench``: ehr-worker against a naive baseline, in one run, printed side by side.

It prints figures and never asserts them: DESIGN.md's speed targets are checked by reading the
table. ``orders`` makes the orders, ``measurements`` measures (inference, the naive baseline in its
own process, the FHIR server, the pipeline end to end, size and memory), ``table`` prints, ``run``
runs them all on a :class:`workers.local.LocalStack`.

Orders are the bundled demo fixtures cycled (or ``training.datasets.protocol.generate`` with
``source="generated"``), each copy with a fresh id so that every write-back creates resources.
"""

from workers.bench.run import run_bench

__all__ = ["run_bench"]
