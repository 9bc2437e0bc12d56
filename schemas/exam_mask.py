"""Which protocols an ordered exam allows, and what the indication says where it leaves a choice open.

``ExamMasker(catalog).weights(service_request)`` gives one weight per catalog protocol (label order)
for the protocol model: 0 for protocols of another exam (never listed), 1 for compatible ones, in
between for a contrast or named variant that differs from the order's, or for the branch that the
indication's cues disfavour. ``None`` when the order names no exam (nothing is restricted).
The exam itself is parsed by ``schemas.exams``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from schemas.catalog import PROTOCOL_SYSTEM, PROTOCOLS, Protocol
from schemas.exams import (
    HINT_WORDS,
    ORDER_REGIONS,
    WITH,
    WITH_AND_WITHOUT,
    WITHOUT,
    OrderedExam,
    _rx,
    parse_ordered_exam,
)
from schemas.fhirjson import clean_text

# --------------------------------------------------------------------------- compatibility


@dataclass(frozen=True)
class ProtocolTraits:
    """What compatibility needs to know of one label: the catalog's attributes plus its words."""

    code: str
    modality: str
    body_region: str
    contrast: str
    words: str = ""  # lower-cased display + code, for hints and angiography
    angio: bool = False

    @classmethod
    def of(cls, p: Protocol) -> ProtocolTraits:
        words = f"{p.display} {p.code}".lower()
        return cls(p.code, p.modality, p.body_region, p.contrast, words, bool(re.search(r"\bcta\b|angio", words)))


_CONTRAST_OK: dict[str, frozenset[str]] = {
    WITHOUT: frozenset({"none", "n/a"}),
    WITH: frozenset({"with", "with-and-without", "n/a"}),
    WITH_AND_WITHOUT: frozenset({"with-and-without", "with", "n/a"}),
}


def _hint_matches(hint: str, traits: ProtocolTraits) -> bool:
    return any(re.search(rf"\b{re.escape(w)}\b", traits.words) for w in HINT_WORDS.get(hint, ()))


# A protocol of the ordered modality and region whose contrast (or named variant) differs from what
# the order says keeps this share of its probability: the order's "W/WO" is strong evidence, but a
# radiologist may still protocol the exam otherwise, so it stays in the ranked list.
SOFT_MISMATCH_WEIGHT = 0.2


def compatible_mask(exam: OrderedExam, traits: Sequence[ProtocolTraits]) -> list[float] | None:
    """A weight per label for the ordered exam (0: incompatible, 1: compatible, in between: the
    modality and region fit but the contrast or named variant does not), or ``None`` when the order
    names no exam (no mask).

    Filters apply in order - modality, region, angiography (hard), then contrast and the protocol
    words the order names (soft) - and a filter that would leave nothing is skipped: an order for an
    exam the catalog lacks, such as "MRI thoracic spine", still gets the nearest protocols."""
    if exam.protocol is not None:
        weights = [1.0 if t.code == exam.protocol else 0.0 for t in traits]
        return weights if any(weights) else None
    if not exam.names_exam:
        return None
    weights = [1.0] * len(traits)

    def narrow(test, *, soft: bool = False) -> None:
        nonlocal weights
        keep = [w > 0 and bool(test(t)) for w, t in zip(weights, traits)]
        if not any(keep):
            return
        if soft:
            weights = [w if k else w * SOFT_MISMATCH_WEIGHT for w, k in zip(weights, keep)]
        else:
            weights = [w if k else 0.0 for w, k in zip(weights, keep)]

    if exam.modality:
        narrow(lambda t: t.modality == exam.modality)
    if exam.regions:
        covered = frozenset().union(*(ORDER_REGIONS.get(r, frozenset({r})) for r in exam.regions))
        narrow(lambda t: t.body_region in covered)
    if exam.angio:
        narrow(lambda t: t.angio)
    elif exam.modality in ("CT", "MR") and exam.contrast == WITHOUT:
        narrow(lambda t: not t.angio)
    if exam.contrast:
        narrow(lambda t: t.contrast in _CONTRAST_OK[exam.contrast], soft=True)
    for hint in sorted(exam.hints):
        narrow(lambda t, h=hint: _hint_matches(h, t), soft=True)
    return None if all(w == 1.0 for w in weights) else weights


