"""Session fixtures: the real services (Tansu, sekmet, Redis), tiny trained models, a celery worker.

The Celery app reads its broker URL when ``workers`` is first imported, so the Redis URL is fixed
here, before any test module imports it. Tests use Redis database 15 to stay clear of a demo.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest

os.environ.setdefault("EHRW_REDIS_URL", "redis://127.0.0.1:6379/15")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parent.parent


@dataclass
class Services:
    kafka_bootstrap: str
    fhir_base_url: str
    redis_url: str
    fhir_port: int
    sekmet_dir: Path
    sekmet: object

    def restart_fhir(self) -> None:
        from connectors.embedded import start_sekmet

        self.sekmet = start_sekmet(self.fhir_port, self.sekmet_dir)


@pytest.fixture(scope="session")
def services(tmp_path_factory):
    from connectors.embedded import ensure_redis, free_port, start_sekmet, start_tansu

    base = tmp_path_factory.mktemp("services")
    redis_url = os.environ["EHRW_REDIS_URL"]
    redis = ensure_redis(int(redis_url.rsplit(":", 1)[1].split("/")[0]))
    kafka_port, fhir_port = free_port(), free_port()
    tansu = start_tansu(kafka_port, base / "tansu")
    sekmet = start_sekmet(fhir_port, base / "sekmet")
    svc = Services(
        kafka_bootstrap=f"127.0.0.1:{kafka_port}",
        fhir_base_url=f"http://127.0.0.1:{fhir_port}/fhir",
        redis_url=redis_url,
        fhir_port=fhir_port,
        sekmet_dir=base / "sekmet",
        sekmet=sekmet,
    )
    yield svc
    svc.sekmet.stop()
    tansu.stop()
    if redis is not None:
        redis.stop()


@pytest.fixture(scope="session")
def tiny_registry(tmp_path_factory) -> Path:
    """Real models, trained, exported and int8-quantized with the tiny profile (about a minute)."""
    from training.build import build_models

    prebuilt = os.environ.get("EHRW_TEST_REGISTRY")  # reuse a tiny registry while iterating locally
    if prebuilt:
        return Path(prebuilt)
    root = tmp_path_factory.mktemp("registry")
    build_models(root, tasks=("protocol", "diagnosis"), profile="tiny", seed=0, progress=False)
    return root


@pytest.fixture(scope="session")
def worker_env(services, tiny_registry) -> dict[str, str]:
    return {
        "EHRW_KAFKA_BOOTSTRAP": services.kafka_bootstrap,
        "EHRW_REDIS_URL": services.redis_url,
        "EHRW_FHIR_BASE_URL": services.fhir_base_url,
        "EHRW_MODEL_REGISTRY": str(tiny_registry),
        "EHRW_FHIR_MAX_RETRIES": "2",
    }


@pytest.fixture(scope="session")
def celery_worker(worker_env, tmp_path_factory):
    from workers.app import app
    from workers.local import start_worker

    app.control.purge()
    log = tmp_path_factory.mktemp("worker") / "worker.log"
    worker = start_worker(worker_env, log, app=app, concurrency=2, name="pytest")
    yield worker
    worker.stop()


@pytest.fixture
def copy_registry(tiny_registry, tmp_path):
    def _copy() -> Path:
        dst = tmp_path / "registry"
        shutil.copytree(tiny_registry, dst)
        return dst

    return _copy


@pytest.fixture(scope="session")
def dx_registry(tmp_path_factory) -> Path:
    """A registry holding only the diagnosis model (the torch-free phenotype ranker, tiny profile, ~30 s);
    the tiny test registry's when EHRW_TEST_REGISTRY names one with a phenotype ranker."""
    prebuilt = os.environ.get("EHRW_TEST_REGISTRY")
    if prebuilt:
        from models.registry import ModelRegistry

        try:
            kind = getattr(ModelRegistry(prebuilt).load_manifest("diagnosis"), "kind", None)
        except Exception:  # noqa: BLE001 - no usable diagnosis model there: build our own
            kind = None
        if kind == "hpo-ranker":
            return Path(prebuilt)
    from training.phenotype.build import build_diagnosis

    root = tmp_path_factory.mktemp("dx-registry")
    build_diagnosis(root, profile="tiny", seed=0, progress=False)
    return root


@pytest.fixture(scope="session")
def dx_model(dx_registry):
    from models.diagnosis import DiagnosisModel
    from models.registry import ModelRegistry

    return DiagnosisModel.load(ModelRegistry(dx_registry).current_dir("diagnosis"))
