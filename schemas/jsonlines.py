"""The one reader of NDJSON / JSON Lines files (FHIR bulk data, labelled examples, fixtures): one
JSON object per non-empty line."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any


class JsonLinesError(ValueError):
    """A line that is not a JSON object; the message names the file and line, never its content."""

    def __init__(self, path: Path | str, line: int, problem: str) -> None:
        super().__init__(f"{path}:{line}: {problem}")
        self.path, self.line, self.problem = Path(path), line, problem


def iter_json_lines(path: Path | str) -> Iterator[tuple[int, dict[str, Any]]]:
    """``(line number, object)`` for every non-empty line of ``path``, in order. ``utf-8-sig``:
    files saved by spreadsheet tools start with a byte-order mark."""
    with Path(path).open("r", encoding="utf-8-sig") as fh:
        for number, raw in enumerate(fh, start=1):
            if not raw.strip():
                continue
            try:
                value = json.loads(raw)
            except json.JSONDecodeError as exc:
                raise JsonLinesError(path, number, f"not valid JSON ({exc.msg} at column {exc.colno})") from None
            if not isinstance(value, dict):
                raise JsonLinesError(path, number, f"expected a JSON object, got {type(value).__name__}")
            yield number, value


def read_json_lines(path: Path | str) -> list[dict[str, Any]]:
    """Every object of ``path`` (see :func:`iter_json_lines`)."""
    return [value for _, value in iter_json_lines(path)]
