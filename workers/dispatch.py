"""Hands a consumer batch to the Celery workers and turns task results into event outcomes.

One dispatch round, in short:

- **Orders, not records, are bounded.** At most ``max_in_flight_orders`` tasks are queued or
  running at once, however many orders the batch's Bundles hold; more are sent as results come
  in. Repeated order ids inside one event run once.
- **Same key, in order.** An event waits until every earlier event of the batch that shares its
  Kafka key or one of its order ids is decided; if that one is to be retried, so is this one.
- **Micro-batches (issue 13).** Orders ready to run are sent in groups of up to
  ``write_batch_orders`` per Celery task, which writes them in one FHIR transaction (a refused
  transaction is retried order by order in the worker). A batch is only ever made of orders that
  may run now, so the ordering rules below hold batch or not; nothing waits for a batch to fill.
- **One run per order and event, whatever happens.** Each order has a task id derived from the
  event's coordinates (group, topic, partition, offset) and the order id, its outcome is stored
  under it, and a marker in Redis (``SET NX``, naming the batch task) says it was sent: an event
  dispatched again (a retry, a restarted consumer, a new owner after a rebalance) finds its orders
  running or finished instead of queueing copies. The results stay until the consumer has committed
  the event (:meth:`CeleryDispatcher.finished`), so a 2,000-order Bundle that outlasts one round
  keeps its progress.
- **The consumer owns retrying.** A task reports ``unavailable`` / ``deployment_error`` /
  ``failed`` instead of retrying itself; such a result is forgotten (so the next attempt runs the
  order again) and becomes a ``retry`` outcome of the matching kind (see
  :mod:`connectors.retry`). The first ``unavailable`` or ``deployment_error`` ends the round at
  once: every other event of the batch waits with it instead of hammering a server that is down.
- **A lost task is sent again** at once, not when its sent marker expires: one that no worker
  received although the queue stands empty (:mod:`workers.lost_tasks`). A received task is
  Redis's to re-deliver if its worker dies.
- **Never outwaiting the group.** While waiting, the round calls the consumer's ``keepalive``
  (a paused poll); without one it stops at 80 % of ``max.poll.interval.ms``.
"""

from __future__ import annotations

import hashlib
import logging
import time
import uuid
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from connectors.kafka import EventConsumer, EventOutcome, Incoming
from connectors.retry import RedisAttempts, RetryKind
from schemas.events import OrderItem, ParsedEvent
from schemas.outcomes import NotFinalOutcome, OrderOutcome, TaskResult, is_final, outcome_codes
from schemas.references import order_id_reference
from workers.clients import kafka_client_config
from workers.lost_tasks import LostTaskWatch
from workers.observability import task_options  # Operations (issue 9)
from workers.payload import apply_async_options, payload_cipher, task_argsrepr
from workers.settings import Settings, get_settings
from workers.tasks import STATUS_DEPLOYMENT, STATUS_FAILED, STATUS_UNAVAILABLE, app, suggest_batch

log = logging.getLogger(__name__)

_KIND_OF_STATUS: dict[str, RetryKind] = {
    STATUS_UNAVAILABLE: "unavailable",
    STATUS_DEPLOYMENT: "deployment",
    STATUS_FAILED: "event",
}
# How often a sent task's marker is checked: a marker that vanished (Redis flushed or restarted)
# means the task may be gone too, so it is sent again.
_MARKER_CHECK_EVERY_S = 5.0


@dataclass(frozen=True)
class VoidOrder:
    """An inline order the parser skipped as void (revoked, entered in error): a task carrying its
    id and reason code only cancels its earlier open suggestion Tasks (issue 8, defect 8)."""

    order_id: str
    reason_code: str

    def apply_async_options(self) -> dict[str, Any]:
        reference = order_id_reference(self.order_id)
        return {"args": [{"reference": reference, "void": self.reason_code}],
                "argsrepr": f"({reference} void={self.reason_code})", "kwargsrepr": "{}"}  # fmt: skip


def work_items(event: ParsedEvent) -> list[OrderItem | VoidOrder]:
    """One task per order of the event: its orders to work on, then its void orders."""
    items: list[OrderItem | VoidOrder] = list(unique_orders(event.items))
    ids = {item.order_id for item in items}
    return items + [VoidOrder(order_id, code) for order_id, code in dict(event.void_orders).items() if order_id not in ids]


def task_id_for(group: str, inc: Incoming, order_id: str) -> str:
    """The Celery task id of one order of one event: stable across rounds, restarts and consumers."""
    raw = f"{group}|{inc.topic}|{inc.partition}|{inc.offset}|{order_id}".encode()
    return "ehrw-" + hashlib.sha256(raw).hexdigest()[:40]


