"""Tensors on the wire: little-endian raw bytes with a dtype and a shape, viewed with ``numpy.frombuffer``.

Both sides agree on these: the element types (the DType enum), the per-frame audio window, and the checks that a
request's bytes hold what its fields say. A view is not a copy, and a malformed request fails here in
microseconds, naming the field, before any work is queued.
"""

from __future__ import annotations

import numpy as np

from .errors import InvalidArgument

# DType (shared by both APIs): unset is float32, the type of every tensor of the old API.
DTYPE_UNSPECIFIED, DTYPE_FLOAT32, DTYPE_UINT8 = 0, 1, 2
NUMPY_DTYPES = {
    DTYPE_UNSPECIFIED: np.dtype(np.float32),
    DTYPE_FLOAT32: np.dtype(np.float32),
    DTYPE_UINT8: np.dtype(np.uint8),
}
DTYPE_ENUMS = {np.dtype(np.float32): DTYPE_FLOAT32, np.dtype(np.uint8): DTYPE_UINT8}


def numpy_dtype(value: int, field: str) -> np.dtype:
    """The numpy type of a DType field's value."""
    try:
        return NUMPY_DTYPES[value]
    except KeyError:
        raise InvalidArgument(f"{field}: expected DTYPE_FLOAT32 or DTYPE_UINT8, got {value}") from None


def frombuffer(data: bytes, dtype: np.dtype | type, field: str) -> np.ndarray:
    dtype = np.dtype(dtype).newbyteorder("<")
    if len(data) % dtype.itemsize:
        raise InvalidArgument(
            f"{field}: {len(data)} bytes is not a whole number of {dtype.name} values ({dtype.itemsize} bytes each)"
        )
    return np.frombuffer(data, dtype=dtype)


def batch_of(flat: np.ndarray, item_shape: tuple[int, ...], batch_size: int, field: str) -> np.ndarray:
    """Reshape a flat array to [B, *item_shape]; ``batch_size`` 0 means infer it."""
    per_item = int(np.prod(item_shape))
    shape_text = "x".join(map(str, item_shape))
    if flat.size == 0 or flat.size % per_item:
        raise InvalidArgument(
            f"{field}: expected a multiple of {per_item} {flat.dtype.name} values ([B,{shape_text}]), got {flat.size}"
        )
    found = flat.size // per_item
    if batch_size and found != batch_size:
        raise InvalidArgument(f"{field}: batch_size is {batch_size} but {field} holds {found} frames of [{shape_text}]")
    return flat.reshape(found, *item_shape)


def audio_windows(
    flat: np.ndarray, item_shape: tuple[int, ...], batch_size: int, declared_shape: list[int] | tuple[int, ...] = ()
) -> np.ndarray:
    """Audio features as [B, 32, 16, 16]: one window per frame, or one window for all (old clients)."""
    field = "audio_features"
    per_item = int(np.prod(item_shape))
    shape_text = "x".join(map(str, item_shape))
    if flat.size == 0:
        raise InvalidArgument(f"{field}: required (float32 [{shape_text}] or [B,{shape_text}])")
    if declared_shape:
        declared = tuple(int(d) for d in declared_shape)
        if declared not in (item_shape, (batch_size, *item_shape)):
            raise InvalidArgument(
                f"audio_features_shape: expected [{shape_text}] or [{batch_size},{shape_text}], got {list(declared)}"
            )
        if int(np.prod(declared)) != flat.size:
            raise InvalidArgument(
                f"{field}: audio_features_shape {list(declared)} needs {int(np.prod(declared))} values, got {flat.size}"
            )
    if not np.isfinite(flat).all():
        raise InvalidArgument(f"{field}: contains NaN or infinity")
    if flat.size == per_item:
        window = flat.reshape(1, *item_shape)
        return np.broadcast_to(window, (batch_size, *item_shape))
    if flat.size == batch_size * per_item:
        return flat.reshape(batch_size, *item_shape)
    raise InvalidArgument(
        f"{field}: expected {per_item} values (one [{shape_text}] window) or {batch_size * per_item} "
        f"([{batch_size},{shape_text}]), got {flat.size}"
    )
