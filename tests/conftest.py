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
# Orders carried inline travel encrypted between consumer and workers (workers/payload.py): one key
# per session, inherited by every worker and consumer process the tests start.
os.environ.setdefault("EHRW_PAYLOAD_KEY", "")
if not os.environ["EHRW_PAYLOAD_KEY"]:
    from cryptography.fernet import Fernet

    os.environ["EHRW_PAYLOAD_KEY"] = Fernet.generate_key().decode()

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
def local_stack(tmp_path_factory):
    """Tansu, sekmet and Redis (reused when one answers) as the demo and the bench run them."""
    from workers.local import LocalStack
    from workers.settings import Settings

    with LocalStack(Settings(redis_url=os.environ["EHRW_REDIS_URL"]), workdir=tmp_path_factory.mktemp("services")) as stack:
        yield stack


@pytest.fixture(scope="session")
def services(local_stack):
    svc = Services(
        kafka_bootstrap=local_stack.settings.kafka_bootstrap,
        fhir_base_url=local_stack.settings.fhir_base_url,
        redis_url=local_stack.settings.redis_url,
        fhir_port=local_stack.services.fhir_port,
        sekmet_dir=local_stack.workdir / "fhir",
        sekmet=local_stack.services.processes["fhir"],
    )
    yield svc
    svc.sekmet.stop()  # a test may have restarted it; the stack stops the rest


@pytest.fixture(scope="module")
def fhir_base(tmp_path_factory):
    """The base URL of a sekmet FHIR server of the test module's own (no Kafka, no Redis)."""
    from connectors.embedded import EmbeddedServices

    with EmbeddedServices(tmp_path_factory.mktemp("fhir"), kafka=False, redis=False) as services:
        yield services.fhir_base_url


@pytest.fixture(scope="session")
def tiny_registry(tmp_path_factory) -> Path:
    """Real models, trained, exported and int8-quantized with the tiny profile (about a minute)."""
    from schemas.tasks import TASKS
    from training.build import build_models

    prebuilt = os.environ.get("EHRW_TEST_REGISTRY")  # reuse a tiny registry while iterating locally
    if prebuilt:
        return Path(prebuilt)
    root = tmp_path_factory.mktemp("registry")
    build_models(root, tasks=TASKS, profile="tiny", seed=0, progress=False)
    return root


@pytest.fixture(scope="session")
def worker_env(local_stack, tiny_registry) -> dict[str, str]:
    return local_stack.env(EHRW_MODEL_REGISTRY=str(tiny_registry), EHRW_FHIR_MAX_RETRIES="2")


@pytest.fixture(scope="session")
def celery_worker(local_stack, worker_env):
    local_stack.purge()
    worker = local_stack.start_worker(concurrency=2, name="pytest", **worker_env)
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
