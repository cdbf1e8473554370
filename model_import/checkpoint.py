"""Read a torch.save checkpoint (zip format) into numpy arrays, without torch and without running its pickle.

Why not torch.load: the importer must not depend on torch, and a checkpoint downloaded from somewhere is a
pickle, which can run any code. This reader accepts exactly the four globals a SyncTalk_2D state_dict
references (docs/models.md), refuses any other one when the pickle names it (before anything is called),
and reads each tensor's bytes straight from the zip's ``data/`` records.
"""

from __future__ import annotations

import collections
import io
import math
import pickle
import re
import zipfile
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from model_import.errors import ModelImportError

_EPOCH_FILE = re.compile(r"([0-9]+)\.pth")
_PICKLE_ERRORS = (pickle.UnpicklingError, EOFError, ValueError, TypeError, IndexError, KeyError, AttributeError)
_ZIP_ERRORS = (zipfile.BadZipFile, zlib.error, EOFError, OSError, NotImplementedError)


@dataclass(frozen=True, slots=True)
class StorageType:
    """Stands for a torch storage class in the pickle: only its element type matters here."""

    name: str
    dtype: str  # numpy type code, little-endian


# Very old torch pickled CUDA storages as torch.cuda.*Storage; newer ones use torch.*Storage plus a location.
_STORAGES = {
    (module, name): StorageType(f"{module}.{name}", dtype)
    for module in ("torch", "torch.cuda")
    for name, dtype in (("FloatStorage", "<f4"), ("LongStorage", "<i8"))
}
ALLOWED_GLOBALS = ("collections.OrderedDict", "torch._utils._rebuild_tensor_v2", *(s.name for s in _STORAGES.values()))


def pick_checkpoint(path: Path) -> Path:
    """A file as given; in a folder, the highest-numbered ``<epoch>.pth`` (numeric order, as SyncTalk_2D picks)."""
    if path.is_dir():
        epochs = [(int(m.group(1)), p) for p in path.iterdir() if (m := _EPOCH_FILE.fullmatch(p.name)) and p.is_file()]
        if not epochs:
            raise ModelImportError(f"{path}: no <epoch>.pth checkpoint in this folder")
        return max(epochs)[1]
    if not path.is_file():
        raise ModelImportError(f"{path}: no such checkpoint file or folder")
    return path


class _Unpickler(pickle.Unpickler):
    """Builds numpy arrays where torch would build tensors; any global outside ALLOWED_GLOBALS is refused."""

    def __init__(self, data: bytes, archive: _Archive) -> None:
        super().__init__(io.BytesIO(data))
        self.archive = archive
        self.storages: dict[str, np.ndarray] = {}

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return self._rebuild_tensor
        if (module, name) in _STORAGES:
            return _STORAGES[module, name]
        raise ModelImportError(
            f"{self.archive.path}: refused: its pickle names the global {module}.{name}, which a SyncTalk_2D "
            f"checkpoint never holds (allowed: {', '.join(ALLOWED_GLOBALS)}); nothing in it was run"
        )

    def persistent_load(self, pid: Any) -> np.ndarray:
        if not (
            isinstance(pid, tuple)
            and len(pid) == 5
            and pid[0] == "storage"
            and isinstance(pid[1], StorageType)
            and isinstance(pid[2], str)
            and isinstance(pid[3], str)  # the location ('cpu', 'cuda:0', ...) does not matter here
            and isinstance(pid[4], int)
        ):
            raise ModelImportError(f"{self.archive.path}: unexpected storage record {pid!r:.200}")
        _, storage_type, key, _location, numel = pid
        if key not in self.storages:
            self.storages[key] = self.archive.storage(key, storage_type.dtype, numel)
        return self.storages[key]

    def _rebuild_tensor(self, storage: Any, offset: Any, size: Any, stride: Any, *rest: Any) -> np.ndarray:
        """torch._utils._rebuild_tensor_v2: a view of ``storage``, checked to stay inside it."""
        path = self.archive.path
        if not isinstance(storage, np.ndarray) or len(rest) > 3:
            raise ModelImportError(f"{path}: malformed tensor record")
        if not (
            isinstance(offset, int)
            and isinstance(size, tuple)
            and isinstance(stride, tuple)
            and len(size) == len(stride)
            and all(isinstance(v, int) and v >= 0 for v in (offset, *size, *stride))
        ):
            raise ModelImportError(f"{path}: malformed tensor record (offset {offset!r}, size {size!r:.80})")
        if math.prod(size) == 0:
            return np.zeros(size, storage.dtype)
        last = offset + sum((n - 1) * s for n, s in zip(size, stride, strict=True))
        if last >= storage.size:
            raise ModelImportError(f"{path}: a tensor of shape {list(size)} runs past its storage of {storage.size}")
        contiguous = tuple(math.prod(size[i + 1 :]) for i in range(len(size)))
        if stride == contiguous or len(size) == 0:
            return storage[offset : offset + math.prod(size)].reshape(size)
        itemsize = storage.dtype.itemsize
        view = np.lib.stride_tricks.as_strided(
            storage[offset:], shape=size, strides=[s * itemsize for s in stride], writeable=False
        )
        return view.copy()


