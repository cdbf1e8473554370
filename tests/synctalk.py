"""Test helpers for SyncTalk_2D inputs without torch: checkpoints in torch.save's zip layout, datasets, fixtures.

The checkpoint writer assembles the pickle opcode by opcode, as torch.save lays it out (protocol 2, GLOBAL, BINPERSID,
_rebuild_tensor_v2 records), so tests can make checkpoints of any content, prefix, storage location or
wrapper, and crafted hostile pickles, on machines without the SyncTalk_2D fixtures.
"""

from __future__ import annotations

import os
import struct
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

from model_import.networks import expected_table

REPO = Path(__file__).resolve().parents[1]
FIXTURES_ENV = "LIPSYNC_SYNCTALK_FIXTURES"


def fixtures_dir() -> Path:
    return Path(os.environ.get(FIXTURES_ENV, REPO.parent / "shared" / "fixtures" / "synctalk2d"))


def require_fixtures() -> Path:
    """The SyncTalk_2D fixture folder; skipped (with the reason) when absent, a failure when CI=true."""
    folder = fixtures_dir()
    if (folder / "unet328_randbn.pth").is_file():
        return folder
    message = f"SyncTalk_2D fixtures not found in {folder} (set {FIXTURES_ENV})"
    if os.environ.get("CI") == "true":
        pytest.fail(f"{message}; CI must have them")
    pytest.skip(message)


# -- pickle opcodes (protocol 2) ---------------------------------------------------------------------


def _str(s: str) -> bytes:
    data = s.encode()
    return b"X" + struct.pack("<I", len(data)) + data


def _int(v: int) -> bytes:
    return b"J" + struct.pack("<i", v)


def _tuple(items: list[bytes]) -> bytes:
    return b"(" + b"".join(items) + b"t" if items else b")"


def global_op(module: str, name: str) -> bytes:
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


ODICT = global_op("collections", "OrderedDict") + b")R"  # OrderedDict()
STORAGE = {np.dtype(np.float32): "FloatStorage", np.dtype(np.int64): "LongStorage"}


def _tensor(
    key: str,
    dtype: np.dtype,
    size: tuple[int, ...],
    location: str,
    numel: int,
    offset: int = 0,
    stride: tuple[int, ...] | None = None,
) -> bytes:
    """REDUCE(_rebuild_tensor_v2, (pid, offset, size, stride, False, OrderedDict()))."""
    if stride is None:
        stride = tuple(int(np.prod(size[i + 1 :])) for i in range(len(size)))
    pid = _tuple([_str("storage"), global_op("torch", STORAGE[dtype]), _str(key), _str(location), _int(numel)])
    args = [
        pid + b"Q",
        _int(offset),
        _tuple([_int(n) for n in size]),
        _tuple([_int(s) for s in stride]),
        b"\x89",
        ODICT,
    ]
    return global_op("torch._utils", "_rebuild_tensor_v2") + _tuple(args) + b"R"


class View:
    """A tensor that is a strided view of a flat storage array (to test offsets and strides)."""

    def __init__(self, storage: np.ndarray, offset: int, size: tuple[int, ...], stride: tuple[int, ...]) -> None:
        self.storage, self.offset, self.size, self.stride = storage, offset, size, stride


def state_pickle(
    state: Mapping[str, np.ndarray | View], location: str = "cpu", wrapper: bool = False, metadata: bool = True
) -> tuple[bytes, dict[str, bytes]]:
    """The data.pkl bytes and the storages' bytes by key."""
    storages: dict[str, bytes] = {}
    items = []
    for i, (name, value) in enumerate(state.items()):
        key = str(i)
        if isinstance(value, View):
            flat = value.storage
            storages[key] = flat.astype(flat.dtype.newbyteorder("<")).tobytes()
            record = _tensor(key, flat.dtype, value.size, location, flat.size, value.offset, value.stride)
        else:
            storages[key] = np.ascontiguousarray(value).astype(value.dtype.newbyteorder("<")).tobytes()
            record = _tensor(key, value.dtype, value.shape, location, value.size)
        items.append(_str(name) + record)
    body = ODICT + (b"(" + b"".join(items) + b"u" if items else b"")
    if metadata:  # BUILD with {'_metadata': OrderedDict({'': {'version': 1}})}, as Module.state_dict() has
        meta = ODICT + _str("") + b"}" + _str("version") + _int(1) + b"s" + b"s"
        body += b"}" + _str("_metadata") + meta + b"s" + b"b"
    if wrapper:  # {'epoch': 99, 'model': <state>, 'optimizer': {}}
        body = b"}(" + _str("epoch") + _int(99) + _str("model") + body + _str("optimizer") + b"}" + b"u"
    return b"\x80\x02" + body + b".", storages


