"""``ehr-worker demo``: the whole path on embedded local services, then a table of what was written.

Starts Tansu (Kafka), Redis (unless one answers) and sekmet (FHIR) at the addresses the settings
name, builds the default models if the registry has none, seeds the FHIR server with the bundled
patients and orders (as a hospital's EHR would hold them), publishes one event per order to Kafka,
runs a real Celery worker and the consumer until every event is settled, reads the suggestions
back from the FHIR server, and stops everything it started.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
import time
from collections import Counter, defaultdict
from importlib import resources
from urllib.parse import urlsplit

from rich.console import Console
from rich.table import Table

from connectors.fhir import FhirClient, FhirPermanentError
from connectors.replay import event_key
from models.registry import ModelNotFoundError, ModelRegistry
from schemas.events import EventRejected, parse_event, skip_reason
from schemas.jsonlines import read_json_lines
from schemas.tasks import TASKS
from schemas.text import is_imaging_order
from workers.local import LocalStack
from workers.settings import Settings, get_settings

log = logging.getLogger(__name__)
# Wide enough for the table when the output is a file or a CI log (rich assumes 80 columns there).
console = Console(width=None if sys.stdout.isatty() else 160)

FIXTURES = resources.files("workers") / "fixtures"


def _host_port(address: str, default_port: int) -> tuple[str, int]:
    parts = urlsplit(address if "://" in address else f"tcp://{address}")
    return parts.hostname or "127.0.0.1", parts.port or default_port


def _ensure_models(settings: Settings, profile: str) -> None:
    registry = ModelRegistry(settings.model_registry)
    missing = []
    for task in TASKS:
        try:
            registry.current_dir(task)
        except ModelNotFoundError:
            missing.append(task)
    if missing:
        from training.build import build_models

        console.print(f"[bold]Building the default models ({', '.join(missing)}) into {settings.model_registry}[/]")
        build_models(settings.model_registry, tasks=tuple(missing), profile=profile, progress=True)
    for task in TASKS:
        registry.verify(task)


def fixture_events() -> tuple[list[dict], list[tuple[str, bytes]]]:
    """Patients to seed, and (name, raw bytes) of every bundled order event."""
    patients = read_json_lines(str(FIXTURES / "patients.ndjson"))
    events: list[tuple[str, bytes]] = []
    for f in sorted((FIXTURES / "hl7").iterdir(), key=lambda p: p.name):
        events.append((f"hl7/{f.name}", f.read_bytes()))
    for f in sorted((FIXTURES / "orders").iterdir(), key=lambda p: p.name):
        if f.name.endswith(".ndjson"):
            for i, line in enumerate(f.read_text(encoding="utf-8").splitlines()):
                if line.strip():
                    events.append((f"orders/{f.name}:{i + 1}", line.encode()))
    return patients, events


def seed_fhir(fhir: FhirClient, patients: list[dict], events: list[tuple[str, bytes]]) -> list[tuple[str, bytes]]:
    """Store patients and valid orders on the server, as the hospital's EHR holds them, and return the
    events to publish: a stored order is published as the server returned it (with its versionId)."""
    for patient in patients:
        fhir.put(patient)
    published = []
    for name, raw in events:
        try:
            parse_event(raw)
            resource = json.loads(raw)
        except EventRejected:
            published.append((name, raw))  # invalid events go out as they are, to the dead-letter topic
            continue
        if resource.get("resourceType") == "ServiceRequest":
            try:
                stored = fhir.put(resource)
                raw = json.dumps(stored).encode()
            except FhirPermanentError as exc:
                log.warning("seeding %s refused by FHIR (%s); publishing it unseeded", name, exc.status)
        published.append((name, raw))
    return published


def actionable_orders(published: list[tuple[str, bytes]]) -> list[dict]:
    """The valid, actionable ServiceRequests among published events: those that must get suggestions."""
    orders: list[dict] = []
    for _, raw in published:
        try:
            parsed = parse_event(raw)
        except EventRejected:
            continue
        orders += [i.service_request for i in parsed.items if i.service_request and not skip_reason(i.service_request)]
    return orders


def suggestions_by_order(fhir: FhirClient) -> dict[str, dict[str, list[dict]]]:
    found: dict[str, dict[str, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for rtype, field in (("Task", "focus"), ("RiskAssessment", "basis")):
        for res in fhir.search(rtype, {"_count": "200"}):
            refs = [res.get(field)] if rtype == "Task" else res.get(field) or []
            for ref in refs:
                target = (ref or {}).get("reference", "")
                if target.startswith("ServiceRequest/"):
                    found[target.split("/")[1]][rtype].append(res)
    return found


def _print_table(orders: list[dict], suggestions, dlq_count: int, labels: dict) -> dict[str, int]:
    table = Table(title="ehr-worker demo: suggestions written to FHIR", show_lines=False)
    for col in ("order", "imaging", "suggested protocol", "p", "top diseases", "FHIR ids written"):
        table.add_column(col, overflow="fold")
    counts: Counter[str] = Counter()
    for sr in orders:
        sid = sr["id"]
        got = suggestions.get(sid, {})
        tasks, risks = got.get("Task", []), got.get("RiskAssessment", [])
        imaging = is_imaging_order(sr)
        protocol, prob = "-", ""
        for task in tasks:
            for inp in task.get("input", []):
                kind = (inp.get("type") or {}).get("text", "")
                if kind == "suggested-protocol":
                    protocol = (inp["valueCodeableConcept"].get("coding") or [{}])[0].get("display", "?")
                elif kind == "suggested-protocol-probability":
                    prob = f"{inp.get('valueDecimal', 0):.2f}"
            if protocol == "-":
                protocol = "(abstained) " + ((task.get("businessStatus") or {}).get("text") or "")[:30]
        diseases = "; ".join(
            f"{(p.get('outcome') or {}).get('text') or ((p.get('outcome') or {}).get('coding') or [{}])[0].get('display', '?')}"
            f" {p.get('probabilityDecimal', 0):.2f}"
            for r in risks[:1]
            for p in r.get("prediction", [])[:3]
        )
        ids = ", ".join(f"{r['resourceType']}/{r['id'][:8]}" for r in tasks + risks)
        table.add_row(sid[:28], "yes" if imaging else "no", protocol, prob, diseases or "-", ids or "-")
        if imaging:
            counts["imaging"] += 1
            counts["imaging_one_task"] += len(tasks) == 1
            counts["imaging_one_risk"] += len(risks) == 1
        else:
            counts["non_imaging"] += 1
            counts["non_imaging_no_task"] += len(tasks) == 0
        counts["duplicates"] += max(0, len(tasks) - 1) + max(0, len(risks) - 1)
        want = labels.get(sid)
        if want and tasks:
            counts["labelled"] += 1
            counts["protocol_match"] += any(
                ((inp.get("valueCodeableConcept") or {}).get("coding") or [{}])[0].get("code") == want.get("protocol")
                for t in tasks
                for inp in t.get("input", [])
                if (inp.get("type") or {}).get("text") == "suggested-protocol"
            )
            counts["disease_in_top"] += any(
                c.get("code") == str(want.get("disease", "")).split(":")[-1]
                for r in risks
                for p in r.get("prediction", [])
                for c in (p.get("outcome") or {}).get("coding", [])
            )
    console.print(table)
    console.print(
        f"imaging orders: {counts['imaging']} — with exactly one Task: {counts['imaging_one_task']}, "
        f"with exactly one RiskAssessment: {counts['imaging_one_risk']}\n"
        f"non-imaging actionable orders: {counts['non_imaging']} — with no protocol Task: {counts['non_imaging_no_task']}\n"
        f"duplicate suggestions: {counts['duplicates']}; events on the dead-letter topic: {dlq_count}"
    )
    if counts["labelled"]:
        console.print(
            f"against the fixtures' expected labels: protocol {counts['protocol_match']}/{counts['labelled']}, "
            f"disease in top-k {counts['disease_in_top']}/{counts['labelled']}"
        )
    return dict(counts)


def run_demo(*, keep_running: bool = False, profile: str = "default") -> bool:
    from workers.dispatch import build_consumer, build_dispatcher

    settings = get_settings()
    _ensure_models(settings, profile)
    _, kafka_port = _host_port(settings.kafka_bootstrap, 9092)
    _, fhir_port = _host_port(settings.fhir_base_url, 8090)
    _, redis_port = _host_port(settings.redis_url, 6379)
    console.print(f"[bold]Starting services[/]: Kafka (Tansu) :{kafka_port}, FHIR (sekmet) :{fhir_port}, Redis :{redis_port}")
    with LocalStack(settings, kafka_port=kafka_port, fhir_port=fhir_port) as stack:
        stack.purge()  # a previous interrupted run may have left tasks in the queue

        fhir = FhirClient(settings.fhir_base_url)
        patients, events = fixture_events()
        published = seed_fhir(fhir, patients, events)

        stack.create_topics()
        console.print("[bold]Starting a Celery worker[/] (celery -A workers worker)")
        stack.start_worker(concurrency=2, name="demo")

        stack.publish([(key.encode() if (key := event_key(raw)) else None, raw) for _, raw in published])
        console.print(f"[bold]Published {len(published)} events[/] to {settings.kafka_topic}; consuming…")

        consumer = build_consumer(stack.settings)  # the stack's: its payload key is the worker's
        started = time.monotonic()
        stats = consumer.run(build_dispatcher(stack.settings), max_events=len(published), idle_timeout_s=60)
        elapsed = time.monotonic() - started
        console.print(f"consumed {len(published)} events in {elapsed:.1f}s: {stats.as_dict()}")

        orders = actionable_orders(published)
        labels_path = FIXTURES / "expected-labels.json"
        labels = json.loads(labels_path.read_text()) if labels_path.is_file() else {}
        counts = _print_table(orders, suggestions_by_order(fhir), stats.dead_lettered, labels)
        if keep_running:
            console.print("Services are up; press Ctrl-C to stop.")
            try:
                threading.Event().wait()
            except KeyboardInterrupt:
                pass
    return (
        counts.get("imaging_one_task", 0) == counts.get("imaging", -1)
        and counts.get("non_imaging_no_task", 0) == counts.get("non_imaging", -1)
        and counts.get("duplicates", 0) == 0
    )
