"""What a GPU owner runs to measure the GPU path (docs/gpu.md). Prints a table and writes JSON.

No GPU exists where this project is developed, so the figures for CUDA come from whoever runs this. For each
batch size, the ms per frame of:

- ``bare``: ``InferenceSession.run`` with the CUDA provider, float32 in and out (the baseline);
- ``engine``: the service's ``LipSyncModel.run`` with IOBinding (reused device output buffers);
- ``cuda_graph``: the same with CUDA graphs captured for the batch sizes measured;
- ``fp16``: the ``lipsync-fp16`` conversion of the model through the engine path;
- ``tensorrt``: the TensorRT provider with an engine cache, when onnxruntime has it (``--tensorrt``).

Without CUDA it runs the same on the CPU (bare vs engine only) so the script itself is checked anywhere.

    python -m bench.gpu_check --models-dir models --model unet328 [--batches 1,4,8,16] [--tensorrt]
"""

from __future__ import annotations

import dataclasses
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from inference_service.config import OnnxConfig
from inference_service.devices import CPU_PROVIDER, CUDA_PROVIDER, Device, providers_for, session_options
from inference_service.engine import LipSyncModel
from inference_service.fp16 import convert

from . import harness


def timed(fn: Callable[[], Any], frames: int, seconds: float) -> float:
    """Median ms per frame over repeated calls (after two warm-up calls)."""
    fn()
    fn()
    times = []
    stop = time.perf_counter() + seconds
    while time.perf_counter() < stop or len(times) < 5:
        started = time.perf_counter()
        fn()
        times.append((time.perf_counter() - started) * 1000.0 / frames)
    return round(statistics.median(times), 3)


def variants(path: Path, batches: list[int], cuda: bool, tensorrt: bool) -> dict[str, tuple[Path, OnnxConfig]]:
    """The engine paths to measure: plain IOBinding everywhere; graphs, fp16 and TensorRT where CUDA is."""
    base = OnnxConfig(io_binding="on")
    out: dict[str, tuple[Path, OnnxConfig]] = {"engine": (path, base)}
    if cuda:
        out["cuda_graph"] = (path, dataclasses.replace(base, cuda_graph=True, cuda_graph_batch_sizes=tuple(batches)))
        fp16 = Path(tempfile.mkdtemp()) / "model_fp16.onnx"
        convert(path, fp16)
        out["fp16"] = (fp16, base)
        if tensorrt:
            cache = Path(tempfile.mkdtemp(prefix="trt-"))
            out["tensorrt"] = (path, dataclasses.replace(base, tensorrt=True, tensorrt_cache_dir=cache))
    return out


def measure(bare: ort.InferenceSession, models: dict[str, LipSyncModel], batches: list[int], seconds: float) -> list:
    """ms per frame of bare and every engine variant, batch size by batch size."""
    rows = []
    rng = np.random.default_rng(0)
    for batch in batches:
        visual = rng.uniform(0, 1, (batch, 6, 320, 320)).astype(np.float32)
        audio = rng.uniform(0, 1, (batch, 32, 16, 16)).astype(np.float32)
        feeds = {"input": visual, "audio": audio}
        row = {"batch": batch, "bare": timed(lambda f=feeds: bare.run(None, f), batch, seconds)}
        for name, model in models.items():
            row[name] = timed(lambda m=model, v=visual, a=audio: m.run(v, a), batch, seconds)
        rows.append(row)
        print("  ".join(f"{k} {v}" for k, v in row.items()))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = harness.parser(__doc__, "bench/results/gpu_check.json")
    parser.add_argument("--model", default="unet328")
    parser.add_argument("--batches", default="1,4,8,16")
    parser.add_argument("--seconds", type=float, default=2.0, help="per measurement")
    parser.add_argument("--gpu", type=int, default=0)
    parser.add_argument("--tensorrt", action="store_true")
    args = parser.parse_args(argv)
    path = args.models_dir / args.model / "model.onnx"
    if not path.is_file():
        parser.error(f"{path}: missing (run lipsync-models --out {args.models_dir})")
    batches = [int(b) for b in args.batches.split(",")]
    cuda = CUDA_PROVIDER in ort.get_available_providers()
    device = Device("cuda", args.gpu, f"cuda:{args.gpu}", 0, 1) if cuda else Device("cpu", -1, "cpu", 0, 1)
    print(f"onnxruntime {ort.__version__}, providers {ort.get_available_providers()}; measuring on {device.label}")
    machine = harness.machine_info()
    base = OnnxConfig(io_binding="on")
    bare = ort.InferenceSession(str(path), sess_options=session_options(base), providers=providers_for(device, base))
    models = {}
    for name, (file, onnx) in variants(path, batches, cuda, args.tensorrt).items():
        started = time.perf_counter()
        models[name] = LipSyncModel(args.model, file, device, onnx, max_batch=max(batches))
        models[name].warm_up(tuple(batches))
        print(f"{name}: loaded and warmed in {time.perf_counter() - started:.1f} s ({models[name].providers[0]})")
    rows = measure(bare, models, batches, args.seconds)
    result = {
        "device": device.label,
        "onnxruntime": ort.__version__,
        "providers": ort.get_available_providers(),
        "model": args.model,
        "ms_per_frame": rows,
        "engine_vs_bare": {r["batch"]: round(r["bare"] / r["engine"], 3) for r in rows},
        "note": "figures from the CPU: the CUDA variants need onnxruntime-gpu and a GPU" if not cuda else "",
    }
    print(f"wrote {harness.write_result(args.out, result, machine)}")
    return 0


if __name__ == "__main__":
    if CPU_PROVIDER not in ort.get_available_providers():  # pragma: no cover
        sys.exit("onnxruntime without a CPU provider?")
    sys.exit(main())
