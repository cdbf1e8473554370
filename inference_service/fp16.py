"""``lipsync-fp16``: convert a model to float16 weights and compute, keeping float32 inputs and outputs.

On a GPU with tensor cores a float16 UNet runs faster and takes half the memory. The service's contract does
not change: the converted file still takes and returns float32, so it drops into ``models.<id>.model_path``
(or sits beside the float32 file, loaded with ``LoadModel(model_path=...)``). The conversion is
onnxconverter-common's ``convert_float_to_float16`` with ``keep_io_types``; ``--check`` runs both files on the
CPU with the same random inputs and reports the largest difference, which should stay near float16's
resolution (about 1e-3 for outputs in [0, 1]).
"""

from __future__ import annotations

import argparse
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort


@dataclass
class Conversion:
    path: Path
    bytes_in: int
    bytes_out: int
    truncated_values: int  # weights below float16's range, flushed to its smallest normal value
    max_abs_diff: float | None = None


def convert(source: Path, dest: Path) -> Conversion:
    from onnxconverter_common import float16  # the gpu/dev extra

    model = onnx.load(str(source))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        converted = float16.convert_float_to_float16(model, keep_io_types=True)
    onnx.checker.check_model(converted)
    for value in (*converted.graph.input, *converted.graph.output):
        if value.type.tensor_type.elem_type != onnx.TensorProto.FLOAT:
            raise ValueError(f"{value.name}: expected float32 I/O after conversion")  # pragma: no cover
    dest.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(converted, str(dest))
    truncated = sum(1 for w in caught if "truncated" in str(w.message))
    return Conversion(dest, source.stat().st_size, dest.stat().st_size, truncated)


def max_difference(a: Path, b: Path, batch: int = 2, seed: int = 0) -> float:
    """Largest |a - b| over every output for the same random inputs, on the CPU."""
    rng = np.random.default_rng(seed)
    first = ort.InferenceSession(str(a), providers=["CPUExecutionProvider"])
    second = ort.InferenceSession(str(b), providers=["CPUExecutionProvider"])
    feeds = {}
    for spec in first.get_inputs():
        shape = [batch if not isinstance(d, int) or d <= 0 else d for d in spec.shape]
        feeds[spec.name] = rng.uniform(0.0, 1.0, shape).astype(np.float32)
    return max(
        float(np.abs(x.astype(np.float32) - y.astype(np.float32)).max())
        for x, y in zip(first.run(None, feeds), second.run(None, feeds), strict=True)
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lipsync-fp16", description=__doc__.split("\n\n")[0])
    parser.add_argument("source", type=Path, help="a float32 ONNX model (the UNet or its audio encoder)")
    parser.add_argument("dest", type=Path, help="where to write the float16 model")
    parser.add_argument("--check", action="store_true", help="compare both on the CPU with random inputs")
    args = parser.parse_args(argv)
    if not args.source.is_file():
        parser.error(f"{args.source}: no such file")
    try:
        result = convert(args.source, args.dest)
    except ImportError:
        print("lipsync-fp16: needs onnxconverter-common: pip install 'lipsync-server[gpu]'", file=sys.stderr)
        return 1
    except Exception as exc:
        print(f"lipsync-fp16: {args.source}: cannot convert ({exc})", file=sys.stderr)
        return 1
    print(
        f"{result.path}: {result.bytes_out / 1e6:.1f} MB (from {result.bytes_in / 1e6:.1f} MB), "
        f"{result.truncated_values} tiny weights flushed to float16's smallest value"
    )
    if args.check:
        print(f"largest output difference on the CPU: {max_difference(args.source, args.dest):.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
