"""A model version's ``manifest.json`` (:class:`Manifest`: labels, calibration, metrics, the
sha256 of every other file), the registry's file names and errors, and the check of a version
folder against its manifest (:func:`verify_version_dir`). :mod:`models.registry` lays the folders
out and switches versions."""

from __future__ import annotations

import hashlib
import json
import re
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_serializer,
    field_validator,
    model_validator,
)

if TYPE_CHECKING:  # pragma: no cover
    from schemas.labels import Label

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
CURRENT = "CURRENT"
HISTORY = "HISTORY"  # promote/rollback log, one tab-separated line per change (issue 9)
MODEL_FILE = "model.onnx"
TOKENIZER_FILE = "tokenizer.json"
MODEL_CARD_FILE = "MODEL_CARD.md"
REQUIRED_FILES = (MODEL_FILE, TOKENIZER_FILE)
# manifests with a ``kind`` other than a text classifier list other required files
KIND_FILES = {"hpo-ranker": ("hpo_terms.json", "hpo_graph.npz", "diseases.json", "lexicon.json", "ranker.json")}

REBUILD_HINT = "rebuild with `ehr-worker models build` (or `python -m training build`)"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


class ModelError(Exception):
    """Base class of the registry and runtime errors."""


class ModelNotFoundError(ModelError, LookupError):
    """No registry, no such task, no such version, or no CURRENT version."""


class ModelIntegrityError(ModelError):
    """A model folder does not match its manifest (missing, extra or changed file) or is unusable."""


