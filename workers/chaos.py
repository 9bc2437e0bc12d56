"""``ehr-worker chaos``: the pipeline under the faults a hospital sees every week, counted from outside.

Each row publishes N events (imaging orders, lab orders, already-completed orders, invalid events
and poison events whose fetched order breaks validation, interleaved), runs real consumer
processes against a real ``celery worker``, a real FHIR server behind a fault proxy and a Redis
of the run's own (:mod:`workers.chaos_lab`), injects one fault while it runs
(:mod:`workers.chaos_faults`), and then counts **from the FHIR server and the topics**, never
from the worker's bookkeeping:

- lost: a good event without its outcome (an imaging order without its Task, a lab or completed
  order without its result event, a good event dead-lettered, a newer version's Task not the one
  left open, a revoked order's Task still open) or a bad event not on the DLQ;
- duplicated: an order (version) with more than one Task or RiskAssessment;
- dead-lettered: distinct events on the dead-letter topic (each with its reason);
- stuck partitions: partitions whose committed offset is short of the end after the run;
- max queue: the most orders waiting in the Redis queue at any sample (every 20 ms).

The fault suite (tests/faults) runs each row with 1,000 events; ``ehr-worker chaos --events N``
runs the long version and prints the table. Kafka is the caller's; everything else is the run's.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, cast

from kafka import KafkaConsumer, TopicPartition

from connectors.kafka import ensure_topics, make_producer
from connectors.topic_reader import read_records
from schemas.references import parse_reference
from workers.chaos_events import Expected, make_events
from workers.chaos_faults import Fault, rows
from workers.chaos_lab import WINDOW, ChaosLab
from workers.settings import Settings

__all__ = ["WINDOW", "ChaosLab", "Fault", "Row", "RowRun", "as_json", "format_row", "rows", "run_row", "run_table"]

log = logging.getLogger(__name__)


@dataclass
class Row:
    fault: str
    events: int
    lost: int
    duplicated: int
    dead_lettered: int
    stuck_partitions: int
    max_queue: int
    seconds: float
    dlq_redelivered: int = 0  # extra DLQ copies of one event (a crash between publish and commit)
    notes: str = ""

    def ok(self) -> bool:
        return self.lost == 0 and self.duplicated == 0 and self.stuck_partitions == 0


# -- one row -------------------------------------------------------------------------------------


class RowRun:
    """One row in progress: its settings, consumer subprocesses, progress and the queue sampler."""

    def __init__(self, lab: ChaosLab, name: str, tag: str, settings: Settings, ends: dict[int, int]) -> None:
        self.lab, self.name, self.tag, self.settings, self.ends = lab, name, tag, settings, ends
        self.stop_all = threading.Event()
        self.consumers: list[subprocess.Popen[bytes]] = []
        self.stopped: set[int] = set()  # consumers stopped by the row (or already reported gone)
        self.max_queue = 0
        self.notes: list[str] = []

    def start_consumer(self) -> None:
        """A real consumer process (``python -m workers.chaos consume``) on the row's settings and
        the lab's Redis; its log is in the lab's work directory."""
        log_path = self.consumer_log(len(self.consumers))
        env = {**self.lab.consumer_env(self.settings), "PYTHONFAULTHANDLER": "1"}  # a native crash leaves a trace
        proc = subprocess.Popen([sys.executable, "-m", "workers.chaos", "consume"], env=env,
                                stdout=subprocess.DEVNULL, stderr=log_path.open("ab"), start_new_session=True)  # fmt: skip
        self.consumers.append(proc)

    def consumer_log(self, index: int) -> Path:
        return self.lab.workdir / f"consumer-{self.tag}-{index}.log"

    def wait_until_assigned(self, index: int, timeout_s: float = 60.0) -> bool:
        """Until consumer ``index`` has been given partitions (it logs each assignment)."""
        log_path = self.consumer_log(index)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if log_path.exists() and "partitions assigned" in log_path.read_text(errors="replace"):
                return True
            time.sleep(0.2)
        return False

    def consumers_gone_unasked(self) -> list[str]:
        """Consumers that exited without :meth:`stop_consumer` (each reported once in the notes)."""
        gone = []
        for index, proc in enumerate(self.consumers):
            if index not in self.stopped and proc.poll() is not None:
                self.stopped.add(index)
                gone.append(f"consumer {index} exited on its own ({proc.returncode})")
        self.notes.extend(gone)
        return gone

    def stop_consumer(self, index: int, timeout_s: float = 60.0) -> None:
        """SIGTERM: the consumer finishes its batch, leaves the group and exits."""
        proc = self.consumers[index]
        self.stopped.add(index)
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=30)
                self.notes.append(f"consumer {index} did not stop on SIGTERM")
        if proc.returncode not in (0, -signal.SIGTERM):
            self.notes.append(f"consumer {index} exited {proc.returncode}")

    def progress(self) -> float:
        committed = _committed(self.settings)
        return sum(min(committed[p], end) for p, end in self.ends.items()) / max(1, sum(self.ends.values()))

    def wait_for(self, fraction: float, timeout_s: float = 300.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and self.progress() < fraction:
            time.sleep(0.5)

    def sample_queue(self) -> None:
        import redis

        client = redis.Redis.from_url(self.lab.redis_url, socket_timeout=1.0, socket_connect_timeout=1.0)
        while not self.stop_all.is_set():
            try:
                self.max_queue = max(self.max_queue, cast(int, client.llen(self.lab.queue)))  # a sync client
            except Exception as exc:  # noqa: BLE001 - a Redis fault row; the sample resumes
                log.debug("queue sample failed (%s)", type(exc).__name__)
            time.sleep(0.02)


def run_row(lab: ChaosLab, name: str, fault: Fault | None, n: int, *, timeout_s: float = 600.0,
            consumers: int = 1, **event_options: Any) -> Row:  # fmt: skip
    tag = f"{re.sub(r'[^A-Za-z0-9]', '', name.split()[0])}-{uuid.uuid4().hex[:6]}"  # a legal topic name
    events, poisoned = make_events(tag, n, **event_options)
    assert lab.proxy is not None
    lab.proxy.poison(poisoned)
    settings = lab.settings(tag)
    ensure_topics(settings.kafka_bootstrap, [settings.kafka_topic], partitions=PARTITIONS)
    ensure_topics(
        settings.kafka_bootstrap, [settings.kafka_dlq_topic, settings.kafka_result_topic], partitions=1
    )
    producer = make_producer(settings.kafka_bootstrap, max_request_size=4 * 1024 * 1024)
    futures = [producer.send(settings.kafka_topic, key=key.encode(), value=value) for key, value, _ in events]
    producer.flush()
    producer.close()
    # The end of each partition as the broker acknowledged it (Tansu's ListOffsets answers are not reliable).
    ends = {p: 0 for p in range(PARTITIONS)}
    for future in futures:
        meta = future.get(timeout=30)
        ends[meta.partition] = max(ends[meta.partition], meta.offset + 1)

    run = RowRun(lab, name, tag, settings, ends)
    sampler = threading.Thread(target=run.sample_queue, daemon=True)
    sampler.start()
    started = time.monotonic()
    if fault is None or name != "consumer SIGKILL before commit":
        for _ in range(consumers):
            run.start_consumer()
    if fault is not None:
        injector = threading.Thread(target=_inject, args=(fault, run), daemon=True)
        injector.start()
    try:
        _wait_for_the_row(run, started + timeout_s)
        seconds = time.monotonic() - started
        log.info("row %s: progress %.3f after %.0fs", name, run.progress(), seconds)
        if fault is not None:
            injector.join(timeout=120)  # a fault still running (a Redis frozen) ends before counting
    finally:  # a failed or interrupted row leaves no consumer behind to read the next row's topics
        for index in range(len(run.consumers)):
            run.stop_consumer(index)
        run.stop_all.set()
    lab.proxy.heal()
    row = verify(lab, settings, name, events, ends, max_queue=run.max_queue, seconds=seconds)
    row.notes = "; ".join([*run.notes, row.notes])
    return row


PARTITIONS = 3
WORKER_GONE_S = 90.0  # longer than the worker-parent row keeps the worker down
STALLED_S = 120.0  # no progress this long after losing a consumer the row did not stop: give up


def _inject(fault: Fault, run: RowRun) -> None:
    """Run ``fault``; a fault that fails (a consumer that could not be started) says so in the notes."""
    try:
        fault(run)
    except Exception as exc:  # noqa: BLE001 - reported in the row, which then fails its counts
        run.notes.append(f"the fault failed: {type(exc).__name__}: {exc}")
        log.exception("row %s: the fault failed", run.name)


def _wait_for_the_row(run: RowRun, deadline: float) -> None:
    """Until every event is committed or ``deadline``; gives up early, with a note, when the lab's
    Celery worker has been gone for ``WORKER_GONE_S`` or nothing has moved for ``STALLED_S`` after
    a consumer exited on its own (nothing would finish the row)."""
    gone_since: float | None = None
    consumer_lost, last_progress, moved_at = False, -1.0, time.monotonic()
    while time.monotonic() < deadline and (progress := run.progress()) < 1.0:
        time.sleep(0.5)
        if progress > last_progress:
            last_progress, moved_at = progress, time.monotonic()
        consumer_lost = bool(run.consumers_gone_unasked()) or consumer_lost
        if consumer_lost and time.monotonic() - moved_at > STALLED_S:
            run.notes.append(f"no progress for {STALLED_S:.0f}s after a consumer exited on its own")
            return
        worker = run.lab.worker
        if worker is None or worker.proc.poll() is None:
            gone_since = None
            continue
        gone_since = gone_since or time.monotonic()
        if time.monotonic() - gone_since > WORKER_GONE_S:
            log_path = run.lab.workdir / "worker.log"
            run.notes.append(f"the lab's celery worker exited ({worker.proc.returncode}); see {log_path}")
            return


def _committed(settings: Settings) -> dict[int, int]:
    consumer = KafkaConsumer(bootstrap_servers=settings.kafka_bootstrap, group_id=settings.kafka_group,
                             enable_auto_commit=False)  # fmt: skip
    try:
        return {
            p: consumer.committed(TopicPartition(settings.kafka_topic, p)) or 0 for p in range(PARTITIONS)
        }
    finally:
        consumer.close()


def verify(lab: ChaosLab, settings: Settings, name: str, events: list[tuple[str, bytes, Expected]],
           ends: dict[int, int], *, max_queue: int, seconds: float) -> Row:  # fmt: skip
    """Count the row's outcome from the FHIR server and the topics."""
    found = _suggestions(lab, f"{settings.kafka_topic.removeprefix('ev-')}-")
    tasks = Counter({oid: sum(len(v) for v in by_version.values()) for oid, by_version in found.tasks.items()})
    dlq_copies: Counter[str] = Counter()
    reasons: dict[str, str] = {}
    for rec in read_records(settings.kafka_bootstrap, settings.kafka_dlq_topic):
        key = (rec.key or b"").decode(errors="replace")
        dlq_copies[key] += 1
        reasons[key] = dict(rec.headers or []).get("ehrw-reason-code", b"").decode()
    results: dict[str, set[str]] = defaultdict(set)
    for rec in read_records(settings.kafka_bootstrap, settings.kafka_result_topic):
        ref = parse_reference(json.loads(rec.value).get("order"))
        if ref is not None:
            results[ref.id].add(str(json.loads(rec.value).get("status")))

    lost = duplicated = 0
    missing: Counter[str] = Counter()  # which expectations failed, for the notes
    for key, _, exp in events:
        wrong = 0
        if exp.kind in BAD_KINDS:
            wrong = int(dlq_copies[key] == 0 or not reasons.get(key)) + sum(tasks[o] for o in exp.orders)
        elif exp.kind in ("v2", "revoked"):  # version 1 was the event before: counted here, once
            (oid,) = exp.orders
            open_ = [v for v, statuses in found.tasks[oid].items() for st in statuses if st == "requested"]
            wrong = int(dlq_copies[key] > 0)
            if exp.kind == "v2":
                wrong += int("2" not in open_) + int(bool(set(open_) - {"2"}))  # v2's Task open, no other
            else:
                wrong += len(open_) + int(not results.get(oid))  # nothing left open, the void reported
            duplicated += sum(len(st) > 1 for st in found.tasks[oid].values()) + sum(
                n > 1 for n in found.risks[oid].values()
            )
        elif exp.kind != "v1":
            wrong = int(dlq_copies[key] > 0)
            for oid in exp.orders:
                if oid in exp.imaging:
                    wrong += int(tasks[oid] == 0)
                    duplicated += int(tasks[oid] > 1) + int(sum(found.risks[oid].values()) > 1)
                else:
                    wrong += int(not results.get(oid)) + int(tasks[oid] > 0)
        lost += wrong
        if wrong:
            missing[exp.kind] += wrong
    committed = _committed(settings)
    stuck = sum(1 for p, end in ends.items() if committed[p] < end)
    bad_events = sum(1 for _, _, e in events if e.kind in BAD_KINDS)
    return Row(
        fault=name, events=len(events), lost=lost, duplicated=duplicated,
        dead_lettered=sum(1 for k in dlq_copies if dlq_copies[k]), stuck_partitions=stuck, max_queue=max_queue,
        seconds=round(seconds, 1), dlq_redelivered=sum(dlq_copies.values()) - len(dlq_copies),
        notes=f"{bad_events} bad events" + (f"; lost by kind {dict(missing)}" if missing else ""),
    )  # fmt: skip


