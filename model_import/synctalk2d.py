"""One import: a SyncTalk_2D checkpoint and dataset in, ``MODELS/ID`` and two config entries out.

Why this order: everything that can be wrong with the inputs (checkpoint, encoder, every frame and landmark
file) is checked before anything is written, and the model folder is assembled beside its final place and
moved in at the end, so a failed import leaves the models folder as it was.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from demo_models.export import save_model
from model_import import card as cards
from model_import import configs, dataset, networks
from model_import.checkpoint import pick_checkpoint, read_state_dict
from model_import.errors import ModelImportError
from service_common.config_source import valid_model_id

Progress = Callable[[str], None]
_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")


def _trainable(state: dict[str, np.ndarray]) -> int:
    return sum(v.size for k, v in state.items() if not k.endswith(_BUFFERS))


def _smoke_test(path: Path, feeds: dict[str, tuple[int, ...]], expected: tuple[int, ...]) -> None:
    """ONNX Runtime loads the file and a zero batch of one has the expected output shape."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {name: np.zeros(shape, np.float32) for name, shape in feeds.items()})
    if out.shape != expected or not np.isfinite(out).all():
        raise ModelImportError(f"{path}: ONNX Runtime returned {out.shape}, expected {expected}")


def _target(models_dir: Path, model_id: str) -> Path:
    if not valid_model_id(model_id):
        raise ModelImportError(f"--name {model_id!r}: expected letters, digits, '.', '_' or '-' (at most 128)")
    target = models_dir / model_id
    if target.exists() and not (target / cards.CARD_NAME).is_file():
        raise ModelImportError(f"{target}: exists and was not written by lipsync-import; choose another --name")
    return target


def _install(staging: Path, target: Path) -> None:
    """Swap the new folder in for an older import of the same id."""
    old = target.with_name(f".{target.name}.old{os.getpid()}")
    if target.exists():
        target.rename(old)
    staging.rename(target)
    shutil.rmtree(old, ignore_errors=True)


def _read_encoder(audio_encoder: Path | None, progress: Progress) -> dict[str, np.ndarray] | None:
    if audio_encoder is None:
        return None
    if not audio_encoder.is_file():
        raise ModelImportError(f"{audio_encoder}: no such audio encoder checkpoint")
    state = networks.encoder_state(read_state_dict(audio_encoder), str(audio_encoder))
    progress(f"audio encoder: {len(state)} tensors from {audio_encoder}")
    return state


def _write_encoder(staging: Path, state: dict[str, np.ndarray], source: Path, progress: Progress) -> None:
    doc = f"SyncTalk_2D ave audio encoder imported from {source.name}; BatchNorm folded."
    path = save_model(networks.build_onnx(networks.ENCODER, state, doc), staging / "audio_encoder.onnx")
    _smoke_test(path, {"mel": (1, 1, 80, 16)}, (1, 512))
    progress("audio_encoder.onnx: written, ONNX Runtime runs it")


def _staging(models_dir: Path, model_id: str) -> Path:
    """A fresh hidden folder beside the target, so that installing it is a rename on the same file system."""
    models_dir.mkdir(parents=True, exist_ok=True)
    staging = models_dir / f".{model_id}.importing{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    return staging


def import_synctalk2d(
    *,
    checkpoint: Path,
    dataset_dir: Path,
    model_id: str,
    models_dir: Path,
    audio_encoder: Path | None = None,
    variant: str = "auto",
    frames: int | None = None,
    progress: Progress = lambda _: None,
) -> dict[str, Any]:
    """Import and return the model card (also written to ``MODELS/ID/model_card.json``)."""
    started = time.perf_counter()
    target = _target(models_dir, model_id)
    ckpt = pick_checkpoint(checkpoint)
    progress(f"checkpoint: reading {ckpt}")
    state = read_state_dict(ckpt)
    variant = networks.check_unet(state, variant, str(ckpt))
    params = _trainable(state)
    progress(f"checkpoint: a SyncTalk_2D {variant} UNet, {len(state)} tensors, {params:,} parameters")
    encoder_state = _read_encoder(audio_encoder, progress)
    avatar = dataset.load_avatar(dataset_dir, frames, progress)

    staging = _staging(models_dir, model_id)
    try:
        size = cards.GEOMETRY[variant]["input_size"]
        doc = f"SyncTalk_2D {variant} UNet ('ave') imported from {ckpt.name}; BatchNorm folded."
        model = networks.build_onnx(variant, state, doc)
        del state  # the graph holds its own (folded) copy of the weights: one less model's worth at the peak
        model_path = save_model(model, staging / "model.onnx")
        del model
        _smoke_test(model_path, {"input": (1, 6, size, size), "audio": (1, 32, 16, 16)}, (1, 3, size, size))
        progress(f"model.onnx: written ({model_path.stat().st_size / 1e6:.1f} MB), ONNX Runtime runs it")
        if encoder_state is not None and audio_encoder is not None:
            _write_encoder(staging, encoder_state, audio_encoder, progress)
        dataset.write_avatar(avatar, staging, progress)
        card = cards.make_card(
            model_id=model_id,
            variant=variant,
            checkpoint=ckpt,
            dataset=dataset_dir,
            encoder=audio_encoder,
            model_dir=staging,
            frames=avatar.frames,
            frame_size=avatar.size,
            params=params,
        )
        cards.write_card(card, staging)
        _install(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    paths = configs.update_configs(models_dir, model_id, variant, encoder_state is not None, progress)
    progress(f"configs: {model_id} added to {paths[0]} and {paths[1]}")
    progress(f"done in {time.perf_counter() - started:.1f} s: {target}")
    return card
