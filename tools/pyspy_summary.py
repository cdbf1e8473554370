"""What a server's busy samples were for, from a ``py-spy record --format raw --native --idle --threads`` file.

Why: a flame graph says where the time goes; tuning a service needs what it goes to (protobuf, gRPC, numpy copies,
ORT, the allocator, glue) and on which thread (the event loop, the inference worker, gRPC's poller). Each sample
goes to the innermost frame that says what the time is for: native upb, numpy, ORT and cygrpc frames count, and so
do the service's own source lines (the line with ``isfinite``, say). Samples whose innermost named frame waits
(epoll, a condition variable, a sleep) are idle and only count towards the thread's wall.

    python tools/pyspy_summary.py bench/results/inference_demo_profile.txt [--root .] [--own inference_service/]

bench/inference_profile.py records the file and puts this summary into bench/results/inference.json.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections import Counter, defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
# Source folders whose lines can claim a sample (the service's code, not the libraries it calls).
OWN = ("inference_service/", "service_common/")

_PY_FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^()]+\.py):(?P<line>\d+)\)$")
_ALLOCATOR = {"munmap", "mmap", "mmap64", "brk", "sbrk", "madvise", "__madvise", "mremap"}
_WAITS = {
    "epoll_wait",
    "epoll_pwait",
    "poll",
    "select",
    "pthread_cond_wait",
    "pthread_cond_timedwait",
    "PyThread_acquire_lock_timed",
    "sem_wait",
    "sem_timedwait",
    "clock_nanosleep",
    "nanosleep",
    "__futex_abstimed_wait_common",
}
# Keywords of a service source line -> category, first match wins (used when no native frame said more).
_LINE_RULES = [
    ("isfinite", "isfinite_check"),
    ("session.run", "ort_run"),
    ("model.run", "ort_run"),
    ("RawMouthRegion", "protobuf_message_build"),
    ("InferBatchResponse(", "protobuf_message_build"),
    ("request.", "protobuf_bytes_field_copy"),
    ("to_model_input", "numpy_dtype_conversion"),
    ("to_output_dtype", "numpy_dtype_conversion"),
    ("np.divide", "numpy_dtype_conversion"),
    ("np.multiply", "numpy_dtype_conversion"),
    ("np.clip", "numpy_dtype_conversion"),
    (".astype", "numpy_dtype_conversion"),
    ("ascontiguousarray", "numpy_dtype_conversion"),
    ("tobytes", "numpy_tobytes"),
    ("frombuffer", "numpy_views"),
    ("reshape", "numpy_views"),
    ("broadcast_to", "numpy_views"),
]
_PROTOBUF_RULES = [
    (("GetAttr", "GetFieldValue"), "protobuf_bytes_field_copy"),
    (("Decode", "Encode", "encode_", "Serialize", "Parse", "MergeFrom", "FromString"), "protobuf_parse_serialize"),
    (("_Init", "Set", "Append", "Extend", "_New"), "protobuf_message_build"),
]
HEADLINE = {
    "protobuf_parse_serialize": "serialization (protobuf)",
    "protobuf_bytes_field_copy": "serialization (protobuf)",
    "protobuf_message_build": "serialization (protobuf)",
    "numpy_tobytes": "numpy conversion/copies",
    "numpy_dtype_conversion": "numpy conversion/copies",
    "numpy_views": "numpy conversion/copies",
    "isfinite_check": "isfinite check",
    "ort_run": "ORT run (calling thread only)",
    "grpc": "gRPC (cygrpc: byte buffers, HTTP/2, sockets, call handling)",
    "allocator": "memory allocation (mmap/munmap/brk)",
    "service_python": "asyncio / Python glue / other",
    "python_glue": "asyncio / Python glue / other",
    "other_native": "asyncio / Python glue / other",
}


class Classifier:
    """Frames to categories; reads the service's source lines (from ``root``) once each file."""

    def __init__(self, root: Path = REPO_ROOT, own: Sequence[str] = OWN) -> None:
        self.root, self.own = root, tuple(own)
        self._files: dict[str, list[str]] = {}

    def line(self, file: str, number: int) -> str:
        if file not in self._files:
            path = self.root / file
            self._files[file] = path.read_text().splitlines() if path.is_file() else []
        lines = self._files[file]
        return lines[number - 1] if 0 < number <= len(lines) else ""

    def sample(self, frames: list[str]) -> str:
        """The category of one sample: its innermost frame that tells, else glue or other native code."""
        foreign = False
        for frame in reversed(frames):
            if category := self.frame(frame, foreign):
                return category
            match = _PY_FRAME.match(frame)
            foreign = foreign or bool(match and not match["file"].startswith(self.own))
        return "python_glue" if any(_PY_FRAME.match(f) for f in frames) else "other_native"

    def frame(self, frame: str, inside_foreign_python: bool = False) -> str | None:
        """Category of one frame, or None when it does not tell (then the caller looks further up).

        A service source line without a telling keyword only claims the sample when no other Python code
        (asyncio, threading) runs below it; otherwise the entry frame would claim every idle-ish loop turn.
        """
        if _named(frame) in _ALLOCATOR:
            return "allocator"
        if "_message.abi3" in frame or "upb_" in frame:
            return next((cat for keys, cat in _PROTOBUF_RULES if any(k in frame for k in keys)), None)
        if frame.startswith("array_tobytes"):
            return "numpy_tobytes"
        if "onnxruntime" in frame:
            return "ort_run"
        if "cygrpc" in frame or "(grpc/" in frame:
            return "grpc"
        match = _PY_FRAME.match(frame)
        if match and match["file"].startswith(self.own):
            text = self.line(match["file"], int(match["line"]))
            category = next((cat for keyword, cat in _LINE_RULES if keyword in text), None)
            return category or (None if inside_foreign_python else "service_python")
        return None


