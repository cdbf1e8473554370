"""The compositing geometry against a reference written here the way SyncTalk_2D's inference script does it."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from compositing_service.geometry import crop_face, frame_index, model_input, paste_back


def reference_input(frame: np.ndarray, rect) -> tuple[np.ndarray, np.ndarray]:
    """As the reference: crop, cubic resize to 328, inner 320, cv2.rectangle mask, concat, CHW, /255."""
    x1, y1, x2, y2 = rect
    crop_img = cv2.resize(frame[y1:y2, x1:x2], (328, 328), interpolation=cv2.INTER_CUBIC)
    img_real_ex = crop_img[4:324, 4:324].copy()
    img_masked = cv2.rectangle(img_real_ex.copy(), (5, 5, 310, 305), (0, 0, 0), -1)
    concat = np.concatenate([img_real_ex.transpose(2, 0, 1), img_masked.transpose(2, 0, 1)]).astype(np.float32)
    return crop_img, concat / 255.0


def reference_paste(frame: np.ndarray, rect, crop_img: np.ndarray, pred_float: np.ndarray) -> np.ndarray:
    x1, y1, x2, y2 = rect
    out = frame.copy()
    pred = np.array(pred_float.transpose(1, 2, 0) * 255, dtype=np.uint8)
    crop_ori = crop_img.copy()
    crop_ori[4:324, 4:324] = pred
    out[y1:y2, x1:x2] = cv2.resize(crop_ori, (x2 - x1, y2 - y1), interpolation=cv2.INTER_CUBIC)
    return out


@pytest.mark.parametrize("rect", [(100, 50, 356, 306), (0, 0, 200, 200), (440, 160, 640, 360), (10, 20, 341, 351)])
def test_input_and_paste_back_match_the_reference(rect) -> None:
    rng = np.random.default_rng(sum(rect))
    frame = rng.integers(0, 256, (360, 640, 3), dtype=np.uint8)
    frame = cv2.GaussianBlur(frame, (7, 7), 0)
    crop_ref, input_ref = reference_input(frame, rect)
    crop = crop_face(frame, rect)
    np.testing.assert_array_equal(crop, crop_ref)
    np.testing.assert_array_equal(model_input(crop).astype(np.float32) / 255.0, input_ref)
    pred = rng.random((3, 320, 320), dtype=np.float32)
    expected = reference_paste(frame, rect, crop_ref, pred)
    out = frame.copy()
    paste_back(out, rect, crop, (pred * 255).astype(np.uint8))
    np.testing.assert_array_equal(out, expected)
    # Outside the rectangle nothing changes.
    x1, y1, x2, y2 = rect
    mask = np.ones(frame.shape[:2], bool)
    mask[y1:y2, x1:x2] = False
    np.testing.assert_array_equal(out[mask], frame[mask])


def test_ping_pong_and_loop_orders() -> None:
    assert [frame_index(p, 4, "ping_pong") for p in range(10)] == [0, 1, 2, 3, 2, 1, 0, 1, 2, 3]
    assert [frame_index(p, 4, "loop") for p in range(6)] == [0, 1, 2, 3, 0, 1]
    assert [frame_index(p, 1, "ping_pong") for p in range(3)] == [0, 0, 0]
    assert frame_index(10**9 + 3, 125, "ping_pong") == frame_index(3 + (10**9 % 248), 125, "ping_pong")
