"""Compare freshly generated protobuf code with the committed copy.

Version stamps (protoc and grpcio-tools versions) are ignored so that a newer
grpcio-tools on a fresh machine does not fail the check by itself.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

STAMPS = re.compile(
    r"^(# Protobuf Python Version:.*|GRPC_GENERATED_VERSION = .*|\s+\d+,\s*|\s*_runtime_version\.Domain\.PUBLIC,)$"
)


def normalized(path: Path) -> list[str]:
    return [line for line in path.read_text().splitlines() if not STAMPS.match(line)]


def main(fresh_dir: str, committed_dir: str) -> int:
    fresh, committed = Path(fresh_dir), Path(committed_dir)
    stale = []
    for generated in sorted(fresh.glob("*_pb2*.py*")):
        mine = committed / generated.name
        if not mine.exists() or normalized(mine) != normalized(generated):
            stale.append(generated.name)
    if stale:
        print(f"generated protobuf code is stale: {', '.join(stale)}; run `make proto` and commit", file=sys.stderr)
        return 1
    print("generated protobuf code is current")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