def catalog_traits(catalog: Iterable[Protocol] = PROTOCOLS) -> list[ProtocolTraits]:
    return [ProtocolTraits.of(p) for p in catalog]


class ExamMasker:
    """Weights over one model's labels (``catalog`` in label order) for each order it protocols."""

    def __init__(self, catalog: Sequence[Protocol], system: str = PROTOCOL_SYSTEM):
        self.catalog = tuple(catalog)
        self.system = system
        self.traits = catalog_traits(self.catalog)
        self._masks: dict[OrderedExam, list[float] | None] = {}

    def exam(self, service_request: dict[str, Any]) -> OrderedExam:
        return parse_ordered_exam(service_request, self.catalog, self.system)

    def weights(self, service_request: dict[str, Any]) -> list[float] | None:
        """The ordered exam's label weights, with the indication's cues where the exam leaves a
        choice open; ``None`` when the order names no exam."""
        exam = self.exam(service_request)
        if exam not in self._masks:
            if len(self._masks) > 8192:
                self._masks.clear()
            self._masks[exam] = compatible_mask(exam, self.traits)
        weights = self._masks[exam]
        if weights is None:
            return None
        return indication_cues(exam, lambda: indication_text(service_request), self.traits, list(weights))


# --------------------------------------------------------------------------- what the indication says

# When the order leaves a choice open ("MRI spine", "MRI brain" without contrast named, "CT chest"),
# well-established cues in the indication favour one branch (ACR Appropriateness Criteria): the
# spinal segment follows the symptoms; MRI brain is done with and without contrast for tumour,
# infection, inflammation/demyelination, visual loss, cranial neuropathy and seizure work-up, and
# without for stroke, dementia, trauma and haemorrhage, or when gadolinium is contraindicated. The
# other branch keeps CUE_WEIGHT of its probability: the model's reading of the whole text still
# counts, and nothing the ordered exam allows is removed. Cues on both sides cancel out.
CUE_WEIGHT = 0.3

_NEGATED = _rx(r"\b(?:no|denies|denied|without|negative\s+for|not)\s+(?:[\w/-]+[\s,]+){0,2}?[\w/-]+")
_CERVICAL = _rx(r"\bneck\b|cervical|\barms?\b|\bhands?\b|finger|thumb|triceps|biceps|\bc[2-8]\b|hoffmann|myelopath|"
                r"spurling|buttoning|grip|upper\s+extremit|\bue\b|shoulder\s+blade|radiat\w*\s+(?:down|to|into)\s+(?:the\s+)?"
                r"(?:right\s+|left\s+|r\s+|l\s+)?arm")
_LUMBAR = _rx(r"low(?:er)?\s+back|\blbp\b|lumbar|lumbosacral|sciatica|\blegs?\b|\bfoot\b|\bfeet\b|buttock|thigh|\bcalf\b|"
              r"saddle|cauda|\bl[1-5]\b|\bs1\b|foot\s+drop|claudication|\bback\s+pain|urinary\s+retention|lower\s+extremit")
_WWO_BRAIN = _rx(r"tumou?r|\bmass\b|neoplas|metasta|\bmets\b|cancer|carcinoma|malignan|lymphoma|glioma|\bgbm\b|"
                 r"meningioma|adenoma|pituitary|prolactin|sella|acoustic|schwannoma|hearing\s+loss|\bsnhl\b|tinnitus|"
                 r"\bms\b|multiple\s+sclerosis|demyelin|optic\s+neuritis|vision\s+loss|visual\s+(?:loss|field)|"
                 r"papilledema|\brapd\b|diplopia|seizure|epilep|convuls|\bgtc\b|infection|abscess|encephalitis|"
                 r"meningitis|\bhiv\b|immunocomp|immunosupp|toxo|trigeminal|cranial\s+nerve|facial\s+(?:numbness|palsy)|"
                 r"\bcn\s+[ivx]+\b|enhanc|\bnf1\b|tuberous|hippel|\bhht\b|leptomening|sarcoid|vasculitis")
