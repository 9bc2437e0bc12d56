"""``MODEL_CARD.md`` for a registry version (Mitchell et al. 2019 sections, plus the fields that
HL7 "AI Transparency on FHIR" surfaces on the written resources)."""

from __future__ import annotations

from typing import Any

TASKS = {
    "protocol": {
        "title": "Imaging protocol suggestion",
        "purpose": (
            "Suggests which of the imaging protocols of the project's protocol CodeSystem should be performed "
            "for an imaging ServiceRequest (e.g. *CT abdomen and pelvis with contrast*), from the order's code "
            "text, reasons and notes. The suggestion is written back as a FHIR `Task` (intent `proposal`) that "
            "a radiologist or technologist accepts or overrides."
        ),
        "users": "Radiologists, radiology technologists and protocolling staff, inside their EHR/RIS worklist.",
        "out_of_scope": [
            "Deciding whether imaging is indicated at all, or replacing appropriateness review (ACR criteria).",
            "Orders that are not imaging orders (the worker does not run the model on them).",
            "Contrast safety decisions: allergy, renal function, pregnancy and implant screening stay with the clinician.",
            "Any protocol outside the label list below; site-specific protocol variants.",
        ],
        "data": (
            "Synthetic imaging orders generated from a knowledge table written for this project (indications, "
            "history and patient factors mapped to the appropriate protocol, in the spirit of the ACR "
            "Appropriateness Criteria), with varied phrasing, abbreviations, typos and an imbalanced class mix "
            "like real order volumes. Validation and test splits use held-out phrasing templates."
        ),
    },
    "diagnosis": {
        "title": "Rare-disease differential suggestion",
        "purpose": (
            "Ranks rare diseases (OMIM / ORPHA identifiers from the Human Phenotype Ontology annotations) "
            "whose phenotype profile is consistent with the clinical text of an order. Suggestions are written "
            "back as a preliminary FHIR `RiskAssessment` for a clinician to review; below the calibrated "
            "threshold nothing is written."
        ),
        "users": "Clinicians and clinical geneticists, as a prompt to consider a rare disease in the differential.",
        "out_of_scope": [
            "Diagnosis. The output is a ranked hint, not a diagnosis, and never a substitute for genetic testing.",
            "Common diseases: the label space holds rare diseases only, so a common condition is always misranked.",
            "Diseases outside the panel listed in manifest.json.",
            "Screening of populations or use without clinician review.",
        ],
        "data": (
            "Synthetic case descriptions generated from the HPO disease annotations (phenotype.hpoa, release "
            "2023-01-27; term labels and synonyms from the HPO term table): features sampled by their annotated frequency, "
            "negated findings, onset and inheritance hints, and noise findings. HPO is (c) The Jackson "
            "Laboratory, used under its licence (https://hpo.jax.org/app/license)."
        ),
    },
}


def _fmt(value: Any, digits: int = 4) -> str:
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _training_lines(train: dict) -> list[str]:
    """How the model was trained and compressed (the manifest's ``training`` record)."""
    cfg = train.get("train_config") or train
    lines = [
        f"- Training: method `{train.get('method', 'full')}`, {train.get('train_steps', train.get('steps', '?'))} steps, "
        f"batch {cfg.get('batch_size', '?')}, AdamW lr {cfg.get('lr', '?')} (head {cfg.get('head_lr', '?')}), loss "
        f"{cfg.get('loss', 'ce')}, warmup + cosine, early stopping on validation macro-F1 (best "
        f"{_fmt(train.get('best_val_macro_f1', float('nan')))}), seed {train.get('seed', '?')}, "
        f"{_fmt(train.get('train_seconds', train.get('seconds', 0.0)), 0)} s on CPU.",
    ]
    distill = train.get("distill")
    if distill:
        lines.append(f"- Distillation: {len(distill.get('teacher_layers', []))}-layer teacher -> {distill.get('student_layers')}-layer "
                     f"student (KL at T={distill.get('temperature')} x T^2, alpha {distill.get('alpha')}, plus CE), "
                     f"{distill.get('steps')} steps, best validation macro-F1 {_fmt(distill.get('best_val_macro_f1', float('nan')))}.")
    prune = train.get("prune")
    if prune:
        lines.append(f"- Structured pruning: {prune.get('head_ratio', 0):.0%} of attention heads and "
                     f"{prune.get('ffn_ratio', 0):.0%} of FFN channels per layer removed "
                     f"({prune.get('params_before', 0) / 1e6:.2f}M -> {prune.get('params_after', 0) / 1e6:.2f}M parameters), "
                     f"then {prune.get('recovery_steps')} recovery steps.")
    lexical = train.get("lexical")
    if lexical and lexical.get("used"):
        lines.append(f"- Lexical branch: a bag of word pieces -> {lexical.get('dim')} -> labels classifier, trained apart "
                     f"({lexical.get('epochs')} epochs, token dropout {lexical.get('token_dropout')}); its logits are added "
                     f"to the encoder's times {lexical.get('mix')} (chosen on held-out phrasings: macro-F1 encoder "
                     f"{_fmt(lexical.get('calib_macro_f1_encoder', float('nan')))}, lexical "
                     f"{_fmt(lexical.get('calib_macro_f1_lexical', float('nan')))}, both "
                     f"{_fmt(lexical.get('calib_macro_f1_combined', float('nan')))}).")
    return lines


