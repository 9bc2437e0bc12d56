"""ONNX Runtime text classifiers on real (tiny) registry models: predict, calibration, abstention,
refusal of inconsistent models, and no torch in the inference process.

``tiny_registry`` (tests/conftest.py) trains, exports, quantizes and publishes both models with
the ``tiny`` profile once per session.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from models import ModelIntegrityError, ModelRegistry, TextClassifier

REPO = Path(__file__).resolve().parent.parent

TEXTS = [
    "CT head without contrast. Reason: fall on warfarin, rule out intracranial hemorrhage",
    "US right upper quadrant: RUQ pain after fatty meals, rule out cholelithiasis",
    "MRI knee: twisting injury, locking, suspected meniscal tear",
    "Tall stature, arachnodactyly, ectopia lentis and aortic root dilatation",
    "Developmental delay, seizures, hypotonia; no hearing loss",
    "",
    "xr chest 2 views cough fever",
]


@pytest.fixture(scope="module")
def protocol(tiny_registry) -> TextClassifier:
    return TextClassifier.load_current(tiny_registry, "protocol")


@pytest.fixture(scope="module")
def diagnosis(tiny_registry):
    from models.diagnosis import load_diagnosis_model

    return load_diagnosis_model(ModelRegistry(tiny_registry).current_dir("diagnosis"))


def test_loads_the_current_versions(tiny_registry, protocol, diagnosis):
    reg = ModelRegistry(tiny_registry)
    assert protocol.version == reg.current_version("protocol") and protocol.name == "ehrw-protocol"
    assert diagnosis.version == reg.current_version("diagnosis") and diagnosis.name == "ehrw-diagnosis"
    assert len(protocol.labels) == 34 == protocol.encoder.num_outputs
    assert len(diagnosis.diseases) > 10_000 and diagnosis.diseases[0]["code"].startswith("OMIM:")
    assert protocol.encoder.threads == 1
    assert protocol.encoder.input_names == ["input_ids", "attention_mask"]


@pytest.mark.parametrize("top_k", [1, 3, 5])
def test_predict_shapes_order_and_probabilities(protocol, top_k):
    outputs = protocol.predict(TEXTS, top_k=top_k)
    assert len(outputs) == len(TEXTS)
    codes = {label.code for label in protocol.labels}
    for out in outputs:
        assert out.task == "protocol" and out.model == "ehrw-protocol" and out.model_version == protocol.version
        assert out.threshold == protocol.threshold
        assert len(out.predictions) == top_k
        probs = [p.probability for p in out.predictions]
        assert probs == sorted(probs, reverse=True)
        assert all(0.0 <= p <= 1.0 for p in probs) and sum(probs) <= 1.0 + 1e-6
        assert len({p.code for p in out.predictions}) == top_k and {p.code for p in out.predictions} <= codes
        assert out.abstained == (probs[0] < protocol.threshold)
        line = out.to_json()
        assert set(line) == {"task", "model", "model_version", "abstained", "predictions"}
        json.dumps(line)


def test_predict_proba_is_calibrated_softmax_and_matches_predict(protocol):
    proba = protocol.predict_proba(TEXTS)
    assert proba.shape == (len(TEXTS), len(protocol.labels))
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, atol=1e-6)
    logits = protocol.logits(TEXTS)
    z = logits / protocol.temperature
    expected = np.exp(z - z.max(1, keepdims=True))
    np.testing.assert_allclose(proba, expected / expected.sum(1, keepdims=True), atol=1e-6)
    for row, out in zip(proba, protocol.predict(TEXTS, top_k=5)):
        top = np.argsort(-row)[:5]
        assert [p.code for p in out.predictions][0] == protocol.labels[top[0]].code
        assert out.predictions[0].probability == pytest.approx(row[top[0]], abs=1e-6)


def test_batching_and_padding_do_not_change_answers(protocol):
    batched = protocol.predict_proba(TEXTS, batch_size=32)
    single = np.vstack([protocol.predict_proba([t]) for t in TEXTS])
    # int8 activations are quantized per batch (dynamic quantization: one scale per tensor), so a
    # text's probabilities drift with its batch mates; the 1-layer tiny model has small margins and
    # drifts by up to ~0.07. Allow that, but not a different answer.
    np.testing.assert_allclose(batched, single, atol=0.1)
    assert (batched.argmax(1) == single.argmax(1)).mean() >= 6 / 7


def test_top_k_is_capped_and_empty_input(protocol):
    assert protocol.predict([]) == []
    out = protocol.predict(["MRI brain"], top_k=1000)[0]
    assert len(out.predictions) == 34
    assert sum(p.probability for p in out.predictions) == pytest.approx(1.0, abs=1e-4)


def test_long_text_is_truncated(protocol):
    ids = protocol.encoder.encode(["headache " * 5000])[0]
    assert len(ids) == protocol.manifest.max_length
    assert len(protocol.predict(["headache " * 5000])) == 1


def test_abstention_threshold_is_honoured(protocol):
    proba = protocol.predict_proba(TEXTS)
    top1 = np.sort(proba.max(axis=1))
    threshold = float((top1[2] + top1[3]) / 2)  # between the 3rd and 4th most confident answers
    manifest = protocol.manifest.model_copy(
        update={"calibration": protocol.manifest.calibration.model_copy(update={"abstain_below": threshold})}
    )
    strict = TextClassifier(manifest, protocol.encoder, protocol.version_dir)
    outputs = strict.predict(TEXTS)
    assert [o.abstained for o in outputs] == [bool(p < threshold) for p in proba.max(axis=1)]
    assert sum(o.abstained for o in outputs) == 3
    assert all(o.threshold == threshold for o in outputs)
    assert all(len(o.predictions) == 5 for o in outputs)  # abstaining still ranks the alternatives


def test_abstention_on_the_top_k_probability_mass(protocol):
    """With ``confidence_top_k`` = 3 the model answers when its three suggestions together are
    likely enough, even if no single one is."""
    proba = protocol.predict_proba(TEXTS)
    mass3 = -np.sort(-proba, axis=1)[:, :3].sum(axis=1)
    threshold = float(np.sort(mass3)[1:3].mean())  # between the 2nd and 3rd smallest top-3 masses
    calibration = protocol.manifest.calibration.model_copy(update={"abstain_below": threshold, "confidence_top_k": 3})
    strict = TextClassifier(protocol.manifest.model_copy(update={"calibration": calibration}), protocol.encoder,
                            protocol.version_dir)
    outputs = strict.predict(TEXTS, top_k=5)
    assert [o.abstained for o in outputs] == [bool(m < threshold) for m in mass3]
    assert sum(o.abstained for o in outputs) == 2
    assert threshold > float(np.sort(proba.max(axis=1))[2])  # top-1 alone would have abstained more


def _copy_current(tiny_registry: Path, tmp_path: Path, task: str = "protocol") -> Path:
    src = ModelRegistry(tiny_registry).current_dir(task)
    dst = tmp_path / src.name
    shutil.copytree(src, dst)
    return dst


def test_corrupt_model_is_refused_naming_the_file(tiny_registry, tmp_path):
    version_dir = _copy_current(tiny_registry, tmp_path)
    model = version_dir / "model.onnx"
    data = bytearray(model.read_bytes())
    data[len(data) // 3] ^= 0xFF
    model.write_bytes(bytes(data))
    with pytest.raises(ModelIntegrityError, match=r"model\.onnx.*ehr-worker models build"):
        TextClassifier.load(version_dir)


def test_label_count_must_match_the_model_output(tiny_registry, tmp_path):
    version_dir = _copy_current(tiny_registry, tmp_path)
    manifest = json.loads((version_dir / "manifest.json").read_text())
    manifest["labels"] = manifest["labels"][:-1]
    (version_dir / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ModelIntegrityError, match="34 outputs but manifest.json lists 33 labels"):
        TextClassifier.load(version_dir)


def test_inference_never_imports_torch(tiny_registry):
    code = (
        "import sys, models\n"
        "from models import TextClassifier, ModelRegistry\n"
        f"reg = ModelRegistry({str(tiny_registry)!r})\n"
        "reg.verify_all()\n"
        "from models.diagnosis import load_diagnosis_model\n"
        "texts = ['CT head for trauma', 'Boy with seizures, hypotonia, microcephaly and hypertelorism.']\n"
        "out = TextClassifier.load_current(reg, 'protocol').predict(texts, top_k=3)\n"
        "assert len(out) == 2 and len(out[0].predictions) == 3\n"
        "out = load_diagnosis_model(reg.current_dir('diagnosis')).predict(texts, top_k=3)\n"
        "assert len(out) == 2 and len(out[1].predictions) == 3\n"
        "heavy = [m for m in ('torch', 'transformers', 'sklearn') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
        "print('ok')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok"


# ------------------------------------------------------------------ the ordered exam (protocol)


def _order(code_text: str, note: str) -> dict:
    return {"resourceType": "ServiceRequest", "id": "o1", "code": {"text": code_text}, "note": [{"text": note}]}


@pytest.mark.parametrize(
    ("code_text", "modality"),
    [("CT CHEST W CONTRAST", "CT"), ("NM myocardial perfusion stress", "NM"), ("US OB", "US"),
     ("XR CHEST PA/LAT", "XR"), ("PET/CT", "PT"), ("ECHO TTE", "ECHO"), ("MRI spine", "MR")],
)
def test_only_protocols_of_the_ordered_exam_are_ranked(protocol, code_text, modality):
    from schemas.catalog import protocol_by_code
    from schemas.text import build_model_input

    sr = _order(code_text, "chest pain and shortness of breath, r/o pneumonia")
    weights = protocol.order_weights([sr])
    (out,) = protocol.predict([build_model_input(sr)], top_k=5, weights=weights)
    ranked = [p for p in out.predictions if p.probability > 0]
    assert ranked and {protocol_by_code(p.code).modality for p in ranked} == {modality}
    # renormalised over the allowed protocols
    assert abs(sum(p.probability for p in out.predictions) - 1.0) < 1e-3 or len(out.predictions) == 5
    if out.alternative is not None:  # flagged separately, never ranked
        assert protocol_by_code(out.alternative.code).modality != modality
        assert out.alternative.code not in {p.code for p in out.predictions}


def test_weights_renormalise_and_flag_a_confident_excluded_label(protocol):
    import numpy as np

    n = len(protocol.labels)
    proba = np.full((1, n), 0.05 / (n - 1))
    proba[0, 0] = 0.95  # the model is sure of label 0 ...
    weights = [[0.0] + [1.0] * (n - 1)]  # ... which the ordered exam does not allow
    (out,) = protocol.outputs_from_proba(proba, top_k=3, weights=weights)
    assert out.predictions[0].code != protocol.labels[0].code
    assert abs(out.predictions[0].probability - 1 / (n - 1)) < 1e-4
    assert out.alternative is not None and out.alternative.code == protocol.labels[0].code
    assert out.alternative.probability == pytest.approx(0.95)
    # merely likely is not "clearly another exam": nothing is flagged
    unsure = np.full((1, n), 0.4 / (n - 1))
    unsure[0, 0] = 0.6
    (out_unsure,) = protocol.outputs_from_proba(unsure, top_k=3, weights=weights)
    assert out_unsure.alternative is None
    assert out.to_json()["alternative_exam"]["code"] == protocol.labels[0].code
    # no weights: exactly today's behaviour
    (plain,) = protocol.outputs_from_proba(proba, top_k=3)
    assert plain.predictions[0].code == protocol.labels[0].code and plain.alternative is None
    assert "alternative_exam" not in plain.to_json()
    # an order naming no exam: no mask
    assert protocol.order_weights([_order("Imaging study", "headache")]) == [None]


def test_the_worker_restricts_to_the_ordered_exam(protocol):
    from schemas.text import build_model_input
    from workers.pipeline import predict_protocol

    sr = _order("NM myocardial perfusion stress", "chest pain on exertion, r/o ischemia")
    out = predict_protocol(protocol, sr, build_model_input(sr), top_k=5)
    assert [p.code for p in out.predictions] == ["NM-MPI"] and out.predictions[0].probability == pytest.approx(1.0)
    sr = _order("Imaging study", "chest pain on exertion, r/o ischemia")  # names no exam: today's behaviour
    out = predict_protocol(protocol, sr, build_model_input(sr), top_k=5)
    assert len(out.predictions) == 5
