"""Validated views of request tensors, and the model-side dtype conversions.

Tensors travel as little-endian raw bytes; they are viewed with
``numpy.frombuffer`` (no copy) and checked against the model's shapes before
any work is queued, so a malformed request costs microseconds and never
reaches a worker.
"""

from __future__ import annotations

import numpy as np

from service_common.errors import InvalidArgument


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


def to_model_input(visual: np.ndarray) -> np.ndarray:
    """float32 in [0, 1] as the model was trained on: uint8 pixels are divided by 255 like the reference."""
    if visual.dtype == np.uint8:
        return np.divide(visual, np.float32(255.0), dtype=np.float32)
    return np.ascontiguousarray(visual, dtype=np.float32)


def to_output_dtype(output: np.ndarray, dtype: np.dtype | type, *, owned: bool = False) -> np.ndarray:
    """uint8 outputs are ``(x * 255)`` truncated, the reference's own paste-back conversion.

    Clipping x to [0, 1] first and multiplying straight into uint8 (a C cast, which truncates as ``astype``
    does) gives the same bytes as scaling, clipping to [0, 255] and casting, with two fewer passes over the
    float array; ``owned`` says ``output`` may be clipped in place (a run's fresh output).
    """
    if np.dtype(dtype) != np.uint8:
        return output
    clipped = np.clip(output, 0.0, 1.0, out=output if owned else None)
    return np.multiply(clipped, np.float32(255.0), out=np.empty(output.shape, np.uint8), casting="unsafe")
