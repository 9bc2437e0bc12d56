"""Operations pieces without services: promote/rollback history, the model holder refusing a corrupt
version, log redaction in both formats, ``--since`` parsing, readiness checks."""

from __future__ import annotations

import io
import json
import logging
import shutil
from datetime import UTC, datetime
from pathlib import Path

import pytest

from connectors.dlq_replay import parse_since
from models.registry import ModelNotFoundError, ModelRegistry
from workers import logs, metrics
from workers.health import run_checks
from workers.rollout import ModelHolder, load_model_folder

NOTE = "Boy aged 2 years presenting with malalignment of upper and lower dental arches"


def _add_version(registry: Path, task: str, version: str) -> str:
    reg = ModelRegistry(registry)
    staging = registry.parent / f"staging-{version}"
    shutil.copytree(registry / task / reg.current_version(task), staging)
    doc = json.loads((staging / "manifest.json").read_text())
    doc["version"] = version
    (staging / "manifest.json").write_text(json.dumps(doc))
    reg.publish(task, version, staging, make_current=False)
    shutil.rmtree(staging)
    return version


@pytest.fixture
def registry(copy_registry) -> Path:
    return copy_registry()


def test_promote_and_rollback_keep_a_history_stack(registry):
    reg = ModelRegistry(registry)
    v1 = reg.current_version("protocol")
    v2, v3 = _add_version(registry, "protocol", "zz-2"), _add_version(registry, "protocol", "zz-3")
    assert reg.promote("protocol", v2) == v1
    assert reg.promote("protocol", v3) == v2
    assert reg.rollback("protocol") == (v3, v2)
    assert reg.rollback("protocol") == (v2, v1)
    assert [h["action"] for h in reg.history("protocol")] == ["promote", "promote", "rollback", "rollback"]
    with pytest.raises(ModelNotFoundError, match="nothing to roll back to"):
        reg.rollback("protocol")  # v1 is the oldest version and no promote is left to undo


def test_rollback_after_an_out_of_band_change_goes_to_the_previous_version(registry):
    reg = ModelRegistry(registry)
    v1 = reg.current_version("protocol")
    v2 = _add_version(registry, "protocol", "zz-2")
    reg.set_current("protocol", v2)  # e.g. a model build: no history entry
    assert reg.rollback_target("protocol") == v1


def test_the_holder_switches_between_tasks_and_refuses_a_corrupt_version(registry):
    holder = ModelHolder(registry, loader=load_model_folder, check_interval_s=0)
    reg = ModelRegistry(registry)
    old = reg.current_version("protocol")
    assert holder.models().protocol.version == old
    good = _add_version(registry, "protocol", "zz-good")
    reg.promote("protocol", good)
    assert holder.models().protocol.version == good
    assert logs.model_versions["protocol"] == good
    bad = _add_version(registry, "protocol", "zz-bad")
    (registry / "protocol" / bad / "model.onnx").write_bytes(b"not a model")
    (registry / "protocol" / "CURRENT").write_text(bad + "\n")  # out of band: promote would refuse it
    refused_before = metrics.model_switches.labels("protocol", "refused")._value.get()
    assert holder.models().protocol.version == good  # still serving the last good version
    assert metrics.model_switches.labels("protocol", "refused")._value.get() == refused_before + 1
    assert holder.models().protocol.version == good  # and not re-verifying it on every task
    assert metrics.model_switches.labels("protocol", "refused")._value.get() == refused_before + 1


def _celery_like_record(message: str, context: dict) -> logging.LogRecord:
    record = logging.LogRecord("celery.app.trace", logging.INFO, __file__, 1, message, (context,), None)
    record.data = context  # Celery passes the same mapping as extra={"data": ...}
    return record


@pytest.mark.parametrize("fmt", ["json", "text"])
def test_celery_records_are_redacted_in_both_formats(fmt):
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logs.json_formatter() if fmt == "json" else logs.text_formatter())
    handler.addFilter(logs.RedactFilter())
    handler.addFilter(logs.ContextFilter())
    context = {"name": "ehr_worker.suggest_for_order", "id": "t-1", "args": f"[{{'note': '{NOTE}'}}]",
               "kwargs": "{}", "return_value": f"{{'reason': '{NOTE}'}}", "runtime": 0.1}  # fmt: skip
    with logs.bind(order="ServiceRequest/x", event="ev[0]@3"):
        handler.handle(
            _celery_like_record("Task %(name)s[%(id)s] succeeded in %(runtime)ss: %(return_value)s", context)
        )
        handler.handle(_celery_like_record("Task %(name)s[%(id)s] received", context))
    out = stream.getvalue()
    assert NOTE[:30] not in out and "[redacted]" in out
    if fmt == "json":
        lines = [json.loads(line) for line in out.splitlines()]
        assert all(set(line) <= logs.EhrJsonFormatter.ALLOWED for line in lines)
        assert lines[0]["order"] == "ServiceRequest/x" and lines[0]["event"] == "ev[0]@3"


def test_since_accepts_ages_and_iso_times_and_names_the_problem():
    now = datetime(2026, 12, 2, 12, 0, tzinfo=UTC)
    assert parse_since("2h", now=now) == datetime(2026, 12, 2, 10, 0, tzinfo=UTC)
    assert parse_since("7d", now=now).day == 25
    assert parse_since("2026-12-01T08:00Z") == datetime(2026, 12, 1, 8, 0, tzinfo=UTC)
    assert parse_since("2026-12-01").tzinfo is not None
    with pytest.raises(ValueError, match="neither an ISO-8601 time"):
        parse_since("yesterday")


def test_readiness_names_the_failing_check():
    def broken() -> None:
        raise ConnectionError("refused")

    ready, results = run_checks({"ok": lambda: None, "fhir": broken})
    assert not ready and results == {"ok": "ok", "fhir": "ConnectionError: refused"}
    assert run_checks({}) == (True, {})