def unique_orders(items: list[OrderItem]) -> list[OrderItem]:
    """One item per order id; the last occurrence wins (a later entry is the newer statement)."""
    by_id: dict[str, OrderItem] = {}
    for item in items:
        by_id.pop(item.order_id, None)
        by_id[item.order_id] = item
    return list(by_id.values())


def outcome_for_event(outcomes: list[OrderOutcome]) -> EventOutcome:
    """The event's outcome once each of its orders has a final result (OperationOutcomes reduced to
    codes again: they become result events and dead-letter headers)."""
    results: list[OrderOutcome] = [
        {**r, "operation_outcome": outcome_codes(r["operation_outcome"])} if "operation_outcome" in r else r
        for r in outcomes
    ]
    rejected = [r for r in results if r["status"] == "rejected"]
    if rejected:
        first = rejected[0]
        return EventOutcome(
            status="dead_letter",
            results=list(results),
            reason_code=first.get("reason_code"),
            reason=first.get("reason"),
            details={"order": first.get("order"), "operation_outcome": first.get("operation_outcome")},
        )
    return EventOutcome(status="done", results=list(results))


def retry_outcome(result: NotFinalOutcome) -> EventOutcome:
    """The ``retry`` outcome for an order result that is not final (codes only, no event text)."""
    status = str(result.get("status"))
    kind = _KIND_OF_STATUS.get(status, "event")
    retry_after = result.get("retry_after")
    return EventOutcome(
        status="retry",
        reason_code=str(result.get("reason_code") or status),
        reason=f"order {result.get('order')}: {status}",
        retry_kind=kind,
        retry_after_s=float(retry_after) if isinstance(retry_after, (int, float)) else None,
        error_type=result.get("error_type"),
    )


@dataclass
class _Event:
    inc: Incoming
    orders: dict[str, OrderItem | VoidOrder]  # task id -> order
    keys: set[str]
    results: dict[str, OrderOutcome] = field(default_factory=dict)
    started: bool = False
    outcome: EventOutcome | None = None


