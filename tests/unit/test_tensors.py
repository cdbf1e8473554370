"""Request tensor views and the reference dtype conversions."""

from __future__ import annotations

import numpy as np
import pytest

from inference_service.tensors import to_model_input, to_output_dtype
from lipsync_protocol.errors import InvalidArgument
from lipsync_protocol.tensors import audio_windows, batch_of, frombuffer


def test_frombuffer_is_a_view_and_checks_whole_values() -> None:
    data = np.arange(6, dtype=np.float32).tobytes()
    view = frombuffer(data, np.float32, "f")
    assert view.base is not None and list(view) == [0, 1, 2, 3, 4, 5]
    with pytest.raises(InvalidArgument, match="f: 23 bytes"):
        frombuffer(data[:-1], np.float32, "f")


def test_batch_of_infers_or_checks_the_batch() -> None:
    flat = np.zeros(2 * 3 * 4, np.uint8)
    assert batch_of(flat, (3, 4), 0, "v").shape == (2, 3, 4)
    with pytest.raises(InvalidArgument, match="batch_size is 3"):
        batch_of(flat, (3, 4), 3, "v")
    with pytest.raises(InvalidArgument, match="multiple of 12"):
        batch_of(flat[:-1], (3, 4), 0, "v")


def test_audio_window_is_broadcast_without_copy() -> None:
    window = np.arange(32 * 16 * 16, dtype=np.float32)
    out = audio_windows(window, (32, 16, 16), 4)
    assert out.shape == (4, 32, 16, 16) and np.shares_memory(out, window)
    assert audio_windows(np.tile(window, 4), (32, 16, 16), 4, (4, 32, 16, 16)).shape == (4, 32, 16, 16)


def test_uint8_input_matches_reference_division() -> None:
    pixels = np.arange(256, dtype=np.uint8)
    reference = pixels.astype(np.float32) / 255.0
    np.testing.assert_array_equal(to_model_input(pixels), reference)
    assert to_model_input(pixels).dtype == np.float32


def test_uint8_output_truncates_like_the_reference() -> None:
    out = np.array([0.0, 0.999, 0.5, 1.0, 1.2, -0.1], np.float32)
    assert list(to_output_dtype(out, np.uint8)) == [0, 254, 127, 255, 255, 0]
    assert to_output_dtype(out, np.float32) is out
