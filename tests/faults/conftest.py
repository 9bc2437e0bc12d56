"""Fixtures of the fault suite: the session's Tansu broker, for tests that need Kafka only."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def bootstrap(services) -> str:
    return services.kafka_bootstrap
