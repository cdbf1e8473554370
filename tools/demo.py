"""`make demo`: start the inference and compositing services, render the committed speech to out/demo.mp4.

Both services run as their own processes on free loopback ports, exactly as
deployed (the local cluster with nginx in front arrives with `lipsync-cluster`);
the client renders tests/data/speech_16k.wav through them, prints its timing
summary, and everything is stopped again.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lipsync_client import LipsyncClient, LipsyncError
from service_common.processes import ServiceProcess, free_port

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--models-dir", type=Path, default=ROOT / "models")
    parser.add_argument("--audio", type=Path, default=ROOT / "tests" / "data" / "speech_16k.wav")
    parser.add_argument("--out", type=Path, default=ROOT / "out" / "demo.mp4")
    parser.add_argument("--model", default="demo")
    args = parser.parse_args(argv)
    models = args.models_dir.resolve()
    if not (models / "compositing.yaml").is_file():
        print(f"demo: {models}/compositing.yaml missing; run `make models` first", file=sys.stderr)
        return 2
    logs = args.out.parent / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    bin_dir = Path(sys.executable).parent
    inference_port, compositing_port = free_port(), free_port()
    print(f"starting the inference service on 127.0.0.1:{inference_port} ...")
    with ServiceProcess(
        [
            str(bin_dir / "lipsync-inference"),
            "--config",
            str(models / "inference.yaml"),
            "--host",
            "127.0.0.1",
            "--port",
            str(inference_port),
        ],
        inference_port,
        logs / "inference.log",
    ).wait_serving(120):
        print(f"starting the compositing service on 127.0.0.1:{compositing_port} ...")
        with ServiceProcess(
            [
                str(bin_dir / "lipsync-compositing"),
                "--config",
                str(models / "compositing.yaml"),
                "--host",
                "127.0.0.1",
                "--port",
                str(compositing_port),
                "--inference-url",
                f"127.0.0.1:{inference_port}",
            ],
            compositing_port,
            logs / "compositing.log",
        ).wait_serving(180) as compositing:
            print(f"rendering {args.audio.name} with the {args.model!r} avatar ...")
            try:
                with LipsyncClient(compositing.address) as client:
                    result = client.render(args.model, args.audio, out=args.out, batch_size=16, concurrency=2)
            except LipsyncError as exc:
                print(f"demo: {exc}", file=sys.stderr)
                return 1
    print(result.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