def _report_lines(metrics: dict) -> list[str]:
    report = metrics.get("report")
    if not report:
        return []
    lines = [
        f"- Rare-class F1 ({report.get('rare_classes', '?')} classes, bottom 20 % by training support): "
        f"{_fmt(report.get('rare_f1', float('nan')))}; peak RSS of a process serving the model: "
        f"{_fmt(report.get('peak_rss_mb', float('nan')), 0)} MB.",
        "- Full report with per-class figures, the confusion matrix and the reliability diagram: `report/REPORT.md`.",
    ]
    for row in metrics.get("comparison") or []:
        lines.append(f"- {row.get('model')}: accuracy {_fmt(row.get('accuracy', float('nan')))}, rare-class F1 "
                     f"{_fmt(row.get('rare_f1', float('nan')))}, p50 {_fmt(row.get('p50_ms', float('nan')), 2)} ms, "
                     f"{_fmt(row.get('size_mb', float('nan')), 1)} MB")
    return lines


def render_model_card(manifest: dict, *, profile: str = "default") -> str:
    task = manifest["task"]
    info = TASKS.get(task, {"title": task, "purpose": "", "users": "", "out_of_scope": [], "data": ""})
    m = manifest.get("metrics", {})
    test = m.get("test", {})
    fp32, int8 = test.get("fp32", {}), test.get("int8", {})
    size = m.get("size", {})
    lat = m.get("latency_int8", {})
    cal = manifest.get("calibration", {})
    train = manifest.get("training", {})
    labels = manifest.get("labels", [])
    calset = m.get("calibration", {}).get("set", "validation set")
    lines = [
        f"# Model card: {manifest['name']} {manifest['version']}",
        "",
        f"**{info['title']}** — task `{task}`, {len(labels)} labels, built {manifest.get('created', '')} "
        f"with the `{profile}` profile of `python -m training build`.",
        "",
        "## Intended use",
        "",
        info["purpose"],
        "",
        f"Intended users: {info['users']}",
        "",
        "Every suggestion is decision support for a qualified person, shown with its calibrated probability and "
        "alternatives. The worker never changes the clinician's order.",
        "",
        "Out of scope:",
        "",
        *[f"- {item}" for item in info["out_of_scope"]],
        "",
        "## Model",
        "",
        f"- Base model: `{manifest.get('base_model', '')}`; encoder layers kept: {train.get('layers', 'all')}; "
        "masked mean pooling; one linear layer.",
        f"- Input: the text built by `schemas.text.build_model_input` from the ServiceRequest, truncated to "
        f"{manifest.get('max_length')} tokens.",
        "- Format: ONNX, dynamic int8 weight quantization (MatMul/Gemm), embedding tables "
        f"{train.get('embeddings_quantization', 'int8')}"
        + (f", lexical table {train['lexical_quantization']}" if train.get("lexical_quantization") else "")
        + "; runs on ONNX Runtime CPU without PyTorch.",
        *_training_lines(train),
        "",
        "## Training data",
        "",
        info["data"],
        "",
        f"- Examples: train {train.get('n_train', '?')}, validation {train.get('n_val', '?')}, "
        f"test {train.get('n_test', '?')} (held-out phrasing groups).",
        f"- Training-data sha256: `{manifest.get('training_data_sha256', '')}`",
        "- No patient data was used. All examples are synthetic.",
        "",
        "## Evaluation (held-out synthetic test set)",
        "",
        "| metric | fp32 | int8 (served) |",
        "|---|---|---|",
    ]
    for key, name in (("accuracy", "accuracy"), ("macro_f1", "macro-F1"), ("rare_f1", "rare-class F1 (bottom 20 % by support)"),
                      ("top3_accuracy", "top-3 accuracy"),
                      ("top5_accuracy", "top-5 accuracy"), ("ece", "ECE (calibrated)")):
        lines.append(f"| {name} | {_fmt(fp32.get(key, float('nan')))} | {_fmt(int8.get(key, float('nan')))} |")
    sel = int8.get("selective", {})
    agreement = test.get("int8_vs_fp32_top1_agreement", float("nan"))
    lines += [
        "",
        f"- int8 vs fp32 top-1 agreement on the test set: {_fmt(agreement)}",
        f"- Model size: fp32 {size.get('fp32_bytes', 0) / 1e6:.1f} MB, int8 {size.get('int8_bytes', 0) / 1e6:.1f} MB "
        f"({_fmt(size.get('int8_over_fp32', float('nan')), 3)} of fp32)",
        f"- Latency, one order, one thread (tokenize + run): p50 {_fmt(lat.get('p50_ms', float('nan')), 2)} ms, "
        f"p95 {_fmt(lat.get('p95_ms', float('nan')), 2)} ms at a median of {lat.get('tokens_p50', '?')} tokens",
        *_report_lines(m),
        "",
        "## Calibration and abstention",
        "",
        f"Probabilities are `softmax(logits / T)` with T = {cal.get('temperature')} fitted (negative "
        f"log-likelihood) on the {calset} of the int8 model. The model abstains when "
        + ("its top probability" if int(cal.get("confidence_top_k", 1)) == 1 else
           f"the summed probability of its top {cal.get('confidence_top_k')} suggestions (the list it writes; "
           "precision then means the true label is among them)")
        + " is below "
        f"{cal.get('abstain_below')}, chosen there for a precision of {cal.get('target_precision', '?')} "
        f"(reached: {m.get('calibration', {}).get('target_reached', '?')}, coverage "
        f"{_fmt(m.get('calibration', {}).get('coverage', float('nan')), 3)}); on the test set it then answers "
        f"{_fmt(sel.get('coverage', float('nan')), 3)} of inputs with precision "
        f"{_fmt(sel.get('precision', float('nan')), 3)}.",
        "",
        "## Limitations and risks",
        "",
        "- Trained and evaluated on synthetic text only: the figures above measure fit to the generator, not "
        "accuracy on a hospital's real orders. Validate on local, labelled orders before clinical use, and "
        "retrain on them (`python -m training ...`).",
        "- Real notes contain abbreviations, copy-paste, negations and comorbidities beyond the generator's "
        "variety; expect lower accuracy and more abstentions.",
        "- Calibration holds for data like the validation set; under distribution shift the probabilities are "
        "optimistic. Monitor the accept/override rate of the written suggestions.",
        "- English only; the input is truncated to the token limit above.",
        *(["- The lexical branch only knows word pieces seen in training; a term a hospital writes differently "
           "(a local abbreviation, a misspelling the generator never made) gets evidence from the encoder alone."]
          if (train.get("lexical") or {}).get("used") else []),
        "- Automation bias: present suggestions as suggestions, with their alternatives.",
        "",
        "## AI Transparency on FHIR",
        "",
        "Every resource the worker writes from this model carries:",
        "",
        "- `meta.security` = `http://terminology.hl7.org/CodeSystem/v3-ObservationValue#AIAST` (AI asserted);",
        f"- a `Provenance` whose `agent.who` is a `Device` for this model: `deviceName` = `{manifest['name']}`, "
        f"`version` = `{manifest['version']}`, a link to this card"
        + (f" ({manifest['model_card_url']})" if manifest.get("model_card_url") else "")
        + ";",
        "- the calibrated probability of each suggestion and its alternatives.",
        "",
        "| field | value |",
        "|---|---|",
        f"| model name | {manifest['name']} |",
        f"| model version | {manifest['version']} |",
        f"| task | {task} |",
        f"| base model | {manifest.get('base_model', '')} |",
        f"| training data | synthetic ({'HPO annotations' if task == 'diagnosis' else 'project protocol knowledge table'}) |",
        f"| training-data sha256 | {manifest.get('training_data_sha256', '')[:16]}... |",
        f"| created | {manifest.get('created', '')} |",
        f"| abstention threshold | {cal.get('abstain_below')} |",
        "",
        "## Labels",
        "",
    ]
    shown = labels if len(labels) <= 60 else labels[:40]
    lines += [f"- `{lab['code']}` {lab['display']}" for lab in shown]
    if len(shown) < len(labels):
        lines.append(f"- ... and {len(labels) - len(shown)} more (all in manifest.json)")
    lines.append("")
    return "\n".join(lines)
