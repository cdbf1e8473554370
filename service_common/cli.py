"""The command line both servers share: config file, overrides, logging, exit codes."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

from .allocator import tune_malloc
from .config_source import LOG_LEVELS, ConfigError
from .request_log import configure_logging

C = TypeVar("C")


def parser_for(prog: str, description: str | None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--config", type=Path, help="YAML config file")
    parser.add_argument("--port", type=int, help="listen port (overrides server.port)")
    parser.add_argument("--host", help="listen address (default 0.0.0.0)")
    parser.add_argument("--models-root", help="overrides models_root")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override any config key, e.g. --set capacity.max_models=2",
    )
    parser.add_argument(
        "--log-level",
        default=None,
        type=log_level_arg,
        help="debug, info, warn(ing) or error, any case (default: logging.level)",
    )
    parser.add_argument("--log-format", choices=["text", "json"], help="overrides logging.format")
    parser.add_argument(
        "--metrics-port", type=int, help="serve Prometheus metrics on this port (0: a free one); sets metrics.enabled"
    )
    return parser


def log_level_arg(text: str) -> str:
    try:
        return LOG_LEVELS[text.strip().lower()]
    except KeyError:
        raise argparse.ArgumentTypeError(f"expected debug, info, warn(ing) or error, got {text!r}") from None


def overrides_from(args: argparse.Namespace) -> list[str]:
    overrides = list(args.set)
    if args.models_root:
        overrides.append(f"models_root={args.models_root}")
    if args.port is not None:
        overrides.append(f"server.port={args.port}")
    if args.host:
        overrides.append(f"server.host={args.host}")
    if args.metrics_port is not None:
        overrides += ["metrics.enabled=true", f"metrics.port={args.metrics_port}"]
    if args.log_format:
        overrides.append(f"logging.format={args.log_format}")
    return overrides


def run_server(
    prog: str,
    args: argparse.Namespace,
    overrides: list[str],
    load: Callable[[Path | None, list[str]], C],
    serve: Callable[[C], Coroutine[Any, Any, None]],
) -> int:
    """Load the config (exit 2 naming the bad key), then serve until SIGTERM (exit 0) or a start failure (1)."""
    try:
        config = load(args.config, overrides)
    except ConfigError as exc:
        print(f"{prog}: invalid config: {exc}", file=sys.stderr)
        return 2
    serving = getattr(config, "serving", None)
    configure_logging(
        args.log_level or getattr(config, "log_level", "INFO"),
        serving.log_format if serving is not None else "text",
    )
    if getattr(config, "tune_malloc", True):
        tune_malloc()
    try:
        asyncio.run(serve(config))
    except RuntimeError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 1
    return 0
