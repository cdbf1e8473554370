"""Model inputs held by the inference service, so the compositing service sends each avatar frame's pixels once.

An avatar frame's model input is the same bytes every time the frame comes round. The compositing service names
it with a key (lipsync_protocol.inputs) and the cache here keeps its real crop (uint8 [3, H, W]; the masked copy
is a fixed function of it, built per run) under (model id, key), bounded in bytes, least recently used out
first. Keys are scoped by model: a key sent for one model never resolves to another model's pixels.

On a device with bound buffers (CUDA, or the CPU when ``onnx.device_inputs`` asks for it, as the tests do) each
held crop is uploaded to the model's device the first time a run uses it and kept there, so a cached frame
costs no host-to-device copy; ``PrepGraphs`` then builds the float model input on the device.
"""

from __future__ import annotations

import collections
import threading
from dataclasses import dataclass

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from lipsync_protocol.geometry import Geometry


class Crop:
    """One frame's real crop, uint8 [3, H, W]: on the host, and on a device once a bound run has used it."""

    __slots__ = ("_device", "_host", "_lock", "nbytes", "shape")

    def __init__(self, host: np.ndarray) -> None:
        self._host: np.ndarray | None = host
        self._device: tuple[str, int, ort.OrtValue] | None = None
        self._lock = threading.Lock()
        self.shape: tuple[int, ...] = tuple(host.shape)
        self.nbytes = int(host.nbytes)

    @property
    def host(self) -> np.ndarray:
        found = self._host
        if found is not None:
            return found
        with self._lock:
            assert self._device is not None
            return self._device[2].numpy()[0]

    def on_device(self, device_type: str, device_id: int, keep_host: bool) -> ort.OrtValue:
        """The crop as an OrtValue [1, 3, H, W] on the device (uploaded once); ``keep_host`` False drops the host
        copy after the upload, so a held frame lives in one place."""
        with self._lock:
            found = self._device
            if found is not None and found[:2] == (device_type, device_id):
                return found[2]
            host = self._host if self._host is not None else found[2].numpy()[0]  # type: ignore[index]
            value = ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(host[None]), device_type, device_id)
            self._device = (device_type, device_id, value)
            if not keep_host:
                self._host = None
            return value


@dataclass
class InputCacheStats:
    entries: int = 0
    bytes: int = 0
    max_bytes: int = 0
    hits: int = 0
    misses: int = 0
    stored: int = 0
    evictions: int = 0


class InputCache:
    """Crops by (model id, key), least recently used evicted beyond ``max_bytes`` (0: nothing is kept)."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._entries: collections.OrderedDict[tuple[str, str], Crop] = collections.OrderedDict()
        self._stats = InputCacheStats(max_bytes=max_bytes)

    def lookup(self, model_id: str, keys: list[str], shape: tuple[int, ...]) -> list[Crop | None]:
        """The held crop of each key (None: not held, or held with another shape than the model takes now)."""
        out: list[Crop | None] = []
        with self._lock:
            for key in keys:
                crop = self._entries.get((model_id, key))
                if crop is not None and crop.shape == shape:
                    self._entries.move_to_end((model_id, key))
                    self._stats.hits += 1
                    out.append(crop)
                else:
                    self._stats.misses += 1
                    out.append(None)
        return out

    def store(self, model_id: str, key: str, pixels: np.ndarray) -> Crop:
        """Keep a copy of ``pixels`` (a view into a request that must not stay alive) under the key."""
        crop = Crop(np.array(pixels, np.uint8, copy=True))
        with self._lock:
            old = self._entries.pop((model_id, key), None)
            if old is not None:
                self._stats.bytes -= old.nbytes
            self._stats.stored += 1
            if crop.nbytes <= self.max_bytes:
                self._entries[(model_id, key)] = crop
                self._stats.bytes += crop.nbytes
                while self._stats.bytes > self.max_bytes:
                    _, evicted = self._entries.popitem(last=False)
                    self._stats.bytes -= evicted.nbytes
                    self._stats.evictions += 1
        return crop

    def drop_model(self, model_id: str) -> None:
        """Forget a model's inputs (it was unloaded)."""
        with self._lock:
            for key in [k for k in self._entries if k[0] == model_id]:
                self._stats.bytes -= self._entries.pop(key).nbytes

    def stats(self) -> InputCacheStats:
        with self._lock:
            return InputCacheStats(**{**vars(self._stats), "entries": len(self._entries)})


