"""`lipsync-models`: generate a complete models root (demo + random-weight unet328, demo avatar) and configs."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from demo_models.export import write_all


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="lipsync-models",
        description=(
            "Write demo and stand-in ONNX models, a demo avatar, inference.yaml and compositing.yaml into a "
            "models directory."
        ),
    )
    parser.add_argument("--out", required=True, type=Path, help="models root to create or overwrite")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random unet328 weights")
    parser.add_argument(
        "--skip-unet328",
        action="store_true",
        help="only the small demo model (the ~46 MB unet328 is not written nor listed in the config)",
    )
    parser.add_argument(
        "--skip-avatar",
        action="store_true",
        help="no demo avatar (avatar/background.mp4, avatar/crop_rects.json) and no compositing.yaml",
    )
    args = parser.parse_args(argv)
    result = write_all(
        args.out, seed=args.seed, include_unet328=not args.skip_unet328, include_avatar=not args.skip_avatar
    )
    json.dump(result, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
