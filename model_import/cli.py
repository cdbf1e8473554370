"""`lipsync-import synctalk2d ...`: a SyncTalk_2D training run in, a served model out (docs/models.md).

Progress goes to stderr, the model card (JSON) to stdout; a bad input exits 2 with one line naming the file.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from model_import.errors import ModelImportError
from model_import.synctalk2d import import_synctalk2d

PROG = "lipsync-import"


def _positive(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"expected a positive number of frames, got {value}")
    return number


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog=PROG, description="Import a trained lip-sync model into a models folder.")
    commands = top.add_subparsers(dest="command", required=True)
    p = commands.add_parser(
        "synctalk2d",
        help="a SyncTalk_2D checkpoint and its dataset",
        description=(
            "Convert a SyncTalk_2D UNet checkpoint (and optionally its audio encoder) to ONNX, turn the dataset's "
            "frames and landmarks into an avatar, and add the model to MODELS/inference.yaml and "
            "MODELS/compositing.yaml."
        ),
    )
    p.add_argument("--checkpoint", required=True, type=Path, help="a .pth file, or a folder: its highest <epoch>.pth")
    p.add_argument("--dataset", required=True, type=Path, help="dataset/<name>, with full_body_img/ and landmarks/")
    p.add_argument("--name", required=True, help="the model id to serve it under")
    p.add_argument("--models-dir", required=True, type=Path, help="the models folder (models_root of the services)")
    p.add_argument(
        "--audio-encoder",
        type=Path,
        help="the ave audio encoder checkpoint; without it the inference service's top-level encoder is used",
    )
    p.add_argument("--variant", choices=["auto", "328", "160"], default="auto", help="default: from the keys")
    p.add_argument("--frames", type=_positive, help="import only the first N frames")
    return top


def _progress(message: str) -> None:
    print(f"{PROG}: {message}", file=sys.stderr, flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        card = import_synctalk2d(
            checkpoint=args.checkpoint,
            dataset_dir=args.dataset,
            model_id=args.name,
            models_dir=args.models_dir,
            audio_encoder=args.audio_encoder,
            variant=args.variant,
            frames=args.frames,
            progress=_progress,
        )
    except ModelImportError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a folder we cannot write, a full disk: the message names the path
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    json.dump(card, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
