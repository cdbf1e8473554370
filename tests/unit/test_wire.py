"""The hop's InferBatchResponse codec is protobuf's own encoding: checked both ways against the library."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lipsync_protocol.wire import WireError, decode_batch_response, encode_batch_response, serialize_response
from shared_proto import inference_pb2 as pb

heads = st.builds(
    pb.InferBatchResponse,
    inference_time_ms=st.floats(0, 1e6, width=32),
    audio_processing_ms=st.floats(0, 1e3, width=32),
    success=st.booleans(),
    error=st.text(max_size=20),
    worker_id=st.integers(-(2**31), 2**31 - 1),
    gpu_id=st.integers(-1, 7),  # -1: a negative int32 is a 10-byte varint
    queue_time_ms=st.floats(0, 1e3, width=32),
    device=st.sampled_from(["cpu", "cuda:0", ""]),
    utterance_frames=st.integers(0, 10**6),
    batch_frames=st.integers(0, 64),
    batch_requests=st.integers(0, 64),
    missing_visual=st.lists(st.integers(0, 63), max_size=5),
)


@settings(max_examples=60, deadline=None)
@given(head=heads, frames=st.integers(0, 4), side=st.integers(1, 9), dtype=st.sampled_from([np.uint8, np.float32]))
def test_encoding_is_what_protobuf_parses(head: pb.InferBatchResponse, frames: int, side: int, dtype) -> None:
    outputs = (np.arange(frames * 3 * side * side) % 251).astype(dtype).reshape(frames, 3, side, side)
    parsed = pb.InferBatchResponse.FromString(encode_batch_response(head, outputs))
    expected = pb.InferBatchResponse()
    expected.CopyFrom(head)
    enum = pb.DTYPE_UINT8 if dtype == np.uint8 else pb.DTYPE_FLOAT32
    for row in outputs:
        expected.outputs.add(data=row.tobytes(), dtype=enum, shape=[3, side, side])
    assert parsed == expected


@settings(max_examples=60, deadline=None)
@given(head=heads, frames=st.integers(0, 4), side=st.integers(1, 9), packed=st.booleans())
def test_decoding_reads_protobufs_encoding(head: pb.InferBatchResponse, frames: int, side: int, packed: bool) -> None:
    message = pb.InferBatchResponse()
    message.CopyFrom(head)
    outputs = np.random.default_rng(side).integers(0, 256, (frames, 3, side, side), dtype=np.uint8)
    for row in outputs:
        message.outputs.add(data=row.tobytes(), dtype=pb.DTYPE_UINT8, shape=[3, side, side])
    data = message.SerializeToString()
    decoded = decode_batch_response(data)
    assert decoded.nbytes == len(data)
    assert len(decoded.outputs) == frames and all(
        np.array_equal(got, want) for got, want in zip(decoded.outputs, outputs, strict=True)
    )
    expected = pb.InferBatchResponse()
    expected.CopyFrom(head)
    assert decoded.head == expected
    if frames:
        assert decoded.outputs[0].base is not None  # a view of the received bytes, not a copy


def test_unpacked_shapes_other_fields_and_refusals() -> None:
    # shape as unpacked varints (what an encoder may write), an unknown field inside a region, fields out of order
    region = bytes([0x18, 2, 0x18, 2, 0x10, 2, 0x50, 7]) + bytes([0x0A, 4]) + b"\x01\x02\x03\x04"
    data = pb.InferBatchResponse(device="cpu").SerializeToString() + bytes([0x0A, len(region)]) + region
    decoded = decode_batch_response(data)
    assert decoded.head.device == "cpu" and decoded.outputs[0].tolist() == [[1, 2], [3, 4]]
    for broken in (data[:-1], bytes([0x0A, 0x80]), data + bytes([0x0B])):
        with pytest.raises(WireError):
            decode_batch_response(broken)
    bad_shape = bytes([0x1A, 1, 3, 0x10, 2, 0x0A, 4]) + b"\x00" * 4
    with pytest.raises(WireError, match="do not fit"):
        decode_batch_response(bytes([0x0A, len(bad_shape)]) + bad_shape)
    assert serialize_response(b"raw") == b"raw"
    assert (
        serialize_response(pb.InferBatchResponse(success=True))
        == pb.InferBatchResponse(success=True).SerializeToString()
    )
