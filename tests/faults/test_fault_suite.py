"""The fault suite: each row of ``ehr-worker chaos`` with 1,000 events on the real services.

A FHIR server, the fault proxy in front of it, a Redis of its own (restarted, flushed and frozen
by the Redis rows) and a real ``celery worker`` (tiny real models, its own Celery queue) are
started for this module (``workers.chaos_lab``); Kafka (Tansu) is the session's. Consumers are
real consumer processes. Every
count comes from the FHIR server and the topics (see :func:`workers.chaos.verify`): every good
event has exactly one set of suggestion resources, every bad event is on the dead-letter topic
with its reason, nothing else exists, no partition is stuck, and the Redis queue stayed within
the dispatcher's window of in-flight orders (per consumer).

``EHRW_FAULT_EVENTS`` changes the number of events per row (default 1,000).
"""

from __future__ import annotations

import logging
import os

import pytest

from workers import chaos

pytestmark = pytest.mark.services

EVENTS = int(os.environ.get("EHRW_FAULT_EVENTS", "1000"))
ROWS = {name: (fault, options) for name, fault, options in chaos.rows(EVENTS)}


@pytest.fixture(scope="module")
def lab(services, tiny_registry, tmp_path_factory):
    logging.getLogger("kafka").setLevel(logging.CRITICAL)
    lab = chaos.ChaosLab(tmp_path_factory.mktemp("chaos"), kafka_bootstrap=services.kafka_bootstrap,
                         registry=tiny_registry).start()  # fmt: skip
    yield lab
    lab.stop()


@pytest.mark.parametrize("name", list(ROWS))
def test_fault_row_loses_nothing_duplicates_nothing_and_sticks_nowhere(lab, name):
    fault, options = ROWS[name]
    options = dict(options)
    consumers = options.pop("consumers", 1)
    # Under pytest-timeout's 600 s, so that a stalled row ends by itself: counted, consumers stopped.
    row = chaos.run_row(lab, name, fault, EVENTS, consumers=consumers, timeout_s=420, **options)
    print(chaos.format_row(row))
    assert row.events >= EVENTS
    assert (row.lost, row.duplicated, row.stuck_partitions) == (0, 0, 0), chaos.format_row(row)
    assert row.dead_lettered > 0  # the bad events are there, each with its reason (verify checks the reason)
    assert row.max_queue <= chaos.WINDOW * (consumers + 1), chaos.format_row(row)