class CeleryDispatcher:
    """``dispatch`` callable for :class:`connectors.kafka.EventConsumer` (see the module docstring)."""

    accepts_keepalive = True

    def __init__(
        self,
        *,
        group: str = "ehr-worker",
        timeout_s: float = 120.0,
        no_keepalive_timeout_s: float = 8.0,
        max_in_flight_orders: int = 64,
        marker_ttl_s: int = 3600,
        tick_s: float = 0.05,
        queue: str | None = None,
        cipher: Any | None = None,
        write_batch_orders: int = 16,
        lost_after_s: float = 10.0,
    ) -> None:
        self.group = group
        # Orders carried inline travel encrypted (workers/payload.py); no key fails here, at start.
        self.cipher = cipher if cipher is not None else payload_cipher(get_settings().payload_key)
        self.queue = queue
        self.timeout_s = timeout_s
        self.no_keepalive_timeout_s = no_keepalive_timeout_s
        self.max_in_flight_orders = max_in_flight_orders
        self.marker_ttl_s = marker_ttl_s
        self.tick_s = tick_s
        self.max_outstanding_seen = 0
        self._in_flight: set[str] = set()  # task ids sent (or found sent) and not yet seen finished
        self._unsure: set[str] = set()  # task ids whose send failed: their marker (if any) is no proof
        self._redis = app.backend.client
        self._backend = app.backend
        self.write_batch_orders = max(1, write_batch_orders)
        self._batch_id = self._new_batch_id()  # the batch being filled
        self._pending: list[tuple[str, Incoming, OrderItem | VoidOrder]] = []
        self._batch_of: dict[str, str] = {}  # order task id -> the batch task that runs it
        self._lost = LostTaskWatch(self._redis, self._backend, queue or str(app.conf.task_default_queue), lost_after_s)
        self._checked_at = time.monotonic()  # when the sent tasks were last looked for (_check_sent)

    # -- the round -------------------------------------------------------------------------------

    def __call__(
        self, batch: list[Incoming], keepalive: Callable[[], None] | None = None
    ) -> list[EventOutcome]:
        events = [self._plan(inc) for inc in batch]
        budget = self.timeout_s if keepalive is not None else self.no_keepalive_timeout_s
        deadline = time.monotonic() + budget
        to_send: deque[tuple[_Event, str]] = deque()
        mine: dict[str, _Event] = {}  # this round's tasks in flight -> their event
        halt: EventOutcome | None = None
        while halt is None:
            self._start_ready(events, to_send)
            # The window counts every task this dispatcher has in flight, earlier rounds' included:
            # that is what bounds the Redis queue, however the batches are cut.
            while to_send and len(self._in_flight) < self.max_in_flight_orders:
                event, tid = to_send.popleft()
                if event.outcome is None:
                    self._send(tid, event.inc, event.orders[tid])
                    self._in_flight.add(tid)
                    mine[tid] = event
            self._flush()
            self.max_outstanding_seen = max(self.max_outstanding_seen, len(self._in_flight))
            if all(e.outcome is not None for e in events) or time.monotonic() >= deadline:
                break
            progressed = False
            for tid, result in self._ready(list(self._in_flight)).items():
                self._in_flight.discard(tid)
                progressed = True
                owner = mine.pop(tid, None)
                if owner is None or owner.outcome is not None:
                    # An earlier round's task, or its event is decided already: a final result waits
                    # in Redis for the event's next dispatch; any other is dropped so that one re-runs.
                    if not is_final(result):
                        self._forget([tid])
                    continue
                halt = self._record(owner, tid, result)
                if halt is not None:
                    break
            # The clock runs across rounds: short rounds (no keepalive) check too.
            if time.monotonic() - self._checked_at >= _MARKER_CHECK_EVERY_S:
                self._checked_at = time.monotonic()
                self._check_sent(mine)
            if keepalive is not None:
                keepalive()
            if not progressed:
                time.sleep(self.tick_s)
        return self._finish(events, halt)

    def _plan(self, inc: Incoming) -> _Event:
        orders = {
            task_id_for(self.group, inc, item.order_id): item for item in work_items(inc.event)
        }
        keys = {f"o:{item.order_id}" for item in orders.values()}
        if inc.key:
            keys.add(f"k:{inc.key.hex()}")
        return _Event(inc, orders, keys)

    def _start_ready(self, events: list[_Event], to_send: deque[tuple[_Event, str]]) -> None:
        blocking: list[_Event] = []  # earlier events not yet done (or to be retried)
        for event in events:
            earlier = [b for b in blocking if b.keys & event.keys]
            if not event.started and event.outcome is None:
                if any(b.outcome is not None for b in earlier):  # an earlier one will be retried
                    event.outcome = EventOutcome(
                        status="retry", reason_code="after_retried_event", retry_kind="busy"
                    )
                elif not earlier:
                    event.started = True
                    to_send.extend((event, tid) for tid in event.orders)
            if event.outcome is None or event.outcome.status == "retry":
                blocking.append(event)

    def _record(self, event: _Event, tid: str, result: TaskResult) -> EventOutcome | None:
        """Store one order's result; returns an outcome that ends the whole round, if any."""
        if is_final(result):
            event.results[tid] = result
            if len(event.results) == len(event.orders):
                event.outcome = outcome_for_event([event.results[t] for t in event.orders])
            return None
        self._forget([tid])  # not final: the next attempt runs the order again
        event.outcome = retry_outcome(result)
        if event.outcome.retry_kind in ("unavailable", "deployment"):
            return event.outcome
        return None

    def _finish(self, events: list[_Event], halt: EventOutcome | None) -> list[EventOutcome]:
        outcomes = []
        for event in events:
            if event.outcome is None and halt is not None:
                event.outcome = EventOutcome(
                    status="retry", reason_code=halt.reason_code, retry_kind=halt.retry_kind,
                    retry_after_s=halt.retry_after_s,
                )  # fmt: skip
            elif event.outcome is None:
                event.outcome = EventOutcome(status="retry", reason_code="still_running", retry_kind="busy")
            outcomes.append(event.outcome)
        counts = Counter(f"{o.status}:{o.reason_code}" for o in outcomes if o.status != "done")
        if counts:
            log.info("round of %d events: %s", len(events), ", ".join(f"{n} {k}" for k, n in sorted(counts.items())))
        return outcomes

    # -- Redis -------------------------------------------------------------------------------------

    @staticmethod
    def _new_batch_id() -> str:
        return f"ehrw-b-{uuid.uuid4().hex}"

    def _send(self, tid: str, inc: Incoming, item: OrderItem | VoidOrder) -> None:
        """Add one order to the batch being filled (sent when full, or by :meth:`_flush`)."""
        key = f"ehrw:sent:{tid}"
        try:
            fresh = self._redis.set(key, self._batch_id.encode(), nx=True, ex=self.marker_ttl_s)
            if not fresh and tid in self._unsure:
                # A SET that timed out earlier (Redis frozen) may have landed with no task behind it:
                # that marker proves nothing, so this batch takes it over.
                self._redis.set(key, self._batch_id.encode(), ex=self.marker_ttl_s)
        except Exception:
            self._unsure.add(tid)
            raise
        if not fresh and tid not in self._unsure:
            return  # sent before (an earlier round, consumer or owner): wait for that one
        self._batch_of[tid] = self._batch_id
        self._pending.append((tid, inc, item))
        if len(self._pending) >= self.write_batch_orders:
            self._flush()

    def _flush(self) -> None:
        """Send the batch being filled as one task."""
        if not self._pending:
            return
        pending, batch_id = self._pending, self._batch_id
        self._pending, self._batch_id = [], self._new_batch_id()
        try:
            # Each order's payload carries ids in clear and an inline order only encrypted;
            # argsrepr/kwargsrepr name ids only (Celery logs arguments at INFO).
            payloads = [
                {**(item.apply_async_options() if isinstance(item, VoidOrder)
                    else apply_async_options(item, self.cipher))["args"][0], "task_id": tid,
                 "event": f"{inc.topic}[{inc.partition}]@{inc.offset}"}
                for tid, inc, item in pending
            ]  # fmt: skip
            _, inc, first = pending[0]
            # Operations (issue 9): event/trace headers of the batch's first order.
            options = task_options(inc.topic, inc.partition, inc.offset, first.order_id)
            options["argsrepr"] = "[" + ", ".join(task_argsrepr(p) for p in payloads) + "]"
            suggest_batch.apply_async(args=[payloads], task_id=batch_id, queue=self.queue, **options)
        except Exception:
            for tid, _, _ in pending:
                self._unsure.add(tid)  # the marker may outlive this failure (the delete fails too)
                self._batch_of.pop(tid, None)
            self._redis.delete(*[f"ehrw:sent:{tid}" for tid, _, _ in pending])
            raise
        self._unsure.difference_update(tid for tid, _, _ in pending)

    def _ready(self, tids: list[str]) -> dict[str, TaskResult]:
        if not tids:
            return {}
        raws = self._redis.mget([self._backend.get_key_for_task(t) for t in tids])
        ready: dict[str, TaskResult] = {}
        missing: list[str] = []
        for tid, raw in zip(tids, raws):
            if raw is None:
                missing.append(tid)
                continue
            meta = self._backend.decode_result(raw)
            state = meta.get("status")
            if state == "SUCCESS" and isinstance(meta.get("result"), dict):
                ready[tid] = meta["result"]
            elif state in ("FAILURE", "REVOKED", "SUCCESS"):  # a single-order task that failed
                ready[tid] = self._failed(meta)
        # An order has no result yet: did its whole batch task end without storing it (a hard time
        # limit, a bug outside the orders)?
        batches = sorted({self._batch_of[t] for t in missing if t in self._batch_of})
        if not batches:
            return ready
        ended: dict[str, dict[str, Any]] = {}
        for batch, raw in zip(batches, self._redis.mget([self._backend.get_key_for_task(b) for b in batches])):
            meta = self._backend.decode_result(raw) if raw is not None else {}
            if meta.get("status") in ("FAILURE", "REVOKED", "SUCCESS"):
                ended[batch] = meta
        orphans = [t for t in missing if self._batch_of.get(t) in ended]
        if orphans:
            # The batch ended since the first read: read its orders again before calling one lost
            # (SUCCESS without an order's result: the result is gone; the order runs again).
            again = self._ready_orders(orphans)
            for tid in orphans:
                ready[tid] = again.get(tid) or self._failed(ended[self._batch_of[tid]])
        return ready

    def _ready_orders(self, tids: list[str]) -> dict[str, TaskResult]:
        ready: dict[str, TaskResult] = {}
        for tid, raw in zip(tids, self._redis.mget([self._backend.get_key_for_task(t) for t in tids])):
            if raw is not None:
                meta = self._backend.decode_result(raw)
                if meta.get("status") == "SUCCESS" and isinstance(meta.get("result"), dict):
                    ready[tid] = meta["result"]
        return ready

    @staticmethod
    def _failed(meta: dict[str, Any]) -> TaskResult:
        state = str(meta.get("status"))
        result = meta.get("result")
        exc: dict[str, Any] = result if isinstance(result, dict) else {}
        exc_type = str(exc.get("exc_type") or state)
        code = "task_timeout" if "TimeLimit" in exc_type else "task_error"
        return {"order": None, "status": STATUS_FAILED, "reason_code": code, "error_type": exc_type}

    def _check_sent(self, mine: dict[str, _Event]) -> None:
        """Every few seconds: send again this round's orders whose task is gone, and free the window
        places of earlier rounds' orders whose task is gone.

        A task is gone when its sent marker vanished (Redis flushed or restarted), or when no worker
        took it although the queue stands empty (:mod:`workers.lost_tasks`)."""
        tids = list(self._in_flight)
        if not tids:
            return
        waiting: dict[str, list[str]] = {}  # batch task -> its orders in flight
        for tid, marker in zip(tids, self._redis.mget([f"ehrw:sent:{tid}" for tid in tids])):
            if marker is None:
                if tid in mine:
                    log.warning("task %s vanished from Redis; sending it again", tid)
                    self._send(tid, mine[tid].inc, mine[tid].orders[tid])
                else:
                    self._in_flight.discard(tid)
                continue
            batch = marker.decode() if isinstance(marker, bytes) else str(marker)
            self._batch_of[tid] = batch  # it may be another consumer's batch
            waiting.setdefault(batch, []).append(tid)
        for batch in self._lost.lost(set(waiting)):
            log.warning("task %s (%d orders) was taken by no worker and is not queued; sending its orders again",
                        batch, len(waiting[batch]))  # fmt: skip
            for tid in waiting[batch]:
                if tid in mine:
                    self._unsure.add(tid)  # its marker names the lost task: take it over
                    self._send(tid, mine[tid].inc, mine[tid].orders[tid])
                else:
                    self._in_flight.discard(tid)
                    self._forget([tid])  # the event's next dispatch sends it afresh
        self._flush()

    def _forget(self, tids: list[str]) -> None:
        keys: list[Any] = []
        for tid in tids:
            keys += [self._backend.get_key_for_task(tid), f"ehrw:sent:{tid}", f"ehrw:runs:{tid}"]
            self._batch_of.pop(tid, None)
        if keys:
            self._redis.delete(*keys)

    def finished(self, incomings: list[Incoming]) -> None:
        """The consumer committed these events: their results and markers can go."""
        tids = [
            task_id_for(self.group, inc, item.order_id)
            for inc in incomings
            for item in work_items(inc.event)
        ]
        for start in range(0, len(tids), 500):
            self._forget(tids[start : start + 500])


