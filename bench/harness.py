"""The benchmarks' one harness: services as processes, CPU meters, closed and open call loops, paired blocks.

Why: these machines are small, shared and noisy. A figure means something only as a ratio of two things measured
in one run, block against block (A B A B A, each B divided by the geometric mean of its neighbours), with the CPU
every process used counted per block, and with the machine's other load recorded beside it.
"""

from __future__ import annotations

import math
import os
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from service_common.processes import ServiceProcess, free_port

from . import common

log = common.log
machine_info = common.machine_info
write_result = common.write_result
median = common.median


def console_script(name: str) -> str:
    path = Path(sys.executable).parent / name
    found = str(path) if path.exists() else shutil.which(name)
    if not found:
        raise RuntimeError(f"{name} not found next to {sys.executable} nor on PATH (make install)")
    return found


@dataclass
class Fleet:
    """Service processes by name, each on a free loopback port with its log in ``work``."""

    work: Path
    procs: dict[str, ServiceProcess] = field(default_factory=dict)

    def start(self, name: str, script: str, args: Sequence[str], env: dict[str, str] | None = None) -> ServiceProcess:
        port = free_port()
        argv = [console_script(script), *args, "--host", "127.0.0.1", "--port", str(port), "--log-level", "WARNING"]
        self.procs[name] = ServiceProcess(argv, port, self.work / f"{name.replace('/', '-')}.log", env)
        return self.procs[name]

    def pids(self) -> dict[str, int]:
        return {name: proc.process.pid for name, proc in self.procs.items()}

    def stop(self) -> dict[str, int]:
        return {name: proc.stop() for name, proc in reversed(self.procs.items())}


@contextmanager
def fleet(prefix: str) -> Iterator[Fleet]:
    work = Path(tempfile.mkdtemp(prefix=prefix))
    running = Fleet(work)
    try:
        yield running
    finally:
        running.stop()
        shutil.rmtree(work, ignore_errors=True)


class Meter:
    """CPU seconds of named processes (all threads), this process and the whole machine, over a block."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = pids

    def snapshot(self) -> dict[str, float | None]:
        out = {name: common.process_cpu_seconds(pid) for name, pid in self.pids.items()}
        out["bench"] = common.process_cpu_seconds(None)
        out["machine"] = common.system_cpu_busy_seconds()
        out["wall"] = time.perf_counter()
        return out

    @staticmethod
    def used(start: dict[str, float | None], end: dict[str, float | None]) -> dict[str, float]:
        """CPU seconds per name over the block, and ``other``: what the rest of the machine used."""
        out = {k: (end[k] or 0.0) - (start[k] or 0.0) for k in start if k != "wall"}
        out["wall"] = (end["wall"] or 0.0) - (start["wall"] or 0.0)
        known = sum(v for k, v in out.items() if k not in ("machine", "wall"))
        out["other"] = max(out.get("machine", 0.0) - known, 0.0)
        return out


def closed_loop(call: Callable[[], Any], seconds: float, in_flight: int) -> list[tuple[float, Any]]:
    """``in_flight`` threads calling back to back until the time is up; (completion stamp, reply) each."""
    return _loop(call, seconds, in_flight, None)


def open_loop(call: Callable[[], Any], seconds: float, rate: float, in_flight: int = 8) -> list[tuple[float, Any]]:
    """Calls started at ``rate`` per second (up to ``in_flight`` at once), for comparing CPU at one throughput."""
    return _loop(call, seconds, in_flight, rate)


def _loop(call: Callable[[], Any], seconds: float, in_flight: int, rate: float | None) -> list[tuple[float, Any]]:
    done: list[tuple[float, Any]] = []
    errors: list[BaseException] = []
    lock = threading.Lock()
    started = time.perf_counter()
    deadline = started + seconds
    issued = [0]

    def worker() -> None:
        try:
            while True:
                with lock:
                    now = time.perf_counter()
                    if now >= deadline and len(done) >= 3:
                        return
                    slot = issued[0]
                    issued[0] += 1
                if rate is not None:
                    wait = started + slot / rate - time.perf_counter()
                    if wait > 0:
                        time.sleep(wait)
                reply = call()
                with lock:
                    done.append((time.perf_counter(), reply))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(in_flight)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return done


def throughput(done: Sequence[tuple[float, Any]], items: float) -> float:
    return common.throughput([stamp for stamp, _ in done], items)


def geomean(values: Sequence[float]) -> float:
    return math.exp(sum(math.log(v) for v in values) / len(values))


def paired(
    run: Callable[[str], dict[str, Any]], reference: str, candidate: str, blocks: int, key: str = "fps"
) -> dict[str, Any]:
    """Blocks reference, candidate, reference, ... (``blocks`` odd); each candidate block's ``key`` divided by the
    geometric mean of its neighbours; the median ratio, every ratio, and every block as ``run`` reported it."""
    if blocks < 3 or blocks % 2 == 0:
        raise ValueError("paired blocks: an odd count of at least 3")
    results = []
    for k in range(blocks):
        mode = reference if k % 2 == 0 else candidate
        block = {"mode": mode, **run(mode)}
        results.append(block)
        shown = "  ".join(f"{n} {v}" for n, v in block.items() if n != "mode" and not isinstance(v, dict))
        log(f"  {mode:28s} {shown}")
    ratios = [
        round(results[k][key] / geomean([results[k - 1][key], results[k + 1][key]]), 4) for k in range(1, blocks, 2)
    ]
    return {"ratio": round(median(ratios), 4), "ratios": ratios, "blocks": results}


def env_flag(name: str) -> bool:
    return os.environ.get(name, "").lower() in ("1", "true", "yes")
