"""REPORT.md and MODEL_CARD.md of the diagnosis model (markdown from the evaluation metrics)."""

from __future__ import annotations


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f} %"


def topk_table(metrics: dict) -> str:
    a = metrics["all"]
    lines = ["| ranking | n | top-1 | top-3 | top-10 |", "|---|---:|---:|---:|---:|"]
    for name, key in (("this model (text -> terms -> ranking)", "model"),
                      ("this model, abstentions counted as misses", "model_served"),
                      ("plain Resnik on the same recognised terms", "resnik"),
                      ("plain Resnik on the true terms (no text)", "resnik_true_terms")):
        r = a[key]
        lines.append(f"| {name} | {r['n']} | {_pct(r['top1'])} | {_pct(r['top3'])} | {_pct(r['top10'])} |")
    lines += ["", "| annotations per disease | n | model top-1 | model top-10 | Resnik top-1 | Resnik top-10 |",
              "|---|---:|---:|---:|---:|---:|"]
    for b, r in metrics["bins"].items():
        m, s = r["model"], r["resnik"]
        lines.append(f"| {b} | {m['n']} | {_pct(m['top1'])} | {_pct(m['top10'])} | {_pct(s['top1'])} | "
                     f"{_pct(s['top10'])} |")
    return "\n".join(lines)


def _hand_written(metrics: dict) -> str:
    h = metrics.get("hand_written")
    if not h:
        return ""
    return f"""## Hand-written text (tests/data: journal-style case reports, ordinary imaging orders)

{h['n_cases']} case-report paragraphs written for this project (not by the generator; the lexicon's curated
table was extended while reading them, so they are a development set, not a held-out one) and
{h['n_ordinary']} ordinary imaging orders as requesters write them.

| | value |
|---|---:|
| present precision (a neighbouring term counts as right) | {_pct(h['present_precision'])} |
| present recall, exact term | {_pct(h['present_recall_exact'])} |
| present recall, the term or an ancestor/descendant | {_pct(h['present_recall_near'])} |
| right disease top-1 / top-3 / top-10 | {_pct(h['top1'])} / {_pct(h['top3'])} / {_pct(h['top10'])} |
| case reports given a suggestion | {_pct(h['gate_accept_cases'])} |
| ordinary orders given a suggestion | {_pct(h['gate_accept_ordinary'])} |
"""


def render_report(metrics: dict, release: str, profile: dict, build_s: float) -> str:
    cr = metrics["concept_recognition"]
    cal = "\n".join(f"| {c['predicted']:.3f} | {c['observed']:.3f} | {c['n']} |" for c in metrics["calibration_top1"])
    cov = metrics["coverage"]
    return f"""# Diagnosis model — evaluation report

HPO release {release}; {cov['diseases']} diseases rankable ({cov['omim']} OMIM, {cov['orpha_only']} ORPHA-only;
{cov['orpha_merged_by_name'] + cov.get('orpha_merged_by_name_tokens_and_annotations', 0)} ORPHA diseases listed once
as the second coding of their OMIM twin: {cov['orpha_merged_by_name']} by equal normalised names,
{cov.get('orpha_merged_by_name_tokens_and_annotations', 0)} by the same distinctive name words and overlapping
annotations — the release carries no OMIM-ORPHA cross-reference). Build {build_s:.0f} s.

Evaluation: {profile['n_eval']} generated case descriptions of diseases drawn over all diseases ({profile['omim_share']:.0%} OMIM),
features sampled by annotated frequency, about a third named by an ancestor term, unrelated findings and stated
negatives added, phrased with HPO synonyms that the evaluation lexicon never saw ({profile['holdout']:.0%} of synonyms held out)
and paraphrases of labels. Ranking is over every disease.

{topk_table(metrics)}

Diseases drawn in proportion to their annotation count (as published case series favour well-described
diseases), {metrics['weighted_by_annotations']['all']['model']['n']} cases: this model top-1
{_pct(metrics['weighted_by_annotations']['all']['model']['top1'])} / top-10
{_pct(metrics['weighted_by_annotations']['all']['model']['top10'])}; plain Resnik
{_pct(metrics['weighted_by_annotations']['all']['resnik']['top1'])} /
{_pct(metrics['weighted_by_annotations']['all']['resnik']['top10'])}; given a suggestion
{_pct(metrics['weighted_by_annotations']['gate_accept_rate_cases'])}.

## Concept recognition (held-out phrasings)

| | precision | recall |
|---|---:|---:|
| present features | {_pct(cr['present_precision'])} | {_pct(cr['present_recall'])} |
| excluded features | {_pct(cr['excluded_precision'])} | {_pct(cr['excluded_recall'])} |

Exact HPO term match; a feature named by a phrasing that maps to a neighbouring term counts as a miss and a false hit.

{_hand_written(metrics)}

## Specificity gate

- rare-disease case descriptions that get a suggestion: {_pct(metrics['gate_accept_rate_cases'])}
- ordinary orders and notes that get one: {_pct(metrics['gate_accept_rate_ordinary'])} (n = {metrics['n_ordinary']}, held-out
  phrasings of the protocol generator and Synthea notes)

## Calibration of the top-1 probability

| predicted | observed | n |
|---:|---:|---:|
{cal}
"""


