"""The bench's table: every figure beside its target from DESIGN.md ("Performance"), and the notes
that say how each was measured. Figures are printed, never asserted."""

from __future__ import annotations

from typing import Any

# DESIGN.md, "Performance".
TARGET_P50_MS = 2.0

TARGET_INFERENCE_SPEEDUP = 10.0

TARGET_E2E_SPEEDUP = 10.0

TARGET_PCT_OF_LIMIT = 80.0

TARGET_SIZE_RATIO = 0.25

TARGET_ACCURACY_LOSS_PT = 0.5

TARGET_WORKER_RSS_MB = 300.0



def _f(x: Any, fmt: str = "{:.2f}") -> str:
    if x is None:
        return "n/a"
    return fmt.format(x) if isinstance(x, (int, float)) else str(x)



def _met(ok: bool | str | None) -> str:
    if isinstance(ok, str):
        return ok
    return "" if ok is None else ("yes" if ok else "NO")



def table_rows(fig: dict) -> list[dict]:
    inf, e2e, size, mem = fig["inference"], fig["end_to_end"], fig["size"], fig["memory"]
    ours, base = inf["ehr_worker"], inf["baseline"]
    speedup = inf["speedup_p50"]
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
            "metric": f"model orders/s, 1 process, batch {ours['batch_size']} (a)",
            "ehr_worker": ours["batched_orders_per_s"], "baseline": base["one_at_a_time_orders_per_s"],
            "ratio": round(ours["batched_orders_per_s"] / base["one_at_a_time_orders_per_s"], 2),
            "target": "", "met": None,
        },
        {
            "metric": f"FHIR server orders/s, {e2e['fhir_server']['clients']} clients (b)",
            "ehr_worker": e2e["fhir_server"]["orders_per_s"], "baseline": None, "ratio": None, "target": "", "met": None,
        },
        {
            "metric": f"limit orders/s = min(model x {e2e['model']['processes']}, FHIR) (c)",
            "ehr_worker": e2e["limit"]["orders_per_s"], "baseline": None, "ratio": None,
            "target": f"bound by {e2e['limit']['bound_by']}", "met": None,
        },
        {
            "metric": "end-to-end orders/s (d)",
            "ehr_worker": e2e["ehr_worker"]["orders_per_s"], "baseline": e2e["baseline"]["orders_per_s"],
            "ratio": e2e["speedup_vs_baseline"], "target": f">= {TARGET_E2E_SPEEDUP:g}x baseline",
            "met": e2e["speedup_vs_baseline"] >= TARGET_E2E_SPEEDUP,
        },
        {
            "metric": "end-to-end, % of limit",
            "ehr_worker": e2e["pct_of_limit"], "baseline": None, "ratio": None,
            "target": f">= {TARGET_PCT_OF_LIMIT:g} %", "met": e2e["pct_of_limit"] >= TARGET_PCT_OF_LIMIT,
        },
        {
            "metric": "model files, both models (MB) (e)",
            "ehr_worker": size["int8_mb"], "baseline": size["fp32_mb"], "ratio": size["int8_over_fp32"],
            "ratio_text": None if size["int8_over_fp32"] is None else f"{size['int8_over_fp32']:.2%}",
            "target": f"int8 <= {TARGET_SIZE_RATIO:.0%} of fp32",
            "met": None if size["int8_over_fp32"] is None else size["int8_over_fp32"] <= TARGET_SIZE_RATIO,
        },
        {
            "metric": "int8 accuracy loss vs fp32, worst (pt) (e)",
            "ehr_worker": size["accuracy_loss_pt_max"], "baseline": None, "ratio": None,
            "target": f"<= {TARGET_ACCURACY_LOSS_PT:g} pt",
            "met": None if size["accuracy_loss_pt_max"] is None else size["accuracy_loss_pt_max"] <= TARGET_ACCURACY_LOSS_PT,
        },
        {
            "metric": "worker process RSS, both models (MB) (f)",
            "ehr_worker": mem["child_rss_mb_max"], "baseline": (mem.get("baseline_process_rss_mb") or {}).get("end"),
            "ratio": None, "target": f"<= {TARGET_WORKER_RSS_MB:g} MB",
            "met": None if mem["child_rss_mb_max"] is None else mem["child_rss_mb_max"] <= TARGET_WORKER_RSS_MB,
        },
    ]  # fmt: skip
    rss_ours, rss_base = rows[-1]["ehr_worker"], rows[-1]["baseline"]
    if rss_ours and rss_base:
        rows[-1]["ratio"] = round(rss_base / rss_ours, 2)
    return rows



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
    cfg, text, e2e = fig["config"], fig["orders_text"], fig["end_to_end"]
    pipe, base, fhir, model = e2e["ehr_worker"], e2e["baseline"], e2e["fhir_server"], e2e["model"]
    notes = (
        f"Orders: {cfg['source']} ({cfg['distinct_order_texts']} distinct texts, fresh ids); model input p50 "
        f"{text['tokens_p50']:.0f} tokens, p95 {text['tokens_p95']:.0f}, {text['truncated_share']:.0%} cut at "
        f"max_length {text['max_length']}. Latency = tokenize + run + calibrated top-k of protocol and diagnosis "
        f"on the same text, one order at a time, {fig['inference']['ehr_worker']['n']} orders.\n"
        f"Baseline: {fig['baseline_model']}, one order at a time, in its own process. Its heads' weights are "
        f"random: they do not change its timing; its outputs go through the same abstention and write-back code.\n"
        f"(a) baseline column: the baseline's one-at-a-time rate (it does not batch).\n"
        f"(b) {fhir['transactions']} pre-built write-back transactions for {fhir['orders']} fresh orders (same "
        f"order mix as the pipeline), posted by {fhir['clients']} concurrent clients; orders/s = orders / wall time.\n"
        f"(c) model = 1000 / mean per-order latency of both models (one process, one thread, batch of one: what a "
        f"worker process does per task) = {model['orders_per_s_one_process']:g}/s, x {model['processes']} "
        f"= min(worker concurrency, CPUs) processes = {model['orders_per_s']:g}/s; bound by {e2e['limit']['bound_by']}. "
        f"Where the models and the FHIR server share the CPUs their costs add up (approx.): 1/(1/model + 1/FHIR) = "
        f"{e2e['limit']['shared_cpu_orders_per_s']:g}/s, of which the pipeline reached {e2e['pct_of_shared_cpu_bound']:g} %.\n"
        f"(d) ehr-worker: {pipe['orders']} events, first dispatch to last offset commit {pipe['seconds']:.2f}s "
        f"({pipe['wall_s_including_group_join']:.2f}s including the consumer's group join); order outcomes "
        f"{pipe['order_outcomes']}, {pipe['resources_created']} resources created. Baseline: predict + one "
        f"synchronous FHIR transaction per order, {base['orders']} orders in {base['seconds']:.2f}s, "
        f"{base['transactions']} transactions, {base['resources_created']} resources created.\n"
        f"(e) from the manifests' metrics (size.int8_bytes / size.fp32_bytes; test accuracy fp32 - int8).\n"
        f"(f) max VmRSS of the celery pool processes {fig['memory']['children_rss_mb']}; baseline column: "
        f"VmRSS of the baseline process (torch + its two fp32 models) at its end. MB = 10^6 bytes.\n"
        f"CPUs: {cfg['cpu_count']}; load average at start {cfg['loadavg_start']}, at end {cfg['loadavg_end']}: "
        f"other processes on the machine slow every figure."
    )
    console.print(notes, markup=False, highlight=False)
    if cfg.get("other_workers_on_broker"):
        console.print(f"[yellow]warning: other Celery workers answer on the same broker and may have taken tasks: "
                      f"{cfg['other_workers_on_broker']}[/]")

