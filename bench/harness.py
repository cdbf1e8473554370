"""The benchmarks' one harness: result files, services as processes, CPU meters, call loops, paired blocks.

Why: these machines are small, shared and noisy. A figure means something only as a ratio of two things measured
in one run, block against block (A B A B A, each B divided by the geometric mean of its neighbours), with the CPU
every process used counted per block, the machine's other load recorded beside it, and every result file saying
where and with what it was measured. Every benchmark here starts its services, meters its blocks, counts its
throughput and writes its JSON through this module, so that two results differ only in what they measure.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from service_common.processes import ServiceProcess, free_port, wait_serving

REPO_ROOT = Path(__file__).resolve().parent.parent
# Limits for the benchmarks' channels: a float32 batch of 16 frames is ~40 MB.
CHANNEL_OPTIONS = [("grpc.max_send_message_length", 256 << 20), ("grpc.max_receive_message_length", 256 << 20)]

# -- progress, machine info, result files, models ----------------------------------------------------------------


def log(message: str) -> None:
    """Progress on stderr, so stdout stays clean for whoever pipes the script."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _cpu_model() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def _git(*args: str) -> str:
    return subprocess.run(
        ["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10, check=True
    ).stdout.strip()


def _git_revision() -> dict[str, Any] | None:
    try:
        return {
            "commit": _git("rev-parse", "HEAD"),
            "dirty": bool(_git("status", "--porcelain", "--untracked-files=no")),
        }
    except (OSError, subprocess.SubprocessError):
        return None


def machine_info() -> dict[str, Any]:
    """Where and with what a result was measured."""
    try:
        affinity: int | None = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        affinity = None
    try:
        load: list[float] | None = list(os.getloadavg())
    except OSError:
        load = None
    return {
        "timestamp_utc": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": affinity,
        "cpu_model": _cpu_model(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "numpy": _version("numpy"),
        "onnxruntime": _version("onnxruntime") or _version("onnxruntime-gpu"),
        "grpcio": _version("grpcio"),
        "protobuf": _version("protobuf"),
        "loadavg_at_start": load,
        "git": _git_revision(),
    }


def write_result(path: Path | str, result: dict[str, Any], machine: dict[str, Any] | None = None) -> Path:
    """``result`` as indented JSON with a ``machine`` block first; written whole or not at all."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"machine": machine or machine_info(), **result}
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=False) + "\n")
    tmp.replace(path)
    return path


def finish(out: Path, result: dict[str, Any], machine: dict[str, Any], started: float) -> Path:
    """``wall_seconds`` last, then the file."""
    result["wall_seconds"] = round(time.perf_counter() - started, 1)
    path = write_result(out, result, machine)
    log(f"wrote {path} in {result['wall_seconds']} s")
    return path


def parser(doc: str | None, out: str | None, models: bool = True) -> argparse.ArgumentParser:
    """The options every benchmark takes: ``--models-dir`` (unless ``models`` is false) and ``--out``."""
    made = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    if models:
        made.add_argument("--models-dir", type=Path, default=Path("models"))
    made.add_argument("--out", type=Path, default=Path(out) if out else None, help="the result JSON")
    return made


def ensure_models(models_dir: Path) -> bool:
    """Generate every demo model, the avatar and both configs when any is missing; True when generated."""
    needed = [
        models_dir / "inference.yaml",
        models_dir / "compositing.yaml",
        models_dir / "demo" / "model.onnx",
        models_dir / "unet328" / "model.onnx",
        models_dir / "avatar" / "background.mp4",
    ]
    config = models_dir / "inference.yaml"
    if all(p.exists() for p in needed) and "unet328:" in config.read_text():
        return False
    from demo_models import write_all

    log(f"generating models into {models_dir} (demo_models.write_all, seed 0)")
    write_all(models_dir, seed=0, include_unet328=True)
    return True


# -- services as processes -----------------------------------------------------------------------------------------


def console_script(name: str) -> str:
    path = Path(sys.executable).parent / name
    found = str(path) if path.exists() else shutil.which(name)
    if not found:
        raise RuntimeError(f"{name} not found next to {sys.executable} nor on PATH (make install)")
    return found


@dataclass
class Fleet:
    """Service processes by name, each with its log in ``work``; stopped last started first."""

    work: Path
    procs: dict[str, ServiceProcess] = field(default_factory=dict)

    def add(self, name: str, argv: Sequence[str], port: int, env: dict[str, str] | None = None) -> ServiceProcess:
        """Any command serving grpc.health.v1 on ``port`` (nginx, whose port is in its config)."""
        self.procs[name] = ServiceProcess(argv, port, self.log_path(name), env)
        return self.procs[name]

    def start(
        self,
        name: str,
        script: str | Sequence[str],
        args: Sequence[str] = (),
        env: dict[str, str] | None = None,
        log_level: str | None = "WARNING",
    ) -> ServiceProcess:
        """One of our services on a free loopback port: ``script`` is a console script's name or a whole command.

        Not yet waited for: the caller says how (``wait_serving``, or ``ready`` on a health port)."""
        port = free_port()
        command = [console_script(script)] if isinstance(script, str) else list(script)
        argv = [*command, *args, "--host", "127.0.0.1", "--port", str(port)]
        return self.add(name, argv + (["--log-level", log_level] if log_level else []), port, env)

    def log_path(self, name: str) -> Path:
        return self.work / f"{name.replace('/', '-')}.log"

    def pids(self) -> dict[str, int]:
        return {name: proc.process.pid for name, proc in self.procs.items()}

    def stop(self) -> dict[str, int]:
        return {name: proc.stop() for name, proc in reversed(self.procs.items())}


@contextmanager
def fleet(prefix: str) -> Iterator[Fleet]:
    """A fleet in a scratch folder, stopped and removed however the block ends."""
    work = Path(tempfile.mkdtemp(prefix=prefix))
    running = Fleet(work)
    try:
        yield running
    finally:
        running.stop()
        shutil.rmtree(work, ignore_errors=True)


def ready(proc: ServiceProcess, port: int, timeout: float = 180.0) -> ServiceProcess:
    """Wait for SERVING on another port than the service's own: a TLS service's plain-text ``server.health_port``."""
    try:
        wait_serving(f"127.0.0.1:{port}", timeout, proc.process)
    except (RuntimeError, TimeoutError) as exc:
        proc.stop()
        tail = proc.log_path.read_text(errors="replace")[-2000:] if proc.log_path else ""
        raise RuntimeError(f"{exc}\n{tail}") from None
    return proc


# -- CPU -----------------------------------------------------------------------------------------------------------

_CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def process_cpu_seconds(pid: int | None = None) -> float | None:
    """User+system CPU seconds of a process (all its threads; None: this one), or None where /proc cannot tell."""
    if pid is None:
        t = os.times()
        return t.user + t.system
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK


def machine_cpu_seconds() -> float | None:
    """CPU seconds all cores spent busy since boot (/proc/stat), or None."""
    try:
        first = Path("/proc/stat").read_text().splitlines()[0].split()
    except (OSError, IndexError):
        return None
    values = [int(v) for v in first[1:]]
    idle = values[3] + (values[4] if len(values) > 4 else 0)
    return (sum(values[:8]) - idle) / _CLK_TCK


class Meter:
    """CPU of this process (``bench``), of named processes (all threads) and of the whole machine over a block.

    ``other`` (the machine minus the rest) is what a noisy neighbour took: a block hit by one can be spotted. A name
    whose pid is None reads None (a result that records a server column where there is no server).
    """

    def __init__(self, pids: Mapping[str, int | None] | None = None) -> None:
        self.pids = dict(pids or {})

    def snapshot(self) -> dict[str, float | None]:
        out: dict[str, float | None] = {"bench": process_cpu_seconds(None)}
        out.update({name: process_cpu_seconds(pid) if pid else None for name, pid in self.pids.items()})
        out["machine"] = machine_cpu_seconds()
        out["wall"] = time.perf_counter()
        return out

    @staticmethod
    def used(start: dict[str, float | None], end: dict[str, float | None]) -> dict[str, float]:
        """CPU seconds per name over the block, ``wall``, and ``other``."""
        out = {k: (end[k] or 0.0) - (start[k] or 0.0) for k in start}
        known = sum(v for k, v in out.items() if k not in ("machine", "wall"))
        out["other"] = max(out["machine"] - known, 0.0)
        return out

    @staticmethod
    def percent(start: dict[str, float | None], end: dict[str, float | None]) -> dict[str, float | None]:
        """``<name>_cpu_pct`` (% of one core) per name and the machine, and ``other_cpu_pct``."""
        wall = max((end["wall"] or 0.0) - (start["wall"] or 0.0), 1e-9)
        out: dict[str, float | None] = {}
        for name in (k for k in start if k != "wall"):
            a, b = start[name], end[name]
            out[f"{name}_cpu_pct"] = None if a is None or b is None else round((b - a) / wall * 100.0, 1)
        machine, bench = out["machine_cpu_pct"], out["bench_cpu_pct"]
        known = sum(v or 0.0 for k, v in out.items() if k != "machine_cpu_pct")
        out["other_cpu_pct"] = None if machine is None or bench is None else round(max(machine - known, 0.0), 1)
        return out


# -- call loops ----------------------------------------------------------------------------------------------------

Call = Callable[[], Any]


class Completions(list[tuple[float, Any]]):
    """What a call loop got back: (completion stamp, reply) per call, in completion order."""

    @property
    def stamps(self) -> list[float]:
        return [at for at, _ in self]

    @property
    def replies(self) -> list[Any]:
        return [reply for _, reply in self]


def closed_loop(call: Call | Sequence[Call], seconds: float, in_flight: int = 1) -> Completions:
    """``in_flight`` threads calling back to back until the time is up (one: in this thread, no hand-offs).

    A sequence of calls gives every thread its own (its own channel, its own walk through the avatar)."""
    calls = list(call) if isinstance(call, Sequence) else [call] * in_flight
    return _loop(calls, seconds, None)


def open_loop(call: Call, seconds: float, rate: float, in_flight: int = 8) -> Completions:
    """Calls started at ``rate`` per second (up to ``in_flight`` at once): CPU compared at one throughput."""
    return _loop([call] * in_flight, seconds, rate)


def _loop(calls: list[Call], seconds: float, rate: float | None) -> Completions:
    done = Completions()
    errors: list[BaseException] = []
    lock = threading.Lock()
    started = time.perf_counter()
    deadline = started + seconds
    issued = [0]

    def worker(call: Call) -> None:
        try:
            while True:
                with lock:
                    if time.perf_counter() >= deadline and len(done) >= 3:
                        return
                    slot = issued[0]
                    issued[0] += 1
                if rate is not None and (wait := started + slot / rate - time.perf_counter()) > 0:
                    time.sleep(wait)
                reply = call()
                with lock:
                    done.append((time.perf_counter(), reply))
        except BaseException as exc:
            errors.append(exc)

    if len(calls) == 1 and rate is None:
        worker(calls[0])
    else:
        threads = [
            threading.Thread(target=worker, args=(c,), name=f"bench-{i}", daemon=True) for i, c in enumerate(calls)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    if errors:
        raise errors[0]
    return done


# -- statistics and paired blocks ----------------------------------------------------------------------------------


def throughput(stamps: Sequence[float], items: float | Sequence[float]) -> float:
    """Items/s between the first and the last completion: ``(completions - 1) x items / (last - first)``.

    The first completion only marks the start: pipeline fill (first transfer, first run, threads still starting) is
    not counted, so a pipelined service and a bare loop are measured by the same rule. ``items`` per completion is
    one number or one per stamp.
    """
    counts = [float(items)] * len(stamps) if isinstance(items, int | float) else [float(n) for n in items]
    order = sorted(range(len(stamps)), key=stamps.__getitem__)
    if len(order) < 2 or stamps[order[-1]] <= stamps[order[0]]:
        raise ValueError("throughput needs at least two distinct completion times")
    return (sum(counts) - counts[order[0]]) / (stamps[order[-1]] - stamps[order[0]])


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def geomean(values: Sequence[float]) -> float:
    return math.exp(sum(math.log(v) for v in values) / len(values))


def percentile(values: Sequence[float], q: float, digits: int = 1) -> float | None:
    """The ``q``-th percentile rounded, or None for no values (a level where nothing arrived)."""
    return round(float(np.percentile(values, q)), digits) if len(values) else None


def per_item_overhead_ms(service_rate: float, bare_rate: float) -> float:
    """Extra milliseconds per item the service path costs over the bare path."""
    return (1.0 / service_rate - 1.0 / bare_rate) * 1000.0


def neighbour_ratios(references: Sequence[float], candidates: Sequence[float]) -> list[float]:
    """Candidate ``i`` over the geometric mean of references ``i`` and ``i + 1`` (the blocks around it)."""
    if len(references) != len(candidates) + 1:
        raise ValueError("one reference block more than candidate blocks")
    return [c / geomean(references[i : i + 2]) for i, c in enumerate(candidates)]


def interleaved(
    run: Callable[[str], dict[str, Any]],
    reference: str,
    schedule: Sequence[str],
    key: str = "fps",
    label: str | None = "mode",
) -> dict[str, Any]:
    """Blocks reference, schedule[0], reference, schedule[1], ..., reference.

    Per candidate mode: ``ratios`` (each of its blocks' ``key`` over the geometric mean of the reference blocks
    around it); ``references`` (those geometric means, block by block); ``blocks`` as ``run`` reported them, in
    order, each with its mode under ``label`` (None: ``run`` names it itself).
    """
    blocks = [_block(run, reference, label)]
    for mode in schedule:
        blocks += [_block(run, mode, label), _block(run, reference, label)]
    refs = [b[key] for b in blocks[0::2]]
    ratios = neighbour_ratios(refs, [b[key] for b in blocks[1::2]])
    by_mode: dict[str, list[float]] = {}
    for mode, ratio in zip(schedule, ratios, strict=True):
        by_mode.setdefault(mode, []).append(round(ratio, 4))
    around = [geomean(refs[i : i + 2]) for i in range(len(schedule))]
    return {"ratios": by_mode, "references": around, "blocks": blocks}


def paired(
    run: Callable[[str], dict[str, Any]],
    reference: str,
    candidate: str,
    blocks: int,
    key: str = "fps",
    label: str | None = "mode",
) -> dict[str, Any]:
    """``blocks`` (odd) alternating blocks; the candidate's median ratio, every ratio and every block."""
    if blocks < 3 or blocks % 2 == 0:
        raise ValueError("paired blocks: an odd count of at least 3")
    out = interleaved(run, reference, [candidate] * (blocks // 2), key, label)
    ratios = out["ratios"][candidate]
    return {"ratio": round(median(ratios), 4), "ratios": ratios, "blocks": out["blocks"]}


def _block(run: Callable[[str], dict[str, Any]], mode: str, label: str | None) -> dict[str, Any]:
    block = {label: mode, **run(mode)} if label else run(mode)
    shown = "  ".join(f"{n} {v}" for n, v in block.items() if n != label and not isinstance(v, dict | list))
    log(f"  {mode:28s} {shown}")
    return block
