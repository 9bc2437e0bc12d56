"""What several ``ehr-worker`` commands share: the error exit, the option and argument types they
take alike, and the model registry they name (:mod:`workers.cli`, :mod:`workers.ops_cli`)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, NoReturn

import typer

if TYPE_CHECKING:
    from models.registry import ModelRegistry

RegistryOpt = Annotated[Path | None, typer.Option(help="Model registry (default: EHRW_MODEL_REGISTRY).")]
VerboseOpt = Annotated[bool, typer.Option("--verbose", "-v")]
InputArg = Annotated[Path, typer.Argument(metavar="IN", help="FHIR ServiceRequest NDJSON, or JSONL with id and text.")]
OutputArg = Annotated[Path, typer.Argument(metavar="OUT", help="JSONL, one line per input ('-' for stdout).")]


def fail(message: str, code: int = 2) -> NoReturn:
    """``error: message`` on stderr, in red, and exit with ``code`` (2: a usage error)."""
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


def open_registry(registry: Path | None) -> ModelRegistry:
    """The registry named by ``--registry``, else ``EHRW_MODEL_REGISTRY``."""
    from models.registry import ModelRegistry
    from workers.settings import get_settings

    return ModelRegistry(registry or get_settings().model_registry)


@contextmanager
def registry_errors() -> Iterator[None]:
    """A missing or corrupt model, or a version the registry refuses, ends the command (exit 1)."""
    from models.registry import ModelIntegrityError, ModelNotFoundError

    try:
        yield
    except (ModelIntegrityError, ModelNotFoundError, ValueError) as exc:
        fail(str(exc), code=1)
