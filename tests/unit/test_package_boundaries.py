"""What each side loads: the compositing service in remote mode and the client never import the engine."""

from __future__ import annotations

import subprocess
import sys

ENGINE = ("onnxruntime", "inference_service.engine", "inference_service.core")
SERVERS = ("inference_service", "compositing_service", "service_common", "lipsync_cluster", "demo_models")


def loaded(statement: str) -> set[str]:
    """The modules a fresh interpreter has after ``statement``."""
    code = f"{statement}\nimport sys\nprint('\\n'.join(sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return set(out.split())


def test_the_compositing_service_does_not_load_onnx_runtime_in_remote_mode() -> None:
    modules = loaded("import compositing_service.server")
    assert not {m for m in modules if m.split(".")[0] == "onnxruntime" or m in ENGINE}


def test_the_client_imports_only_the_protocol_and_the_generated_code() -> None:
    modules = loaded("import lipsync_client, lipsync_client.cli, lipsync_client.session, lipsync_client.media")
    assert not {m for m in modules if m.split(".")[0] in SERVERS}
    assert not {m for m in modules if m.split(".")[0] in ("onnxruntime", "cv2", "av", "soxr")}  # PyAV, soxr: lazy
    assert {"lipsync_protocol.timing", "shared_proto.compositing_pb2"} <= modules
