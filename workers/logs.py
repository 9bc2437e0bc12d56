"""Logging for the consumer and the workers: one JSON object per line, or plain text for people.

JSON lines (python-json-logger) carry ``time``, ``level``, ``logger``, ``message`` and, where known,
the event's ``topic``/``partition``/``offset`` (``event``), the ``order`` id, the Celery ``task_id``,
a ``reason_code`` and the ``model_versions`` the process serves. Only those keys are written:
anything else a library attaches to a record (Celery attaches the task arguments, i.e. the whole
ServiceRequest with its note text, as ``extra={"data": ...}``) is dropped, and Celery's own
"received"/"succeeded"/"failed" records have their arguments and return value redacted before any
formatter sees them, in text mode too.

Context comes from :func:`bind` (a context manager over ``contextvars``) so the code that logs
does not have to repeat the ids.
"""

from __future__ import annotations

import contextvars
import logging
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any, TextIO

from pythonjsonlogger.json import JsonFormatter

CONTEXT_FIELDS = ("event", "topic", "partition", "offset", "order", "task_id", "reason_code", "trace_id")
_context: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar(
    "ehrw_log_context", default=None
)
# What this process serves, set by the model holder (workers.rollout); shown on every worker line.
model_versions: dict[str, str] = {}

REDACTED = "[redacted]"
# Keys of Celery's logging context mappings that hold task arguments or results.
_CELERY_PAYLOAD_KEYS = ("args", "kwargs", "argsrepr", "kwargsrepr", "return_value", "retval", "result")
_NOISY = ("kafka", "httpx", "httpcore", "urllib3")


@contextmanager
def bind(**fields: Any) -> Iterator[None]:
    """Add ``fields`` (ids and codes only) to every log record emitted inside the block."""
    token = _context.set({**(_context.get() or {}), **{k: v for k, v in fields.items() if v is not None}})
    try:
        yield
    finally:
        _context.reset(token)


def bind_for_task(**fields: Any) -> contextvars.Token:
    """Like :func:`bind` across Celery's task_prerun/task_postrun signals; undo with :func:`unbind`."""
    return _context.set({**(_context.get() or {}), **{k: v for k, v in fields.items() if v is not None}})


def unbind(token: contextvars.Token) -> None:
    try:
        _context.reset(token)
    except ValueError:  # reset from another context: start clean instead
        _context.set({})


def _redact(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: (REDACTED if k in _CELERY_PAYLOAD_KEYS else v) for k, v in value.items()}
    return value


class RedactFilter(logging.Filter):
    """Removes task arguments and return values from Celery's records (and any ``data`` extra)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, Mapping):
            record.args = _redact(record.args)
        if hasattr(record, "data"):
            record.data = _redact(record.data)
        return True


class ContextFilter(logging.Filter):
    """Copies the bound context and the served model versions onto the record."""

    def filter(self, record: logging.LogRecord) -> bool:
        for key, value in (_context.get() or {}).items():
            if key in CONTEXT_FIELDS and not hasattr(record, key):
                setattr(record, key, value)
        if model_versions and not hasattr(record, "model_versions"):
            record.model_versions = dict(model_versions)
        return True


class EhrJsonFormatter(JsonFormatter):
    """python-json-logger's formatter, writing only the documented keys."""

    ALLOWED = frozenset(("time", "level", "logger", "message", "exc_info", "model_versions", *CONTEXT_FIELDS))

    def add_fields(
        self, log_data: dict[str, Any], record: logging.LogRecord, message_dict: dict[str, Any]
    ) -> None:
        super().add_fields(log_data, record, message_dict)
        for key in [k for k in log_data if k not in self.ALLOWED]:
            del log_data[key]


def json_formatter() -> logging.Formatter:
    return EhrJsonFormatter(
        "{asctime}{levelname}{name}{message}",
        style="{",
        rename_fields={"asctime": "time", "levelname": "level", "name": "logger"},
        datefmt="%Y-%m-%dT%H:%M:%S%z",
        json_ensure_ascii=False,
    )


def text_formatter() -> logging.Formatter:
    return logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")


def configure(
    fmt: str = "json", level: str | int = "INFO", *, stream: TextIO | None = None
) -> logging.Handler:
    """Route every record of the process (warnings included) through one redacting handler."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(json_formatter() if fmt == "json" else text_formatter())
    handler.addFilter(RedactFilter())
    handler.addFilter(ContextFilter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    # Celery's loggers do not propagate to the root logger by default in every version: make them.
    for name in ("celery", "celery.task", "celery.app.trace", "celery.worker.strategy"):
        celery_logger = logging.getLogger(name)
        celery_logger.handlers.clear()
        celery_logger.propagate = True
    for noisy in _NOISY:
        logging.getLogger(noisy).setLevel(logging.WARNING)
    logging.captureWarnings(True)
    return handler
