"""The ehr-worker command line on real (tiny) models, and refusal of a corrupt model."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from schemas.tasks import TASKS

REPO = Path(__file__).resolve().parent.parent


def run_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    import os

    return subprocess.run(
        [sys.executable, "-m", "workers.cli", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, **(env or {})},
        timeout=300,
    )


def test_predict_writes_one_line_per_input_in_the_documented_shape(tiny_registry, tmp_path):
    src = tmp_path / "in.jsonl"
    rows = [
        {"id": "a", "text": "CT head: fall on warfarin, r/o intracranial bleed"},
        {"id": "b", "text": "US RUQ: RUQ pain after meals, r/o cholelithiasis"},
        {"id": "c", "text": "Tall stature, arachnodactyly, ectopia lentis; echo for aortic root"},
    ]
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    for task in TASKS:
        out = tmp_path / f"{task}.jsonl"
        proc = run_cli("predict", "--task", task, "--top-k", "3", str(src), str(out), "--registry", str(tiny_registry))
        assert proc.returncode == 0, proc.stderr
        lines = [json.loads(line) for line in out.read_text().splitlines()]
        assert [line["id"] for line in lines] == ["a", "b", "c"]
        for line in lines:
            assert set(line) == {"id", "task", "model", "model_version", "abstained", "predictions"}
            # the diagnosis model lists nothing when the text names no phenotype at all (it abstains)
            assert line["task"] == task and (len(line["predictions"]) == 3 or (task == "diagnosis" and line["abstained"]))
            probs = [p["probability"] for p in line["predictions"]]
            assert probs == sorted(probs, reverse=True) and all(0 <= p <= 1 for p in probs)
            assert not line["predictions"] or set(line["predictions"][0]) == {"system", "code", "display", "probability"}


def test_predict_accepts_servicerequest_ndjson(tiny_registry, tmp_path):
    src = REPO / "workers" / "fixtures" / "orders" / "imaging-orders.ndjson"
    out = tmp_path / "out.jsonl"
    proc = run_cli("predict", "--task", "protocol", str(src), str(out), "--registry", str(tiny_registry))
    assert proc.returncode == 0, proc.stderr
    n_in = sum(1 for line in src.read_text().splitlines() if line.strip())
    assert len(out.read_text().splitlines()) == n_in


def test_predict_names_the_bad_line(tiny_registry, tmp_path):
    src = tmp_path / "bad.jsonl"
    src.write_text('{"id": "a", "text": "ok"}\n{"id": "b"}\n')
    proc = run_cli("predict", "--task", "protocol", str(src), str(tmp_path / "o.jsonl"), "--registry", str(tiny_registry))
    assert proc.returncode != 0
    assert "bad.jsonl:2" in proc.stderr


def test_models_list_and_verify(tiny_registry):
    proc = run_cli("models", "list", "--registry", str(tiny_registry))
    assert proc.returncode == 0, proc.stderr
    assert "protocol" in proc.stdout and "diagnosis" in proc.stdout
    proc = run_cli("models", "verify", "--registry", str(tiny_registry))
    assert proc.returncode == 0, proc.stderr


def _corrupt(registry: Path) -> Path:
    current = (registry / "protocol" / "CURRENT").read_text().strip()
    model = registry / "protocol" / current / "model.onnx"
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0xFF
    model.write_bytes(bytes(data))
    return model


def test_verify_refuses_a_corrupt_model(copy_registry):
    registry = copy_registry()
    _corrupt(registry)
    proc = run_cli("models", "verify", "--registry", str(registry))
    assert proc.returncode == 1
    assert "model.onnx" in proc.stderr and "protocol" in proc.stderr


@pytest.mark.services
def test_worker_refuses_to_start_on_a_corrupt_model(copy_registry, worker_env, tmp_path):
    from workers.app import app
    from workers.local import start_worker

    registry = copy_registry()
    _corrupt(registry)
    with pytest.raises(RuntimeError) as err:
        start_worker({**worker_env, "EHRW_MODEL_REGISTRY": str(registry)}, tmp_path / "w.log", app=app, name="corrupt", ready_timeout=60)
    assert "model.onnx" in str(err.value)


def test_docker_compose_is_a_valid_stack():
    import yaml

    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    services = compose["services"]
    assert {"kafka", "redis", "fhir", "worker", "consumer"} <= set(services)
    assert services["worker"]["command"][:3] == ["celery", "-A", "workers"]
    assert services["consumer"]["command"] == ["ehr-worker", "consume"]
    assert "KAFKA_PROCESS_ROLES" in services["kafka"]["environment"]  # KRaft, no ZooKeeper
    env = services["worker"]["environment"]
    for key in ("EHRW_KAFKA_BOOTSTRAP", "EHRW_REDIS_URL", "EHRW_FHIR_BASE_URL", "EHRW_MODEL_REGISTRY"):
        assert key in env
    for name, svc in services.items():
        for dep in svc.get("depends_on", {}):
            assert dep in services, f"{name} depends on unknown {dep}"
    # Secrets only via the environment: every password/secret value is a ${VAR} reference.
    for svc in services.values():
        env = svc.get("environment") or {}
        for key, value in (env.items() if isinstance(env, dict) else []):
            if any(word in key.upper() for word in ("PASSWORD", "SECRET")):
                assert str(value).startswith("${"), key
        assert "change-me" not in " ".join(map(str, svc.get("command") or []))


def test_celery_accepts_json_only():
    from workers.app import app

    assert app.conf.task_serializer == "json" and app.conf.result_serializer == "json"
    assert app.conf.accept_content == ["json"]
    assert app.conf.task_acks_late and app.conf.task_reject_on_worker_lost
