"""The operations docs stay true: every metric and alert is explained, the example Bundle is valid."""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

from schemas.validation import r4_schema_errors
from workers import metrics

DOCS = Path(__file__).resolve().parent.parent / "docs"


def _metric_names() -> set[str]:
    names = {
        getattr(metrics, n)._name for n in dir(metrics) if hasattr(getattr(metrics, n), "_documentation")
    }
    return names | {"ehrw_celery_queue_depth"}


def test_every_metric_and_alert_is_explained_in_the_operations_guide():
    guide = (DOCS / "operations.md").read_text()
    documented = {re.sub(r"_total$", "", n) for n in re.findall(r"`(ehrw_[a-z_]+)`", guide)}
    assert sorted(_metric_names() - documented) == []
    assert sorted(documented - _metric_names()) == []
    alerts = yaml.safe_load((DOCS / "prometheus" / "alerts.yml").read_text())
    for rule in alerts["groups"][0]["rules"]:
        assert f"`{rule['alert']}`" in guide, rule["alert"]
    assert "```mermaid" in guide


def test_the_example_bundle_is_valid_r4_and_matches_its_copy():
    bundle = json.loads((DOCS / "fhir-example-bundle.json").read_text())
    assert bundle["type"] == "transaction"
    types = [e["resource"]["resourceType"] for e in bundle["entry"]]
    assert {"Device", "Task", "RiskAssessment", "Provenance"} <= set(types)
    for entry in bundle["entry"]:
        assert r4_schema_errors(entry["resource"]) == [], entry["resource"]["resourceType"]
        assert entry["request"]["ifNoneExist"]
    doc = (DOCS / "fhir-resources.md").read_text()
    copy = doc.split("```json\n", 1)[1].split("```", 1)[0]
    assert json.loads(copy) == bundle
    order = next(
        json.loads(line)
        for line in (DOCS.parent / "workers/fixtures/orders/imaging-orders.ndjson").read_text().splitlines()
        if '"demo-img-001"' in line
    )
    assert order["note"][0]["text"][:40] not in json.dumps(bundle)


def test_the_readme_links_the_operations_docs():
    readme = (DOCS.parent / "README.md").read_text()
    for name in ("operations.md", "configuration.md", "fhir-resources.md"):
        assert f"docs/{name}" in readme, name
