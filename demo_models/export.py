"""Write every generated model, a demo avatar and ready service configs into one models directory.

Why: a fresh checkout (CI, a laptop, a load test) needs a complete, loadable models root without trained
checkpoints; one call lays it out exactly as the inference and compositing services expect it.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import onnx
import yaml

from demo_models import audio_encoder, avatar, talking, unet328
from lipsync_protocol.geometry import GEOMETRIES

CONFIG_NAME = "inference.yaml"
COMPOSITING_CONFIG_NAME = "compositing.yaml"
AVATAR_DIR = "avatar"
AVATAR_VIDEO = f"{AVATAR_DIR}/background.mp4"
AVATAR_RECTS = f"{AVATAR_DIR}/crop_rects.json"


def save_model(model: onnx.ModelProto, path: Path) -> Path:
    """Validate before writing so a broken graph never reaches the serving side."""
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def _io_spec(shapes: dict[str, list[int]]) -> dict[str, dict[str, object]]:
    return {name: {"shape": ["batch", *shape], "dtype": "float32"} for name, shape in shapes.items()}


# Prepended to both files: a dump cannot carry comments, and the plain-text line must read as a decision.
HEADER = (
    "# Written by lipsync-models for a local demo. server.plaintext: true asks for plain text (no TLS): nothing\n"
    "# here is meant to leave this machine. For TLS and tokens see docs/operations.md; every key is described in\n"
    "# docs/configuration.md. demo160 is the demo for the 160 family's geometry (a 168 crop, inner 160, bilinear).\n"
)


def dump(config: dict[str, Any]) -> str:
    return HEADER + yaml.safe_dump(config, sort_keys=False, default_flow_style=False)


def _models(include_unet328: bool) -> list[str]:
    return ["demo", "demo160", *(["unet328"] if include_unet328 else [])]


def inference_config(models_root: Path, include_unet328: bool = True) -> dict[str, Any]:
    """The inference service config; models_root is absolute so the file works from any cwd."""
    encoders = {"demo": "demo/audio_encoder.onnx", "demo160": "demo/audio_encoder.onnx"}
    models: dict[str, dict[str, Any]] = {}
    for name in _models(include_unet328):
        entry: dict[str, Any] = {
            "model_path": f"{name}/model.onnx",
            "audio_encoder_path": encoders.get(name, f"{name}/audio_encoder.onnx"),
        }
        if name == "demo160":
            entry["geometry"] = "160"  # the family's name: a string, as the schema reads it
        entry["preload"] = name == "demo"
        models[name] = entry
    return {
        "models_root": str(models_root.resolve()),
        "server": {"port": ":50051", "plaintext": True, "max_message_size_mb": 64, "worker_count_per_gpu": 2},
        "gpus": {"enabled": False, "count": 0},
        "capacity": {"max_models": 4, "max_memory_gb": 8, "eviction_policy": "lfu"},
        "onnx": {"intra_op_threads": 0, "inter_op_threads": 1},
        "models": models,
    }


def compositing_config(models_root: Path, include_unet328: bool = True) -> dict[str, Any]:
    """The compositing service config: every model shares the generated demo avatar (DIR/avatar)."""
    models: dict[str, dict[str, Any]] = {}
    for name in _models(include_unet328):
        models[name] = {
            "model_path": f"{name}/model.onnx",
            "background_dir": AVATAR_VIDEO,
            "crop_rects_path": AVATAR_RECTS,
            "num_frames": avatar.NUM_FRAMES,
            "preload_backgrounds": name == "demo",
            **({"geometry": "160"} if name == "demo160" else {}),
        }
    return {
        "models_root": str(models_root.resolve()),
        "server": {"port": ":50052", "plaintext": True, "max_message_size_mb": 64},
        "inference_server": {"url": "127.0.0.1:50051", "plaintext": True, "timeout_seconds": 30, "max_retries": 3},
        "inference": {"mode": "remote", "config": CONFIG_NAME},
        "capacity": {
            "max_models": 4,
            "background_cache_frames": 250,
            "background_cache_mb": 2048,
            "eviction_policy": "lfu",
        },
        "output": {"format": "jpeg", "jpeg_quality": 75, "frame_order": "ping_pong"},
        "models": models,
    }


def render_config(models_root: Path, include_unet328: bool = True) -> str:
    return dump(inference_config(models_root, include_unet328))


def render_compositing_config(models_root: Path, include_unet328: bool = True) -> str:
    return dump(compositing_config(models_root, include_unet328))


def write_all(out_dir: Path, seed: int = 0, include_unet328: bool = True, include_avatar: bool = True) -> dict:
    """Generate all models under out_dir and return what was written, with sizes and timings.

    Without the unet328 both configs list only the demo model, so they never point at missing files.
    Without the avatar neither the avatar nor compositing.yaml (which needs it) is written.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    result: dict = {"models_root": str(out_dir.resolve()), "seed": seed}

    t0 = time.perf_counter()
    demo_dir = out_dir / "demo"
    result["demo"] = {
        "model_path": str(save_model(talking.build_demo(seed), demo_dir / "model.onnx")),
        "audio_encoder_path": str(save_model(talking.build_demo_audio_encoder(seed), demo_dir / "audio_encoder.onnx")),
    }
    geometry160 = GEOMETRIES["160"]
    result["demo160"] = {
        "model_path": str(save_model(talking.build_demo(seed, geometry160), out_dir / "demo160" / "model.onnx"))
    }

    if include_unet328:
        unet_dir = out_dir / "unet328"
        model, stats = unet328.build_unet328_with_stats(seed)
        enc, enc_stats = audio_encoder.build_audio_encoder_with_stats(seed)
        info = {
            "params": stats.params,
            "params_onnx": stats.params_folded,
            "gmac_per_frame": round(stats.gmac, 4),
            "inputs": _io_spec(unet328.INPUTS),
            "outputs": _io_spec(unet328.OUTPUTS),
            "audio_encoder": {
                "params": enc_stats.params,
                "params_onnx": enc_stats.params_folded,
                "gmac_per_chunk": round(enc_stats.gmac, 4),
                "inputs": _io_spec(audio_encoder.INPUTS),
                "outputs": _io_spec(audio_encoder.OUTPUTS),
            },
            "seed": seed,
            "note": "random weights with the SyncTalk_2D 328 (ave) architecture; BatchNorm folded",
        }
        result["unet328"] = {
            "model_path": str(save_model(model, unet_dir / "model.onnx")),
            "audio_encoder_path": str(save_model(enc, unet_dir / "audio_encoder.onnx")),
            **{k: info[k] for k in ("params", "params_onnx", "gmac_per_frame")},
            "audio_encoder_params": enc_stats.params,
            "audio_encoder_gmac": round(enc_stats.gmac, 4),
        }
        json_path = unet_dir / "model.json"
        json_path.write_text(json.dumps(info, indent=2) + "\n")
        result["unet328"]["info_path"] = str(json_path)

    config_path = out_dir / CONFIG_NAME
    config_path.write_text(render_config(out_dir, include_unet328))
    result["config_path"] = str(config_path)

    if include_avatar:
        info = avatar.write_avatar(out_dir / AVATAR_DIR)
        result["avatar_video"] = info["avatar_video"]
        result["crop_rects_path"] = info["crop_rects_path"]
        result["avatar"] = {k: info[k] for k in ("num_frames", "encoder", "seconds")}
        compositing_path = out_dir / COMPOSITING_CONFIG_NAME
        compositing_path.write_text(render_compositing_config(out_dir, include_unet328))
        result["compositing_config_path"] = str(compositing_path)
    result["seconds"] = round(time.perf_counter() - t0, 3)
    return result
