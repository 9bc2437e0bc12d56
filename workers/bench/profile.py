"""Where an order's time goes: a sampling profile (py-spy) of the consumer and of the celery
worker's pool processes during the end-to-end run, reduced to the pipeline's stages.

py-spy samples from outside (``py-spy record --pid ... --idle --format raw``), so neither process
runs instrumented code; ``--idle`` keeps samples of threads waiting (on the FHIR server, on Redis),
so each stage is *wall time* of the process per order. Each collapsed stack is assigned to the first
stage whose rule matches one of its frames (:data:`WORKER_STAGES`, :data:`CONSUMER_STAGES`); the
raw files are kept as evidence (``--profile-dir``).

Without py-spy (``pip install py-spy``, in the ``dev`` extra) the profile is skipped and said so.
"""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

# (stage, frame pattern): a stack goes to the first stage (in this order) with a frame matching.
# py-spy frames look like "Class.function (package/module.py:123)".
_F = r"^(?:[\w<>]+\.)*"  # optional "Class." / "outer.<locals>." qualifiers before the function name


def _frame(names: str, module: str = "") -> re.Pattern[str]:
    return re.compile(_F + f"(?:{names}) \\(" + (f".*{module}" if module else ""))


WORKER_STAGES: list[tuple[str, re.Pattern[str]]] = [
    ("context fetch", _frame("_fetch_context", r"workers/")),
    ("order read (id-only events)", _frame("_resolve", r"workers/pipeline")),
    ("payload decrypt", _frame("open_task_payload|unseal", r"workers/payload")),
    ("tokenize", re.compile(_F + r"(?:encode|_feed) \(.*models/|tokenizers")),
    ("protocol model", _frame("predict_protocols?", r"workers/pipeline")),
    ("diagnosis model", re.compile(r"models/(?:diagnosis|phenotypes)\.py")),
    ("model input text", _frame("build_model_input|input_text")),
    ("bundle build + validation", _frame("_prepare|build_writeback_bundle|check_writeback_bundle")),
    ("FHIR write", _frame("_write_batch|_write_alone|write_with_supersede|prepare_supersede|cancel_void_order")),
    ("task result store (Redis)", _frame("_store|_stored|_count_runs?", r"workers/tasks")),
    ("rest of the task", re.compile(r"workers/(?:tasks|pipeline)\.py")),
    ("celery (receive, ack, result)", re.compile(r"celery/|kombu/|billiard/")),
]
CONSUMER_STAGES: list[tuple[str, re.Pattern[str]]] = [
    ("parse + validate", _frame("_parse", r"connectors/kafka")),
    ("Celery hand-off (send)", _frame("_send|_flush", r"workers/dispatch")),
    ("wait for results (poll Redis, keep-alive)", _frame("__call__", r"workers/dispatch")),
    ("publish results + commit", _frame("_publish_and_commit", r"connectors/kafka")),
    ("retry bookkeeping", _frame("_spend_budget|_wait_before_retry", r"connectors/kafka")),
    ("Kafka poll", _frame("poll", r"kafka/consumer")),
]
OTHER = "other"


@dataclass
class StageProfile:
    samples: int = 0
    by_stage: dict[str, int] = field(default_factory=dict)


def classify(lines: Sequence[str], rules: list[tuple[str, re.Pattern[str]]], *, root: re.Pattern[str] | None = None) -> StageProfile:
    """Sum py-spy raw lines (``frame;frame;... count``, root first) per stage; with ``root``, only
    stacks holding a frame that matches it (one thread's work) are counted."""
    prof = StageProfile()
    for line in lines:
        stack, _, count = line.rstrip().rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = stack.split(";")
        if root is not None and not any(root.search(f) for f in frames):
            continue
        n = int(count)
        prof.samples += n
        stage = next((name for name, rule in rules for f in reversed(frames) if rule.search(f)), OTHER)
        prof.by_stage[stage] = prof.by_stage.get(stage, 0) + n
    return prof


def py_spy_binary() -> str | None:
    here = Path(sys.executable).parent / "py-spy"
    return str(here) if here.is_file() else shutil.which("py-spy")


class Recorder:
    """``py-spy record`` of one process (and its subprocesses) until :meth:`stop`."""

    def __init__(self, pid: int, out: Path, *, rate: int = 100, subprocesses: bool = False) -> None:
        self.out = out
        self.rate = rate
        self.proc: subprocess.Popen[bytes] | None = None
        self.error: str | None = None
        binary = py_spy_binary()
        if binary is None:
            self.error = "py-spy not installed (pip install py-spy)"
            return
        cmd = [binary, "record", "--pid", str(pid), "--idle", "--format", "raw", "--rate", str(rate),
               "--nonblocking", "--output", str(out)]  # fmt: skip
        if subprocesses:
            cmd.append("--subprocesses")
        out.parent.mkdir(parents=True, exist_ok=True)
        self._log = out.with_suffix(".log").open("wb")
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT)

    def stop(self) -> list[str]:
        """Stop recording (SIGINT: py-spy writes its file) and return the raw lines."""
        if self.proc is None:
            return []
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        if not self.out.is_file():
            self.error = f"py-spy wrote no profile (see {self.out.with_suffix('.log')})"
            return []
        return self.out.read_text(errors="replace").splitlines()


def per_order_ms(prof: StageProfile, rate: int, orders: int) -> dict[str, float]:
    """Milliseconds of sampled time per order for each stage (samples / rate / orders)."""
    return {stage: round(n / rate / orders * 1000.0, 3) for stage, n in sorted(prof.by_stage.items(), key=lambda kv: -kv[1])}