def sha256_file(path: str | Path, *, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def check_name(kind: str, value: str) -> str:
    """``value`` when it is a safe task or version name (a folder name, never a path), else ValueError."""
    if not isinstance(value, str) or not _NAME.match(value) or value in (".", ".."):
        raise ValueError(f"{kind} {value!r} is not a valid name (letters, digits, '.', '_', '+', '-')")
    return value


class LabelSpec(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    system: str = Field(min_length=1)
    code: str = Field(min_length=1)
    display: str

    def to_label(self) -> "Label":
        from schemas.labels import Label

        return Label(self.system, self.code, self.display)


class Calibration(BaseModel):
    model_config = ConfigDict(extra="allow")

    temperature: float = Field(1.0, gt=0.0, allow_inf_nan=False)
    abstain_below: float = Field(0.0, ge=0.0, le=1.0, allow_inf_nan=False)
    # abstain when the probability mass of the top ``confidence_top_k`` labels is below
    # ``abstain_below``: 1 for a single answer, k for a differential list of k
    confidence_top_k: int = Field(1, ge=1)


class Manifest(BaseModel):
    """``manifest.json`` of one model version. Unknown keys are kept (``extra="allow"``), so an
    older reader keeps working on a newer manifest of the same ``format_version``."""

    model_config = ConfigDict(extra="allow")

    task: str
    name: str
    version: str
    base_model: str
    labels: list[LabelSpec] = Field(min_length=2)
    max_length: int = Field(gt=2, le=8192)
    calibration: Calibration = Field(default_factory=Calibration)
    metrics: dict[str, Any] = Field(default_factory=dict)
    files: dict[str, str]
    training_data_sha256: str
    created: datetime
    format_version: int = FORMAT_VERSION
    model_card_url: str | None = None

    @field_validator("task", "version")
    @classmethod
    def _valid_name(cls, value: str, info) -> str:
        return check_name(info.field_name, value)

    @field_validator("files")
    @classmethod
    def _valid_files(cls, files: dict[str, str]) -> dict[str, str]:
        for name, digest in files.items():
            parts = Path(name).parts
            if not parts or Path(name).is_absolute() or ".." in parts or name == MANIFEST or "\\" in name:
                raise ValueError(f"file name {name!r} is not a plain relative path inside the version folder")
            if not _SHA256.match(digest):
                raise ValueError(f"sha256 of {name} is not 64 lowercase hex digits")
        return files

    @field_validator("created")
    @classmethod
    def _utc(cls, value: datetime) -> datetime:
        return value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value.astimezone(timezone.utc)

    @field_serializer("created")
    def _ser_created(self, value: datetime) -> str:
        return value.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")

    @model_validator(mode="after")
    def _check(self) -> "Manifest":
        if self.format_version > FORMAT_VERSION:
            raise ValueError(
                f"format_version {self.format_version} is newer than this ehr-worker understands "
                f"({FORMAT_VERSION}); upgrade ehr-worker"
            )
        # a text classifier needs its ONNX graph and tokenizer; an ``hpo-ranker`` (models.diagnosis) its arrays
        required = KIND_FILES.get(getattr(self, "kind", None) or "", REQUIRED_FILES)
        missing = [f for f in required if f not in self.files]
        if missing:
            raise ValueError(f"files must list {', '.join(missing)}")
        keys = [(label.system, label.code) for label in self.labels]
        if len(set(keys)) != len(keys):
            dup = next(k for k in keys if keys.count(k) > 1)
            raise ValueError(f"label {dup[0]}|{dup[1]} is listed twice")
        return self

    # -- convenience -------------------------------------------------------------------------
    @property
    def num_labels(self) -> int:
        return len(self.labels)

    def label_objects(self) -> list["Label"]:
        return [label.to_label() for label in self.labels]

    def to_json(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def write(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_json(), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")

    @classmethod
    def read(cls, path: str | Path) -> "Manifest":
        """Parse ``manifest.json``; an unreadable or invalid manifest is a :class:`ModelIntegrityError`."""
        path = Path(path)
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ModelIntegrityError(f"{path}: manifest.json is missing; {REBUILD_HINT}") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ModelIntegrityError(f"{path}: manifest.json is not valid JSON ({exc}); {REBUILD_HINT}") from None
        try:
            return cls.model_validate(raw)
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in err['loc']) or 'manifest'}: {err['msg']}" for err in exc.errors()[:5]
            )
            raise ModelIntegrityError(f"{path}: manifest.json is invalid ({problems}); {REBUILD_HINT}") from None


def list_files(version_dir: Path) -> list[str]:
    """Every file below ``version_dir`` except the manifest, as sorted POSIX relative paths."""
    out = []
    for path in version_dir.rglob("*"):
        if path.is_file() or path.is_symlink():
            rel = path.relative_to(version_dir).as_posix()
            if rel != MANIFEST:
                out.append(rel)
    return sorted(out)


def checksum_files(version_dir: str | Path) -> dict[str, str]:
    """``{relative name: sha256}`` of every file in a version folder, for writing a manifest."""
    version_dir = Path(version_dir)
    return {name: sha256_file(version_dir / name) for name in list_files(version_dir)}


def verify_version_dir(version_dir: str | Path, *, task: str | None = None, version: str | None = None) -> Manifest:
    """Check a version folder against its manifest and return the manifest.

    Raises :class:`ModelIntegrityError` naming the first offending file: a listed file that is
    missing, a file whose sha256 differs, or a file on disk that the manifest does not list.
    """
    version_dir = Path(version_dir)
    if not version_dir.is_dir():
        raise ModelNotFoundError(f"model folder {version_dir} does not exist; {REBUILD_HINT}")
    manifest = Manifest.read(version_dir / MANIFEST)
    where = f"{manifest.task} model {manifest.version} ({version_dir})"
    if task is not None and manifest.task != task:
        raise ModelIntegrityError(f"{where}: manifest.json says task {manifest.task!r}, expected {task!r}; {REBUILD_HINT}")
    if version is not None and manifest.version != version:
        raise ModelIntegrityError(
            f"{where}: manifest.json says version {manifest.version!r} but the folder is {version!r}; {REBUILD_HINT}"
        )
    for name, expected in sorted(manifest.files.items()):
        path = version_dir / name
        if path.is_symlink() or not path.is_file():
            raise ModelIntegrityError(f"{where}: {name} is missing; {REBUILD_HINT}")
        actual = sha256_file(path)
        if actual != expected:
            raise ModelIntegrityError(
                f"{where}: {name} is corrupt (sha256 {actual[:12]}... does not match the manifest's "
                f"{expected[:12]}...); {REBUILD_HINT}"
            )
    extra = [name for name in list_files(version_dir) if name not in manifest.files]
    if extra:
        raise ModelIntegrityError(
            f"{where}: {extra[0]} is not listed in manifest.json (unexpected file"
            f"{'s: ' + ', '.join(extra) if len(extra) > 1 else ''}); remove it or {REBUILD_HINT}"
        )
    return manifest
