"""ONNX Runtime inference for the registry's text classifiers (no torch, ever).

A model folder holds an ONNX graph that maps ``input_ids`` and ``attention_mask`` (int64,
``[batch, sequence]``, both axes dynamic) to ``logits`` (``[batch, num_labels]``), and the
``tokenizer.json`` it was trained with. Texts are tokenized one by one (truncated to the
manifest's ``max_length``), sorted by length and padded only to the longest text of each batch,
so a batch of short orders costs what short orders cost.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from models.registry import (
    MANIFEST,
    MODEL_FILE,
    REBUILD_HINT,
    TOKENIZER_FILE,
    Manifest,
    ModelIntegrityError,
    ModelRegistry,
    verify_version_dir,
)
from schemas.labels import Label, ModelOutput, Prediction

if TYPE_CHECKING:
    from schemas.exam_mask import ExamMasker

KNOWN_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    z = np.asarray(logits, dtype=np.float64) / float(temperature)
    z -= z.max(axis=-1, keepdims=True)
    np.exp(z, out=z)
    z /= z.sum(axis=-1, keepdims=True)
    return z


def top_k_confidence(probs: np.ndarray, k: int = 1) -> np.ndarray:
    """The probability mass of the ``k`` most probable labels of each row: the model's confidence
    that the answer is among the ``k`` it lists (k = 1: the top-1 probability). The abstention
    threshold (``calibration.abstain_below``) is fitted on, and applied to, this number."""
    probs = np.asarray(probs)
    k = max(1, min(int(k), probs.shape[-1]))
    if k == 1:
        return probs.max(axis=-1)
    return -np.sort(-probs, axis=-1)[..., :k].sum(axis=-1)


def session_options(threads: int = 1) -> Any:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = max(1, int(threads))
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    if threads <= 1:
        # No spinning worker threads: a Celery worker process should not burn a core while idle.
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return opts


class OnnxTextEncoder:
    """Tokenizer + ONNX Runtime session: texts -> raw logits. Shared by the runtime and training's
    evaluation, so that what is evaluated is exactly what is served."""

    def __init__(self, model_path: str | Path, tokenizer_path: str | Path, max_length: int, *, threads: int = 1):
        import onnxruntime as ort
        from tokenizers import Tokenizer

        self.model_path = Path(model_path)
        self.max_length = int(max_length)
        self.threads = max(1, int(threads))
        try:
            self.tokenizer = Tokenizer.from_file(str(tokenizer_path))
        except Exception as exc:  # the tokenizers error types are not public
            raise ModelIntegrityError(f"{tokenizer_path}: cannot load the tokenizer ({exc}); {REBUILD_HINT}") from None
        self.tokenizer.no_padding()
        self.tokenizer.enable_truncation(max_length=self.max_length)
        pad = self.tokenizer.token_to_id("[PAD]")
        if pad is None:
            pad = self.tokenizer.token_to_id("<pad>")
        self.pad_id = int(pad or 0)
        try:
            self.session = ort.InferenceSession(
                str(self.model_path), session_options(self.threads), providers=["CPUExecutionProvider"]
            )
        except Exception as exc:
            raise ModelIntegrityError(f"{self.model_path}: ONNX Runtime cannot load the model ({exc}); {REBUILD_HINT}") from None
        self.input_names = [i.name for i in self.session.get_inputs()]
        unknown = [n for n in self.input_names if n not in KNOWN_INPUTS]
        if unknown or "input_ids" not in self.input_names:
            raise ModelIntegrityError(
                f"{self.model_path}: unexpected model inputs {self.input_names} (expected input_ids, attention_mask"
                f"[, token_type_ids]); {REBUILD_HINT}"
            )
        outputs = self.session.get_outputs()
        self.output_name = outputs[0].name
        shape = outputs[0].shape
        self.num_outputs: int | None = shape[-1] if len(shape) == 2 and isinstance(shape[-1], int) else None
        if self.num_outputs is None:
            self.num_outputs = int(self.logits(["x"]).shape[-1])

    def encode(self, texts: Sequence[str]) -> list[list[int]]:
        return [self.tokenizer.encode(t if isinstance(t, str) else str(t)).ids for t in texts]

    def _feed(self, ids: list[list[int]]) -> dict[str, np.ndarray]:
        width = max(len(x) for x in ids)
        input_ids = np.full((len(ids), width), self.pad_id, dtype=np.int64)
        mask = np.zeros((len(ids), width), dtype=np.int64)
        for row, seq in enumerate(ids):
            input_ids[row, : len(seq)] = seq
            mask[row, : len(seq)] = 1
        feed = {"input_ids": input_ids, "attention_mask": mask}
        if "token_type_ids" in self.input_names:
            feed["token_type_ids"] = np.zeros_like(input_ids)
        return {k: v for k, v in feed.items() if k in self.input_names}

    def logits_from_ids(self, ids: list[list[int]], batch_size: int = 32) -> np.ndarray:
        if not ids:
            return np.zeros((0, self.num_outputs or 0), dtype=np.float32)
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
        out = np.empty((len(ids), self.num_outputs or 0), dtype=np.float32) if self.num_outputs else None
        for start in range(0, len(order), max(1, batch_size)):
            chunk = order[start : start + batch_size]
            logits = self.session.run([self.output_name], self._feed([ids[i] for i in chunk]))[0]
            if out is None:
                out = np.empty((len(ids), logits.shape[-1]), dtype=np.float32)
            out[chunk] = logits
        assert out is not None  # ids is not empty
        return out

    def logits(self, texts: Sequence[str], batch_size: int = 32) -> np.ndarray:
        return self.logits_from_ids(self.encode(list(texts)), batch_size=batch_size)

    def latency_ms(self, texts: Sequence[str], *, repeats: int = 1, warmup: int = 5) -> np.ndarray:
        """Per-text wall time in ms of tokenize + one-order session run (batch of one)."""
        texts = list(texts)
        for t in texts[:warmup]:
            self.logits([t], batch_size=1)
        times = []
        for _ in range(repeats):
            for t in texts:
                t0 = time.perf_counter()
                self.logits([t], batch_size=1)
                times.append((time.perf_counter() - t0) * 1e3)
        return np.asarray(times)


class TextClassifier:
    """A registry model ready to predict: ``TextClassifier.load(version_dir).predict(texts)``."""

    def __init__(self, manifest: Manifest, encoder: OnnxTextEncoder, version_dir: Path):
        self.manifest = manifest
        self.encoder = encoder
        self.version_dir = version_dir
        self.labels = manifest.label_objects()
        if encoder.num_outputs != len(self.labels):
            raise ModelIntegrityError(
                f"{version_dir}: the model has {encoder.num_outputs} outputs but manifest.json lists "
                f"{len(self.labels)} labels; {REBUILD_HINT}"
            )

    # -- loading -----------------------------------------------------------------------------
    @classmethod
    def load(cls, version_dir: str | Path, *, threads: int = 1, verify: bool = True) -> "TextClassifier":
        """Load one version folder. Checksums are verified first (``verify=False`` skips only the
        sha256 recomputation, never the manifest validation); a corrupt or inconsistent model
        raises :class:`ModelIntegrityError` naming the problem."""
        version_dir = Path(version_dir)
        manifest = verify_version_dir(version_dir) if verify else Manifest.read(version_dir / MANIFEST)
        encoder = OnnxTextEncoder(
            version_dir / MODEL_FILE, version_dir / TOKENIZER_FILE, manifest.max_length, threads=threads
        )
        return cls(manifest, encoder, version_dir)

    @classmethod
    def load_current(cls, registry: str | Path | ModelRegistry, task: str, *, threads: int = 1) -> "TextClassifier":
        reg = registry if isinstance(registry, ModelRegistry) else ModelRegistry(registry)
        return cls.load(reg.current_dir(task), threads=threads)

    # -- metadata ----------------------------------------------------------------------------
    @property
    def task(self) -> str:
        return self.manifest.task

    @property
    def name(self) -> str:
        return self.manifest.name

    @property
    def version(self) -> str:
        return self.manifest.version

    @property
    def temperature(self) -> float:
        return self.manifest.calibration.temperature

    @property
    def threshold(self) -> float:
        return self.manifest.calibration.abstain_below

    @property
    def model_card_url(self) -> str | None:
        return self.manifest.model_card_url

    @property
    def model_card_path(self) -> Path:
        return self.version_dir / "MODEL_CARD.md"

    def __repr__(self) -> str:
        return f"TextClassifier({self.name} {self.version}, {len(self.labels)} labels, threads={self.encoder.threads})"

    # -- inference ---------------------------------------------------------------------------
    def logits(self, texts: Sequence[str], batch_size: int = 32) -> np.ndarray:
        return self.encoder.logits(texts, batch_size=batch_size)

    def predict_proba(self, texts: Sequence[str], batch_size: int = 32) -> np.ndarray:
        """Calibrated (temperature-scaled) class probabilities, ``[len(texts), num_labels]``."""
        return softmax(self.logits(texts, batch_size=batch_size), self.temperature)

    def outputs_from_proba(
        self, proba: np.ndarray, top_k: int = 5, weights: Sequence[Sequence[float] | None] | None = None
    ) -> list[ModelOutput]:
        """ModelOutputs from calibrated probabilities. ``weights`` (one per row, or ``None``): a
        per-label weight for that input (0 = not allowed, e.g. a protocol of another exam than the
        one ordered); the row is reweighted and renormalised before ranking and abstention, and a
        disallowed label that the unweighted model is confident in comes back as ``alternative``."""
        proba, excluded = apply_label_weights(proba, weights)
        alternatives = [self._prediction(i, p) if i is not None else None for i, p in excluded]
        k = max(1, min(int(top_k), proba.shape[-1]))
        threshold = self.threshold
        confidences = top_k_confidence(proba, self.manifest.calibration.confidence_top_k)
        results: list[ModelOutput] = []
        for row, confidence, alternative in zip(proba, confidences, alternatives):
            top = np.argpartition(-row, k - 1)[:k] if k < row.shape[0] else np.arange(row.shape[0])
            top = top[np.argsort(-row[top], kind="stable")]
            # restricted to the ordered exam: the protocols it rules out are not listed
            preds = [self._prediction(i, row[i]) for i in top if row[i] > 0 or i == top[0]]
            results.append(
                ModelOutput(
                    task=self.task,
                    model=self.name,
                    model_version=self.version,
                    abstained=bool(confidence < threshold),
                    predictions=preds,
                    threshold=threshold,
                    model_card_url=self.model_card_url,
                    alternative=alternative,
                )
            )
        return results

    def _prediction(self, index: int, probability: float) -> Prediction:
        label = self.labels[index]
        return Prediction(label.system, label.code, label.display, min(1.0, max(0.0, round(float(probability), 6))))

    def predict(
        self,
        texts: Sequence[str],
        top_k: int = 5,
        batch_size: int = 32,
        weights: Sequence[Sequence[float] | None] | None = None,
    ) -> list[ModelOutput]:
        """One :class:`schemas.labels.ModelOutput` per text, in input order: the top-k labels by
        calibrated probability, ``abstained`` when the probability mass of the top
        ``calibration.confidence_top_k`` labels (1: the top-1 probability) is below the manifest's
        ``calibration.abstain_below``. ``weights``: see :meth:`outputs_from_proba` (protocols: the
        ordered exam's compatible labels, :meth:`order_weights`)."""
        texts = list(texts)
        if not texts:
            return []
        return self.outputs_from_proba(self.predict_proba(texts, batch_size=batch_size), top_k=top_k, weights=weights)

    # -- the ordered exam (protocol models) ---------------------------------------------------
    @cached_property
    def exam_masker(self) -> ExamMasker | None:
        """For a protocol model: the :class:`schemas.exam_mask.ExamMasker` over its labels (the
        manifest's ``protocol_catalog`` for a hospital catalog, else the default catalog), or
        ``None`` when the labels' attributes are unknown (then nothing is masked)."""
        return _exam_masker(self.manifest, self.labels) if self.task == "protocol" else None

    def order_weights(self, service_requests: Sequence[dict]) -> list[list[float] | None] | None:
        """Per-order label weights from each order's code (``None``: no masking at all)."""
        masker = self.exam_masker
        if masker is None:
            return None
        return [masker.weights(sr) for sr in service_requests]


# A protocol of another exam than the one ordered is reported as the alternative only when the
# indication clearly calls for that exam: the model, unrestricted, gives it at least this probability
# and all the protocols the ordered exam allows together less than ALTERNATIVE_MAX_ALLOWED_MASS.
ALTERNATIVE_MIN_PROBABILITY = 0.8
ALTERNATIVE_MAX_ALLOWED_MASS = 0.1


def apply_label_weights(
    proba: np.ndarray, weights: Sequence[Sequence[float] | None] | None
) -> tuple[np.ndarray, list[tuple[int | None, float]]]:
    """Reweight and renormalise each row by its label weights (``None``: unchanged). Also returns,
    per row, the excluded (weight 0) label the unrestricted model is confident in, as (index,
    probability), or (None, 0.0). A row whose allowed labels all score 0 keeps the model's own
    ranking. Training calls this too, so that the threshold is fitted on what is served."""
    proba = np.asarray(proba, dtype=np.float64)
    excluded: list[tuple[int | None, float]] = [(None, 0.0)] * len(proba)
    if weights is None:
        return proba, excluded
    if len(weights) != len(proba):
        raise ValueError(f"{len(weights)} weight rows for {len(proba)} inputs")
    proba = proba.copy()
    for i, w in enumerate(weights):
        if w is None:
            continue
        weight = np.asarray(w, dtype=np.float64)
        if weight.shape != proba[i].shape:
            raise ValueError(f"a weight row has {weight.shape[-1]} entries for {proba.shape[-1]} labels")
        masked = proba[i] * weight
        total = masked.sum()
        if not total > 0:
            continue
        outside = np.where(weight <= 0, proba[i], 0.0)
        best = int(outside.argmax())
        allowed_mass = float(proba[i][weight > 0].sum())
        if outside[best] >= ALTERNATIVE_MIN_PROBABILITY and allowed_mass < ALTERNATIVE_MAX_ALLOWED_MASS:
            excluded[i] = (best, float(outside[best]))
        proba[i] = masked / total
    return proba, excluded


def _exam_masker(manifest: Manifest, labels: list[Label]) -> ExamMasker | None:
    from schemas.catalog import PROTOCOL_SYSTEM, PROTOCOLS, Protocol
    from schemas.exam_mask import ExamMasker

    custom = getattr(manifest, "protocol_catalog", None) or (manifest.model_extra or {}).get("protocol_catalog")
    if custom:
        try:
            by_code = {str(c["code"]): c for c in custom}
            catalog = [
                Protocol(
                    label.code, label.display, str(by_code[label.code]["modality"]), str(by_code[label.code]["body_region"]),
                    str(by_code[label.code]["contrast"]), None,
                )
                for label in labels
            ]
        except (KeyError, TypeError):
            return None
        return ExamMasker(catalog, labels[0].system)
    defaults = {p.code: p for p in PROTOCOLS}
    if any(label.system != PROTOCOL_SYSTEM or label.code not in defaults for label in labels):
        return None
    return ExamMasker([defaults[label.code] for label in labels], PROTOCOL_SYSTEM)


def default_threads() -> int:
    """``EHRW_MODEL_THREADS`` or 1 (one thread per worker process; scale out with processes)."""
    try:
        return max(1, int(os.environ.get("EHRW_MODEL_THREADS", "1")))
    except ValueError:
        return 1