_WO_BRAIN = _rx(r"stroke|infarct|\btia\b|\bcva\b|dementia|memory|cognitive|alzheimer|atrophy|\bnph\b|trauma|"
                r"concussion|hemorrhage|haemorrhage|\bbleed|developmental\s+delay|autism|hypoxic|"
                r"pregnan|dialysis|\begfr\s*(?:of\s*)?[12]\d\b|renal\s+failure|gadolinium\s+allergy|allergy\s+to\s+gad")
_PE = _rx(r"\bpe\b|pulmonary\s+embol|d-?dimer|wells|\bdvt\b|hypox|tachycard|pleuritic")
_STONE = _rx(r"stone|nephrolith|urolith|renal\s+colic|\bcalcul|flank\s+pain|hematuria")
_PREGNANT = _rx(r"pregnan|\bhcg\b|\bivf\b|ectopic|gestation|\bweeks?\s+by\s+lmp|\biup\b|\bg\d\s*p\d|trimester|fetal")


def indication_text(service_request: dict[str, Any]) -> str:
    """The indication (reasons and notes) with negated phrases ("no neck pain") removed."""
    texts = [c.get("text") for c in service_request.get("reasonCode") or [] if isinstance(c, dict)]
    texts += [c.get("display") for r in service_request.get("reasonCode") or [] if isinstance(r, dict)
              for c in r.get("coding") or [] if isinstance(c, dict)]
    texts += [n.get("text") for n in service_request.get("note") or [] if isinstance(n, dict)]
    return _NEGATED.sub(" ", " ".join(clean_text(t) for t in texts if isinstance(t, str)))


def indication_cues(exam: OrderedExam, text: str | Callable[[], str], traits: Sequence[ProtocolTraits],
                    weights: list[float]) -> list[float]:
    """``weights`` (the ordered exam's, see :func:`compatible_mask`) with the indication's cues applied.
    ``text`` may be a function: the indication is only read when the exam leaves a choice open."""
    regions = {t.body_region for t, w in zip(traits, weights) if w > 0}
    open_choice = ({"cervical-spine", "lumbar-spine"} <= regions
                   or (exam.modality == "MR" and exam.contrast is None and regions & {"brain", "head"})
                   or (exam.modality == "CT" and regions & {"chest", "abdomen-pelvis"})
                   or (exam.modality == "US" and "gravid-uterus" in regions and len(regions) > 1))
    if not open_choice:
        return weights
    text = text() if callable(text) else text
    if not text:
        return weights

    def favour(test) -> None:
        allowed = [w > 0 for w in weights]
        keep = [a and bool(test(t)) for a, t in zip(allowed, traits)]
        if any(keep) and any(a and not k for a, k in zip(allowed, keep)):
            weights[:] = [w if k or not a else w * CUE_WEIGHT for w, a, k in zip(weights, allowed, keep)]

    def one_sided(yes: re.Pattern[str], no: re.Pattern[str]) -> int:
        a, b = bool(yes.search(text)), bool(no.search(text))
        return 1 if a and not b else (-1 if b and not a else 0)

    if {"cervical-spine", "lumbar-spine"} <= regions:
        side = one_sided(_CERVICAL, _LUMBAR)
        if side:
            favour(lambda t: t.body_region == ("cervical-spine" if side > 0 else "lumbar-spine"))
    if exam.modality == "MR" and exam.contrast is None and regions & {"brain", "head"}:
        side = one_sided(_WWO_BRAIN, _WO_BRAIN)
        if side:
            favour(lambda t: t.contrast == ("with-and-without" if side > 0 else "none"))
    if exam.modality == "CT" and "chest" in regions and not exam.angio and _PE.search(text) and exam.contrast != WITHOUT:
        favour(lambda t: t.angio)
    if exam.modality == "CT" and "abdomen-pelvis" in regions and exam.contrast != WITH and _STONE.search(text):
        favour(lambda t: _hint_matches("stone", t))
    if exam.modality == "US" and "gravid-uterus" in regions and len(regions) > 1:
        pregnant = bool(_PREGNANT.search(text))
        favour(lambda t: (t.body_region == "gravid-uterus") == pregnant)
    return weights