def build_dispatcher(settings: Settings) -> CeleryDispatcher:
    """The dispatcher as configured by ``EHRW_*``."""
    return CeleryDispatcher(
        group=settings.kafka_group,
        timeout_s=settings.task_timeout_s,
        no_keepalive_timeout_s=min(settings.task_timeout_s, 0.8 * settings.kafka_max_poll_interval_ms / 1000),
        max_in_flight_orders=settings.max_in_flight_orders,
        # A task whose worker died is re-delivered once it is older than the visibility timeout, at
        # kombu's next look (every tenth 10 s tick, so up to 100 s later); the marker outlives that,
        # so no copy is sent meanwhile. A task no worker received is found lost long before.
        marker_ttl_s=int(settings.broker_visibility_timeout_s + settings.task_hard_time_limit_s + 160),
        queue=settings.celery_queue,
        cipher=payload_cipher(settings.payload_key),
        # With traces on, one order per task: each order's trace runs whole from its event to its
        # own FHIR transaction (a shared transaction would belong to one trace only).
        write_batch_orders=1 if settings.otel_enabled else settings.write_batch_orders,
    )


def build_consumer(settings: Settings, **overrides: object) -> EventConsumer:
    """The event consumer as configured by ``EHRW_*``; ``overrides`` replace single arguments (tests)."""
    kwargs: dict[str, object] = {
        "bootstrap": settings.kafka_bootstrap,
        "topic": settings.kafka_topic,
        "group": settings.kafka_group,
        "dlq_topic": settings.kafka_dlq_topic,
        "result_topic": settings.kafka_result_topic,
        "max_in_flight": settings.max_in_flight,
        "max_poll_interval_ms": settings.kafka_max_poll_interval_ms,
        "session_timeout_ms": settings.kafka_session_timeout_ms,
        "max_attempts": settings.event_max_attempts,
        "attempts": RedisAttempts(settings.redis_url),
        "max_event_bytes": settings.max_event_bytes,
        "dlq_max_bytes": settings.dlq_max_record_bytes,
        "retry_backoff_s": settings.retry_backoff_s,
        "retry_backoff_max_s": settings.retry_backoff_max_s,
        "retry_after_max_s": settings.retry_after_max_s,
        "client_config": kafka_client_config(settings),  # TLS/SASL, as every other Kafka client
    }
    kwargs.update(overrides)
    return EventConsumer(**kwargs)  # type: ignore[arg-type]
