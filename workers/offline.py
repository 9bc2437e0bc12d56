"""``ehr-worker predict``: one model over a file of orders, with no Kafka and no FHIR server."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

from models.registry import ModelRegistry
from models.runtime import TextClassifier
from schemas.jsonlines import iter_json_lines
from schemas.text import build_model_input, service_request_from_text


def read_orders(path: Path) -> Iterator[tuple[str, dict]]:
    """Yield ``(id, ServiceRequest)`` from FHIR NDJSON or JSONL ``{"id", "text"}`` lines."""
    for lineno, row in iter_json_lines(path):
        if row.get("resourceType") == "ServiceRequest":
            yield str(row.get("id", f"line-{lineno}")), row
        elif "text" in row and "id" in row:
            if not isinstance(row["text"], str):
                raise ValueError(f"{path}:{lineno}: 'text' must be a string")
            yield str(row["id"]), service_request_from_text(str(row["id"]), row["text"], field="note")
        else:
            found = row.get("resourceType") or ", ".join(sorted(row)[:5]) or "nothing"
            raise ValueError(
                f"{path}:{lineno}: expected a ServiceRequest resource or an object with 'id' and 'text' (found {found})"
            )


@contextmanager
def _open_out(path: Path) -> Iterator[IO[str]]:
    if str(path) == "-":
        yield sys.stdout
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w", encoding="utf-8") as fh:
            yield fh


def predict_file(
    task: str, input_path: Path, output_path: Path, *, top_k: int = 5, registry: Path | None = None, batch_size: int = 32
) -> int:
    if not input_path.exists():
        raise FileNotFoundError(f"{input_path} does not exist")
    if registry is None:
        from workers.settings import get_settings

        registry = get_settings().model_registry
    model = TextClassifier.load(ModelRegistry(registry).current_dir(task))
    orders = list(read_orders(input_path))
    n = 0
    with _open_out(output_path) as out:
        for start in range(0, len(orders), batch_size):
            chunk = orders[start : start + batch_size]
            # protocol: only the protocols of the exam each order names (its code) are ranked
            weights = model.order_weights([sr for _, sr in chunk]) if task == "protocol" else None
            outputs = model.predict([build_model_input(sr) for _, sr in chunk], top_k=top_k, weights=weights)
            for (order_id, _), output in zip(chunk, outputs):
                out.write(json.dumps({"id": order_id, **output.to_json()}) + "\n")
                n += 1
    return n
