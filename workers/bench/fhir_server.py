"""The FHIR server's own write-back throughput, without the pipeline: pre-built write-back Bundles of
fresh orders posted by concurrent clients, one order per transaction and ``k`` orders per
transaction (:func:`schemas.writeback_batch.combine_transactions`, as the worker's micro-batches).
The best of these is the ceiling the end-to-end figure is compared with."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

from connectors.fhir import FhirClient
from schemas.writeback_batch import combine_transactions
from workers.bench.progress import progress_bar


def batched(bundles: Sequence[dict], k: int) -> list[dict]:
    """Transactions of ``k`` orders each (the last may hold fewer)."""
    if k <= 1:
        return list(bundles)
    return [combine_transactions(bundles[i : i + k]).bundle for i in range(0, len(bundles), k)]


def measure_fhir_transactions(base_url: str, bundles: Sequence[dict], *, orders: int, clients: int = 2,
                              orders_per_transaction: int = 1, progress: bool = True) -> dict:
    """Post ``bundles`` (one order's each; orders with nothing to write have none) as transactions of
    ``orders_per_transaction`` orders from ``clients`` threads, each with its own pooled client."""
    transactions = batched(bundles, orders_per_transaction)
    local = threading.local()
    made: list[FhirClient] = []
    lock = threading.Lock()
    desc = f"FHIR server, {clients} clients, {orders_per_transaction} orders/transaction"
    bar = progress_bar(total=len(transactions), enabled=progress, desc=desc)

    def post(bundle: dict) -> None:
        client = getattr(local, "client", None)
        if client is None:
            client = local.client = FhirClient(base_url)
            with lock:
                made.append(client)
        client.transaction(bundle)
        with lock:
            bar.update(1)

    try:
        with ThreadPoolExecutor(max_workers=clients) as pool:
            t0 = time.perf_counter()
            list(pool.map(post, transactions))
            seconds = time.perf_counter() - t0
    finally:
        bar.close()
        for c in made:
            c.close()
    return {
        "clients": clients,
        "orders_per_transaction": orders_per_transaction,
        "orders": orders,
        "transactions": len(transactions),
        "seconds": round(seconds, 3),
        "transactions_per_s": round(len(transactions) / seconds, 2),
        # Same order mix as the pipeline: orders with nothing to write cost no transaction.
        "orders_per_s": round(orders / seconds, 2),
    }


def fhir_sweep(base_url: str, make_bundles, *, orders: int, clients: Sequence[int], batch_sizes: Sequence[int],
               progress: bool = True) -> dict:
    """Every (clients, orders per transaction) pair on fresh orders (``make_bundles(n, tag)`` returns
    ``(bundles, n_orders)``); ``best`` is the highest orders/s."""
    runs = []
    for k in batch_sizes:
        for c in clients:
            bundles, n = make_bundles(orders, f"fx{k}c{c}")
            runs.append(measure_fhir_transactions(base_url, bundles, orders=n, clients=c, orders_per_transaction=k,
                                                  progress=progress))
    single = [r for r in runs if r["orders_per_transaction"] == 1]
    best = max(runs, key=lambda r: r["orders_per_s"])
    return {
        "runs": runs,
        "best": best,
        "best_single_order": max(single, key=lambda r: r["orders_per_s"]) if single else None,
    }
