"""The model-side dtype conversions: uint8 pixels to the float input the model was trained on, its float output
to the uint8 the reference pastes back (the wire's own views and checks are lipsync_protocol.tensors)."""

from __future__ import annotations

import numpy as np


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
