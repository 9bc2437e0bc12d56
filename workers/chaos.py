"""``ehr-worker chaos``: the pipeline under the faults a hospital sees every week, counted from outside.

Each row publishes N events (imaging orders, lab orders, already-completed orders, invalid events
and poison events whose fetched order breaks validation, interleaved), runs the real consumer
against a real ``celery worker`` and a real FHIR server (behind :mod:`workers.chaos_proxy`),
injects one fault while it runs, and then counts **from the FHIR server and the topics**, never
from the worker's bookkeeping:

- lost: a good event without its outcome (an imaging order without its Task, a lab or completed
  order without its result event, a good event dead-lettered) or a bad event not on the DLQ;
- duplicated: an order with more than one Task or RiskAssessment;
- dead-lettered: distinct events on the dead-letter topic (each with its reason);
- stuck partitions: partitions whose committed offset is short of the end after the run;
- max queue: the most orders waiting in the Redis queue at any sample (every 20 ms).

The fault suite (tests/faults) runs each row with 1,000 events; ``ehr-worker chaos --events N``
runs the long version and prints the table. The services it starts are its own (a FHIR server, a
proxy, a worker on its own Celery queue); Kafka and Redis may be shared.
"""

from __future__ import annotations

import json
import logging
import os
import random
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
from typing import Any

from cryptography.fernet import Fernet
from kafka import KafkaConsumer, TopicPartition

from connectors.embedded import ManagedProcess, free_port, start_sekmet
from connectors.fhir import FhirClient
from connectors.kafka import ensure_topics, make_producer
from connectors.topic_reader import read_records
from workers.chaos_events import Expected, make_events
from workers.chaos_proxy import FaultProxy
from workers.settings import Settings

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


# -- the services a chaos run owns -----------------------------------------------------------------


class ChaosLab:
    """A FHIR server, the fault proxy in front of it and a Celery worker on a queue of its own."""

    def __init__(
        self, workdir: Path, *, kafka_bootstrap: str, redis_url: str, registry: Path, concurrency: int = 2
    ) -> None:
        self.workdir = Path(workdir)
        self.kafka_bootstrap = kafka_bootstrap
        self.redis_url = redis_url
        self.registry = Path(registry)
        # Consumer and worker share the key of inline orders (workers/payload.py): the lab's own
        # when none is set.
        self.payload_key = os.environ.get("EHRW_PAYLOAD_KEY") or Fernet.generate_key().decode()
        self.concurrency = concurrency
        self.queue = f"chaos-{uuid.uuid4().hex[:8]}"
        self.fhir_port = free_port()
        self.sekmet: ManagedProcess | None = None
        self.proxy: FaultProxy | None = None
        self.worker: Any = None

    @property
    def worker_env(self) -> dict[str, str]:
        assert self.proxy is not None
        return {
            "EHRW_REDIS_URL": self.redis_url,
            "EHRW_FHIR_BASE_URL": self.proxy.base_url,
            "EHRW_MODEL_REGISTRY": str(self.registry),
            "EHRW_CELERY_QUEUE": self.queue,
            "EHRW_FHIR_MAX_RETRIES": "1",
            "EHRW_FHIR_TIMEOUT_S": "5",
            "EHRW_TASK_SOFT_TIME_LIMIT_S": "20",
            "EHRW_TASK_HARD_TIME_LIMIT_S": "30",
            "EHRW_BROKER_VISIBILITY_TIMEOUT_S": "60",
            "EHRW_PAYLOAD_KEY": self.payload_key,
        }

    def start(self) -> ChaosLab:
        self.sekmet = start_sekmet(self.fhir_port, self.workdir / "fhir")
        self.proxy = FaultProxy(f"http://127.0.0.1:{self.fhir_port}/fhir", free_port()).start()
        self.start_worker()
        return self

    def start_worker(self) -> None:
        from workers.app import app
        from workers.local import start_worker

        self.worker = start_worker(self.worker_env, self.workdir / "worker.log", app=app,
                                   concurrency=self.concurrency, name="chaos")  # fmt: skip

    def stop(self) -> None:
        if self.worker is not None:
            self.worker.stop()
        if self.proxy is not None:
            self.proxy.stop()
        if self.sekmet is not None:
            self.sekmet.stop()

    def stop_fhir(self) -> None:
        assert self.sekmet is not None
        self.sekmet.stop()

    def start_fhir(self) -> None:
        self.sekmet = start_sekmet(self.fhir_port, self.workdir / "fhir")

    def kill_worker_child(self) -> bool:
        children = _children(self.worker.pid)
        if not children:
            return False
        os.kill(random.choice(children), signal.SIGKILL)
        return True

    def fhir(self) -> FhirClient:
        return FhirClient(f"http://127.0.0.1:{self.fhir_port}/fhir", max_pages=1000)

    def settings(self, tag: str, **changes: Any) -> Settings:
        values: dict[str, Any] = {
            "kafka_bootstrap": self.kafka_bootstrap, "kafka_topic": f"ev-{tag}", "kafka_group": f"grp-{tag}",
            "kafka_dlq_topic": f"dlq-{tag}", "kafka_result_topic": f"res-{tag}", "redis_url": self.redis_url,
            "celery_queue": self.queue, "event_max_attempts": 3, "retry_backoff_s": 0.2, "retry_backoff_max_s": 2.0,
            "retry_after_max_s": 30.0, "max_in_flight": 64, "max_in_flight_orders": 32, "task_timeout_s": 30.0,
            "payload_key": self.payload_key,
        }  # fmt: skip
        values.update(changes)
        return Settings(**values)