def write_zip(path: Path, pickle_bytes: bytes, storages: Mapping[str, bytes], prefix: str | None = None) -> Path:
    """torch.save's zip layout; the prefix defaults to the file's name without its last extension."""
    prefix = path.name.rsplit(".", 1)[0] if prefix is None else prefix
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr(f"{prefix}/data.pkl", pickle_bytes)
        zf.writestr(f"{prefix}/.format_version", "1")
        zf.writestr(f"{prefix}/.storage_alignment", "64")
        zf.writestr(f"{prefix}/byteorder", "little")
        for key, data in storages.items():
            zf.writestr(f"{prefix}/data/{key}", data)
        zf.writestr(f"{prefix}/version", "3\n")
        zf.writestr(f"{prefix}/.data/serialization_id", "0" * 40)
    return path


def write_checkpoint(path: Path, state: Mapping[str, Any], prefix: str | None = None, **options: Any) -> Path:
    pickle_bytes, storages = state_pickle(state, **options)
    return write_zip(path, pickle_bytes, storages, prefix)


def random_state(network: str, seed: int = 0) -> dict[str, np.ndarray]:
    """Random weights of the right keys and shapes, He-scaled, with random BatchNorm statistics."""
    rng = np.random.default_rng(seed)
    state: dict[str, np.ndarray] = {}
    for key, (shape, dtype) in expected_table(network).items():
        if dtype == "int64":
            state[key] = np.array(int(rng.integers(0, 1000)), np.int64)
        elif key.endswith("running_var"):
            state[key] = rng.uniform(0.5, 1.5, shape).astype(np.float32)
        elif key.endswith("running_mean") or key.endswith("bias"):
            state[key] = rng.normal(0, 0.05, shape).astype(np.float32)
        elif len(shape) == 1:  # BatchNorm gamma
            state[key] = rng.uniform(0.6, 1.0, shape).astype(np.float32)
        else:
            fan_in = int(np.prod(shape[1:]))
            state[key] = (rng.standard_normal(shape) * np.sqrt(1.0 / fan_in)).astype(np.float32)
    return state


# -- datasets ----------------------------------------------------------------------------------------


def write_lms(path: Path, x1: int, y52: int, x31: int, points: int = 110) -> None:
    """A landmark file whose points 1, 52 and 31 place the crop; the other points are arbitrary."""
    pts = np.random.default_rng(len(str(path))).integers(0, 400, (points, 2))
    pts[1, 0], pts[52 % points, 1], pts[31 % points, 0] = x1, y52, x31
    path.write_text("".join(f"{x} {y}\n" for x, y in pts))


def make_dataset(root: Path, count: int, size: tuple[int, int] = (320, 240), rect_side: int = 100) -> Path:
    """dataset/<name>/full_body_img/<k>.jpg and landmarks/<k>.lms: textured frames, a face rect moving by 1 px."""
    (root / "full_body_img").mkdir(parents=True)
    (root / "landmarks").mkdir()
    width, height = size
    yy, xx = np.mgrid[0:height, 0:width]
    for k in range(count):
        image = np.stack([xx * 255 // width, yy * 255 // height, (xx * 3 + yy * 5 + 20 * k) % 256], -1)
        cv2.imwrite(str(root / "full_body_img" / f"{k}.jpg"), image.astype(np.uint8))
        x1, y1 = width // 3 + k, height // 5 + k
        write_lms(root / "landmarks" / f"{k}.lms", x1, y1, x1 + rect_side)
    return root
