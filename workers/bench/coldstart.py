"""Cold start: from ``celery -A workers worker`` being started to its first order served (models
loaded, context read, suggestions written to FHIR, result stored).

The order is queued *before* the worker starts, so nothing but the worker's start-up sits between
the two instants. Also reported: when the worker first answered a ping (the parent is up; its pool
processes may still be loading their models).
"""

from __future__ import annotations

import json
import threading
import time

from schemas.events import parse_event
from workers.local import LocalStack
from workers.payload import apply_async_options, payload_cipher
from workers.tasks import suggest


def measure_cold_start(stack: LocalStack, order: dict, *, concurrency: int, timeout_s: float = 120.0) -> dict:
    """Queue ``order`` (one inline ServiceRequest), start a worker, wait for the order's result."""
    item = parse_event(json.dumps(order).encode()).items[0]
    cipher = payload_cipher(stack.settings.payload_key)
    task_id = f"bench-coldstart-{order['id']}"
    queue = stack.settings.celery_queue
    async_result = suggest.apply_async(task_id=task_id, queue=queue, **apply_async_options(item, cipher))
    box: dict = {}

    def wait() -> None:  # the result may come before the worker's first ping answer
        box["result"] = async_result.get(timeout=timeout_s, propagate=False)
        box["served"] = time.perf_counter()

    waiter = threading.Thread(target=wait, daemon=True)
    waiter.start()
    t0 = time.perf_counter()
    worker = stack.start_worker(concurrency=concurrency, name="bench-cold", EHRW_WORKER_HTTP_PORT="0",
                                EHRW_CELERY_QUEUE=queue)
    ready = time.perf_counter() - t0
    try:
        waiter.join(timeout_s)
        result = box.get("result")
        served = box["served"] - t0 if "served" in box else None
    finally:
        async_result.forget()
        worker.stop()
        stack.workers.remove(worker)
    status = result.get("status") if isinstance(result, dict) else None
    return {
        "concurrency": concurrency,
        "seconds_to_first_order": round(served, 2) if served is not None else None,
        "seconds_to_ping": round(ready, 2),
        "first_order_status": status,
    }
