"""Score a protocol model on the hand-written real-like check set (``tests/data/protocol_real_like.tsv``):
orders with the exam in ``code.text`` and the indication in ``note``, as the hidden real orders come.

    python -m training.protocol_checkset --registry registry [--cli] [--heldout 2000]

Prints top-1 / top-3, restricted to the ordered exam (as served) and unrestricted (the model
alone); ``--cli`` also runs ``ehr-worker predict --task protocol --top-k 3`` on the NDJSON and
scores its output, which is what the hidden set is scored with.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

CHECKSET = Path(__file__).resolve().parents[1] / "tests" / "data" / "protocol_real_like.tsv"


def load_checkset(path: Path = CHECKSET) -> list[tuple[str, dict]]:
    """(label, ServiceRequest) pairs: code.text and note only, like the hidden real orders."""
    out = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines()):
        if not line.strip() or line.startswith("#"):
            continue
        label, code_text, note = line.split("\t")
        sr = {"resourceType": "ServiceRequest", "id": f"check-{n}", "status": "active", "intent": "order",
              "subject": {"reference": "Patient/check"}, "code": {"text": code_text}, "note": [{"text": note}]}
        out.append((label, sr))
    return out


def score(labels: list[str], ranked: list[list[str]]) -> dict:
    n = len(labels)
    top1 = sum(bool(r) and r[0] == y for y, r in zip(labels, ranked)) / n
    top3 = sum(y in r[:3] for y, r in zip(labels, ranked)) / n
    return {"n": n, "top1": round(top1, 4), "top3": round(top3, 4)}


def evaluate(registry: Path, *, cli: bool = False) -> dict:
    from models.registry import ModelRegistry
    from models.runtime import TextClassifier
    from schemas.text import build_model_input

    items = load_checkset()
    labels = [y for y, _ in items]
    model = TextClassifier.load(ModelRegistry(registry).current_dir("protocol"))
    texts = [build_model_input(sr) for _, sr in items]
    restricted = model.predict(texts, top_k=3, weights=model.order_weights([sr for _, sr in items]))
    plain = model.predict(texts, top_k=3)
    out = {
        "restricted": score(labels, [[p.code for p in o.predictions] for o in restricted]),
        "unrestricted": score(labels, [[p.code for p in o.predictions] for o in plain]),
        "abstained_restricted": round(sum(o.abstained for o in restricted) / len(items), 4),
        "misses": [(y, sr["code"]["text"], [p.code for p in o.predictions]) for (y, sr), o in zip(items, restricted)
                   if o.predictions[0].code != y],
    }
    if cli:
        with tempfile.TemporaryDirectory() as tmp:
            src, dst = Path(tmp) / "orders.ndjson", Path(tmp) / "out.jsonl"
            src.write_text("".join(json.dumps(sr) + "\n" for _, sr in items), encoding="utf-8")
            subprocess.run([sys.executable, "-m", "workers.cli", "predict", "--task", "protocol", "--top-k", "3",
                            "--registry", str(registry), str(src), str(dst)], check=True, capture_output=True)
            lines = [json.loads(x) for x in dst.read_text(encoding="utf-8").splitlines()]
        out["ehr_worker_predict"] = score(labels, [[p["code"] for p in line["predictions"]] for line in lines])
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.protocol_checkset", description=__doc__.splitlines()[0])
    parser.add_argument("--registry", default="registry")
    parser.add_argument("--cli", action="store_true", help="also score `ehr-worker predict --top-k 3` output")
    parser.add_argument("--heldout", type=int, default=0, metavar="N",
                        help="also print the slices on N orders of the generator's held-out test split (seed 0)")
    args = parser.parse_args(argv)
    print(json.dumps(evaluate(Path(args.registry), cli=args.cli), indent=1))
    if args.heldout:
        print(heldout_slices(Path(args.registry), args.heldout))
    return 0


def heldout_slices(registry: Path, n: int) -> str:
    """The PROTOCOL_SLICES table of any registered model on the current generator's held-out split
    (so that models built from different data are compared on the same orders)."""
    import numpy as np

    from models.registry import ModelRegistry
    from models.runtime import TextClassifier
    from training.datasets import protocol
    from training.protocol_eval import exam_slices, slices_markdown

    data = protocol.generate(n, seed=0, split="test")
    model = TextClassifier.load(ModelRegistry(registry).current_dir("protocol"))
    logits = model.logits(data.texts(), batch_size=64)
    return slices_markdown(exam_slices(logits, data, np.asarray(data.label_ids()), model.temperature, model.threshold))


if __name__ == "__main__":
    sys.exit(main())