def _children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(p) for p in text.split()]


# -- one row -------------------------------------------------------------------------------------

Fault = Callable[["RowRun"], None]


class RowRun:
    """One row in progress: its settings, consumers, progress and the queue sampler."""

    def __init__(self, lab: ChaosLab, name: str, tag: str, settings: Settings, ends: dict[int, int]) -> None:
        self.lab, self.name, self.tag, self.settings, self.ends = lab, name, tag, settings, ends
        self.stop_all = threading.Event()
        self.consumers: list[tuple[threading.Thread, threading.Event]] = []
        self.max_queue = 0
        self.notes: list[str] = []

    def start_consumer(self) -> threading.Event:
        from workers.dispatch import build_consumer, build_dispatcher

        stop = threading.Event()
        consumer = build_consumer(self.settings)
        dispatcher = build_dispatcher(self.settings)

        def run() -> None:
            try:
                consumer.run(dispatcher, stop=stop)
            except Exception as exc:  # noqa: BLE001 - a crashed consumer shows as stuck partitions
                log.error("consumer crashed: %s", type(exc).__name__)
                self.notes.append(f"consumer crashed: {type(exc).__name__}")

        thread = threading.Thread(target=run, daemon=True, name=f"consumer-{len(self.consumers)}")
        thread.start()
        self.consumers.append((thread, stop))
        return stop

    def progress(self) -> float:
        committed = _committed(self.settings)
        return sum(min(committed[p], end) for p, end in self.ends.items()) / max(1, sum(self.ends.values()))

    def wait_for(self, fraction: float, timeout_s: float = 120.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and self.progress() < fraction:
            time.sleep(0.5)

    def sample_queue(self) -> None:
        import redis

        client = redis.Redis.from_url(self.settings.redis_url)
        while not self.stop_all.is_set():
            try:
                self.max_queue = max(self.max_queue, int(client.llen(self.lab.queue)))
            except Exception as exc:  # noqa: BLE001 - a Redis fault row; the sample resumes
                log.debug("queue sample failed (%s)", type(exc).__name__)
            time.sleep(0.02)


def run_row(lab: ChaosLab, name: str, fault: Fault | None, n: int, *, timeout_s: float = 600.0,
            consumers: int = 1, **event_options: Any) -> Row:  # fmt: skip
    tag = f"{name.split()[0]}-{uuid.uuid4().hex[:6]}"
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
        injector = threading.Thread(target=fault, args=(run,), daemon=True)
        injector.start()
    deadline = started + timeout_s
    while time.monotonic() < deadline and run.progress() < 1.0:
        time.sleep(0.5)
    seconds = time.monotonic() - started
    log.info("row %s: progress %.3f after %.0fs", name, run.progress(), seconds)
    for _, stop in run.consumers:
        stop.set()
    for thread, _ in run.consumers:
        thread.join(timeout=30)
    run.stop_all.set()
    lab.proxy.heal()
    row = verify(lab, settings, name, events, ends, max_queue=run.max_queue, seconds=seconds)
    row.notes = "; ".join([*run.notes, row.notes])
    return row


PARTITIONS = 3


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
    tasks: Counter[str] = Counter()
    risks: Counter[str] = Counter()
    fhir = lab.fhir()
    prefix = f"ServiceRequest/{settings.kafka_topic.removeprefix('ev-')}-"
    for res in fhir.search("Task", {"_count": "500"}):
        ref = (res.get("focus") or {}).get("reference", "")
        if ref.startswith(prefix):
            tasks[ref.split("/", 1)[1]] += 1
    for res in fhir.search("RiskAssessment", {"_count": "500"}):
        for basis in res.get("basis") or []:
            ref = basis.get("reference", "")
            if ref.startswith(prefix):
                risks[ref.split("/", 1)[1]] += 1
    dlq_copies: Counter[str] = Counter()
    reasons: dict[str, str] = {}
    for rec in read_records(settings.kafka_bootstrap, settings.kafka_dlq_topic):
        key = (rec.key or b"").decode(errors="replace")
        dlq_copies[key] += 1
        reasons[key] = dict(rec.headers or []).get("ehrw-reason-code", b"").decode()
    results: dict[str, set[str]] = defaultdict(set)
    for rec in read_records(settings.kafka_bootstrap, settings.kafka_result_topic):
        doc = json.loads(rec.value)
        results[str(doc.get("order", "")).split("/")[-1]].add(str(doc.get("status")))

    lost = duplicated = 0
    missing: Counter[str] = Counter()  # which expectations failed, for the notes
    for key, _, exp in events:
        bad = exp.kind in ("invalid", "poison", "oversized")
        if bad:
            wrong = int(dlq_copies[key] == 0 or not reasons.get(key)) + sum(tasks[o] for o in exp.orders)
        else:
            wrong = int(dlq_copies[key] > 0)
            for oid in exp.orders:
                if oid in exp.imaging:
                    wrong += int(tasks[oid] == 0)
                    duplicated += int(tasks[oid] > 1) + int(risks[oid] > 1)
                else:
                    wrong += int(not results.get(oid)) + int(tasks[oid] > 0)
        lost += wrong
        if wrong:
            missing[exp.kind] += wrong
    committed = _committed(settings)
    stuck = sum(1 for p, end in ends.items() if committed[p] < end)
    bad_events = sum(1 for _, _, e in events if e.kind in ("invalid", "poison", "oversized"))
    return Row(
        fault=name, events=len(events), lost=lost, duplicated=duplicated,
        dead_lettered=sum(1 for k in dlq_copies if dlq_copies[k]), stuck_partitions=stuck, max_queue=max_queue,
        seconds=round(seconds, 1), dlq_redelivered=sum(dlq_copies.values()) - len(dlq_copies),
        notes=f"{bad_events} bad events" + (f"; lost by kind {dict(missing)}" if missing else ""),
    )  # fmt: skip


# -- the faults ----------------------------------------------------------------------------------


def kill_worker_children(times: int = 3) -> Fault:
    def fault(run: RowRun) -> None:
        for i in range(times):
            run.wait_for((i + 1) / (times + 2))
            if run.lab.kill_worker_child():
                run.notes.append(f"killed a worker child at {run.progress():.0%}")

    return fault


def kill_consumer_before_commit(at_commit: int = 3) -> Fault:
    """A consumer subprocess that SIGKILLs itself after publishing a batch's outcomes and before
    committing them (the worst moment), then a fresh consumer takes over."""

    def fault(run: RowRun) -> None:
        env = {**os.environ, **settings_env(run.settings), "EHRW_PAYLOAD_KEY": run.lab.payload_key}
        proc = subprocess.run([sys.executable, "-m", "workers.chaos", "crash-consumer", str(at_commit)], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=300, check=False)  # fmt: skip
        run.notes.append(f"consumer killed by SIGKILL (exit {proc.returncode}) at {run.progress():.0%}")
        run.start_consumer()

    return fault


def stop_fhir(seconds: float) -> Fault:
    def fault(run: RowRun) -> None:
        run.wait_for(0.2)
        run.lab.stop_fhir()
        run.notes.append(f"FHIR stopped {seconds:.0f}s at {run.progress():.0%}")
        time.sleep(seconds)
        run.lab.start_fhir()

    return fault


def fhir_answers(
    status: int, seconds: float, *, fraction: float = 1.0, retry_after: float | None = None
) -> Fault:
    def fault(run: RowRun) -> None:
        assert run.lab.proxy is not None
        run.wait_for(0.15)
        run.lab.proxy.fail(status, fraction, retry_after)
        run.notes.append(
            f"FHIR answered {status} to {fraction:.0%} for {seconds:.0f}s at {run.progress():.0%}"
        )
        time.sleep(seconds)
        run.lab.proxy.heal()

    return fault


def forced_rebalance(run: RowRun) -> None:
    """Two consumers share the group; a third joins mid-run, then one of the first leaves."""
    run.wait_for(0.2)
    run.start_consumer()
    run.wait_for(0.5)
    run.consumers[0][1].set()
    run.notes.append("3rd consumer joined at 20 %, 1st left at 50 %")


def rows(n: int, *, long: bool = False) -> list[tuple[str, Fault | None, dict[str, Any]]]:
    """The rows of the table, most important first; ``long`` uses the issue's durations."""
    outage = 60.0 if long else 8.0
    return [
        ("poison + invalid interleaved", None, {}),
        ("worker child SIGKILL", kill_worker_children(), {}),
        ("consumer SIGKILL before commit", kill_consumer_before_commit(), {}),
        (f"FHIR stopped {outage:.0f}s", stop_fhir(outage), {}),
        ("FHIR 500s (30 %)", fhir_answers(500, outage, fraction=0.3), {}),
        ("FHIR 429 Retry-After", fhir_answers(429, 45.0 if long else 6.0, retry_after=45 if long else 3), {}),
        ("FHIR 401 expired token", fhir_answers(401, 30.0 if long else 6.0), {}),
        ("Bundles of 2,000 + duplicate ids", None, {"bundles": 2}),
        ("oversized events", None, {"oversized": 3}),
        ("two consumers + rebalance", forced_rebalance, {"consumers": 2}),
    ]


def settings_env(settings: Settings) -> dict[str, str]:
    env = {}
    for name, value in settings.model_dump().items():
        if value is not None and not hasattr(value, "get_secret_value"):
            env[f"EHRW_{name.upper()}"] = str(value)
    return env


def run_table(lab: ChaosLab, n: int, *, names: list[str] | None = None, long: bool = False,
              echo: Callable[[str], None] = print) -> list[Row]:  # fmt: skip
    table: list[Row] = []
    for name, fault, options in rows(n, long=long):
        if names and not any(part.lower() in name.lower() for part in names):
            continue
        consumers = options.pop("consumers", 1)
        row = run_row(lab, name, fault, n, consumers=consumers, **options)
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


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "crash-consumer":
        logging.basicConfig(level=logging.WARNING)
        _crash_consumer(int(sys.argv[2]))
    else:
        sys.exit("usage: python -m workers.chaos crash-consumer K (use `ehr-worker chaos` for the table)")
