"""Running a session with its inputs and outputs bound to buffers on the model's device (ONNX Runtime IOBinding).

Without binding, every ``session.run`` allocates its output on the device and copies it back, and with CUDA
graphs ORT needs every input and output at the address it captured. A ``BoundRunner`` belongs to one worker
(bindings are not shared between threads) and keeps, per batch size:

- an output buffer on the device, reused run after run (the last ``MAX_SIZES`` batch sizes used); inputs are
  copied in from host memory with ``bind_cpu_input``;
- with CUDA graphs, fixed input and output buffers for each configured graph size, filled in place, with
  ``gpu_graph_id`` naming the graph. A batch is padded with zeros up to the next graph size (the padding
  frames' outputs are dropped), and a batch larger than the largest size runs in pieces of that size.

Held model inputs (inference_service/inputs.py) come as crops already on the device: the runner's ``prep`` builds
the float input there, into the graph's fixed buffer when CUDA graphs are on, and binds it; nothing is copied
from the host for them.

The same code runs against the CPU (device type "cpu"), which is how its logic is tested here: no GPU exists
where this project is developed.
"""

from __future__ import annotations

import bisect
import collections
from collections.abc import Sequence

import numpy as np
import onnxruntime as ort

from .inputs import Crop, PrepGraphs

MAX_SIZES = 8  # output buffers kept per runner, most recently used batch sizes


def graph_size_for(frames: int, sizes: Sequence[int]) -> int:
    """The smallest captured batch size that holds ``frames`` (``sizes`` ascending), or the largest."""
    index = bisect.bisect_left(sizes, frames)
    return sizes[min(index, len(sizes) - 1)]


def pieces(frames: int, sizes: Sequence[int]) -> list[tuple[int, int, int]]:
    """(start, count, graph size) runs that cover ``frames`` frames with the captured sizes."""
    largest = sizes[-1]
    out = []
    start = 0
    while start < frames:
        count = min(largest, frames - start)
        out.append((start, count, graph_size_for(count, sizes)))
        start += count
    return out


class BoundRunner:
    def __init__(
        self,
        session: ort.InferenceSession,
        input_names: tuple[str, str],
        output_name: str,
        output_item_shape: tuple[int, ...],
        device_type: str,
        device_id: int = 0,
        graph_sizes: Sequence[int] = (),
        prep: PrepGraphs | None = None,
    ) -> None:
        self.session = session
        self.visual_name, self.audio_name = input_names
        self.output_name = output_name
        self.output_item_shape = output_item_shape
        self.device_type = device_type
        self.device_id = device_id
        self.graph_sizes = tuple(sorted(graph_sizes))
        self.prep = prep
        self._outputs: collections.OrderedDict[int, tuple[ort.IOBinding, ort.OrtValue]] = collections.OrderedDict()
        self._graphs: dict[int, tuple[ort.IOBinding, ort.OrtValue, ort.OrtValue, ort.OrtValue, ort.RunOptions]] = {}
        self.allocations = 0  # device buffers created, for tests and memory accounting

    def _value(self, shape: tuple[int, ...]) -> ort.OrtValue:
        self.allocations += 1
        return ort.OrtValue.ortvalue_from_shape_and_type(list(shape), np.float32, self.device_type, self.device_id)

    @property
    def device_bytes(self) -> int:
        """Bytes of the device buffers held now."""
        total = sum(int(np.prod(v.shape())) * 4 for _, v in self._outputs.values())
        for _, visual, audio, out, _ in self._graphs.values():
            total += sum(int(np.prod(v.shape())) * 4 for v in (visual, audio, out))
        return total

    def run(self, visual: np.ndarray | list[Crop], audio: np.ndarray) -> np.ndarray:
        """One forward pass of float32 C-contiguous ``visual`` [B, ...] (or crops for ``prep``) and ``audio``
        [B, ...]; host float32 out."""
        if self.graph_sizes:
            return self._run_graphs(visual, audio)
        frames = len(visual)
        bound = self._outputs.pop(frames, None)
        if bound is None:
            out = self._value((frames, *self.output_item_shape))
            binding = self.session.io_binding()
            binding.bind_ortvalue_output(self.output_name, out)
            bound = (binding, out)
            while len(self._outputs) >= MAX_SIZES:
                self._outputs.popitem(last=False)
        self._outputs[frames] = bound
        binding, out = bound
        if isinstance(visual, list):
            assert self.prep is not None, "crops need the device's input builder"
            binding.bind_ortvalue_input(self.visual_name, self.prep.build(visual))
        else:
            binding.bind_cpu_input(self.visual_name, visual)
        binding.bind_cpu_input(self.audio_name, audio)
        self.session.run_with_iobinding(binding)
        return self._to_host(out)

    def _to_host(self, value: ort.OrtValue) -> np.ndarray:
        array = value.numpy()
        # On the CPU numpy() may share the reused buffer: copy, or the next run overwrites a result in use.
        return np.array(array, copy=True) if self.device_type == "cpu" else array

    def _graph(
        self, size: int, visual_item: tuple[int, ...], audio_item: tuple[int, ...]
    ) -> tuple[ort.IOBinding, ort.OrtValue, ort.OrtValue, ort.OrtValue, ort.RunOptions]:
        found = self._graphs.get(size)
        if found is not None:
            return found
        visual = self._value((size, *visual_item))
        audio = self._value((size, *audio_item))
        out = self._value((size, *self.output_item_shape))
        binding = self.session.io_binding()
        binding.bind_ortvalue_input(self.visual_name, visual)
        binding.bind_ortvalue_input(self.audio_name, audio)
        binding.bind_ortvalue_output(self.output_name, out)
        options = ort.RunOptions()
        options.add_run_config_entry("gpu_graph_id", str(size))
        self._graphs[size] = (binding, visual, audio, out, options)
        return self._graphs[size]

    def _run_graphs(self, visual: np.ndarray | list[Crop], audio: np.ndarray) -> np.ndarray:
        results = []
        if isinstance(visual, list):
            assert self.prep is not None, "crops need the device's input builder"
            visual_item: tuple[int, ...] = self.prep.geometry.visual_shape
        else:
            visual_item = visual.shape[1:]
        for start, count, size in pieces(len(visual), self.graph_sizes):
            binding, visual_value, audio_value, out, options = self._graph(size, visual_item, audio.shape[1:])
            if isinstance(visual, list):
                piece = visual[start : start + count]
                # Padding frames repeat the last crop: their outputs are dropped, and nothing is uploaded for them.
                self.prep.build(piece + piece[-1:] * (size - count), out=visual_value)  # type: ignore[union-attr]
            else:
                visual_value.update_inplace(_padded(visual[start : start + count], size))
            audio_value.update_inplace(_padded(audio[start : start + count], size))
            self.session.run_with_iobinding(binding, options)
            results.append(self._to_host(out)[:count])
        return results[0] if len(results) == 1 else np.concatenate(results)


def _padded(batch: np.ndarray, size: int) -> np.ndarray:
    if len(batch) == size:
        return np.ascontiguousarray(batch)
    out = np.zeros((size, *batch.shape[1:]), batch.dtype)
    out[: len(batch)] = batch
    return out
