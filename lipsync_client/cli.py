"""``lipsync-client``: render speech to a lip-synced MP4, stream it through a real-time session, look at a server."""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path

from lipsync_protocol.channels import ClientTls

from .api import LipsyncClient, LipsyncError


class ProgressBar:
    """A one-line bar on stderr when it is a terminal; silent otherwise (logs stay clean)."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.started = time.perf_counter()

    def __call__(self, done: int, total: int) -> None:
        if not self.enabled:
            return
        width = 30
        filled = int(width * done / total) if total else width
        rate = done / max(time.perf_counter() - self.started, 1e-9)
        sys.stderr.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{total} frames {rate:.1f} fps")
        if done >= total:
            sys.stderr.write("\n")
        sys.stderr.flush()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lipsync-client", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    render = sub.add_parser("render", help="render a speech file to a lip-synced video")
    render.add_argument("--server", required=True, help="HOST:PORT of the compositing service or load balancer")
    render.add_argument("--model", required=True, help="avatar / model id")
    render.add_argument("--audio", required=True, type=Path, help="WAV, FLAC, MP3, ... at any rate")
    render.add_argument("--out", type=Path, help="MP4 to write (H.264, 25 fps, speech muxed in)")
    render.add_argument("--frames-dir", type=Path, help="also write the JPEG frames here")
    render.add_argument("--batch-size", type=int, default=16)
    render.add_argument("--concurrency", type=int, default=2, help="batches in flight")
    render.add_argument("--start-frame", type=int, default=0, help="first background frame of the avatar")
    render.add_argument("--timeout", type=float, default=120.0, help="deadline of each batch, seconds")
    render.add_argument("--no-progress", action="store_true")
    stream = sub.add_parser(
        "stream", help="feed a speech file through a real-time session, as a live source would, into a video"
    )
    stream.add_argument("--server", required=True, help="HOST:PORT of the compositing service or load balancer")
    stream.add_argument("--model", required=True, help="avatar / model id")
    stream.add_argument("--audio", required=True, type=Path, help="WAV, FLAC, MP3, ... at any rate")
    stream.add_argument("--out", required=True, type=Path, help="MP4 to write (H.264, 25 fps, speech muxed in)")
    stream.add_argument("--frames-dir", type=Path, help="also write the JPEG frames here")
    stream.add_argument("--realtime", action="store_true", help="send each chunk when a live source would have it")
    stream.add_argument("--chunk-ms", type=float, default=40.0, help="audio per AudioChunk, ms (default 40)")
    stream.add_argument("--stats-json", type=Path, help="write the latency figures here")
    stream.add_argument("--start-frame", type=int, default=0, help="first background frame of the avatar")
    stream.add_argument("--no-progress", action="store_true")
    for name, text in (("health", "the server's health"), ("models", "the avatars it serves")):
        command = sub.add_parser(name, help=text)
        command.add_argument("--server", required=True)
    for command in sub.choices.values():
        add_connection_options(command)
    return parser


def add_connection_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("security")
    group.add_argument("--token", help="API token (default: $LIPSYNC_TOKEN); sent as authorization: Bearer")
    group.add_argument("--tls", action="store_true", help="connect with TLS (implied by --ca-file/--cert-file)")
    group.add_argument("--ca-file", type=Path, help="CA certificate(s) to check the server with (default: system)")
    group.add_argument("--cert-file", type=Path, help="client certificate for mutual TLS (with --key-file)")
    group.add_argument("--key-file", type=Path, help="client private key for mutual TLS")
    group.add_argument("--server-name", default="", help="the name to check in the server's certificate")


def connection(args: argparse.Namespace) -> tuple[str | None, ClientTls | None]:
    token = args.token or os.environ.get("LIPSYNC_TOKEN") or None
    wants_tls = args.tls or args.ca_file or args.cert_file or args.key_file or args.server_name
    if (args.cert_file is None) != (args.key_file is None):
        raise LipsyncError("--cert-file and --key-file: give both for mutual TLS, or neither")
    tls = ClientTls(args.ca_file, args.cert_file, args.key_file, args.server_name) if wants_tls else None
    return token, tls


# The library names its parameters; this command line, its flags.
FLAGS = {"audio": "--audio", "out": "--out", "frames_dir": "--frames-dir", "batch_size": "--batch-size"}
FLAGS |= {"concurrency": "--concurrency", "start_frame": "--start-frame", "chunk_ms": "--chunk-ms"}
_NAMES = re.compile(r"^([a-z_]+(?:, [a-z_]+)*):")


def as_flags(message: str) -> str:
    """A library error as this command's user reads it: the parameters it names before the colon as flags."""
    found = _NAMES.match(message)
    if found is None:
        return message
    names = found.group(1).split(", ")
    if not all(name in FLAGS for name in names):
        return message
    return ", ".join(FLAGS[name] for name in names) + message[found.end(1) :]


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        token, tls = connection(args)
        with LipsyncClient(args.server, timeout=getattr(args, "timeout", 120.0), token=token, tls=tls) as client:
            if args.command == "health":
                health = client.health()
                print(
                    f"healthy: {health.healthy}  inference: {health.inference_server_healthy} "
                    f"({health.inference_mode} {health.inference_server_url})  version: {health.version}  "
                    f"avatars loaded: {health.loaded_models}/{health.max_models}"
                )
                return 0 if health.healthy else 1
            if args.command == "models":
                for info in client.models():
                    state = "loaded" if info.loaded else "not loaded"
                    size = f"{info.frame_width}x{info.frame_height}, {info.num_frames} frames" if info.loaded else ""
                    print(f"{info.model_id:20s} {state:11s} {size:28s} {info.background_dir}")
                return 0
            progress = ProgressBar(sys.stderr.isatty() and not args.no_progress)
            if args.command == "stream":
                return stream(client, args, progress)
            result = client.render(
                args.model,
                args.audio,
                out=args.out,
                frames_dir=args.frames_dir,
                batch_size=args.batch_size,
                concurrency=args.concurrency,
                start_frame=args.start_frame,
                progress=progress,
            )
            print(result.summary())
            return 0
    except LipsyncError as exc:
        print(f"lipsync-client: error: {as_flags(str(exc))}", file=sys.stderr)
        return 1


def stream(client: LipsyncClient, args: argparse.Namespace, progress: ProgressBar) -> int:
    if args.stats_json is not None and args.stats_json.is_dir():
        raise LipsyncError(f"--stats-json: {args.stats_json} is a folder")
    result = client.stream(
        args.model,
        args.audio,
        out=args.out,
        frames_dir=args.frames_dir,
        realtime=args.realtime,
        chunk_ms=args.chunk_ms,
        start_frame=args.start_frame,
        progress=progress,
    )
    print(result.summary())
    if args.stats_json is not None:
        stats = {"server": args.server, "model": args.model, "audio": str(args.audio), **result.stats()}
        try:
            args.stats_json.parent.mkdir(parents=True, exist_ok=True)
            args.stats_json.write_text(json.dumps(stats, indent=2) + "\n")
        except OSError as exc:
            raise LipsyncError(f"--stats-json: {exc}") from None
        print(f"stats            {args.stats_json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
