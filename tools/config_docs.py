"""Write or check docs/configuration.md, the configuration reference generated from both services' schemas.

Why a tool: the reference must say what the services read. ``make config-docs`` writes it; ``make
config-docs-check`` (run by .ci/run) and tests/unit/test_config_reference.py fail when the committed file is
not what the schemas give.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from compositing_service.config import SCHEMA as COMPOSITING
from inference_service.config import SCHEMA as INFERENCE
from service_common.config_reference import document

DEFAULT_PATH = Path(__file__).resolve().parent.parent / "docs" / "configuration.md"


def render() -> str:
    return document([(INFERENCE, "Inference service"), (COMPOSITING, "Compositing service")])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    action = parser.add_mutually_exclusive_group(required=True)
    action.add_argument("--write", type=Path, metavar="PATH", help="write the reference to PATH")
    action.add_argument("--check", type=Path, metavar="PATH", help="exit 1 when PATH is not the current reference")
    args = parser.parse_args(argv)
    text = render()
    if args.write:
        args.write.write_text(text)
        return 0
    current = args.check.read_text() if args.check.is_file() else ""
    if current != text:
        print(f"{args.check} is stale: run `make config-docs` and commit it", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
