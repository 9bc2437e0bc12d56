"""The model registry: one folder per task and version, a manifest with checksums, a CURRENT pointer.

Layout (docs/architecture.md)::

    {root}/{task}/{version}/model.onnx       int8 ONNX classifier (input_ids, attention_mask -> logits)
    {root}/{task}/{version}/tokenizer.json   Hugging Face `tokenizers` file, used as-is at serving time
    {root}/{task}/{version}/MODEL_CARD.md
    {root}/{task}/{version}/manifest.json    labels, calibration, metrics, sha256 of every other file
    {root}/{task}/CURRENT                    the current version string

A version folder is immutable once published: ``publish`` copies into a hidden temporary folder
next to the target and renames it into place, and ``CURRENT`` is replaced atomically, so a worker
never sees half a model. ``verify`` recomputes every checksum; any missing, extra or changed file is
a :class:`ModelIntegrityError` that names the file.
"""

from __future__ import annotations

import os
import re
import shutil
import uuid
from datetime import datetime, timezone
from pathlib import Path

from models.manifest import (
    CURRENT,
    FORMAT_VERSION,
    HISTORY,
    KIND_FILES,
    MANIFEST,
    MODEL_CARD_FILE,
    MODEL_FILE,
    REBUILD_HINT,
    REQUIRED_FILES,
    TOKENIZER_FILE,
    Calibration,
    LabelSpec,
    Manifest,
    ModelError,
    ModelIntegrityError,
    ModelNotFoundError,
    check_name,
    checksum_files,
    list_files,
    sha256_file,
    verify_version_dir,
)

# The manifest's names are re-exported: ``from models.registry import ...`` is the one import.
__all__ = [
    "CURRENT",
    "FORMAT_VERSION",
    "HISTORY",
    "KIND_FILES",
    "MANIFEST",
    "MODEL_CARD_FILE",
    "MODEL_FILE",
    "REBUILD_HINT",
    "REQUIRED_FILES",
    "TOKENIZER_FILE",
    "Calibration",
    "LabelSpec",
    "Manifest",
    "ModelError",
    "ModelIntegrityError",
    "ModelNotFoundError",
    "ModelRegistry",
    "checksum_files",
    "list_files",
    "sha256_file",
    "verify_version_dir",
]


def _natural_key(version: str) -> tuple:
    return tuple((0, int(tok), "") if tok.isdigit() else (1, 0, tok) for tok in re.split(r"(\d+)", version) if tok)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


