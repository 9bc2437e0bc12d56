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

    def to_json(self) -> dict[str, Any]:
        return {
            "system": self.system,
            "code": self.code,
            "display": self.display,
            "probability": self.probability,
        }


@dataclass
class ModelOutput:
    """One model's ranked answer for one input; ``abstained`` when top-1 is below ``threshold``."""

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

    @property
    def top(self) -> Prediction | None:
        return self.predictions[0] if self.predictions else None

    def to_json(self) -> dict[str, Any]:
        """The ``ehr-worker predict`` output line of DESIGN.md (the caller adds ``id``)."""
        out: dict[str, Any] = {
            "task": self.task,
            "model": self.model,
            "model_version": self.model_version,
            "abstained": self.abstained,
            "predictions": [p.to_json() for p in self.predictions],
        }
        if self.alternative is not None:
            out["alternative_exam"] = self.alternative.to_json()
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
            predictions=[_prediction(p) for p in data.get("predictions", [])],
            threshold=float(threshold if threshold is not None else data.get("threshold", 0.0)),
            model_card_url=model_card_url if model_card_url is not None else data.get("model_card_url"),
            alternative=_prediction(data["alternative_exam"]) if data.get("alternative_exam") else None,
        )


def _prediction(p: dict[str, Any]) -> Prediction:
    return Prediction(str(p["system"]), str(p["code"]), str(p["display"]), float(p["probability"]))
