"""``lipsync-cluster up|down``: the cluster as local processes, in the foreground or in the background."""

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
    down = sub.add_parser("down", help="stop a cluster started with --detach")
    down.add_argument("--port", type=int, default=8080)
    return parser


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
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    cluster = Cluster(spec)
    try:
        cluster.start()
    except ClusterError as exc:
        print(f"lipsync-cluster: {exc}", file=sys.stderr)
        return 1
    try:
        if ready is not None:
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
        while not stop.wait(1.0):
            for name in set(cluster.dead_parts()) - reported:
                print(f"lipsync-cluster: {name} exited", file=sys.stderr, flush=True)
                reported.add(name)
    finally:
        cluster.stop()
        if ready is not None:
            ready.unlink(missing_ok=True)
        print("lipsync cluster stopped", flush=True)
    return 0


def up_detached(args: argparse.Namespace) -> int:
    state = state_file(args.port)
    if state.exists():
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
    if args.detach:
        return up_detached(args)
    return run_foreground(args, ready=args.state)


if __name__ == "__main__":
    sys.exit(main())
