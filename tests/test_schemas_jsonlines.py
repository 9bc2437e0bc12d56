"""schemas.jsonlines: the one NDJSON / JSON Lines reader; errors name the file and line, never the content."""

from __future__ import annotations

import pytest

from schemas.jsonlines import JsonLinesError, iter_json_lines, read_json_lines


def test_objects_in_order_blank_lines_and_bom_skipped(tmp_path):
    path = tmp_path / "orders.ndjson"
    path.write_bytes(b'\xef\xbb\xbf{"id": "a"}\n\n  \n{"id": "b"}\r\n')
    assert list(iter_json_lines(path)) == [(1, {"id": "a"}), (4, {"id": "b"})]
    assert read_json_lines(str(path)) == [{"id": "a"}, {"id": "b"}]


@pytest.mark.parametrize(
    ("content", "problem"),
    [('{"id": "a"}\n{"note": "Jane Doe, 4 y\n', "2: not valid JSON"), ('{"id": "a"}\n[1, 2]\n', "2: expected a JSON object, got list")],
)
def test_a_bad_line_is_named_without_its_content(tmp_path, content, problem):
    path = tmp_path / "bad.jsonl"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(JsonLinesError) as err:
        read_json_lines(path)
    assert f"bad.jsonl:{problem}" in str(err.value) and "Jane" not in str(err.value)
    assert err.value.line == 2 and err.value.path == path