def _named(frame: str) -> str:
    return frame.split(" (", 1)[0]


def _leaf_label(frames: list[str], named_leaf: str) -> str:
    """The innermost named frame, plus the libraries of unsymbolized frames below it (e.g. cygrpc > libc)."""
    below = frames[frames.index(named_leaf) + 1 :]
    libs = list(dict.fromkeys(f.split(" (", 1)[-1].rstrip(")").rsplit("/", 1)[-1].split(".", 1)[0] for f in below))
    return named_leaf + "".join(f" > [{lib}]" for lib in libs)


def _thread(frames: list[str]) -> str:
    """Pops the ``thread (...)`` frame py-spy puts first (--threads) and names the thread by its role."""
    if not (frames and frames[0].startswith("thread (")):
        return "all"
    name = frames.pop(0).split(": ", 1)[-1]
    if name == "MainThread":
        return "event_loop (MainThread)"
    if name.startswith("infer-"):
        return "infer_worker"
    return "grpc_poller" if "_poll_wrapper" in name else name


class _Counts:
    def __init__(self) -> None:
        self.total: Counter[str] = Counter()
        self.busy: Counter[str] = Counter()
        self.categories: Counter[str] = Counter()
        self.by_thread: dict[str, Counter[str]] = defaultdict(Counter)
        self.leaves: Counter[str] = Counter()


def summarize(path: Path, root: Path = REPO_ROOT, own: Sequence[str] = OWN) -> dict[str, Any]:
    """Busy samples by category, overall, per thread and by innermost named function."""
    classifier = Classifier(root, own)
    counts = _Counts()
    for raw in path.read_text().splitlines():
        if not raw.strip():
            continue
        stack_text, count_text = raw.rsplit(" ", 1)
        count, frames = int(count_text), stack_text.split(";")
        thread = _thread(frames)
        counts.total[thread] += count
        named = [f for f in frames if not f.startswith("0x")]
        if named and _named(named[-1]) in _WAITS:
            continue
        category = classifier.sample(frames)
        counts.busy[thread] += count
        counts.categories[category] += count
        counts.by_thread[thread][category] += count
        if named:
            counts.leaves[_leaf_label(frames, named[-1])] += count
    return _report(counts)


def _pct(n: int, total: int) -> float:
    return round(100.0 * n / total, 1) if total else 0.0


def _report(counts: _Counts) -> dict[str, Any]:
    busy = sum(counts.categories.values())
    headline: Counter[str] = Counter()
    for category, n in counts.categories.items():
        headline[HEADLINE.get(category, category)] += n
    threads = sorted(counts.total, key=lambda t: -counts.busy[t])
    return {
        "busy_samples": busy,
        "top_costs_pct_of_busy": {k: _pct(v, busy) for k, v in headline.most_common()},
        "categories_pct_of_busy": {k: _pct(v, busy) for k, v in counts.categories.most_common()},
        "threads": {
            t: {
                "busy_pct_of_wall": _pct(counts.busy[t], counts.total[t]),
                "share_of_busy_pct": _pct(counts.busy[t], busy),
                "top": {k: _pct(v, counts.busy[t]) for k, v in counts.by_thread[t].most_common(5)},
            }
            for t in threads
        },
        "top_leaf_functions_pct_of_busy": {k: _pct(v, busy) for k, v in counts.leaves.most_common(12)},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("raw", type=Path, help="py-spy record --format raw output")
    parser.add_argument("--root", type=Path, default=REPO_ROOT, help="where the service's source files are")
    parser.add_argument("--own", action="append", help=f"source folders that claim samples (default {OWN})")
    args = parser.parse_args(argv)
    json.dump(summarize(args.raw, args.root, tuple(args.own or OWN)), sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