BAD_KINDS = ("invalid", "poison", "oversized")


@dataclass
class _Found:
    tasks: dict[str, dict[str | None, list[str]]]  # order id -> focus version -> Task statuses
    risks: dict[str, Counter[str | None]]  # order id -> basis version -> RiskAssessments


def _suggestions(lab: ChaosLab, id_prefix: str) -> _Found:
    """The suggestion Tasks and RiskAssessments on the FHIR server for the row's orders."""
    found = _Found(defaultdict(lambda: defaultdict(list)), defaultdict(Counter))
    fhir = lab.fhir()
    for res in fhir.search("Task", {"_count": "500"}):
        ref = parse_reference((res.get("focus") or {}).get("reference"))
        if ref is not None and ref.resource_type == "ServiceRequest" and ref.id.startswith(id_prefix):
            found.tasks[ref.id][ref.version].append(str(res.get("status")))
    for res in fhir.search("RiskAssessment", {"_count": "500"}):
        for basis in res.get("basis") or []:
            ref = parse_reference(basis.get("reference"))
            if ref is not None and ref.resource_type == "ServiceRequest" and ref.id.startswith(id_prefix):
                found.risks[ref.id][ref.version] += 1
    return found


def run_table(lab: ChaosLab, n: int, *, names: list[str] | None = None, long: bool = False,
              echo: Callable[[str], None] = print) -> list[Row]:  # fmt: skip
    table: list[Row] = []
    for name, fault, options in rows(n, long=long):
        if names and not any(part.lower() in name.lower() for part in names):
            continue
        consumers = options.pop("consumers", 1)
        # Give up on a row only when it is clearly stuck: a busy host needs about 0.1 s an event.
        row = run_row(lab, name, fault, n, consumers=consumers, timeout_s=max(600.0, 0.25 * n), **options)
        echo(format_row(row))
        table.append(row)
    return table