class _Archive:
    """The zip's records under one prefix (``archive/``, ``99/``, ... : torch names it after the file)."""

    def __init__(self, path: Path, zf: zipfile.ZipFile) -> None:
        self.path = path
        self.zf = zf
        pickles = [n for n in zf.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
        if len(pickles) != 1:
            raise ModelImportError(f"{path}: not a torch checkpoint (expected one <prefix>/data.pkl, found {pickles})")
        self.prefix = pickles[0][: -len("data.pkl")]
        self.big_endian = self._byteorder() == "big"

    def _byteorder(self) -> str:
        name = self.prefix + "byteorder"
        if name not in self.zf.namelist():
            return "little"  # older writers have no such record and were little-endian
        value = self.read(name).decode("ascii", "replace").strip()
        if value not in ("little", "big"):
            raise ModelImportError(f"{self.path}: unknown byteorder {value!r}")
        return value

    def read(self, name: str) -> bytes:
        try:
            return self.zf.read(name)
        except KeyError:
            raise ModelImportError(f"{self.path}: the record {name} is missing from the archive") from None
        except _ZIP_ERRORS as exc:
            raise ModelImportError(f"{self.path}: the zip archive is truncated or corrupt ({exc})") from exc

    def storage(self, key: str, dtype: str, numel: int) -> np.ndarray:
        data = self.read(f"{self.prefix}data/{key}")
        np_type = np.dtype(dtype).newbyteorder(">" if self.big_endian else "<")
        if numel < 0 or len(data) < numel * np_type.itemsize:
            raise ModelImportError(
                f"{self.path}: storage {key} holds {len(data)} bytes, expected {numel} x {np_type.itemsize}"
            )
        array = np.frombuffer(data, np_type, count=numel)
        return array.astype(np.dtype(dtype)) if self.big_endian else array


def load_pickle(path: Path) -> Any:
    """The object ``torch.load`` would return, with numpy arrays in place of tensors."""
    if not zipfile.is_zipfile(path):
        with path.open("rb") as f:
            head = f.read(4)
        if head == b"PK\x03\x04":
            raise ModelImportError(
                f"{path}: the zip archive is truncated or corrupt (its central directory is missing)"
            )
        if head[:2] == b"\x80\x02":
            raise ModelImportError(
                f"{path}: torch's legacy (pre-1.6) checkpoint format is not read; re-save it with torch >= 1.6"
            )
        raise ModelImportError(f"{path}: not a torch checkpoint (a zip archive with a data.pkl)")
    try:
        with zipfile.ZipFile(path) as zf:
            archive = _Archive(path, zf)
            return _Unpickler(archive.read(archive.prefix + "data.pkl"), archive).load()
    except ModelImportError:
        raise
    except _ZIP_ERRORS as exc:
        raise ModelImportError(f"{path}: the zip archive is truncated or corrupt ({exc})") from exc
    except _PICKLE_ERRORS as exc:
        raise ModelImportError(f"{path}: its data.pkl is not a readable checkpoint pickle ({exc})") from exc


def read_state_dict(path: Path) -> dict[str, np.ndarray]:
    """The checkpoint's state_dict: the top-level mapping, or the one under ``model`` / ``state_dict``."""
    obj = load_pickle(path)
    if isinstance(obj, Mapping):
        for wrapper in ("model", "state_dict"):  # {'epoch', 'model', 'optimizer'} as some trainers save
            if isinstance(obj.get(wrapper), Mapping):
                obj = obj[wrapper]
                break
    if not isinstance(obj, Mapping):
        raise ModelImportError(f"{path}: holds a {type(obj).__name__}, not a state_dict")
    state: dict[str, np.ndarray] = {}
    for key, value in obj.items():
        if not isinstance(key, str) or not isinstance(value, np.ndarray):
            raise ModelImportError(f"{path}: entry {key!r:.80}: expected a tensor, found {type(value).__name__}")
        state[key] = value
    return state
