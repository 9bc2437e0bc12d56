"""The configuration reference in README.md and docs/configuration.md matches the settings."""

from __future__ import annotations

import pytest

from workers import configdoc
from workers.settings import Settings


@pytest.mark.parametrize("path", configdoc.TARGETS, ids=lambda p: p.name)
def test_the_settings_table_is_up_to_date(path):
    text = path.read_text(encoding="utf-8")
    assert configdoc.render(text) == text, (
        f"{path.name} is out of date: run python -m workers.configdoc --write"
    )


def test_every_setting_is_in_the_table_with_its_default_and_a_meaning():
    rows = {var: (default, meaning) for var, default, meaning in configdoc.rows()}
    assert set(rows) == {f"EHRW_{name.upper()}" for name in Settings.model_fields}
    assert [var for var, (_, meaning) in rows.items() if not meaning.strip()] == []
    assert rows["EHRW_WORKER_HTTP_PORT"][0] == f"`{Settings.model_fields['worker_http_port'].default}`"


def test_a_stale_table_is_detected():
    current = configdoc.TARGETS[0].read_text(encoding="utf-8")
    stale = current.replace("| `EHRW_KAFKA_TOPIC` |", "| `EHRW_KAFKA_TOPIC_OLD` |")
    assert stale != current and configdoc.render(stale) == current
    assert configdoc.main(["--check"]) == 0
