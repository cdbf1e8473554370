"""Failures inside the server: unexpected ones become INTERNAL, overload becomes RESOURCE_EXHAUSTED."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
from support import ServerThread, make_config

from inference_service import server as server_module
from inference_service.servicer import InferenceServicer
from service_common.grpc_glue import translate_errors
from shared_proto import inference_pb2 as pb
from shared_proto import inference_pb2_grpc


def test_unexpected_exception_is_internal_and_server_survives(models_dir, monkeypatch) -> None:
    async def explode(self, request, context):
        raise ZeroDivisionError("boom")

    exploding = type("Exploding", (InferenceServicer,), {"ListModels": translate_errors(explode)})
    monkeypatch.setattr(server_module, "InferenceServicer", exploding)
    server = ServerThread(make_config(models_dir))
    try:
        with grpc.insecure_channel(server.address) as channel:
            stub = inference_pb2_grpc.InferenceServiceStub(channel)
            with pytest.raises(grpc.RpcError) as err:
                stub.ListModels(pb.ListModelsRequest())
            assert err.value.code() == grpc.StatusCode.INTERNAL
            assert "ZeroDivisionError" in err.value.details()
            assert stub.Health(pb.HealthRequest()).healthy
    finally:
        server.stop()


@pytest.mark.slow  # unet328: loaded, then batches of it queued
def test_full_queue_answers_resource_exhausted_with_retry_hint(models_dir) -> None:
    server = ServerThread(make_config(models_dir, **{"server.max_queue_per_device": 1}))
    request = pb.InferBatchRequest(
        model_id="unet328",
        visual_frames=np.zeros((2, 6, 320, 320), np.uint8).tobytes(),
        visual_dtype=pb.DTYPE_UINT8,
        audio_features=np.zeros((32, 16, 16), np.float32).tobytes(),
    )
    try:
        with grpc.insecure_channel(server.address) as channel:
            stub = inference_pb2_grpc.InferenceServiceStub(channel)
            stub.LoadModel(pb.LoadModelRequest(model_id="unet328"))
            futures = [stub.InferBatch.future(request) for _ in range(6)]
            codes, hints = [], []
            for future in futures:
                try:
                    future.result()
                    codes.append(grpc.StatusCode.OK)
                except grpc.RpcError as exc:
                    codes.append(exc.code())
                    hints.append(dict(exc.trailing_metadata() or ()).get("retry-after-ms"))
            assert grpc.StatusCode.OK in codes
            assert grpc.StatusCode.RESOURCE_EXHAUSTED in codes
            assert hints and all(h == "100" for h in hints)
            assert stub.Health(pb.HealthRequest()).healthy
    finally:
        server.stop()
