"""The bench's table: every figure beside its target from DESIGN.md ("Performance"), and the notes
that say how each was measured. Figures are printed, never asserted."""

from __future__ import annotations

from typing import Any

# DESIGN.md, "Performance".
TARGET_P50_MS = 3.0

TARGET_INFERENCE_SPEEDUP = 20.0

TARGET_E2E_SPEEDUP = 10.0

TARGET_PCT_OF_LIMIT = 80.0

TARGET_SIZE_RATIO = 0.25

TARGET_ACCURACY_LOSS_PT = 0.5

TARGET_WORKER_RSS_MB = 300.0

TARGET_COLD_START_S = 5.0



def _f(x: Any, fmt: str = "{:.2f}") -> str:
    if x is None:
        return "n/a"
    return fmt.format(x) if isinstance(x, (int, float)) else str(x)



def _met(ok: bool | str | None) -> str:
    if isinstance(ok, str):
        return ok
    return "" if ok is None else ("yes" if ok else "NO")



def _worker_children(procs: dict[str, dict]) -> list[float]:
    return [p["rss_mb"] for name, p in procs.items() if name.startswith("worker child")]


def table_rows(fig: dict) -> list[dict]:
    inf, e2e, size = fig["inference"], fig["end_to_end"], fig["size"]
    ours, base = inf["ehr_worker"], inf["baseline"]
    speedup = inf["speedup_p50"]
    head, fhir, single = e2e["ehr_worker"], e2e["fhir_server"], e2e.get("fhir_server_single_order") or {}
    full = e2e.get("fhir_server_full") or {}
    mem = fig.get("memory_largest_run") or {}
    rss_end = _worker_children(mem.get("end") or {})
    rss_start = _worker_children(mem.get("start") or {})
    rss_max = max(rss_end) if rss_end else None
    growth = round(max(rss_end) - max(rss_start), 1) if rss_end and rss_start else None
    cold = fig.get("cold_start") or {}
    p99 = head["latency_produce_to_written"].get("p99_ms")
    rows = [
        {
            "metric": "inference p50, both models, 1 thread (ms)",
            "ehr_worker": ours["p50_ms"], "baseline": base["p50_ms"], "ratio": speedup,
            "target": f"<= {TARGET_P50_MS:g} ms; >= {TARGET_INFERENCE_SPEEDUP:g}x baseline",
            "met": f"{_met(ours['p50_ms'] <= TARGET_P50_MS)}; {_met(speedup >= TARGET_INFERENCE_SPEEDUP)}",
            "met_p50": ours["p50_ms"] <= TARGET_P50_MS,
            "met_speedup": speedup >= TARGET_INFERENCE_SPEEDUP,
        },
        {
            "metric": "inference p95, both models, 1 thread (ms)",
            "ehr_worker": ours["p95_ms"], "baseline": base["p95_ms"],
            "ratio": round(base["p95_ms"] / ours["p95_ms"], 2), "target": "", "met": None,
        },
        {
            "metric": "model orders/s, 1 process, 1 at a time",
            "ehr_worker": ours["one_at_a_time_orders_per_s"], "baseline": base["one_at_a_time_orders_per_s"],
            "ratio": round(ours["one_at_a_time_orders_per_s"] / base["one_at_a_time_orders_per_s"], 2),
            "target": "", "met": None,
        },
        {
            "metric": f"model orders/s, 1 process, batch {ours['batch_size']}",
            "ehr_worker": ours["batched_orders_per_s"], "baseline": base["one_at_a_time_orders_per_s"],
            "ratio": round(ours["batched_orders_per_s"] / base["one_at_a_time_orders_per_s"], 2),
            "target": "", "met": None,
        },
        {
            "metric": f"FHIR server alone, 1 order/transaction, {single.get('clients', '?')} clients (orders/s)",
            "ehr_worker": single.get("orders_per_s"), "baseline": None, "ratio": None, "target": "", "met": None,
        },
        {
            "metric": f"FHIR server alone, best: {fhir['orders_per_transaction']} orders/transaction, "
                      f"{fhir['clients']} clients (orders/s)",
            "ehr_worker": fhir["orders_per_s"], "baseline": None, "ratio": None, "target": "", "met": None,
        },
        {
            "metric": f"FHIR server alone, best, holding {e2e.get('fhir_server_full_orders')} orders (orders/s)",
            "ehr_worker": full.get("orders_per_s"), "baseline": None, "ratio": None, "target": "", "met": None,
        },
        {
            "metric": f"end-to-end orders/s, N={head['orders']}, concurrency {head['worker_concurrency']}",
            "ehr_worker": head["orders_per_s"], "baseline": e2e["baseline"]["orders_per_s"],
            "ratio": e2e["speedup_vs_baseline"], "target": f">= {TARGET_E2E_SPEEDUP:g}x baseline",
            "met": e2e["speedup_vs_baseline"] >= TARGET_E2E_SPEEDUP,
        },
        {
            "metric": f"end-to-end, % of the FHIR server's best over the same growth of its database "
                      f"({e2e.get('fhir_best_orders_per_s')} orders/s; empty: {e2e.get('pct_of_fhir_best_empty')} %)",
            "ehr_worker": e2e["pct_of_fhir_best"], "baseline": None, "ratio": None,
            "target": f">= {TARGET_PCT_OF_LIMIT:g} %", "met": e2e["pct_of_fhir_best"] >= TARGET_PCT_OF_LIMIT,
        },
        {
            "metric": "end-to-end p99 latency, produce -> written (ms)",
            "ehr_worker": p99, "baseline": None, "ratio": None, "target": "reported", "met": None,
        },
        {
            "metric": "cold start: worker start -> first order served (s)",
            "ehr_worker": cold.get("seconds_to_first_order"), "baseline": None, "ratio": None,
            "target": f"< {TARGET_COLD_START_S:g} s",
            "met": None if cold.get("seconds_to_first_order") is None
            else cold["seconds_to_first_order"] < TARGET_COLD_START_S,
        },
        {
            "metric": "model files, both models (MB)",
            "ehr_worker": size["int8_mb"], "baseline": size["fp32_mb"], "ratio": size["int8_over_fp32"],
            "ratio_text": None if size["int8_over_fp32"] is None else f"{size['int8_over_fp32']:.2%}",
            "target": f"int8 <= {TARGET_SIZE_RATIO:.0%} of fp32",
            "met": None if size["int8_over_fp32"] is None else size["int8_over_fp32"] <= TARGET_SIZE_RATIO,
        },
        {
            "metric": "int8 accuracy loss vs fp32, worst (pt)",
            "ehr_worker": size["accuracy_loss_pt_max"], "baseline": None, "ratio": None,
            "target": f"<= {TARGET_ACCURACY_LOSS_PT:g} pt",
            "met": None if size["accuracy_loss_pt_max"] is None else size["accuracy_loss_pt_max"] <= TARGET_ACCURACY_LOSS_PT,
        },
        {
            "metric": "worker process RSS, both models, end of largest run (MB)",
            "ehr_worker": rss_max, "baseline": (fig["memory"].get("baseline_process_rss_mb") or {}).get("end"),
            "ratio": None, "target": f"<= {TARGET_WORKER_RSS_MB:g} MB",
            "met": None if rss_max is None else rss_max <= TARGET_WORKER_RSS_MB,
        },
        {
            "metric": "worker process RSS growth over the largest run (MB)",
            "ehr_worker": growth, "baseline": None, "ratio": None, "target": "flat", "met": None,
        },
    ]  # fmt: skip
    rss_row = rows[-2]
    if rss_row["ehr_worker"] and rss_row["baseline"]:
        rss_row["ratio"] = round(rss_row["baseline"] / rss_row["ehr_worker"], 2)
    return rows


