"""``python -m training.phenotype.probe --model DIR``: the diagnosis model on hand-written text, apart from
the generator: case-report paragraphs written in journal style for this project
(``tests/data/diagnosis_case_reports.jsonl``: disease, text, the HPO terms a curator would code, present
and excluded; ``diagnosis_case_reports_heldout.jsonl``: ten more, written after the lexicon work and never
tuned on) and ordinary imaging orders as requesters write them (``tests/data/ordinary_orders.txt``).

Reports concept-recognition precision/recall (exact term, and "near": the recognised term is the gold
term, an ancestor or a descendant of it), the rank of the right disease, and the share of each set given a
suggestion. ``--show`` prints, per case, the gold terms missed and the terms recognised beyond gold.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

DATA = Path(__file__).resolve().parents[2] / "tests" / "data"
CASES = DATA / "diagnosis_case_reports.jsonl"
# written after the lexicon work on CASES and measured once, never tuned on: the held-out check
HELD_OUT = DATA / "diagnosis_case_reports_heldout.jsonl"
ORDINARY = DATA / "ordinary_orders.txt"


def load_cases(path: Path = CASES) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def load_ordinary(path: Path = ORDINARY) -> list[str]:
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def probe(model, cases: list[dict], ordinary: list[str], show: bool = False) -> dict:
    from models.phenotypes import patient_terms

    index = {h: i for i, h in enumerate(model.recognizer.ids)}
    codes = {row["code"]: i for i, row in enumerate(model.diseases)}
    tp = fp = fn = near_fn = 0
    ranks, accepted = [], []
    for c in cases:
        a = model.analyse(c["text"])
        got, _ = patient_terms(a.mentions)
        got_set = set(got)
        gold = {index[h] for h in c["present"] if h in index}
        related = {g: set(model.ranker.ancestors(g).tolist()) for g in gold}
        hits = gold & got_set
        near = {g for g in gold if g in got_set or any(g in model.ranker.ancestors(t) or t in related[g]
                                                       for t in got_set)}
        tp += len(hits)
        fn += len(gold - hits)
        near_fn += len(gold - near)
        extra = got_set - gold
        fp += sum(1 for t in extra if not any(t in model.ranker.ancestors(g) or g in model.ranker.ancestors(t)
                                            for g in gold))
        d = codes.get(c["disease"])
        rank = 10**6
        if a.probabilities is not None and d is not None:
            rank = int((a.probabilities > a.probabilities[d]).sum() + 1)
        ranks.append(rank)
        accepted.append(a.accept)
        if show:
            ids, labels = model.recognizer.ids, model.recognizer.labels
            top = int(np.argmax(a.probabilities)) if a.probabilities is not None else None
            print(f"\n{c['id']} {c['disease']} rank={rank} accept={a.accept} "
                  f"top={model.diseases[top]['display'][:50] if top is not None else '-'}")
            print("  missed:", "; ".join(labels[g] for g in gold - near))
            print("  near:  ", "; ".join(labels[g] for g in near - hits))
            print("  extra: ", "; ".join(f"{labels[t]} ({ids[t]})" for t in extra))
    ranks_a = np.array(ranks)
    served = np.array([r if ok else 10**6 for r, ok in zip(ranks, accepted, strict=True)])
    ordinary_accept = [model.analyse(t).accept for t in ordinary]
    if show:
        for t, ok in zip(ordinary, ordinary_accept, strict=True):
            if ok:
                print("ordinary accepted:", t[:100])
    return {
        "n_cases": len(cases), "n_ordinary": len(ordinary),
        "present_precision": tp / max(1, tp + fp), "present_recall_exact": tp / max(1, tp + fn),
        "present_recall_near": 1 - near_fn / max(1, tp + fn),
        "top1": float((ranks_a <= 1).mean()), "top3": float((ranks_a <= 3).mean()),
        "top10": float((ranks_a <= 10).mean()),
        "served_top1": float((served <= 1).mean()), "served_top10": float((served <= 10).mean()),
        "gate_accept_cases": float(np.mean(accepted)), "gate_accept_ordinary": float(np.mean(ordinary_accept)),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.phenotype.probe")
    parser.add_argument("--model", required=True, help="a diagnosis version folder")
    parser.add_argument("--show", action="store_true")
    parser.add_argument("--cases", default=str(CASES), help=f"JSONL of case reports (also: {HELD_OUT.name})")
    args = parser.parse_args(argv)
    from models.diagnosis import DiagnosisModel

    model = DiagnosisModel.load(args.model, verify=False)
    out = probe(model, load_cases(Path(args.cases)), load_ordinary(), show=args.show)
    print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in out.items()}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