def crops_of(pixels: np.ndarray) -> list[Crop]:
    """Crops sent without keys (used once, not kept): views into the request, no copy."""
    return [Crop(frame) for frame in pixels]


def fill_from_crops(out: np.ndarray, crops: list[Crop], geometry: Geometry, *, mask_zeroed: bool = False) -> None:
    """Write the float model input [n, 6, H, W] for ``crops`` into ``out``: channels 0-2 the real crop / 255 (the
    reference's conversion), 3-5 the same with the mask rectangle zeroed, exactly what a client building all six
    channels would have sent. ``mask_zeroed``: the masked copy's rectangle in ``out`` is zero already (a reused
    buffer), so only the strips around it are written."""
    scale = np.float32(255.0)
    for row, crop in zip(out, crops, strict=True):
        np.divide(crop.host, scale, out=row[:3], dtype=np.float32)
    # The mask covers ~92% of the copy: zero it (unless it is), then copy only the strips around it.
    x, y, w, h = geometry.mask
    real, masked = out[:, :3], out[:, 3:]
    if not mask_zeroed:
        masked[:, :, y : y + h, x : x + w] = 0.0
    masked[:, :, :y] = real[:, :, :y]
    masked[:, :, y + h :] = real[:, :, y + h :]
    masked[:, :, y : y + h, :x] = real[:, :, y : y + h, :x]
    masked[:, :, y : y + h, x + w :] = real[:, :, y : y + h, x + w :]


def prep_graph(count: int, geometry: Geometry) -> onnx.ModelProto:
    """``count`` crops uint8 [1, 3, H, W] (device values, bound one by one) to the float model input
    [count, 6, H, W], the same arithmetic as ``fill_from_crops`` (cast, divide by 255, multiply by a 0/1 mask)."""
    size = geometry.input_size
    names = [f"crop{i}" for i in range(count)]
    mask = np.ones((1, 3, size, size), np.float32)
    mask[:, :, geometry.mask_rows, geometry.mask_cols] = 0.0
    nodes = [
        helper.make_node("Concat", names, ["stacked"], axis=0)
        if count > 1
        else helper.make_node("Identity", names, ["stacked"]),
        helper.make_node("Cast", ["stacked"], ["as_float"], to=TensorProto.FLOAT),
        helper.make_node("Div", ["as_float", "scale"], ["real"]),
        helper.make_node("Mul", ["real", "mask"], ["masked"]),
        helper.make_node("Concat", ["real", "masked"], ["visual"], axis=1),
    ]
    graph = helper.make_graph(
        nodes,
        f"prep{count}",
        [helper.make_tensor_value_info(n, TensorProto.UINT8, [1, 3, size, size]) for n in names],
        [helper.make_tensor_value_info("visual", TensorProto.FLOAT, [count, 6, size, size])],
        initializer=[
            numpy_helper.from_array(np.array(255.0, np.float32), "scale"),
            numpy_helper.from_array(mask, "mask"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


class PrepGraphs:
    """The on-device input builders of one model, one small session per batch size (made on first use)."""

    def __init__(self, geometry: Geometry, providers: list, device_type: str, device_id: int) -> None:
        self.geometry = geometry
        self.providers = providers
        self.device_type = device_type
        self.device_id = device_id
        self._sessions: dict[int, ort.InferenceSession] = {}
        self._lock = threading.Lock()

    def _session(self, count: int) -> ort.InferenceSession:
        with self._lock:
            session = self._sessions.get(count)
            if session is None:
                options = ort.SessionOptions()
                options.intra_op_num_threads = 1
                options.add_session_config_entry("session.intra_op.allow_spinning", "0")
                session = ort.InferenceSession(
                    prep_graph(count, self.geometry).SerializeToString(), options, providers=self.providers
                )
                self._sessions[count] = session
            return session

    def build(self, crops: list[Crop], out: ort.OrtValue | None = None, keep_host: bool = False) -> ort.OrtValue:
        """The float model input of ``crops`` on the device, into ``out`` when given (a CUDA graph's fixed
        buffer), else into a new device value."""
        session = self._session(len(crops))
        binding = session.io_binding()
        for i, crop in enumerate(crops):
            binding.bind_ortvalue_input(f"crop{i}", crop.on_device(self.device_type, self.device_id, keep_host))
        if out is None:
            size = self.geometry.input_size
            out = ort.OrtValue.ortvalue_from_shape_and_type(
                [len(crops), 6, size, size], np.float32, self.device_type, self.device_id
            )
        binding.bind_ortvalue_output("visual", out)
        session.run_with_iobinding(binding)
        return out
