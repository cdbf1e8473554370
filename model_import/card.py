"""The model card: where an imported model came from and the image geometry it must be served with.

Why a card: a UNet only lip-syncs on exactly the crops it was made for, and the ONNX file cannot say which
crops those are. The card records the geometry, the sources and their hashes, so an imported model can be
checked against its checkpoint later and served with the right geometry.
"""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from model_import import __version__

CARD_NAME = "model_card.json"
CARD_FORMAT = "lipsync-model-card/1"

# What SyncTalk_2D's inference scripts do with each variant (docs/models.md, "Geometry").
GEOMETRY: dict[str, dict[str, Any]] = {
    "328": {
        "crop_size": 328,
        "inner_offset": 4,
        "input_size": 320,
        "mask_rect_xywh": [5, 5, 310, 305],
        "crop_interpolation": "INTER_CUBIC",
        "training_crop_interpolation": "INTER_LINEAR",
        "paste_interpolation": "INTER_CUBIC",
        "note": (
            "SyncTalk_2D trains 328 models on bilinear crops (its cv2.resize(crop, (328, 328), cv2.INTER_AREA) "
            "passes INTER_AREA as the dst argument, so the default INTER_LINEAR applies) but runs them on "
            "bicubic (INTER_CUBIC) crops; this server follows its inference"
        ),
    },
    "160": {
        "crop_size": 168,
        "inner_offset": 4,
        "input_size": 160,
        "mask_rect_xywh": [5, 5, 150, 145],
        "crop_interpolation": "INTER_LINEAR",
        "training_crop_interpolation": "INTER_LINEAR",
        "paste_interpolation": "INTER_LINEAR",
        "note": (
            "bilinear in training and inference alike: the 168 crop's cv2.resize also passes INTER_AREA as dst, "
            "and the paste-back resize uses the default INTER_LINEAR"
        ),
    },
}


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def make_card(
    *,
    model_id: str,
    variant: str,
    checkpoint: Path,
    dataset: Path,
    encoder: Path | None,
    model_dir: Path,
    frames: list[Path],
    frame_size: tuple[int, int],
    params: int,
) -> dict[str, Any]:
    """The card's content; hashes are taken of the files as they are on disk now."""
    encoder_files = model_dir / "audio_encoder.onnx"
    return {
        "format": CARD_FORMAT,
        "model_id": model_id,
        "source": {
            "kind": "SyncTalk_2D",
            "checkpoint": str(checkpoint.resolve()),
            "checkpoint_sha256": sha256_file(checkpoint),
            "dataset": str(dataset.resolve()),
        },
        "variant": variant,
        "geometry": GEOMETRY[variant],
        "model": {
            "path": "model.onnx",
            "sha256": sha256_file(model_dir / "model.onnx"),
            "inputs": {"input": ["batch", 6, *[GEOMETRY[variant]["input_size"]] * 2], "audio": ["batch", 32, 16, 16]},
            "outputs": {"output": ["batch", 3, *[GEOMETRY[variant]["input_size"]] * 2]},
            "params": params,
            "batchnorm": "folded into the convs",
        },
        "audio_encoder": (
            {
                "source": str(encoder.resolve()),
                "source_sha256": sha256_file(encoder),
                "path": "audio_encoder.onnx",
                "sha256": sha256_file(encoder_files),
                "inputs": {"mel": ["batch", 1, 80, 16]},
                "outputs": {"embedding": ["batch", 512]},
            }
            if encoder
            else {"source": None, "note": "none imported: the inference service's top-level audio_encoder_path"}
        ),
        "avatar": {
            "frames_dir": "frames",
            "crop_rects": "crop_rects.json",
            "frame_count": len(frames),
            "frame_width": frame_size[0],
            "frame_height": frame_size[1],
            "first_frame": frames[0].name,
            "last_frame": frames[-1].name,
        },
        "importer": {"name": "lipsync-import", "version": __version__},
        "imported_at": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


def write_card(card: dict[str, Any], model_dir: Path) -> Path:
    path = model_dir / CARD_NAME
    path.write_text(json.dumps(card, indent=2) + "\n")
    return path
