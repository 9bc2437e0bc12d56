"""``ehr-worker``: the command-line tool (consume, replay, predict, demo, bench, chaos, models)."""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from schemas.tasks import TASKS
from workers.cli_options import InputArg, OutputArg, RegistryOpt, VerboseOpt, open_registry
from workers.cli_options import fail as _fail

app = typer.Typer(
    name="ehr-worker",
    help="FHIR ServiceRequest events -> protocol and rare-disease suggestions written back to FHIR.",
    no_args_is_help=True,
    add_completion=False,
)
models_app = typer.Typer(help="Build, list and verify the models in the registry.", no_args_is_help=True)
app.add_typer(models_app, name="models")


class Task(str, Enum):
    protocol = "protocol"
    diagnosis = "diagnosis"


class BuildTask(str, Enum):
    protocol = "protocol"
    diagnosis = "diagnosis"
    all = "all"


class ReplayTarget(str, Enum):
    kafka = "kafka"
    direct = "direct"


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    for noisy in ("kafka", "httpx", "httpcore"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


@app.command()
def consume(
    max_events: Annotated[Optional[int], typer.Option(help="Stop after this many events (default: run forever).")] = None,
    idle_timeout: Annotated[Optional[float], typer.Option(help="Stop after this many seconds without events.")] = None,
    verbose: VerboseOpt = False,
) -> None:
    """Consume ServiceRequest events from Kafka and hand them to the Celery workers."""
    from connectors.kafka import ensure_topics
    from workers.dispatch import build_consumer, build_dispatcher
    from workers.observability import start_consumer_observability  # Operations (issue 9)
    from workers.settings import get_settings

    s = get_settings()
    observer = start_consumer_observability(s)  # Operations (issue 9): JSON logs, /metrics, /readyz, traces
    if verbose:
        logging.getLogger().setLevel(logging.DEBUG)
    from workers.clients import kafka_client_config
    from workers.payload import PayloadError

    try:
        dispatcher = build_dispatcher(s)  # refuses to start without EHRW_PAYLOAD_KEY
    except PayloadError as exc:
        _fail(str(exc))
    ensure_topics(s.kafka_bootstrap, [s.kafka_topic, s.kafka_dlq_topic, s.kafka_result_topic], **kafka_client_config(s))
    stats = build_consumer(s, observer=observer).run(dispatcher, idle_timeout_s=idle_timeout, max_events=max_events)
    typer.echo(json.dumps(stats.as_dict()))


@app.command()
def replay(
    paths: Annotated[list[Path], typer.Argument(help="Fixture files or folders: .json (resource or Bundle), .ndjson.")],
    to: Annotated[ReplayTarget, typer.Option("--to", help="kafka: publish events; direct: send to the workers.")] = ReplayTarget.kafka,
    rate: Annotated[Optional[float], typer.Option(help="At most this many events per second.")] = None,
    verbose: VerboseOpt = False,
) -> None:
    """Replay fixture events into Kafka, or directly to the Celery workers."""
    _setup_logging(verbose)
    from workers.settings import get_settings

    for p in paths:
        if not p.exists():
            _fail(f"{p} does not exist")
    s = get_settings()
    if to is ReplayTarget.kafka:
        from connectors.kafka import ensure_topics
        from connectors.replay import replay_to_kafka

        ensure_topics(s.kafka_bootstrap, [s.kafka_topic])
        n = replay_to_kafka(paths, bootstrap=s.kafka_bootstrap, topic=s.kafka_topic, rate=rate)
        typer.echo(f"published {n} events to {s.kafka_topic} on {s.kafka_bootstrap}")
        return

    from workers.direct import replay_direct

    counts = replay_direct(paths, rate=rate, timeout_s=s.task_timeout_s)
    typer.echo(json.dumps(counts))
    if counts.get("failed"):
        raise typer.Exit(1)


@app.command()
def predict(
    task: Annotated[Task, typer.Option("--task", help="Which model to run.")],
    input_path: InputArg,
    output_path: OutputArg,
    top_k: Annotated[int, typer.Option("--top-k", min=1, max=50)] = 5,
    registry: RegistryOpt = None,
    batch_size: Annotated[int, typer.Option(min=1)] = 32,
) -> None:
    """Run one model over a file of orders, offline (no Kafka, no FHIR)."""
    from workers.offline import predict_file

    _offline(
        lambda: predict_file(task.value, input_path, output_path, top_k=top_k, registry=registry, batch_size=batch_size),
        output_path, "predictions",
    )  # fmt: skip


@app.command()
def phenotypes(
    input_path: InputArg,
    output_path: OutputArg,
    registry: RegistryOpt = None,
) -> None:
    """Recognise HPO phenotypes in each text (present / excluded / family / uncertain, with character spans)."""
    from workers.offline import phenotypes_file

    _offline(lambda: phenotypes_file(input_path, output_path, registry=registry), output_path, "lines")


def _offline(run: Callable[[], int], output_path: Path, what: str) -> None:
    """An offline file command: a bad input ends it (exit 2); ``wrote N <what> to OUT`` on stderr."""
    try:
        n = run()
    except (ValueError, FileNotFoundError) as exc:
        _fail(str(exc))
    if str(output_path) != "-":
        typer.echo(f"wrote {n} {what} to {output_path}", err=True)


def _exit_cleanly_on_sigterm() -> None:
    """SIGTERM (``timeout``, a CI runner, ``kill``) exits through Python's unwinding, so the embedded
    services, workers and consumers a command started are stopped by their ``finally`` blocks instead
    of being left running (a chaos run stopped by ``timeout`` left a worker, a consumer, Tansu,
    sekmet and Redis behind)."""
    import signal

    signal.signal(signal.SIGTERM, lambda signum, _frame: sys.exit(128 + signum))


@app.command()
def demo(
    keep_running: Annotated[bool, typer.Option(help="Leave the services up after the table (Ctrl-C stops).")] = False,
    profile: Annotated[str, typer.Option(help="Model profile to build when models are absent.")] = "default",
) -> None:
    """Start embedded Kafka/Redis/FHIR, build models if absent, replay the bundled fixtures, print what was written."""
    _setup_logging(False)
    _exit_cleanly_on_sigterm()
    from workers.demo import run_demo

    ok = run_demo(keep_running=keep_running, profile=profile)
    raise typer.Exit(0 if ok else 1)


@app.command()
def bench(
    orders: Annotated[Optional[list[str]], typer.Option("--orders", help="N orders end to end; repeatable or a list (200,2000,20000, the default).")] = None,
    concurrency: Annotated[Optional[list[str]], typer.Option("--concurrency", help="Worker concurrency; repeatable or a list (1,2, the default).")] = None,
    latency_orders: Annotated[int, typer.Option("--latency-orders", min=1, help="Orders timed one by one.")] = 300,
    baseline_orders: Annotated[Optional[int], typer.Option("--baseline-orders", min=1, help="Orders through the naive baseline end to end (default: the smallest N).")] = None,
    fhir_orders: Annotated[int, typer.Option("--fhir-orders", min=1, help="Orders per FHIR-server-alone row.")] = 1000,
    profile_orders: Annotated[int, typer.Option("--profile-orders", min=0, help="Orders of the profiled run (0: no profile).")] = 2000,
    quick: Annotated[bool, typer.Option("--quick", help="A short run (tests, a first look): N=20, concurrency 2, 20 orders everywhere.")] = False,
    registry: Annotated[Optional[Path], typer.Option(help="Model registry (default: EHRW_MODEL_REGISTRY).")] = None,
    json_out: Annotated[Optional[Path], typer.Option("--json", metavar="OUT", help="Write every figure as JSON.")] = None,
    profile_dir: Annotated[Optional[Path], typer.Option("--profile-dir", help="Where the py-spy profiles go (default: bench-profile-<run id>).")] = None,
    redis_db: Annotated[int, typer.Option("--redis-db", min=0, help="Redis database of the bench's own Celery queue (at EHRW_REDIS_URL's port).")] = 14,
    source: Annotated[str, typer.Option(help="fixtures (bundled demo orders) or generated.")] = "fixtures",
) -> None:
    """Measure ehr-worker against a naive PyTorch baseline and the FHIR server alone (inference, end
    to end per N and worker concurrency, per-stage profile, memory, cold start); prints figures."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    _exit_cleanly_on_sigterm()
    from models.registry import ModelIntegrityError, ModelNotFoundError
    from workers.bench import run_bench
    from workers.settings import get_settings

    if source not in ("fixtures", "generated"):
        _fail("--source must be fixtures or generated")
    try:
        ns = _int_list(orders, "--orders") or ([20] if quick else [200, 2000, 20000])
        cs = _int_list(concurrency, "--concurrency") or ([2] if quick else [1, 2])
    except ValueError as exc:
        _fail(str(exc))
    small = 20 if quick else None
    try:
        run_bench(
            orders=ns,
            concurrency=cs,
            latency_orders=small or latency_orders,
            baseline_orders=small or baseline_orders,
            fhir_orders=small or fhir_orders,
            profile_orders=small or profile_orders if profile_orders else 0,
            registry=registry or get_settings().model_registry,
            json_out=json_out,
            profile_dir=profile_dir,
            redis_db=redis_db,
            source=source,
        )
    except (ModelIntegrityError, ModelNotFoundError) as exc:
        _fail(str(exc))


def _int_list(values: Optional[list[str]], option: str) -> list[int]:
    """``--orders 200 --orders 2000`` or ``--orders 200,2000``: positive integers."""
    out: list[int] = []
    for value in values or []:
        for part in value.split(","):
            if part.strip():
                if not part.strip().isdigit() or int(part) < 1:
                    raise ValueError(f"{option} takes positive integers (got {part.strip()!r})")
                out.append(int(part))
    return out


@app.command()
def chaos(
    events: Annotated[int, typer.Option("--events", min=10, help="Events per fault row.")] = 10_000,
    only: Annotated[Optional[list[str]], typer.Option("--only", help="Rows whose name contains this (repeatable).")] = None,
    short: Annotated[bool, typer.Option("--short", help="Short outages (8 s) instead of the issue's 60 s.")] = False,
    registry: Annotated[Optional[Path], typer.Option(help="Model registry (default: EHRW_MODEL_REGISTRY).")] = None,
    json_out: Annotated[Optional[Path], typer.Option("--json", metavar="OUT", help="Write the table as JSON.")] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Run the pipeline under faults (kills, outages, poison, rebalances); print lost/duplicated/stuck per fault."""
    import tempfile

    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")  # fmt: skip
    logging.getLogger("kafka").setLevel(logging.CRITICAL)
    _exit_cleanly_on_sigterm()
    from connectors.embedded import EmbeddedServices
    from workers import chaos as chaos_run
    from workers.settings import get_settings

    s = get_settings()
    root = registry or s.model_registry
    if not Path(root).exists():
        _fail(f"no models in {root}; build them with `ehr-worker models build` (or --profile tiny)")
    with EmbeddedServices(fhir=False, redis=False) as services:
        lab = chaos_run.ChaosLab(Path(tempfile.mkdtemp(prefix="ehrw-chaos-")), kafka_bootstrap=services.kafka_bootstrap,
                                 registry=Path(root))  # its own FHIR, Redis and worker  # fmt: skip
        try:
            lab.start()
            typer.echo(chaos_run.HEADER)
            table = chaos_run.run_table(lab, events, names=only, long=not short, echo=typer.echo)
        finally:
            lab.stop()
    if json_out:
        json_out.write_text(chaos_run.as_json(table))
    if not all(row.ok() for row in table):
        raise typer.Exit(1)


@models_app.command("build")
def models_build(
    task: Annotated[BuildTask, typer.Option("--task")] = BuildTask.all,
    profile: Annotated[str, typer.Option(help="default: the real models; tiny: seconds, for tests.")] = "default",
    registry: RegistryOpt = None,
    seed: int = 0,
) -> None:
    """Generate data, fine-tune, export, quantize to int8, calibrate, evaluate and register."""
    from training.build import build_models
    from workers.settings import get_settings

    root = registry or get_settings().model_registry
    tasks = TASKS if task is BuildTask.all else (task.value,)
    built = build_models(root, tasks=tasks, profile=profile, seed=seed, progress=True)
    for name, path in built.items():
        typer.echo(f"{name}: {path}")


@models_app.command("list")
def models_list(registry: RegistryOpt = None) -> None:
    """List registered models and their versions (current marked *)."""
    reg = open_registry(registry)
    tasks = reg.tasks()
    if not tasks:
        _fail(f"no models in {reg.root}; build them with `ehr-worker models build`", code=1)
    for task in tasks:
        current = reg.current_version(task)
        for version in reg.versions(task):
            m = reg.load_manifest(task, version)
            acc = (m.metrics or {}).get("test", {}).get("int8", {}).get("accuracy")
            mark = "*" if version == current else " "
            acc_s = f"  int8 test acc {acc:.3f}" if isinstance(acc, (int, float)) else ""
            typer.echo(f"{mark} {task:<10} {version:<24} {len(m.labels):>5} labels{acc_s}")


@models_app.command("verify")
def models_verify(registry: RegistryOpt = None) -> None:
    """Check every file of the current models against the manifest's sha256."""
    from models.registry import ModelIntegrityError, ModelNotFoundError

    reg = open_registry(registry)
    bad = False
    for task in TASKS:
        try:
            reg.verify(task)
            typer.echo(f"ok      {task} {reg.current_version(task)}")
        except (ModelIntegrityError, ModelNotFoundError) as exc:
            bad = True
            typer.secho(f"FAILED  {task}: {exc}", fg=typer.colors.RED, err=True)
    if bad:
        raise typer.Exit(1)


# Operations (issue 9): dead-letter replay and model roll-out commands, registered on the apps above.
from workers.ops_cli import dlq_app, models_promote, models_rollback  # noqa: E402

app.add_typer(dlq_app, name="dlq")
models_app.command("promote")(models_promote)
models_app.command("rollback")(models_rollback)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
