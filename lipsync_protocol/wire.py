"""InferBatchResponse on the hop without copying the mouths more than once each way.

A batch's mouths are most of the hop's bytes (307 KB a frame at 320x320). The stock protobuf path copies them
four times on the way out (array to bytes, into the message, out of it, into gRPC) and three times on the way in
(out of gRPC's buffer into the message, out of the message, into an array). Here the server writes the message's
wire format straight from the output array (one copy), and the client takes numpy views of the received bytes
(no copy). The bytes are protobuf's own encoding of the same message, so any client parses them unchanged; the
tests check both directions against the protobuf library.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from shared_proto import inference_pb2 as pb

_NUMPY = {pb.DTYPE_UINT8: np.uint8, pb.DTYPE_FLOAT32: np.float32, pb.DTYPE_UNSPECIFIED: np.float32}
_ENUMS = {np.dtype(np.uint8): pb.DTYPE_UINT8, np.dtype(np.float32): pb.DTYPE_FLOAT32}
_OUTPUTS = 1  # InferBatchResponse.outputs
_DATA, _DTYPE, _SHAPE = 1, 2, 3  # RawMouthRegion fields
_VARINT, _I64, _LEN, _I32 = 0, 1, 2, 5


class WireError(ValueError):
    """Bytes that are not an InferBatchResponse."""


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def encode_batch_response(head: pb.InferBatchResponse, outputs: np.ndarray) -> bytes:
    """``head`` (every field but outputs) with one RawMouthRegion per row of ``outputs`` ([B, ...], uint8 or
    float32), encoded as protobuf would encode the whole message."""
    outputs = np.ascontiguousarray(outputs)
    meta = pb.RawMouthRegion(dtype=_ENUMS[outputs.dtype], shape=list(outputs.shape[1:])).SerializeToString()
    size = outputs[0].nbytes if len(outputs) else 0
    data_tag = bytes([_DATA << 3 | _LEN]) + _varint(size)
    region = bytes([_OUTPUTS << 3 | _LEN]) + _varint(len(meta) + len(data_tag) + size) + meta + data_tag
    parts: list[bytes | memoryview] = [head.SerializeToString()]
    for row in outputs:
        parts += (region, memoryview(row.reshape(-1).view(np.uint8)))
    return b"".join(parts)


@dataclass
class DecodedBatch:
    """A decoded InferBatchResponse: its fields but outputs in ``head``, the outputs as arrays viewing ``data``."""

    head: pb.InferBatchResponse
    outputs: list[np.ndarray]
    nbytes: int


def _read_varint(data: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(data) or shift > 63:
            raise WireError("truncated or overlong varint")
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7


def _skip(data: bytes, pos: int, wire: int) -> int:
    if wire == _VARINT:
        return _read_varint(data, pos)[1]
    if wire == _I64:
        return pos + 8
    if wire == _I32:
        return pos + 4
    if wire == _LEN:
        length, pos = _read_varint(data, pos)
        return pos + length
    raise WireError(f"unsupported wire type {wire}")


def _region(data: bytes, start: int, end: int) -> np.ndarray:
    offset = length = -1
    dtype = pb.DTYPE_UNSPECIFIED
    shape: list[int] = []
    pos = start
    while pos < end:
        key, pos = _read_varint(data, pos)
        field, wire = key >> 3, key & 7
        if field == _DATA and wire == _LEN:
            length, pos = _read_varint(data, pos)
            offset, pos = pos, pos + length
        elif field == _DTYPE and wire == _VARINT:
            dtype, pos = _read_varint(data, pos)
        elif field == _SHAPE and wire == _LEN:
            size, pos = _read_varint(data, pos)
            stop = pos + size
            while pos < stop:
                value, pos = _read_varint(data, pos)
                shape.append(value)
        elif field == _SHAPE and wire == _VARINT:
            value, pos = _read_varint(data, pos)
            shape.append(value)
        else:
            pos = _skip(data, pos, wire)
    if pos != end:
        raise WireError("RawMouthRegion runs past its length")
    numpy_dtype = np.dtype(_NUMPY.get(dtype, np.float32))
    if offset < 0:
        offset, length = end, 0
    if length % numpy_dtype.itemsize or (shape and int(np.prod(shape)) * numpy_dtype.itemsize != length):
        raise WireError(f"RawMouthRegion: {length} bytes do not fit shape {shape} of {numpy_dtype.name}")
    array = np.frombuffer(data, numpy_dtype, count=length // numpy_dtype.itemsize, offset=offset)
    return array.reshape(shape) if shape else array


def decode_batch_response(data: bytes) -> DecodedBatch:
    """The inverse of ``encode_batch_response`` for any valid encoding (fields in any order, shapes packed or not)."""
    outputs: list[np.ndarray] = []
    rest: list[bytes] = []
    pos = 0
    while pos < len(data):
        field_start = pos
        key, pos = _read_varint(data, pos)
        field, wire = key >> 3, key & 7
        if field == _OUTPUTS and wire == _LEN:
            length, pos = _read_varint(data, pos)
            if pos + length > len(data):
                raise WireError("an output runs past the message")
            outputs.append(_region(data, pos, pos + length))
            pos += length
        else:
            pos = _skip(data, pos, wire)
            rest.append(data[field_start:pos])
    if pos != len(data):
        raise WireError("truncated message")
    return DecodedBatch(pb.InferBatchResponse.FromString(b"".join(rest)), outputs, len(data))


def serialize_response(response: pb.InferBatchResponse | bytes) -> bytes:
    """The server's serializer for InferBatch: pre-encoded bytes as they are, a message the usual way."""
    return response if isinstance(response, bytes) else response.SerializeToString()
