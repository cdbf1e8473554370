"""`make demo`: the local cluster (inference, two compositing replicas, nginx), speech in, out/demo.mp4 out.

Starts the same topology as deploy/ describes, as plain processes on
loopback; renders the committed speech sample through the load balancer;
prints the client's timing summary; stops the cluster (also on failure).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from lipsync_client import LipsyncClient, LipsyncError
from lipsync_cluster.launcher import Cluster, ClusterError, ClusterSpec
from service_common.processes import free_port

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--models-dir", type=Path, default=ROOT / "models")
    parser.add_argument("--audio", type=Path, default=ROOT / "tests" / "data" / "speech_16k.wav")
    parser.add_argument("--out", type=Path, default=ROOT / "out" / "demo.mp4")
    parser.add_argument("--model", default="demo")
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--port", type=int, default=0, help="public port (0: a free one)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    spec = ClusterSpec(models_dir=args.models_dir, port=args.port or free_port(), replicas=args.replicas)
    try:
        with Cluster(spec) as cluster:
            print(f"cluster serving on {cluster.address}; rendering {args.audio.name} with the {args.model!r} avatar")
            with LipsyncClient(cluster.address) as client:
                result = client.render(args.model, args.audio, out=args.out, batch_size=16, concurrency=2)
    except (ClusterError, LipsyncError) as exc:
        print(f"demo: {exc}", file=sys.stderr)
        return 1
    print(result.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
