"""Operations commands: ``ehr-worker dlq list|show|replay`` and ``ehr-worker models promote|rollback``.

Registered on the main Typer app by :mod:`workers.cli`.
"""

from __future__ import annotations

import json
import sys
from typing import Annotated

import typer

from workers.cli_options import RegistryOpt, fail, open_registry, registry_errors

dlq_app = typer.Typer(
    help="Inspect the dead-letter topic and replay events once their cause is fixed.", no_args_is_help=True
)

ReasonOpt = Annotated[
    list[str] | None, typer.Option("--reason", help="Only this reason code (repeat for several).")
]
SinceOpt = Annotated[
    str | None,
    typer.Option(
        "--since", help="Only events rejected since: ISO time (2026-12-01T08:00Z) or age (30m, 2h, 7d)."
    ),
]


def _letters(reason: list[str] | None, since: str | None, topic: str | None = None):
    from connectors.dlq_replay import parse_since, read_dead_letters
    from workers.settings import get_settings

    s = get_settings()
    try:
        since_at = parse_since(since) if since else None
    except ValueError as exc:
        fail(str(exc))
    from workers.clients import kafka_client_config

    return s, read_dead_letters(
        s.kafka_bootstrap, topic or s.kafka_dlq_topic, reasons=reason or (), since=since_at,
        client_config=kafka_client_config(s),
    )


@dlq_app.command("list")
def dlq_list(
    reason: ReasonOpt = None,
    since: SinceOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per line.")] = False,
) -> None:
    """List dead-lettered events (ids, reason codes, times; never the events' content)."""
    s, letters = _letters(reason, since)
    if as_json:
        for letter in letters:
            typer.echo(json.dumps(letter.summary()))
        return
    typer.echo(f"{len(letters)} dead-lettered events on {s.kafka_dlq_topic}")
    for letter in letters:
        row = letter.summary()
        typer.echo(
            f"{row['dlq']:<10} {row['rejected_at'] or '-':<21} {row['reason_code']:<28} key={row['key'] or '-'}"
        )
    counts: dict[str, int] = {}
    for letter in letters:
        counts[letter.reason_code] = counts.get(letter.reason_code, 0) + 1
    for code, n in sorted(counts.items(), key=lambda kv: -kv[1]):
        typer.echo(f"  {n:>6}  {code}")


@dlq_app.command("show")
def dlq_show(
    at: Annotated[
        str, typer.Argument(metavar="PARTITION@OFFSET", help="As printed by `dlq list`, e.g. 0@12.")
    ],
    body: Annotated[
        bool, typer.Option("--body", help="Also write the original event bytes (clinical content) to stdout.")
    ] = False,
) -> None:
    """One dead-lettered event: reason, source, the server's OperationOutcome. The event itself
    holds patient data and is printed only with --body."""
    try:
        partition, offset = (int(x) for x in at.split("@", 1))
    except ValueError:
        fail(f"{at!r} is not PARTITION@OFFSET (e.g. 0@12, as `ehr-worker dlq list` prints)")
    _, letters = _letters(None, None)
    match = [d for d in letters if d.partition == partition and d.offset == offset]
    if not match:
        fail(f"no dead-lettered event at {at}", code=1)
    letter = match[0]
    if body:
        sys.stdout.buffer.write((letter.value or b"") + b"\n")
        return
    doc = {**letter.summary(), "details": letter.details()}
    typer.echo(json.dumps(doc, indent=2, ensure_ascii=False))


@dlq_app.command("replay")
def dlq_replay(
    reason: ReasonOpt = None,
    since: SinceOpt = None,
    to: Annotated[
        str | None, typer.Option("--to", help="Topic to publish to (default: EHRW_KAFKA_TOPIC).")
    ] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Say what would be replayed; publish nothing.")
    ] = False,
) -> None:
    """Re-publish dead-lettered events (original bytes and key) to the input topic after fixing their cause."""
    from connectors.dlq_replay import replay_dead_letters

    s, letters = _letters(reason, since)
    target = to or s.kafka_topic
    if dry_run:
        counts: dict[str, int] = {}
        for letter in letters:
            counts[letter.reason_code] = counts.get(letter.reason_code, 0) + 1
        typer.echo(
            json.dumps({"topic": target, "would_send": len(letters), "by_reason": counts, "dry_run": True})
        )
        return
    try:
        from workers.clients import kafka_client_config

        report = replay_dead_letters(letters, bootstrap=s.kafka_bootstrap, topic=target,
                                     client_config=kafka_client_config(s))
    except RuntimeError as exc:
        fail(str(exc), code=1)
    typer.echo(json.dumps(report.as_dict()))
    typer.echo(f"replayed {report.sent} events from {s.kafka_dlq_topic} to {target}", err=True)


def models_promote(
    version: Annotated[str, typer.Argument(help="The version to make current (as `models list` shows).")],
    task: Annotated[
        str | None, typer.Option("--task", help="protocol or diagnosis (default: whichever has VERSION).")
    ] = None,
    registry: RegistryOpt = None,
) -> None:
    """Make VERSION current after verifying it; running workers switch to it between tasks."""
    reg = open_registry(registry)
    tasks = [task] if task else [t for t in reg.tasks() if version in reg.versions(t)]
    if not tasks:
        fail(f"no task in {reg.root} has a version {version!r}; see `ehr-worker models list`", code=1)
    for name in tasks:
        with registry_errors():
            previous = reg.promote(name, version)
        typer.echo(f"{name}: {previous or '-'} -> {version}")


def models_rollback(
    task: Annotated[
        str | None, typer.Option("--task", help="protocol or diagnosis (default: the one last promoted).")
    ] = None,
    registry: RegistryOpt = None,
) -> None:
    """Make the version current before the last promote current again; workers switch between tasks."""
    reg = open_registry(registry)
    if task is None:
        changed = [(h[-1]["time"], t) for t in reg.tasks() if (h := reg.history(t))]
        if not changed:
            fail("no promote recorded in the registry; name the task with --task", code=1)
        task = max(changed)[1]
    with registry_errors():
        previous, current = reg.rollback(task)
    typer.echo(f"{task}: {previous} -> {current}")
