"""``ehr-worker predict``: one model over a file of orders, with no Kafka and no FHIR server."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

from models.diagnosis import load_diagnosis_model
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
    folder = ModelRegistry(registry).current_dir(task)
    model = load_diagnosis_model(folder) if task == "diagnosis" else TextClassifier.load(folder)
    to_text = getattr(model, "input_text", lambda sr, context=(): build_model_input(sr))
    orders = list(read_orders(input_path))
    n = 0
    with _open_out(output_path) as out:
        for start in range(0, len(orders), batch_size):
            chunk = orders[start : start + batch_size]
            texts = [to_text(sr) for _, sr in chunk]
            if task == "protocol":  # only the protocols of the exam each order names (its code) are ranked
                outputs = model.predict(texts, top_k=top_k, weights=model.order_weights([sr for _, sr in chunk]))
            else:
                outputs = model.predict(texts, top_k=top_k)
            for (order_id, _), output in zip(chunk, outputs):
                out.write(json.dumps({"id": order_id, **output.to_json()}) + "\n")
                n += 1
    return n


def phenotypes_file(input_path: Path, output_path: Path, *, registry: Path | None = None) -> int:
    """``ehr-worker phenotypes``: one line per order, ``{"id", "terms": [{code, label, status, span}]}``.
    Spans are character offsets into the text the model reads: the ``text`` of a JSONL line as given,
    or for a ServiceRequest its clinical text (``schemas.text.phenotype_text``)."""
    from models.diagnosis import DiagnosisModel

    if not input_path.exists():
        raise FileNotFoundError(f"{input_path} does not exist")
    if registry is None:
        from workers.settings import get_settings

        registry = get_settings().model_registry
    folder = ModelRegistry(registry).current_dir("diagnosis")
    model = load_diagnosis_model(folder)
    if not isinstance(model, DiagnosisModel):
        # a ValueError: the CLI reports it as a clear message
        raise ValueError(  # noqa: TRY004
            f"the current diagnosis model in {folder} has no phenotype recogniser (an older text "
                         "classifier); rebuild it with `python -m training pipeline --task diagnosis`")
    n = 0
    with _open_out(output_path) as out:
        for order_id, sr in read_orders(input_path):
            plain = set(sr) <= {"resourceType", "id", "status", "intent", "note"}  # a JSONL {id, text} line
            text = sr["note"][0]["text"] if plain and sr.get("note") else model.input_text(sr)
            terms = [m.to_json() for m in model.recognizer.recognise(text[: model.max_chars])]
            out.write(json.dumps({"id": order_id, "terms": terms}) + "\n")
            n += 1
    return n
