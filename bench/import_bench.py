"""How long `lipsync-import synctalk2d` takes and how much memory it needs, on the 328 fixture checkpoint.

Why: an import runs on whatever machine holds the training run; its peak memory decides whether that works
beside a running server, and its time whether a CI job may re-import on every build.

- ``cli``: the console script as a child process, ``--runs`` times; wall time each, and the child's peak
  resident memory (``ru_maxrss`` from ``os.wait4``, which counts ONNX Runtime's and protobuf's C++ memory).
- ``in_process``: one more import in this process under ``tracemalloc`` (Python and numpy allocations only),
  with the time of each step taken from the progress lines.

The dataset is made here: ``--frames`` JPEG frames of 1280x720 with landmark files (110 points).

    .venv/bin/python -m bench.import_bench [--fixtures DIR] [--frames 125] [--runs 3] [--out bench/results/import.json]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import cv2
import numpy as np

from model_import.synctalk2d import import_synctalk2d

from .harness import REPO_ROOT, machine_info, write_result

DEFAULT_FIXTURES = Path(
    os.environ.get("LIPSYNC_SYNCTALK_FIXTURES", REPO_ROOT.parent / "shared" / "fixtures" / "synctalk2d")
)
WIDTH, HEIGHT = 1280, 720


def make_dataset(root: Path, frames: int) -> Path:
    """Textured 720p frames with a face-sized square that drifts, as a talking-head video would."""
    (root / "full_body_img").mkdir(parents=True)
    (root / "landmarks").mkdir()
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:HEIGHT, 0:WIDTH]
    for k in range(frames):
        image = np.stack([xx * 255 // WIDTH, yy * 255 // HEIGHT, (xx + 2 * yy + 3 * k) % 256], -1).astype(np.uint8)
        cv2.imwrite(str(root / "full_body_img" / f"{k}.jpg"), image)
        points = rng.integers(300, 700, (110, 2))
        x1 = 520 + int(8 * np.sin(k / 5))
        points[1, 0], points[52, 1], points[31, 0] = x1, 300, x1 + 260
        (root / "landmarks" / f"{k}.lms").write_text("".join(f"{x} {y}\n" for x, y in points))
    return root


def run_cli(args: list[str]) -> tuple[float, float]:
    """(wall seconds, peak RSS MiB) of one child import."""
    start = time.perf_counter()
    child = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(child.pid, 0)
    wall = time.perf_counter() - start
    stderr = child.stderr.read().decode() if child.stderr else ""
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"import failed:\n{stderr}")
    return wall, usage.ru_maxrss / 1024  # KiB on Linux


def cli_runs(checkpoint: Path, encoder: Path, dataset: Path, models: Path, runs: int) -> list[tuple[float, float]]:
    """``runs`` imports by the console script: (wall seconds, peak RSS MiB) each."""
    command = [str(Path(sys.executable).parent / "lipsync-import"), "synctalk2d", "--checkpoint", str(checkpoint)]
    command += ["--audio-encoder", str(encoder), "--dataset", str(dataset), "--name", "bench"]
    command += ["--models-dir", str(models)]
    return [run_cli(command) for _ in range(runs)]


def in_process(checkpoint: Path, encoder: Path, dataset: Path, models: Path) -> tuple[float, list[tuple[float, str]]]:
    """One import in this process under tracemalloc: its peak (bytes) and when each progress line came (s)."""
    steps: list[tuple[float, str]] = []
    tracemalloc.start()
    start = time.perf_counter()
    import_synctalk2d(
        checkpoint=checkpoint,
        dataset_dir=dataset,
        model_id="bench",
        models_dir=models,
        audio_encoder=encoder,
        progress=lambda message: steps.append((time.perf_counter() - start, message)),
    )
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return peak, steps


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fixtures", type=Path, default=DEFAULT_FIXTURES)
    parser.add_argument("--frames", type=int, default=125)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "bench" / "results" / "import.json")
    args = parser.parse_args(argv)
    checkpoint = args.fixtures / "unet328_randbn.pth"
    encoder = args.fixtures / "audio_encoder_randbn.pth"
    if not checkpoint.is_file():
        raise SystemExit(f"{checkpoint}: not found (set --fixtures or LIPSYNC_SYNCTALK_FIXTURES)")
    machine = machine_info()
    with tempfile.TemporaryDirectory(prefix="import-bench-") as tmp:
        dataset = make_dataset(Path(tmp) / "dataset" / "bench", args.frames)
        models = Path(tmp) / "models"
        runs = cli_runs(checkpoint, encoder, dataset, models, args.runs)
        sizes = {p.name: p.stat().st_size for p in (models / "bench").iterdir() if p.is_file()}
        shutil.rmtree(models)
        peak, steps = in_process(checkpoint, encoder, dataset, models)
        steps = [(at, message.replace(tmp, "<tmp>")) for at, message in steps]
    walls = [w for w, _ in runs]
    result = {
        "checkpoint": {"file": checkpoint.name, "mib": round(checkpoint.stat().st_size / 2**20, 1)},
        "frames": args.frames,
        "frame_size": [WIDTH, HEIGHT],
        "written_mib": {name: round(size / 2**20, 2) for name, size in sorted(sizes.items())},
        "cli": {
            "runs": args.runs,
            "wall_s": [round(w, 2) for w in walls],
            "wall_s_median": round(statistics.median(walls), 2),
            "peak_rss_mib": [round(r, 1) for _, r in runs],
            "peak_rss_mib_max": round(max(r for _, r in runs), 1),
        },
        "in_process": {
            "tracemalloc_peak_mib": round(peak / 2**20, 1),
            "steps": [{"at_s": round(at, 3), "step": message} for at, message in steps],
        },
    }
    write_result(args.out, result, machine)
    print(
        f"{args.out}: median {result['cli']['wall_s_median']} s, peak RSS {result['cli']['peak_rss_mib_max']} MiB, "
        f"tracemalloc peak {result['in_process']['tracemalloc_peak_mib']} MiB"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
