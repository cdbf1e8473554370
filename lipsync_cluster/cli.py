"""``lipsync-cluster up|down|restart``: the cluster as local processes, in the foreground or in the background."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from .launcher import Cluster, ClusterError, ClusterSpec, wait_gone


def state_file(port: int) -> Path:
    """Where a background cluster on ``port`` records itself, so `down` can find it."""
    base = Path(os.environ.get("XDG_RUNTIME_DIR") or "/tmp")
    return base / f"lipsync-cluster-{os.getuid()}-{port}.json"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lipsync-cluster", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="start inference, compositing replicas and nginx on loopback")
    up.add_argument("--replicas", type=int, default=2, help="compositing replicas")
    up.add_argument("--inference-servers", type=int, default=1, help="inference servers (round_robin from replicas)")
    up.add_argument("--models-dir", type=Path, default=Path("models"))
    up.add_argument("--port", type=int, default=8080, help="public port (nginx)")
    up.add_argument(
        "--gateway-port", type=int, help="also serve the browser viewer (lipsync-gateway) on this port, e.g. 8090"
    )
    up.add_argument("--detach", action="store_true", help="return once healthy; stop later with `down`")
    up.add_argument("--set-inference", action="append", default=[], metavar="KEY=VALUE")
    up.add_argument("--set-compositing", action="append", default=[], metavar="KEY=VALUE")
    up.add_argument("--state", type=Path, help=argparse.SUPPRESS)  # written by the detached supervisor when ready
    down = sub.add_parser("down", help="stop a running cluster (started in the background or not)")
    down.add_argument("--port", type=int, default=8080)
    restart = sub.add_parser("restart", help="restart a running cluster's processes without losing a call")
    restart.add_argument("--port", type=int, default=8080, help="the cluster's public port")
    restart.add_argument(
        "--rolling",
        action="store_true",
        required=True,
        help="one by one: each compositing replica replaced (the new one joins nginx before the old one leaves "
        "and drains), then each inference server restarted (with two or more)",
    )
    restart.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for it to finish")
    return parser


def recorded_pid(state: Path) -> int | None:
    """The supervisor recorded in ``state`` if it still runs (a file left by a killed one does not count)."""
    try:
        pid = int(json.loads(state.read_text())["supervisor_pid"])
        os.kill(pid, 0)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return pid


def run_foreground(args: argparse.Namespace, ready: Path | None = None) -> int:
    spec = ClusterSpec(
        models_dir=args.models_dir,
        port=args.port,
        replicas=args.replicas,
        inference_servers=args.inference_servers,
        inference_overrides=args.set_inference,
        compositing_overrides=args.set_compositing,
        gateway_port=args.gateway_port,
    )
    if spec.replicas < 1 or spec.inference_servers < 1:
        print("lipsync-cluster: --replicas and --inference-servers must be >= 1", file=sys.stderr)
        return 2
    if spec.gateway_port is not None and not 0 < spec.gateway_port < 65536:
        print("lipsync-cluster: --gateway-port must be a port number (1-65535)", file=sys.stderr)
        return 2
    ready = ready or state_file(spec.port)
    if recorded_pid(ready) not in (None, os.getpid()):
        print(f"lipsync-cluster: a cluster already runs on port {spec.port} ({ready})", file=sys.stderr)
        return 1
    stop, restart = threading.Event(), threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    signal.signal(signal.SIGUSR1, lambda *_: restart.set())  # from `lipsync-cluster restart --rolling`
    cluster = Cluster(spec)
    try:
        cluster.start()
    except ClusterError as exc:
        print(f"lipsync-cluster: {exc}", file=sys.stderr)
        return 1
    try:
        ready.write_text(
            json.dumps({"supervisor_pid": os.getpid(), "address": cluster.address, "gateway": cluster.gateway_url})
        )
        viewer = f"; browser viewer on {cluster.gateway_url}" if cluster.gateway_url else ""
        print(
            f"lipsync cluster serving on {cluster.address}: {len(cluster.inference)} inference, "
            f"{len(cluster.replicas)} compositing replicas behind nginx{viewer} (Ctrl-C to stop)",
            flush=True,
        )
        reported: set[str] = set()
        while not stop.wait(0.2):
            if restart.is_set():
                restart.clear()
                rolling_restart(cluster, restart_result(ready))
            for name in set(cluster.dead_parts()) - reported:
                print(f"lipsync-cluster: {name} exited", file=sys.stderr, flush=True)
                reported.add(name)
    finally:
        cluster.stop()
        ready.unlink(missing_ok=True)
        print("lipsync cluster stopped", flush=True)
    return 0


def restart_result(state: Path) -> Path:
    return state.with_suffix(".restart.json")


def rolling_restart(cluster: Cluster, result: Path) -> None:
    """Done by the supervisor on SIGUSR1; what happened goes to ``result`` for the `restart` command."""
    started = time.monotonic()
    try:
        done = cluster.rolling_restart()
        outcome = {"ok": True, "done": done}
    except (ClusterError, OSError) as exc:
        outcome = {"ok": False, "error": str(exc)}
    outcome["seconds"] = round(time.monotonic() - started, 2)
    print(f"lipsync-cluster: rolling restart: {json.dumps(outcome)}", flush=True)
    tmp = result.with_suffix(".tmp")
    tmp.write_text(json.dumps(outcome))
    tmp.replace(result)


def restart(args: argparse.Namespace) -> int:
    state = state_file(args.port)
    pid = recorded_pid(state)
    if pid is None:
        print(f"lipsync-cluster: no cluster runs on port {args.port}", file=sys.stderr)
        return 1
    result = restart_result(state)
    result.unlink(missing_ok=True)
    os.kill(pid, signal.SIGUSR1)
    deadline = time.monotonic() + args.timeout
    while not result.exists():
        if time.monotonic() > deadline or recorded_pid(state) is None:
            print("lipsync-cluster: the rolling restart did not finish", file=sys.stderr)
            return 1
        time.sleep(0.2)
    outcome = json.loads(result.read_text())
    result.unlink(missing_ok=True)
    if not outcome["ok"]:
        print(f"lipsync-cluster: rolling restart failed: {outcome['error']}", file=sys.stderr)
        return 1
    for line in outcome["done"]:
        print(line)
    print(f"rolling restart done in {outcome['seconds']} s")
    return 0


def up_detached(args: argparse.Namespace) -> int:
    state = state_file(args.port)
    if recorded_pid(state) is not None:
        print(
            f"lipsync-cluster: a cluster is already recorded on port {args.port} ({state}); "
            "run `lipsync-cluster down` first",
            file=sys.stderr,
        )
        return 1
    argv = [
        sys.executable,
        "-m",
        "lipsync_cluster.cli",
        "up",
        "--replicas",
        str(args.replicas),
        "--inference-servers",
        str(args.inference_servers),
        "--models-dir",
        str(args.models_dir),
        "--port",
        str(args.port),
        "--state",
        str(state),
    ]
    if args.gateway_port is not None:
        argv += ["--gateway-port", str(args.gateway_port)]
    for item in args.set_inference:
        argv += ["--set-inference", item]
    for item in args.set_compositing:
        argv += ["--set-compositing", item]
    log_path = state.with_suffix(".log")
    with open(log_path, "wb") as log:
        child = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if state.exists():
            viewer = f", browser viewer on http://127.0.0.1:{args.gateway_port}/" if args.gateway_port else ""
            print(
                f"lipsync cluster serving on 127.0.0.1:{args.port}{viewer} (stop with `lipsync-cluster down --port "
                f"{args.port}`)"
            )
            return 0
        if child.poll() is not None:
            print(log_path.read_text(errors="replace"), file=sys.stderr)
            log_path.unlink(missing_ok=True)
            return 1
        time.sleep(0.2)
    child.terminate()
    print("lipsync-cluster: not healthy after 300 s", file=sys.stderr)
    return 1


def down(args: argparse.Namespace) -> int:
    state = state_file(args.port)
    if not state.exists():
        print(f"lipsync-cluster: no background cluster on port {args.port}", file=sys.stderr)
        return 1
    pid = json.loads(state.read_text())["supervisor_pid"]
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        state.unlink(missing_ok=True)
    if not wait_gone(pid, 60):
        print(f"lipsync-cluster: supervisor {pid} did not stop", file=sys.stderr)
        return 1
    state.with_suffix(".log").unlink(missing_ok=True)
    print("lipsync cluster stopped")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if args.command == "down":
        return down(args)
    if args.command == "restart":
        return restart(args)
    if args.detach:
        return up_detached(args)
    return run_foreground(args, ready=args.state)


if __name__ == "__main__":
    sys.exit(main())
