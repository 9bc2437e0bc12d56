"""Model registry: manifest validation, publish (atomic, immutable), CURRENT, verify and tampering.

These tests use hand-made version folders (no model training), so they run in a second.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from models.registry import (
    Manifest,
    ModelIntegrityError,
    ModelNotFoundError,
    ModelRegistry,
    checksum_files,
    sha256_file,
)


def make_version(tmp: Path, task: str = "protocol", version: str = "20260101.000000", **overrides) -> Path:
    src = tmp / f"src-{task}-{version}"
    src.mkdir(parents=True)
    (src / "model.onnx").write_bytes(b"\x08\x07fake-onnx-bytes" * 100)
    (src / "tokenizer.json").write_text('{"version": "1.0"}')
    (src / "MODEL_CARD.md").write_text("# card\n")
    manifest = {
        "task": task,
        "name": f"ehrw-{task}",
        "version": version,
        "base_model": "sentence-transformers/all-MiniLM-L6-v2",
        "labels": [
            {"system": "https://ehr-worker.dev/fhir/CodeSystem/imaging-protocol", "code": "CT-HEAD-WO", "display": "CT head without contrast"},
            {"system": "https://ehr-worker.dev/fhir/CodeSystem/imaging-protocol", "code": "MR-KNEE", "display": "MRI knee"},
        ],
        "max_length": 128,
        "calibration": {"temperature": 1.3, "abstain_below": 0.35},
        "metrics": {"test": {"int8": {"accuracy": 0.9}}},
        "files": checksum_files(src),
        "training_data_sha256": "0" * 64,
        "created": "2026-01-01T00:00:00Z",
        "format_version": 1,
    }
    manifest.update(overrides)
    (src / "manifest.json").write_text(json.dumps(manifest))
    return src


@pytest.fixture
def registry(tmp_path) -> ModelRegistry:
    return ModelRegistry(tmp_path / "registry")


def test_publish_makes_current_and_verifies(registry, tmp_path):
    src = make_version(tmp_path)
    dest = registry.publish("protocol", "20260101.000000", src)
    assert dest == registry.root / "protocol" / "20260101.000000"
    assert (registry.root / "protocol" / "CURRENT").read_text().strip() == "20260101.000000"
    assert registry.tasks() == ["protocol"]
    assert registry.versions("protocol") == ["20260101.000000"]
    assert registry.current_version("protocol") == "20260101.000000"
    assert registry.current_dir("protocol") == dest
    manifest = registry.verify("protocol")
    assert manifest.name == "ehrw-protocol" and manifest.num_labels == 2
    assert manifest.calibration.temperature == 1.3 and manifest.calibration.abstain_below == 0.35
    assert set(manifest.files) == {"model.onnx", "tokenizer.json", "MODEL_CARD.md"}
    assert manifest.files["model.onnx"] == sha256_file(dest / "model.onnx")
    # nothing temporary is left behind
    assert sorted(p.name for p in (registry.root / "protocol").iterdir()) == ["20260101.000000", "CURRENT"]


def test_versions_sort_naturally_and_make_current_false_keeps_the_pointer(registry, tmp_path):
    registry.publish("protocol", "20260101.000000", make_version(tmp_path, version="20260101.000000"))
    registry.publish("protocol", "20260102.000000.10", make_version(tmp_path, version="20260102.000000.10"), make_current=False)
    registry.publish("protocol", "20260102.000000.9", make_version(tmp_path, version="20260102.000000.9"), make_current=False)
    assert registry.versions("protocol") == ["20260101.000000", "20260102.000000.9", "20260102.000000.10"]
    assert registry.current_version("protocol") == "20260101.000000"
    registry.set_current("protocol", "20260102.000000.10")
    assert registry.load_manifest("protocol").version == "20260102.000000.10"
    assert registry.load_manifest("protocol", "20260102.000000.9").version == "20260102.000000.9"


def test_published_versions_are_immutable(registry, tmp_path):
    registry.publish("protocol", "1.0.0", make_version(tmp_path, version="1.0.0"))
    with pytest.raises(FileExistsError):
        registry.publish("protocol", "1.0.0", make_version(tmp_path / "again", version="1.0.0"))
    registry.publish("protocol", "1.0.0", make_version(tmp_path / "over", version="1.0.0"), overwrite=True)
    registry.verify("protocol", "1.0.0")


def test_publish_refuses_a_mismatched_or_corrupt_source(registry, tmp_path):
    src = make_version(tmp_path, version="1.0.0")
    with pytest.raises(ModelIntegrityError, match="version"):
        registry.publish("protocol", "2.0.0", src)
    with pytest.raises(ModelIntegrityError, match="task"):
        registry.publish("diagnosis", "1.0.0", src)
    (src / "tokenizer.json").write_text("{}")
    with pytest.raises(ModelIntegrityError, match="tokenizer.json"):
        registry.publish("protocol", "1.0.0", src)
    assert not (registry.root / "protocol" / "1.0.0").exists()
    assert not (registry.root / "protocol" / "CURRENT").exists()


def test_flipped_byte_is_refused_naming_the_file_and_the_fix(registry, tmp_path):
    dest = registry.publish("protocol", "1.0.0", make_version(tmp_path, version="1.0.0"))
    model = dest / "model.onnx"
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0x01
    model.write_bytes(bytes(data))
    with pytest.raises(ModelIntegrityError) as err:
        registry.verify("protocol")
    message = str(err.value)
    assert "model.onnx" in message and "corrupt" in message and "ehr-worker models build" in message
    assert "protocol" in message


def test_missing_file_is_refused(registry, tmp_path):
    dest = registry.publish("protocol", "1.0.0", make_version(tmp_path, version="1.0.0"))
    (dest / "tokenizer.json").unlink()
    with pytest.raises(ModelIntegrityError, match=r"tokenizer\.json is missing"):
        registry.verify("protocol")


def test_extra_file_is_refused(registry, tmp_path):
    dest = registry.publish("protocol", "1.0.0", make_version(tmp_path, version="1.0.0"))
    (dest / "sub").mkdir()
    (dest / "sub" / "evil.onnx").write_bytes(b"x")
    with pytest.raises(ModelIntegrityError, match=r"sub/evil\.onnx is not listed"):
        registry.verify("protocol")


@pytest.mark.parametrize(
    "content, needle",
    [
        ("{not json", "not valid JSON"),
        (json.dumps({"task": "protocol"}), "invalid"),
        (None, "missing"),
    ],
)
def test_bad_manifest_is_refused(registry, tmp_path, content, needle):
    dest = registry.publish("protocol", "1.0.0", make_version(tmp_path, version="1.0.0"))
    if content is None:
        (dest / "manifest.json").unlink()
        (dest / "manifest.json.bak").write_text("{}")
        with pytest.raises(ModelIntegrityError, match="manifest.json is missing"):
            registry.verify("protocol")
        assert registry.versions("protocol") == []  # without a manifest it is not a version folder
        return
    (dest / "manifest.json").write_text(content)
    with pytest.raises(ModelIntegrityError, match=needle) as err:
        registry.verify("protocol")
    assert "manifest.json" in str(err.value)


@pytest.mark.parametrize(
    "overrides, needle",
    [
        ({"labels": [{"system": "s", "code": "a", "display": "A"}, {"system": "s", "code": "a", "display": "A2"}]}, "twice"),
        ({"labels": [{"system": "s", "code": "a", "display": "A"}]}, "labels"),
        ({"calibration": {"temperature": 0, "abstain_below": 0.3}}, "temperature"),
        ({"calibration": {"temperature": 1.0, "abstain_below": 1.5}}, "abstain_below"),
        ({"files": {"model.onnx": "abc"}}, "sha256"),
        ({"files": {"../model.onnx": "0" * 64, "model.onnx": "0" * 64, "tokenizer.json": "0" * 64}}, "relative path"),
        ({"format_version": 99}, "upgrade"),
        ({"version": "../escape"}, "version"),
        ({"task": "a/b"}, "task"),
    ],
)
def test_manifest_validation(tmp_path, overrides, needle):
    src = make_version(tmp_path, version="1.0.0")
    data = json.loads((src / "manifest.json").read_text())
    (src / "manifest.json").write_text(json.dumps({**data, **overrides}))
    with pytest.raises(ModelIntegrityError, match=needle):
        Manifest.read(src / "manifest.json")


def test_manifest_round_trip_and_labels(tmp_path):
    src = make_version(tmp_path, version="1.0.0", extra_field={"kept": True})
    manifest = Manifest.read(src / "manifest.json")
    data = manifest.to_json()
    assert data["created"] == "2026-01-01T00:00:00Z" and data["extra_field"] == {"kept": True}
    for key in ("task", "name", "version", "base_model", "labels", "max_length", "calibration", "metrics",
                "files", "training_data_sha256", "created", "format_version"):
        assert key in data
    labels = manifest.label_objects()
    assert labels[0].code == "CT-HEAD-WO" and labels[1].display == "MRI knee"
    manifest.write(tmp_path / "again.json")
    assert Manifest.read(tmp_path / "again.json") == manifest


def test_not_found_messages_are_helpful(tmp_path):
    empty = ModelRegistry(tmp_path / "nowhere")
    assert empty.tasks() == []
    with pytest.raises(ModelNotFoundError, match="does not exist.*ehr-worker models build"):
        empty.current_dir("protocol")
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        empty.verify_all()
    reg = ModelRegistry(tmp_path / "reg")
    reg.root.mkdir()
    with pytest.raises(ModelNotFoundError, match="no 'protocol' model.*ehr-worker models build"):
        reg.current_dir("protocol")
    reg.publish("protocol", "1.0.0", make_version(tmp_path, version="1.0.0"), make_current=False)
    with pytest.raises(ModelNotFoundError, match="no protocol/CURRENT"):
        reg.current_dir("protocol")
    with pytest.raises(ModelNotFoundError, match="versions: 1.0.0"):
        reg.version_dir("protocol", "9.9.9")
    (reg.root / "protocol" / "CURRENT").write_text("2.0.0\n")
    with pytest.raises(ModelNotFoundError, match="2.0.0"):
        reg.current_dir("protocol")
    with pytest.raises(ValueError):
        reg.current_dir("../etc")


def test_verify_all_covers_every_task(registry, tmp_path):
    registry.publish("protocol", "1.0.0", make_version(tmp_path, version="1.0.0"))
    registry.publish("diagnosis", "1.0.0", make_version(tmp_path, task="diagnosis", version="1.0.0"))
    assert set(registry.verify_all()) == {"protocol", "diagnosis"}
    (registry.root / "diagnosis" / "1.0.0" / "MODEL_CARD.md").write_text("changed")
    with pytest.raises(ModelIntegrityError, match="diagnosis.*MODEL_CARD.md"):
        registry.verify_all()
