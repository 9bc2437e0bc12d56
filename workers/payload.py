"""What a Celery task carries for one order: ids in clear, the order itself only encrypted.

Task arguments sit in Redis (the broker) and Celery prints them in its logs, so they must hold no
patient text. A task therefore carries:

- ``reference`` (``ServiceRequest/{id}[/_history/{version}]``) and ``idempotency_key``: what the
  worker needs to read the order from the FHIR server and to name its result;
- ``sealed``: for an order that came inline in the event, the order encrypted with the key in
  ``EHRW_PAYLOAD_KEY`` (Fernet: AES-128-CBC + HMAC-SHA256). The worker uses it only when the server
  does not hold that version of the order (404/410), or when the order has no ``meta.versionId``
  (then the server copy could be another version, so the event's own copy is the one to read).

Dispatch (the consumer)::

    cipher = payload_cipher(settings.payload_key)    # once, at start: fails fast when unset
    suggest.apply_async(**apply_async_options(item, cipher), task_id=...)

Worker (the task)::

    item, fallback = open_task_payload(payload, cipher)
    suggest_for_order(item, fhir, models, fallback=fallback, ...)
"""

from __future__ import annotations

import json
from typing import Any

from schemas.events import OrderItem
from schemas.references import ID_RE
from schemas.writeback import order_idempotency_key

PAYLOAD_KEY_ENV = "EHRW_PAYLOAD_KEY"
_GENERATE = "python -c 'from cryptography.fernet import Fernet; print(Fernet.generate_key().decode())'"


class PayloadError(ValueError):
    """A task payload that cannot be opened: no key, the wrong key, or a tampered token."""


def payload_cipher(key: Any) -> Any:
    """The Fernet cipher for ``EHRW_PAYLOAD_KEY`` (a urlsafe-base64 32-byte key, as ``str`` or
    pydantic ``SecretStr``); raises
    :class:`PayloadError` saying how to make one when it is missing or malformed. Consumer and
    workers must share the key; rotate by deploying both with the new key after the queue drained."""
    from cryptography.fernet import Fernet

    if hasattr(key, "get_secret_value"):
        key = key.get_secret_value()
    if not key:
        raise PayloadError(f"{PAYLOAD_KEY_ENV} is not set; orders carried in events are encrypted with it. Make one: {_GENERATE}")
    try:
        return Fernet(key.encode("ascii") if isinstance(key, str) else key)
    except (ValueError, TypeError, UnicodeEncodeError):
        raise PayloadError(f"{PAYLOAD_KEY_ENV} is not a Fernet key (32 bytes, urlsafe base64). Make one: {_GENERATE}") from None


def seal(resource: dict[str, Any], cipher: Any) -> str:
    """``resource`` as an encrypted, authenticated token (ASCII)."""
    return cipher.encrypt(json.dumps(resource, separators=(",", ":"), ensure_ascii=False).encode("utf-8")).decode("ascii")


def unseal(token: str, cipher: Any) -> dict[str, Any]:
    from cryptography.fernet import InvalidToken

    try:
        resource = json.loads(cipher.decrypt(token.encode("ascii")))
    except (InvalidToken, ValueError, UnicodeEncodeError):
        raise PayloadError(f"a task payload cannot be decrypted: is {PAYLOAD_KEY_ENV} the consumer's key?") from None
    if not isinstance(resource, dict):
        raise PayloadError("a task payload decrypts to something other than a resource")
    return resource


def task_payload(item: OrderItem, cipher: Any | None) -> dict[str, Any]:
    """The JSON task argument for one order (see the module docstring); ``cipher`` is needed only
    for orders carried inline, and a missing one raises :class:`PayloadError`."""
    if item.reference is not None:
        return {"reference": item.reference}
    sr = item.service_request
    assert sr is not None
    if cipher is None:
        payload_cipher(None)  # raises, saying how to set the key
    version = (sr.get("meta") or {}).get("versionId") if isinstance(sr.get("meta"), dict) else None
    reference = f"ServiceRequest/{sr['id']}"
    if isinstance(version, str) and ID_RE.fullmatch(version):
        reference += f"/_history/{version}"
    payload: dict[str, Any] = {"reference": reference, "idempotency_key": order_idempotency_key(sr),
                               "sealed": seal(sr, cipher)}
    if "/_history/" not in reference:
        payload["use_sealed"] = True  # no version: only the event's own copy is certainly this order
    return payload


def apply_async_options(item: OrderItem, cipher: Any | None) -> dict[str, Any]:
    """Keyword arguments for ``suggest.apply_async(**options, task_id=...)``: the payload as the
    only argument, and ``argsrepr``/``kwargsrepr`` so no Celery log line prints more than ids."""
    payload = task_payload(item, cipher)
    return {"args": [payload], "argsrepr": task_argsrepr(payload), "kwargsrepr": "{}"}


def task_argsrepr(payload: dict[str, Any]) -> str:
    """What Celery may log for the task's arguments: the reference and key, never the order."""
    key = payload.get("idempotency_key")
    return f"({payload.get('reference')!s}{f' key={key}' if key else ''})"


def open_task_payload(payload: dict[str, Any], cipher: Any | None) -> tuple[OrderItem, dict[str, Any] | None]:
    """``(item, fallback)`` for :func:`workers.pipeline.suggest_for_order`: the item to work on and,
    for a versioned inline order, the decrypted copy to use when the server does not hold it."""
    reference = payload.get("reference")
    if not isinstance(reference, str):
        raise PayloadError("a task payload has no order reference")
    if "sealed" not in payload:
        return OrderItem(reference=reference), None
    if cipher is None:
        payload_cipher(None)
    order = unseal(payload["sealed"], cipher)
    if payload.get("use_sealed"):
        return OrderItem(service_request=order), None
    return OrderItem(reference=reference), order