HEADER = f"{'fault':<34} {'events':>7} {'lost':>5} {'dup':>4} {'DLQ':>5} {'stuck':>5} {'max queue':>9} {'s':>6}  notes"


def format_row(row: Row) -> str:
    notes = row.notes + (f"; {row.dlq_redelivered} DLQ copies re-sent" if row.dlq_redelivered else "")
    return (f"{row.fault:<34} {row.events:>7} {row.lost:>5} {row.duplicated:>4} {row.dead_lettered:>5} "
            f"{row.stuck_partitions:>5} {row.max_queue:>9} {row.seconds:>6.1f}  {notes}")  # fmt: skip


def as_json(table: list[Row]) -> str:
    return json.dumps([asdict(r) for r in table], indent=2)


def _crash_consumer(at_commit: int) -> None:
    """``python -m workers.chaos crash-consumer K``: consume (EHRW_* settings) and SIGKILL this
    process at the K-th commit, after the batch's outcomes were published."""
    from workers.dispatch import build_consumer, build_dispatcher
    from workers.settings import get_settings

    settings = get_settings()
    consumer = build_consumer(settings)
    commit = consumer._commit
    calls = {"n": 0}

    def commit_or_die(kafka_consumer: Any, offsets: Any, records: int) -> bool:
        calls["n"] += 1
        if offsets and calls["n"] >= at_commit:
            os.kill(os.getpid(), signal.SIGKILL)
        return commit(kafka_consumer, offsets, records)

    consumer._commit = commit_or_die  # type: ignore[method-assign,assignment]
    consumer.run(build_dispatcher(settings), idle_timeout_s=60)


def _consume() -> None:
    """``python -m workers.chaos consume``: one consumer on the ``EHRW_*`` settings until SIGTERM."""
    from workers.dispatch import build_consumer, build_dispatcher
    from workers.settings import get_settings

    settings = get_settings()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    build_consumer(settings).run(build_dispatcher(settings), stop=stop)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("kafka", "httpx", "celery"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if len(sys.argv) == 2 and sys.argv[1] == "consume":
        _consume()
    elif len(sys.argv) == 3 and sys.argv[1] == "crash-consumer":
        _crash_consumer(int(sys.argv[2]))
    else:
        sys.exit("usage: python -m workers.chaos consume | crash-consumer K (use `ehr-worker chaos` for the table)")
