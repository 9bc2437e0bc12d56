"""``python -m training build [--task protocol|diagnosis|all] [--profile default|tiny] [--registry PATH] [--seed N]``"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path


def _default_registry() -> str:
    return os.environ.get("EHRW_MODEL_REGISTRY", "registry")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training", description="Train, export and register ehr-worker models.")
    sub = parser.add_subparsers(dest="command", required=True)

    b = sub.add_parser("build", help="build the models: data -> train -> export -> quantize -> calibrate -> evaluate -> register")
    b.add_argument("--task", choices=["protocol", "diagnosis", "all"], default="all")
    b.add_argument("--profile", default="default", help="default (the shipped models) or tiny (tests/CI)")
    b.add_argument("--registry", default=_default_registry(), help="registry folder (default: $EHRW_MODEL_REGISTRY or ./registry)")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--base-model", default=None, help="a local Hugging Face model folder (default: bundled all-MiniLM-L6-v2)")
    b.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a profile value for the chosen task(s), e.g. --set num_layers=2 (JSON values)")
    b.add_argument("--model-card-base-url", default=None, help="public URL prefix under which MODEL_CARD.md files are served")
    b.add_argument("--quiet", action="store_true", help="no progress bars or stage logs")

    p = sub.add_parser("profiles", help="print the build profiles")
    p.add_argument("name", nargs="?")

    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from training.build import PROFILES, TASKS, build_models, resolve_profile

    if args.command == "profiles":
        chosen = {args.name: PROFILES[args.name]} if args.name else PROFILES
        print(json.dumps(chosen, indent=2))
        return 0

    if not args.quiet:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
        logging.getLogger("training").setLevel(logging.INFO)
    tasks = list(TASKS) if args.task == "all" else [args.task]
    profile: str | dict = args.profile
    if args.profile not in PROFILES:
        parser.error(f"unknown profile {args.profile!r} (choose from {', '.join(PROFILES)})")
    if args.set:
        overrides = {}
        for item in args.set:
            key, sep, value = item.partition("=")
            if not sep:
                parser.error(f"--set expects KEY=VALUE, got {item!r}")
            try:
                overrides[key] = json.loads(value)
            except json.JSONDecodeError:
                overrides[key] = value
        profile = {task: {**resolve_profile(args.profile, task), **overrides} for task in tasks}
    try:
        built = build_models(Path(args.registry), tasks=tasks, profile=profile, seed=args.seed,
                             progress=not args.quiet, base_model=args.base_model,
                             model_card_base_url=args.model_card_base_url)
    except KeyboardInterrupt:
        print("interrupted; nothing was registered for the unfinished task", file=sys.stderr)
        return 130
    for task, path in built.items():
        print(f"{task}\t{path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