def _simple_table(title: str, columns: list[str], rows: list[list[Any]]):
    from rich.table import Table

    table = Table(title=title, show_lines=False)
    for i, col in enumerate(columns):
        table.add_column(col, justify="left" if i == 0 else "right")
    for r in rows:
        table.add_row(*[_f(x) if not isinstance(x, str) else x for x in r])
    return table


def print_table(fig: dict, console) -> None:
    from rich.table import Table

    table = Table(title="ehr-worker bench", show_lines=False)
    for col, just in (("metric", "left"), ("ehr-worker", "right"), ("naive baseline", "right"),
                      ("ratio", "right"), ("target", "left"), ("met", "center")):  # fmt: skip
        table.add_column(col, justify=just, overflow="fold")
    for r in fig["rows"]:
        ratio = r.get("ratio_text") or ("" if r["ratio"] is None else f"{r['ratio']:.2f}x")
        table.add_row(r["metric"], _f(r["ehr_worker"]), _f(r["baseline"]), ratio, r["target"], _met(r["met"]))
    console.print(table)
    e2e = fig["end_to_end"]
    console.print(_simple_table(
        "end to end, per N and worker concurrency (latency: produce -> written, ms)",
        ["N", "concurrency", "orders/s", "x baseline", "FHIR best", "% FHIR best", "% FHIR empty", "p50", "p95", "p99"],
        [[str(r["orders"]), str(r["worker_concurrency"]), r["orders_per_s"], r["speedup_vs_baseline"],
          r.get("fhir_best_orders_per_s"), r["pct_of_fhir_best"], r.get("pct_of_fhir_best_empty"),
          r.get("written_p50_ms"), r.get("written_p95_ms"), r.get("written_p99_ms")]
         for r in e2e["runs"]]))  # fmt: skip
    console.print(_simple_table(
        "FHIR server alone (pre-built write-back bundles of fresh orders)",
        ["server", "orders/transaction", "clients", "orders/s", "transactions/s"],
        [[when, str(r["orders_per_transaction"]), str(r["clients"]), r["orders_per_s"], r["transactions_per_s"]]
         for when, sweep in (("empty", fig["fhir_server"]), (f"holding {e2e.get('fhir_server_full_orders')} orders",
                                                             fig.get("fhir_server_full")))
         for r in (sweep or {}).get("runs", [])]))  # fmt: skip
    prof = fig.get("profile") or {}
    if prof.get("worker_ms_per_order") is not None:
        run = prof.get("run") or {}
        stages = [["worker: " + k, v] for k, v in prof["worker_ms_per_order"].items()]
        stages += [["consumer: " + k, v] for k, v in prof["consumer_ms_per_order"].items()]
        console.print(_simple_table(
            f"per-stage time per order (ms; py-spy, profiled run of N={run.get('orders')} at concurrency "
            f"{run.get('worker_concurrency')}: {run.get('orders_per_s')} orders/s)", ["stage", "ms/order"], stages))
        cpu = prof.get("pipeline_cpu") or {}
        cpu_rows = [[k, v] for k, v in (cpu.get("cpu_ms_per_order_by_process") or {}).items()]
        cpu_rows.append(["pipeline's own (consumer + worker - models)", cpu.get("pipeline_own_cpu_ms_per_order")])
        console.print(_simple_table("CPU per order (ms), profiled run", ["process", "CPU ms/order"], cpu_rows))
        console.print(f"profile evidence: {', '.join(prof.get('evidence') or [])}", markup=False, highlight=False)
    elif prof.get("error"):
        console.print(f"[yellow]no per-stage profile: {prof['error']}[/]")
    mem = fig.get("memory_largest_run") or {}
    if mem:
        start, end = mem["start"], mem["end"]
        console.print(_simple_table(
            f"memory (RSS, MB) of every process, largest run (N={mem['orders']}, concurrency {mem['worker_concurrency']})",
            ["process", "start", "end"],
            [[name, (start.get(name) or {}).get("rss_mb"), p["rss_mb"]] for name, p in end.items()]))  # fmt: skip
    cfg, text, cold = fig["config"], fig["orders_text"], fig.get("cold_start") or {}
    machine = cfg.get("machine") or {}
    base = e2e["baseline"]
    notes = (
        f"Orders: {cfg['source']} ({cfg['distinct_order_texts']} distinct texts, fresh ids); model input p50 "
        f"{text['tokens_p50']:.0f} tokens, p95 {text['tokens_p95']:.0f}, {text['truncated_share']:.0%} cut at "
        f"max_length {text['max_length']}. Inference latency = both models on the same text, one order at a time, "
        f"{fig['inference']['ehr_worker']['n']} orders.\n"
        f"Baseline: {fig['baseline_model']}, one order at a time, in its own process, predict + one synchronous "
        f"FHIR transaction per order: {base['orders']} orders in {base['seconds']:.2f}s.\n"
        f"End to end: each run on an empty FHIR server (its request log off) and a new worker; 2 warm-up orders, then "
        f"N orders produced as one burst while the pipeline runs; orders/s = N / "
        f"(first produced -> last offset committed); latency per order from produce to the dispatcher seeing it "
        f"written (queueing included: a burst of N drains in N / rate). Worker micro-batches of up to "
        f"{cfg['write_batch_orders']} orders, {cfg['max_in_flight']} events per consumer batch, "
        f"{cfg['max_in_flight_orders']} orders in flight.\n"
        f"FHIR server alone: {cfg['fhir_orders']} fresh orders' write-back bundles per row, as transactions of k "
        f"orders (Device entries shared), posted by the given number of client threads, on an empty server and on the "
        f"server holding the largest run's orders; a run's FHIR best takes the server's time per order as linear in the "
        f"orders it holds, averaged over the run's growth from empty.\n"
        f"Cold start: an order queued, then `celery -A workers worker --concurrency {cold.get('concurrency')}` started; "
        f"seconds until its result is stored ({cold.get('seconds_to_ping')} s until the worker answered a ping).\n"
        f"CPUs: {cfg['cpu_count']}; load average at start {cfg['loadavg_start']}, at end {cfg['loadavg_end']}: "
        f"other processes on the machine slow every figure. MB = 10^6 bytes.\n"
        f"Machine: {machine.get('cpu')}; reference workloads (best of 5): pure Python {machine.get('python_ms')} ms, "
        f"numpy {machine.get('numpy_ms')} ms. Compare runs on different machines through these."
    )
    console.print(notes, markup=False, highlight=False)
    if cfg.get("other_workers_on_broker"):
        console.print(f"[yellow]warning: other Celery workers answer on the same broker and may have taken tasks: "
                      f"{cfg['other_workers_on_broker']}[/]")