class ModelRegistry:
    """A registry folder: ``{root}/{task}/{version}/`` plus ``{root}/{task}/CURRENT``."""

    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser()

    def __repr__(self) -> str:
        return f"ModelRegistry({str(self.root)!r})"

    # -- discovery ---------------------------------------------------------------------------
    def tasks(self) -> list[str]:
        """Tasks that have at least one version folder or a CURRENT file."""
        if not self.root.is_dir():
            return []
        return sorted(
            p.name
            for p in self.root.iterdir()
            if p.is_dir() and not p.name.startswith(".") and ((p / CURRENT).is_file() or self._version_dirs(p))
        )

    @staticmethod
    def _version_dirs(task_dir: Path) -> list[Path]:
        if not task_dir.is_dir():
            return []
        return [p for p in task_dir.iterdir() if p.is_dir() and not p.name.startswith(".") and (p / MANIFEST).exists()]

    def versions(self, task: str) -> list[str]:
        """Published versions of ``task``, oldest first (natural sort of the version strings)."""
        check_name("task", task)
        return sorted((p.name for p in self._version_dirs(self.root / task)), key=_natural_key)

    def current_version(self, task: str) -> str:
        check_name("task", task)
        task_dir = self.root / task
        pointer = task_dir / CURRENT
        if not pointer.is_file():
            raise ModelNotFoundError(self._not_found(task))
        version = pointer.read_text(encoding="utf-8").strip()
        try:
            check_name("version", version)
        except ValueError:
            raise ModelIntegrityError(f"{pointer} does not hold a valid version string; {REBUILD_HINT}") from None
        if not (task_dir / version).is_dir():
            raise ModelNotFoundError(
                f"{pointer} names version {version!r}, but {task_dir / version} does not exist; {REBUILD_HINT}"
            )
        return version

    def _not_found(self, task: str) -> str:
        if not self.root.is_dir():
            return f"model registry {self.root} does not exist; {REBUILD_HINT} or set EHRW_MODEL_REGISTRY"
        versions = self.versions(task)
        if not versions:
            known = ", ".join(self.tasks()) or "none"
            return f"no {task!r} model in registry {self.root} (tasks there: {known}); {REBUILD_HINT}"
        return (
            f"registry {self.root} has {task!r} versions ({', '.join(versions)}) but no {task}/CURRENT; "
            f"make one current with ModelRegistry.set_current() or {REBUILD_HINT}"
        )

    def version_dir(self, task: str, version: str | None = None) -> Path:
        if version is None:
            version = self.current_version(task)
        check_name("task", task)
        check_name("version", version)
        path = self.root / task / version
        if not path.is_dir():
            raise ModelNotFoundError(
                f"no {task!r} version {version!r} in registry {self.root} "
                f"(versions: {', '.join(self.versions(task)) or 'none'}); {REBUILD_HINT}"
            )
        return path

    def current_dir(self, task: str) -> Path:
        return self.version_dir(task)

    def load_manifest(self, task: str, version: str | None = None) -> Manifest:
        """The manifest (parsed and validated, checksums not recomputed; see :meth:`verify`)."""
        return Manifest.read(self.version_dir(task, version) / MANIFEST)

    def verify(self, task: str, version: str | None = None) -> Manifest:
        """Recompute every checksum of a version (default: the current one); raise
        :class:`ModelIntegrityError` naming the file on any mismatch."""
        path = self.version_dir(task, version)
        return verify_version_dir(path, task=task, version=path.name)

    # -- writing -----------------------------------------------------------------------------
    def new_version(self, task: str, now: datetime | None = None) -> str:
        """A version name for ``task`` that is not taken yet: the UTC time ``YYYYmmdd.HHMMSS``, with
        ``.1``, ``.2``... appended when a build in the same second already took it."""
        base = (now or datetime.now(timezone.utc)).strftime("%Y%m%d.%H%M%S")
        existing = set(self.versions(task))
        version, n = base, 1
        while version in existing or (self.root / task / version).exists():
            version = f"{base}.{n}"
            n += 1
        return version

    def publish(
        self, task: str, version: str, src_dir: str | Path, make_current: bool = True, *, overwrite: bool = False
    ) -> Path:
        """Copy a complete, verified version folder into ``{root}/{task}/{version}`` atomically.

        ``src_dir`` must hold a ``manifest.json`` whose task and version match and whose checksums
        hold. The copy goes to a hidden temporary folder in the task folder, is verified again, and
        is renamed into place; then ``CURRENT`` is replaced atomically (``make_current``).
        Published versions are immutable: an existing version is refused unless ``overwrite``.
        """
        check_name("task", task)
        check_name("version", version)
        src_dir = Path(src_dir)
        manifest = verify_version_dir(src_dir, task=task, version=version)
        task_dir = self.root / task
        task_dir.mkdir(parents=True, exist_ok=True)
        dest = task_dir / version
        if dest.exists() and not overwrite:
            raise FileExistsError(f"{task} version {version} is already published at {dest}; versions are immutable")
        tmp = task_dir / f".tmp-{version}-{uuid.uuid4().hex[:8]}"
        try:
            shutil.copytree(src_dir, tmp, symlinks=False)
            verify_version_dir(tmp, task=task, version=version)
            for path in tmp.rglob("*"):
                if path.is_file():
                    with open(path, "rb") as fh:
                        os.fsync(fh.fileno())
            if dest.exists():  # overwrite: move the old one aside first, then drop it
                old = task_dir / f".old-{version}-{uuid.uuid4().hex[:8]}"
                os.rename(dest, old)
                os.rename(tmp, dest)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.rename(tmp, dest)
            _fsync_dir(task_dir)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        if make_current:
            self.set_current(task, manifest.version)
        return dest

    def set_current(self, task: str, version: str) -> None:
        """Point ``{task}/CURRENT`` at an existing, intact version (atomic replace)."""
        path = self.version_dir(task, version)
        verify_version_dir(path, task=task, version=version)
        _write_atomic(self.root / task / CURRENT, version + "\n")

    def verify_all(self) -> dict[str, Manifest]:
        """Verify the current version of every task; ``{task: manifest}``."""
        tasks = self.tasks()
        if not tasks:
            raise ModelNotFoundError(
                f"model registry {self.root} {'is empty' if self.root.is_dir() else 'does not exist'}; {REBUILD_HINT}"
            )
        return {task: self.verify(task) for task in tasks}

    # -- roll-out (issue 9): promote / rollback with a history ---------------------------------
    def history(self, task: str) -> list[dict[str, str]]:
        """The CURRENT changes made by :meth:`promote` and :meth:`rollback`, oldest first."""
        check_name("task", task)
        path = self.root / task / HISTORY
        if not path.is_file():
            return []
        out = []
        for line in path.read_text(encoding="utf-8").splitlines():
            parts = line.split("\t")
            if len(parts) == 4:
                out.append(dict(zip(("time", "action", "from", "to"), parts)))
        return out

    def _record(self, task: str, action: str, previous: str | None, version: str) -> None:
        line = f"{datetime.now(timezone.utc).strftime('%Y-%m-%dT%H:%M:%SZ')}\t{action}\t{previous or '-'}\t{version}\n"
        with open(self.root / task / HISTORY, "a", encoding="utf-8") as fh:
            fh.write(line)
            fh.flush()
            os.fsync(fh.fileno())

    def promote(self, task: str, version: str) -> str | None:
        """Make ``version`` current (verified first) and record it; returns the previous version.

        Running workers switch to it between tasks (``EHRW_MODEL_CHECK_INTERVAL_S``)."""
        try:
            previous: str | None = self.current_version(task)
        except (ModelNotFoundError, ModelIntegrityError):
            previous = None
        self.set_current(task, version)
        if previous != version:
            self._record(task, "promote", previous, version)
        return previous

    def rollback_target(self, task: str) -> str:
        """The version :meth:`rollback` would make current: the one before the last promote still in
        effect, else (CURRENT was set some other way) the newest version older than the current one."""
        current = self.current_version(task)
        stack: list[str] = []
        last_to = None
        for entry in self.history(task):
            if entry["action"] == "promote" and entry["from"] != "-":
                stack.append(entry["from"])
            elif entry["action"] == "rollback" and stack:
                stack.pop()
            last_to = entry["to"]
        if stack and last_to == current and stack[-1] != current:
            return stack[-1]
        older = [v for v in self.versions(task) if _natural_key(v) < _natural_key(current)]
        if not older:
            raise ModelNotFoundError(
                f"nothing to roll back to: {task} {current} is the oldest version in {self.root}"
            )
        return older[-1]

    def rollback(self, task: str) -> tuple[str, str]:
        """Undo the last promote of ``task`` (see :meth:`rollback_target`); ``(from, to)``."""
        current = self.current_version(task)
        target = self.rollback_target(task)
        self.set_current(task, target)
        self._record(task, "rollback", current, target)
        return current, target
