"""What a model predicts: labels, ranked predictions and one model's output for one input."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Label:
    system: str
    code: str
    display: str


@dataclass(frozen=True)
class Prediction:
    system: str
    code: str
    display: str
    probability: float
    # optional, for the diagnosis model: extra codings of the same disease (system, code, display),
    # e.g. the ORPHA twin of an OMIM disease, and the rationale as (HPO code, label) pairs: patient
    # features that support this disease and excluded features that count against it
    codings: tuple[tuple[str, str, str], ...] = ()
    supporting: tuple[tuple[str, str], ...] = ()
    against: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        # Normalise numpy scalars to a plain float (json cannot encode numpy.float32), and refuse
        # NaN or out-of-range values: they would be written to FHIR as a clinical number.
        try:
            probability = float(self.probability)
        except (TypeError, ValueError):
            raise ValueError(f"probability of {self.system}|{self.code} is not a number") from None
        object.__setattr__(self, "probability", probability)
        if not math.isfinite(probability):
            raise ValueError(f"probability of {self.system}|{self.code} is not a finite number")
        if not 0.0 <= probability <= 1.0:
            raise ValueError(f"probability of {self.system}|{self.code} is outside [0, 1]")

    @property
    def label(self) -> Label:
        return Label(self.system, self.code, self.display)

    def to_json(self, detail: bool = False) -> dict[str, Any]:
        """The documented prediction object; ``detail`` adds ``codings`` and ``rationale`` where present."""
        out: dict[str, Any] = {
            "system": self.system,
            "code": self.code,
            "display": self.display,
            "probability": self.probability,
        }
        if detail and self.codings:
            out["codings"] = [{"system": s, "code": c, "display": d} for s, c, d in self.codings]
        if detail and (self.supporting or self.against):
            out["rationale"] = {
                "supporting": [{"code": c, "label": lab} for c, lab in self.supporting],
                "against": [{"code": c, "label": lab} for c, lab in self.against],
            }
        return out

    @classmethod
    def from_json(cls, p: dict[str, Any]) -> Prediction:
        rationale = p.get("rationale") or {}
        return cls(
            str(p["system"]), str(p["code"]), str(p["display"]), float(p["probability"]),
            codings=tuple((str(c["system"]), str(c["code"]), str(c.get("display", ""))) for c in p.get("codings", [])),
            supporting=tuple((str(x["code"]), str(x["label"])) for x in rationale.get("supporting", [])),
            against=tuple((str(x["code"]), str(x["label"])) for x in rationale.get("against", [])),
        )


@dataclass
class ModelOutput:
    """One model's ranked answer for one input; ``abstained`` when the model's confidence (the
    probability mass of its top ``calibration.confidence_top_k`` labels) is below ``threshold``."""

    task: str
    model: str
    model_version: str
    abstained: bool
    predictions: list[Prediction] = field(default_factory=list)
    threshold: float = 0.0
    model_card_url: str | None = None
    # a label outside the allowed set (a protocol of another exam than the one ordered) that the
    # model, unrestricted, is confident in: reported separately, never in ``predictions``
    alternative: Prediction | None = None
    # recognised HPO phenotypes of the input, {"code", "label", "status": present|excluded} (diagnosis)
    phenotypes: list[dict[str, str]] = field(default_factory=list)

    @property
    def top(self) -> Prediction | None:
        return self.predictions[0] if self.predictions else None

    def to_json(self, detail: bool = False) -> dict[str, Any]:
        """The ``ehr-worker predict`` output line of DESIGN.md (the caller adds ``id``); ``detail`` adds
        the diagnosis model's explanations (``phenotypes``, per-prediction ``codings`` and ``rationale``)."""
        out: dict[str, Any] = {
            "task": self.task,
            "model": self.model,
            "model_version": self.model_version,
            "abstained": self.abstained,
            "predictions": [p.to_json(detail) for p in self.predictions],
        }
        if self.alternative is not None:
            out["alternative_exam"] = self.alternative.to_json()
        if detail and self.phenotypes:
            out["phenotypes"] = [dict(p) for p in self.phenotypes]
        return out

    @classmethod
    def from_json(
        cls, data: dict[str, Any], *, threshold: float | None = None, model_card_url: str | None = None
    ) -> ModelOutput:
        """Inverse of :meth:`to_json` (e.g. after a Celery JSON round trip). ``threshold`` and
        ``model_card_url`` are not part of the output line; pass them, or include them as keys."""
        return cls(
            task=str(data["task"]),
            model=str(data["model"]),
            model_version=str(data["model_version"]),
            abstained=bool(data["abstained"]),
            predictions=[Prediction.from_json(p) for p in data.get("predictions", [])],
            threshold=float(threshold if threshold is not None else data.get("threshold", 0.0)),
            model_card_url=model_card_url if model_card_url is not None else data.get("model_card_url"),
            alternative=Prediction.from_json(data["alternative_exam"]) if data.get("alternative_exam") else None,
            phenotypes=[dict(p) for p in data.get("phenotypes", [])],
        )

