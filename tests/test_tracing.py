"""OpenTelemetry traces on real processes: the consumer and a celery worker export over OTLP/HTTP to a
receiver in the test, and each event is one trace, continuing the producer's ``traceparent``."""

from __future__ import annotations

import json
import threading
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from connectors.embedded import free_port
from connectors.fhir import FhirClient
from tests.support import Topics
from tests.test_operations import Consumer, _imaging_orders, wait_for

pytestmark = pytest.mark.services


class Receiver:
    """An OTLP/HTTP trace receiver: decodes each export request into plain span dicts."""

    def __init__(self) -> None:
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

        self.spans: list[dict] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                request = ExportTraceServiceRequest.FromString(body)
                for rs in request.resource_spans:
                    service = {a.key: a.value.string_value for a in rs.resource.attributes}
                    for ss in rs.scope_spans:
                        for span in ss.spans:
                            receiver.spans.append({
                                "name": span.name,
                                "trace": span.trace_id.hex(),
                                "span": span.span_id.hex(),
                                "parent": span.parent_span_id.hex(),
                                "component": service.get("service.component"),
                                "attributes": {a.key: str(a.value) for a in span.attributes},
                            })  # fmt: skip
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args) -> None:
                pass

        self.port = free_port()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def test_one_trace_per_event_from_kafka_headers_to_the_fhir_write(services, worker_env, tmp_path):
    from kafka import KafkaProducer

    from connectors.kafka import ensure_topics
    from workers.app import app
    from workers.local import start_worker

    receiver = Receiver()
    env = {
        **worker_env,
        "EHRW_CELERY_QUEUE": f"trace-{uuid.uuid4().hex[:8]}",
        "EHRW_WORKER_HTTP_PORT": "0",
        "EHRW_OTEL_ENABLED": "true",
        "EHRW_OTEL_ENDPOINT": f"http://127.0.0.1:{receiver.port}/v1/traces",
        "OTEL_BSP_SCHEDULE_DELAY": "200",
    }
    worker = start_worker(env, tmp_path / "worker.log", app=app, concurrency=1, name="trace")
    try:
        fhir = FhirClient(services.fhir_base_url)
        orders = [fhir.put(o) for o in _imaging_orders(2, f"trace-{uuid.uuid4().hex[:6]}")]
        topics = Topics.fresh("trace")
        ensure_topics(services.kafka_bootstrap, [topics.events, topics.dlq, topics.results])
        upstream_trace = uuid.uuid4().hex
        producer = KafkaProducer(bootstrap_servers=services.kafka_bootstrap, acks="all")
        traceparent = f"00-{upstream_trace}-{uuid.uuid4().hex[:16]}-01".encode()
        producer.send(topics.events, key=orders[0]["id"].encode(), value=json.dumps(orders[0]).encode(),
                      headers=[("traceparent", traceparent)])  # fmt: skip
        producer.send(topics.events, key=orders[1]["id"].encode(), value=json.dumps(orders[1]).encode())
        producer.flush()
        producer.close()
        Consumer(env, topics, tmp_path / "consumer.log", "--max-events", "2").wait(300)

        def complete() -> bool:
            names = [s["name"] for s in receiver.spans]
            return names.count("ehrw.fhir.transaction") >= 2 and names.count("ehrw.dispatch") >= 2

        wait_for(complete, 60, "spans of both events")
    finally:
        worker.stop()
        receiver.stop()

    traces: dict[str, list[dict]] = {}
    for span in receiver.spans:
        traces.setdefault(span["trace"], []).append(span)
    assert upstream_trace in traces  # the first event continues the producer's trace
    assert len(traces) == 2
    for spans in traces.values():
        by_name = {s["name"]: s for s in spans}
        assert {"ehrw.dispatch", "ehrw.order", "ehrw.inference", "ehrw.fhir.transaction"} <= set(by_name)
        assert (
            by_name["ehrw.dispatch"]["component"] == "consumer"
            and by_name["ehrw.order"]["component"] == "worker"
        )
        assert by_name["ehrw.order"]["parent"] == by_name["ehrw.dispatch"]["span"]
        assert by_name["ehrw.fhir.transaction"]["parent"] == by_name["ehrw.order"]["span"]
    notes = [o["note"][0]["text"][:30] for o in orders if o.get("note")]
    assert notes and not any(n in json.dumps(receiver.spans) for n in notes)
