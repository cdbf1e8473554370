"""The example configs under deploy/ stay valid as the config keys change."""

from __future__ import annotations

from pathlib import Path

from compositing_service.config import load_config as load_compositing
from inference_service.config import load_config as load_inference

DEPLOY = Path(__file__).resolve().parents[2] / "deploy" / "configs"


def test_deploy_configs_parse(tmp_path: Path) -> None:
    inference = load_inference(DEPLOY / "inference.yaml", {"models_root": str(tmp_path)}, environ={})
    assert inference.port == 50051 and {"demo", "unet328"} <= set(inference.models)
    compositing = load_compositing(DEPLOY / "compositing.yaml", {"models_root": str(tmp_path)}, environ={})
    assert compositing.inference_targets == ("dns:///inference:50051",)
    assert compositing.models["demo"].background == (tmp_path / "avatar" / "background.mp4").resolve()