def render_card(metrics: dict, release: str, vendored: bool, name: str, version: str) -> str:
    source = ("the vendored HPO release (training/data/hpo/, exactly the release the project is evaluated against)"
              if vendored else "an HPO release given with --hpo (not the vendored one)")
    a = metrics["all"]
    cr = metrics["concept_recognition"]
    return f"""# Model card: {name} {version}

## Intended use

Decision support for clinicians ordering a rare-disease work-up: reads the clinical text of an order
(reason, notes, fetched context), recognises HPO phenotypes (present or excluded; a relative's findings and
suspected ones do not count), ranks every disease of the HPO annotations and returns calibrated probabilities
with the features that support each disease and those that count against it. It stays silent (abstains)
when the text describes no rare-disease phenotype. Suggestions are for a clinician to review, never a
diagnosis.

## Training data

No patient data. Knowledge: HPO release {release}, from {source}; Human Phenotype Ontology,
https://hpo.jax.org (see training/data/NOTICE.md); OMIM and Orphanet identifiers as given in the
annotations. {metrics['coverage']['diseases']} diseases are rankable. The weights of the score (a handful),
the temperature and the specificity gate are fitted on generated case descriptions and on ordinary orders
and notes (the project's protocol generator; Synthea notes).

## Evaluation

Generated case descriptions with phrasings the lexicon never saw, ranked over every disease: top-1
{_pct(a['model']['top1'])}, top-3 {_pct(a['model']['top3'])}, top-10 {_pct(a['model']['top10'])}; a plain Resnik
ranking on the same recognised terms {_pct(a['resnik']['top1'])} / {_pct(a['resnik']['top3'])} /
{_pct(a['resnik']['top10'])}. Concept recognition precision {_pct(cr['present_precision'])}, recall
{_pct(cr['present_recall'])}. See report/REPORT.md for bins by annotation count and for hand-written
journal-style case reports and ordinary imaging orders (tests/data), read apart from the generator.

## Calibration and abstention

Probabilities are a softmax over all diseases with a fitted temperature (reliability table in the report).
The model abstains when a logistic gate on the recognised terms (how many, how specific, how common in
ordinary orders) and on the ranking says the text describes no rare-disease phenotype: ordinary orders given
a suggestion {_pct(metrics['gate_accept_rate_ordinary'])}; generated rare-disease cases given one
{_pct(metrics['gate_accept_rate_cases'])}.

## Limitations

Generated evaluation cases are not real patients; real case reports are longer and less regular and name
findings the lexicon misses (on ten hand-written case reports never tuned on, recall of the exact term was
about 63 %, of the term or a neighbour about 80 %). There is no embedding stage for phrasings outside the
lexicon. Genetic subtypes of one disease ("Kabuki syndrome 1/2") are often indistinguishable from the text,
and an ORPHA entry without a recognised OMIM twin may rank above the OMIM disease it duplicates. Diseases annotated with few features are ranked from little evidence.
Knowledge stops at the HPO release above.

## AI Transparency on FHIR

Written back as a RiskAssessment (one prediction per disease, OMIM code first and the ORPHA equivalent as a
second coding, rationale with HPO codes and labels only) whose basis lists the recognised phenotypes as
HPO-coded Observations (interpretation POS/NEG), a Device for this model and a Provenance; every resource is
labelled AIAST (artificial intelligence asserted).
"""
