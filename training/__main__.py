"""``python -m training build|pipeline|methods|profiles``

- ``build [--task protocol|diagnosis|all]``: the registry's models, one pipeline per task.
- ``pipeline --task protocol|diagnosis``: one model, data -> train -> distill -> prune -> export ->
  quantize -> calibrate -> evaluate -> register, with the evaluation report in the version folder.
- ``methods --task protocol|diagnosis``: the method comparison (full, LoRA, QLoRA-4bit, distilled
  student, pruned) on the ``methods`` profile, as a markdown table.
- ``profiles [NAME]``: print the profiles (plain values; override any with ``--set KEY=VALUE``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from schemas.tasks import TASKS
from training.profiles import PROFILES, Profile, named_profile


def _default_registry() -> str:
    return os.environ.get("EHRW_MODEL_REGISTRY", "registry")


def _common(parser: argparse.ArgumentParser, *, task_choices: list[str], task_default: str | None) -> None:
    if task_default is None:
        parser.add_argument("--task", choices=task_choices, required=True)
    else:
        parser.add_argument("--task", choices=task_choices, default=task_default)
    parser.add_argument("--profile", default="default", help="default (the shipped models) or tiny (tests/CI)")
    parser.add_argument("--registry", default=_default_registry(),
                        help="registry folder (default: $EHRW_MODEL_REGISTRY or ./registry)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--base-model", default=None,
                        help="a local Hugging Face model folder (default: the bundled all-MiniLM-L6-v2)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a profile value, e.g. --set method=lora --set num_layers=2 (JSON values)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars or stage logs")


def _overrides(parser: argparse.ArgumentParser, items: list[str]) -> dict:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            parser.error(f"--set expects KEY=VALUE, got {item!r}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training", description="Train, compress, export and register ehr-worker models.")
    sub = parser.add_subparsers(dest="command", required=True)

    b = sub.add_parser("build", help="build the models: one pipeline per task, published as CURRENT")
    _common(b, task_choices=[*TASKS, "all"], task_default="all")
    b.add_argument("--model-card-base-url", default=None, help="public URL prefix under which MODEL_CARD.md files are served")

    pl = sub.add_parser("pipeline", help="one model: data -> train -> distill -> prune -> export -> quantize -> "
                                         "calibrate -> evaluate -> register")
    _common(pl, task_choices=list(TASKS), task_default=None)
    pl.add_argument("--model-card-base-url", default=None)
    pl.add_argument("--not-current", action="store_true", help="register the version without making it CURRENT")
    pl.add_argument("--keep-dir", default=None, help="also keep the work files (fp32/int8 ONNX) in this folder")
    pl.add_argument("--catalog", default=None, metavar="CSV_OR_JSON",
                    help="protocol: a hospital's own catalog (CSV: code,display,modality,region,contrast[,system,loinc,"
                         "examples]; or a FHIR CodeSystem JSON) instead of the 34 default protocols")

    m = sub.add_parser("methods", help="compare full / LoRA / QLoRA-4bit / distilled / pruned on one task")
    _common(m, task_choices=list(TASKS), task_default=None)
    m.set_defaults(profile="methods", registry="registry-methods")
    m.add_argument("--only", default=None, help="comma-separated subset of the methods (default: all)")
    m.add_argument("--out", default=None, help="markdown file for the table (default: <registry>/METHODS-<task>.md)")

    p = sub.add_parser("profiles", help="print the build profiles")
    p.add_argument("name", nargs="?")

    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    if args.command == "profiles":
        if args.name and args.name not in PROFILES:
            parser.error(f"unknown profile {args.name!r} (choose from {', '.join(PROFILES)})")
        chosen = {args.name: PROFILES[args.name]} if args.name else PROFILES
        print(json.dumps(chosen, indent=2))
        return 0

    if not args.quiet:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
        logging.getLogger("training").setLevel(logging.INFO)
    if args.profile not in PROFILES:
        parser.error(f"unknown profile {args.profile!r} (choose from {', '.join(PROFILES)})")
    tasks = list(TASKS) if args.task == "all" else [args.task]
    overrides = _overrides(parser, args.set)
    if getattr(args, "catalog", None):
        if args.task != "protocol":
            parser.error("--catalog applies to --task protocol")
        from schemas.catalog import load_protocol_catalog

        try:
            load_protocol_catalog(args.catalog)
        except ValueError as exc:
            parser.error(str(exc))
        overrides["catalog"] = str(Path(args.catalog).resolve())
    try:
        profile = {task: Profile.from_values(overrides, base=named_profile(args.profile, task)) for task in tasks}
    except KeyError as exc:
        parser.error(f"--set: {exc.args[0]}")
    try:
        if args.command == "build":
            from training.build import build_models

            built = build_models(Path(args.registry), tasks=tasks, profile=profile, seed=args.seed,
                                 progress=not args.quiet, base_model=args.base_model,
                                 model_card_base_url=args.model_card_base_url)
            for task, path in built.items():
                print(f"{task}\t{path}")
            return 0
        if args.command == "pipeline":
            from training.pipeline import run_pipeline

            dest, row = run_pipeline(args.task, Path(args.registry), profile=profile, seed=args.seed,
                                     progress=not args.quiet, base_model=args.base_model,
                                     make_current=not args.not_current, model_card_base_url=args.model_card_base_url,
                                     keep_dir=args.keep_dir)
            if not args.quiet:
                from training.evaluate import summary_table

                print("\n" + summary_table([row]), file=sys.stderr)
                print(f"report: {dest / 'report' / 'REPORT.md'}", file=sys.stderr)
            print(f"{args.task}\t{dest}")
            return 0
        if args.command == "methods":
            from training.methods import METHOD_VARIANTS, compare_methods

            only = [x.strip() for x in args.only.split(",")] if args.only else list(METHOD_VARIANTS)
            unknown = [x for x in only if x not in METHOD_VARIANTS]
            if unknown:
                parser.error(f"unknown method(s) {', '.join(unknown)} (choose from {', '.join(METHOD_VARIANTS)})")
            out = Path(args.out) if args.out else Path(args.registry) / f"METHODS-{args.task}.md"
            table = compare_methods(args.task, Path(args.registry), profile=profile, methods=only, seed=args.seed,
                                    progress=not args.quiet, base_model=args.base_model, out=out)
            print(table)
            return 0
    except KeyboardInterrupt:
        print("interrupted; nothing was registered for the unfinished task", file=sys.stderr)
        return 130
    parser.error(f"unknown command {args.command!r}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
