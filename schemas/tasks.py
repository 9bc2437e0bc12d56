"""The two tasks an order is run through, and the names their models are published under."""

from __future__ import annotations

from typing import Final, Literal

Task = Literal["protocol", "diagnosis"]

# in the order a worker runs them and a summary lists them
TASKS: Final[tuple[Task, ...]] = ("protocol", "diagnosis")

# the manifest's ``name``: the Device name and RiskAssessment method code written back to FHIR
MODEL_NAMES: Final[dict[str, str]] = {"protocol": "ehrw-protocol", "diagnosis": "ehrw-diagnosis"}
