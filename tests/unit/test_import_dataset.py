"""A SyncTalk_2D dataset as an avatar: pairing, landmarks, the reference's crop, and files the service loads."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from synctalk import make_dataset, write_lms

from compositing_service.frames import ImageFolder, check_rects, load_rects
from model_import import ModelImportError
from model_import.dataset import crop_rects, load_avatar, pair_files, read_landmarks, write_avatar


def quiet(_: str) -> None:
    pass


@settings(max_examples=300, deadline=None)
@given(
    x1=st.integers(-400, 400),
    y1=st.integers(-300, 300),
    x2=st.integers(-400, 400),
)
def test_rects_take_exactly_what_the_numpy_slice_takes(x1: int, y1: int, x2: int) -> None:
    """The reference crops img[y1:y1 + (x2 - x1), x1:x2] and lets numpy's slice decide; so do we."""
    width, height = 320, 240
    grid = np.arange(width * height).reshape(height, width)
    crop = grid[y1 : y1 + (x2 - x1), x1:x2]
    (a, b, c, d) = crop_rects(np.array([[x1, y1, x2]]), (width, height))[0].tolist()
    if crop.size:
        np.testing.assert_array_equal(grid[b:d, a:c], crop)
        assert 0 <= a < c <= width and 0 <= b < d <= height
    else:
        assert c <= a or d <= b


def test_pairs_in_numeric_order_with_a_limit(tmp_path: Path) -> None:
    root = make_dataset(tmp_path / "ds", 12)
    (root / "full_body_img" / "thumbs.db").write_text("ignored")
    pairs = pair_files(root)
    assert [p.name for p, _ in pairs] == [f"{k}.jpg" for k in range(12)]  # 10 and 11 after 9, not after 1
    assert [q.name for _, q in pairs] == [f"{k}.lms" for k in range(12)]
    assert len(pair_files(root, 5)) == 5


def test_avatar_files_load_in_the_compositing_service(tmp_path: Path) -> None:
    root = make_dataset(tmp_path / "ds", 12)
    write_lms(root / "landmarks" / "11.lms", 250, 200, 350)  # runs off the right and bottom edges
    avatar = load_avatar(root, None, quiet)
    assert avatar.size == (320, 240)
    frames_dir, rects_path = write_avatar(avatar, tmp_path / "out", quiet)
    rects = load_rects(rects_path)
    folder = ImageFolder(frames_dir)
    check_rects(rects, folder.shape, rects_path)
    assert folder.count == 12 and [p.name for p in folder.files] == [f"{k}.jpg" for k in range(12)]
    assert rects[0].tolist() == [106, 48, 206, 148]  # x1 = x of point 1, y1 = y of point 52, side x31 - x1
    assert rects[11].tolist() == [250, 200, 320, 240]  # clipped as the slice clips it
    assert json.loads(rects_path.read_text())[3] == [109, 51, 209, 151]
    # Byte-for-byte copies: the service decodes the pixels SyncTalk_2D decodes.
    assert (frames_dir / "7.jpg").read_bytes() == (root / "full_body_img" / "7.jpg").read_bytes()
    assert len(load_avatar(root, 4, quiet).frames) == 4


def test_landmark_files_are_checked(tmp_path: Path) -> None:
    short = tmp_path / "short.lms"
    write_lms(short, 1, 2, 3, points=40)
    with pytest.raises(ModelImportError, match=rf"{short}: 40 landmarks, need at least 53"):
        read_landmarks(short)
    empty = tmp_path / "empty.lms"
    empty.write_text("")
    with pytest.raises(ModelImportError, match="0 landmarks"):
        read_landmarks(empty)
    garbage = tmp_path / "garbage.lms"
    garbage.write_text("12 x\n")
    with pytest.raises(ModelImportError, match=rf"{garbage}: not a readable landmark file"):
        read_landmarks(garbage)
    three = tmp_path / "three.lms"
    three.write_text("1 2 3\n" * 60)
    with pytest.raises(ModelImportError, match="got 3 columns"):
        read_landmarks(three)
    floats = tmp_path / "floats.lms"
    floats.write_text("10.9 -3.7\n" * 60)
    assert read_landmarks(floats)[0].tolist() == [10, -3]  # float32 then int32: truncation, as the reference


def test_mismatched_frames_are_named(tmp_path: Path) -> None:
    root = make_dataset(tmp_path / "ds", 4)
    cv2.imwrite(str(root / "full_body_img" / "2.jpg"), np.zeros((100, 100, 3), np.uint8))
    with pytest.raises(ModelImportError, match=r"2\.jpg: 100x100, but the first frame is 320x240"):
        load_avatar(root, None, quiet)
    with pytest.raises(ModelImportError, match="no such folder"):
        pair_files(tmp_path / "nowhere")
    empty = tmp_path / "empty"
    (empty / "full_body_img").mkdir(parents=True)
    (empty / "landmarks").mkdir()
    with pytest.raises(ModelImportError, match="no frames"):
        pair_files(empty)
