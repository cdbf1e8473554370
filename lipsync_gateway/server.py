"""``lipsync-gateway``: the browser viewer's HTTP server, in front of the compositing service.

Routes:

- ``GET /``: the viewer page (``static/index.html`` and ``static/viewer.js``; no build step, nothing external).
- ``GET /healthz``: 200 and a small JSON status while the gateway serves.
- ``GET /models``: the compositing service's ListModels as a JSON list.
- ``POST /session?model=ID&start_frame=N[&drop_late=1]``: the body is an audio file (anything PyAV reads: WAV,
  MP3, OGG, WebM-Opus from MediaRecorder...). It is decoded to 16 kHz mono, streamed to a StreamSession in 40 ms
  chunks (as fast as gRPC flow control allows) followed by end_of_input, and the frames come back as they are made,
  as newline-delimited JSON over a chunked response::

      {"started": {"session_id": .., "width": 1280, "height": 720, "fps": 25, "audio_seconds": .., ...}}
      {"index": 0, "t": 0.0, "speech": true, "jpeg": "<base64>"}
      ...
      {"ended": {"frames": .., "speech_frames": .., "dropped_frames": .., "audio_seconds": .., "wall_seconds": ..}}

  An error before the stream starts is an HTTP error status whose body is one line ``{"error": .., "code": ..}``;
  an error during the stream is such a line in place of ``ended``.
- ``GET /sample-clip``: the clip given with ``--sample-clip`` (the page offers it; tests drive the page with it).
- ``POST /offer``: WebRTC (webrtc.py): ``{"sdp", "type": "offer", "model"}`` in, ``{"sdp", "type": "answer",
  "peer_id"}`` out; the peer talks to the avatar with its microphone and gets its video and speech back.
- ``POST /peers/{id}/speech``: audio for that peer's avatar to say (a file, or a streamed body such as a TTS
  stream; raw ``audio/L16;rate=N`` too); answers when it has been fed. ``GET /peers`` lists the peers with their
  stats and the CPU per media step; ``DELETE /peers/{id}`` closes one.

WebRTC flags: ``--max-peers`` (503 beyond), ``--ice-server URL`` (repeatable; ``--ice-username`` and
``--ice-credential`` for TURN), ``--playout-delay``, ``--peer-idle-timeout``, ``--peer-session-timeout``,
``--vad-threshold-db`` and ``--vad-hangover`` (docs/webrtc.md).

Everything is bounded: the body size (``--max-upload-mb``), the decoded audio (``--max-audio-seconds``), the
sessions open at once (``--max-sessions``) and each session's gRPC deadline (``--session-timeout``). A browser that
disconnects cancels its request handler, which cancels the gRPC call.

Sessions use the synchronous gRPC API, read by one thread per session into a small bounded queue (so a slow browser
still pushes back on the service): the asyncio client reports INTERNAL instead of the server's status when a call
ends while a request is being written (grpc/grpc#36066), which would hide errors such as an unknown model.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import logging
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from aiohttp import web

from lipsync_client.api import LipsyncError, open_channel
from lipsync_client.cli import add_connection_options, connection
from lipsync_client.media import MediaError, read_speech
from lipsync_client.retry import retrying
from lipsync_protocol.channels import ClientTls
from shared_proto import compositing_pb2 as pb
from shared_proto import compositing_pb2_grpc, inference_pb2

from .pump import ResponsePump
from .webrtc import PeerManager, WebRtcConfig, ice_servers

log = logging.getLogger("lipsync_gateway")

STATIC = Path(__file__).resolve().parent / "static"
SAMPLE_RATE = 16000
CHUNK_SAMPLES = SAMPLE_RATE * 40 // 1000  # 40 ms of audio per AudioChunk
MB = 1 << 20
NDJSON = "application/x-ndjson"
CHANNEL_OPTIONS = retrying([("grpc.max_receive_message_length", 64 * MB), ("grpc.max_send_message_length", 64 * MB)])
# The page loads nothing from anywhere else: scripts, media and requests stay on this origin.
PAGE_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' blob: data:; "
    "media-src 'self' blob:; connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.FAILED_PRECONDITION: 409,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 503,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}


@dataclass(frozen=True)
class GatewayConfig:
    server: str
    host: str = "127.0.0.1"
    port: int = 8090
    max_upload_bytes: int = 50 * MB
    max_audio_seconds: float = 300.0
    max_sessions: int = 4
    session_timeout: float = 600.0
    sample_clip: Path | None = None
    token: str | None = None  # sent to the compositing service (auth.enabled there)
    tls: ClientTls | None = None
    webrtc: WebRtcConfig = field(default_factory=WebRtcConfig)


class GatewayError(Exception):
    """A request that fails before its frame stream starts: an HTTP status and a JSON error line."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message

    @classmethod
    def from_rpc(cls, exc: grpc.RpcError) -> GatewayError:
        return cls(HTTP_STATUS.get(exc.code(), 502), exc.code().name, exc.details() or exc.code().name)

    def response(self) -> web.Response:
        return web.Response(status=self.status, text=error_line(self.code, self.message), content_type=NDJSON)


def error_line(code: str, message: str) -> str:
    return json.dumps({"error": message, "code": code}) + "\n"


def line(obj: dict[str, Any]) -> bytes:
    return (json.dumps(obj, separators=(",", ":")) + "\n").encode()


def session_requests(config: pb.SessionConfig, samples: np.ndarray) -> Iterator[pb.SessionRequest]:
    """The config, the audio in 40 ms float32 chunks, end_of_input; gRPC pulls them as flow control allows."""
    yield pb.SessionRequest(config=config)
    data = np.ascontiguousarray(samples, "<f4")
    for start in range(0, len(data), CHUNK_SAMPLES):
        yield pb.SessionRequest(audio=pb.AudioChunk(data=data[start : start + CHUNK_SAMPLES].tobytes()))
    yield pb.SessionRequest(control=pb.SessionControl(end_of_input=True))


class Gateway:
    def __init__(self, config: GatewayConfig) -> None:
        self.config = config
        self.channel: grpc.Channel | None = None
        self.stub: compositing_pb2_grpc.CompositingServiceStub | None = None
        self.active_sessions = 0
        self.sessions = 0
        self.disconnects = 0
        self.peers = PeerManager(config.webrtc, lambda: self.stub)

    async def lifetime(self, app: web.Application) -> AsyncIterator[None]:
        """One gRPC channel (thread-safe) from startup to cleanup."""
        config = self.config
        raw, self.channel = open_channel(config.server, CHANNEL_OPTIONS, token=config.token, tls=config.tls)
        self.stub = compositing_pb2_grpc.CompositingServiceStub(self.channel)
        yield
        await self.peers.close_all()
        raw.close()

    # -- routes ---------------------------------------------------------------

    async def index(self, request: web.Request) -> web.StreamResponse:
        return web.FileResponse(
            STATIC / "index.html",
            headers={"Content-Security-Policy": PAGE_CSP, "Cache-Control": "no-cache", "Content-Type": "text/html"},
        )

    async def viewer_js(self, request: web.Request) -> web.StreamResponse:
        return web.FileResponse(
            STATIC / "viewer.js", headers={"Cache-Control": "no-cache", "Content-Type": "text/javascript"}
        )

    async def talk_js(self, request: web.Request) -> web.StreamResponse:
        return web.FileResponse(
            STATIC / "talk.js", headers={"Cache-Control": "no-cache", "Content-Type": "text/javascript"}
        )

    async def healthz(self, request: web.Request) -> web.Response:
        return web.json_response(
            {
                "status": "ok",
                "server": self.config.server,
                "active_sessions": self.active_sessions,
                "sessions": self.sessions,
                "disconnects": self.disconnects,
                "sample_clip": self.config.sample_clip is not None,
                "peers": self.peers.health(),
            }
        )

    async def sample_clip(self, request: web.Request) -> web.StreamResponse:
        if self.config.sample_clip is None:
            raise web.HTTPNotFound(text="no sample clip (start the gateway with --sample-clip FILE)")
        return web.FileResponse(self.config.sample_clip, headers={"Cache-Control": "no-cache"})

    async def models(self, request: web.Request) -> web.Response:
        assert self.stub is not None
        try:
            reply = await asyncio.to_thread(self.stub.ListModels, pb.ListModelsRequest(), timeout=15)
        except grpc.RpcError as exc:
            error = GatewayError.from_rpc(exc)
            return web.json_response({"error": error.message, "code": error.code}, status=error.status)
        return web.json_response(
            [
                {
                    "model_id": m.model_id,
                    "loaded": m.loaded,
                    "num_frames": m.num_frames,
                    "frame_width": m.frame_width,
                    "frame_height": m.frame_height,
                }
                for m in reply.models
            ]
        )

    async def session(self, request: web.Request) -> web.StreamResponse:
        try:
            model, start_frame, drop_late = self._session_query(request)
            if self.active_sessions >= self.config.max_sessions:
                raise GatewayError(
                    503,
                    "RESOURCE_EXHAUSTED",
                    f"sessions: {self.active_sessions} open on this gateway (--max-sessions); retry later",
                )
        except GatewayError as exc:
            return exc.response()
        self.active_sessions += 1
        self.sessions += 1
        try:
            return await self._run_session(request, model, start_frame, drop_late)
        except GatewayError as exc:
            return exc.response()
        except (asyncio.CancelledError, ConnectionError):
            self.disconnects += 1
            log.info("session for %s: the browser disconnected; call cancelled", request.remote)
            raise
        finally:
            self.active_sessions -= 1

    # -- sessions -------------------------------------------------------------

    @staticmethod
    def _session_query(request: web.Request) -> tuple[str, int, bool]:
        model = request.query.get("model", "").strip()
        if not model:
            raise GatewayError(400, "INVALID_ARGUMENT", "model: expected ?model=ID (see /models)")
        text = request.query.get("start_frame", "0") or "0"
        try:
            start_frame = int(text)
        except ValueError:
            start_frame = -1
        if not 0 <= start_frame < 2**31:
            raise GatewayError(400, "INVALID_ARGUMENT", f"start_frame: expected an integer >= 0, got {text!r}")
        drop_late = request.query.get("drop_late", "").lower() in ("1", "true", "yes")
        return model, start_frame, drop_late

    async def _read_upload(self, request: web.Request) -> np.ndarray:
        """The body into a private temporary file (never more than the limit), decoded with read_speech."""
        limit = self.config.max_upload_bytes
        too_large = GatewayError(413, "PAYLOAD_TOO_LARGE", f"body: larger than the {limit / MB:g} MB limit")
        if request.content_length is not None and request.content_length > limit:
            raise too_large
        with tempfile.TemporaryDirectory(prefix="lipsync-gateway-") as tmp:
            path = Path(tmp) / "upload"
            size = 0
            with open(path, "wb") as out:
                async for chunk in request.content.iter_chunked(256 * 1024):
                    size += len(chunk)
                    if size > limit:
                        raise too_large
                    out.write(chunk)
            if size == 0:
                raise GatewayError(400, "INVALID_ARGUMENT", "body: expected an audio file, got an empty body")
            try:
                samples = await asyncio.to_thread(read_speech, path, "the upload")
            except MediaError as exc:
                raise GatewayError(400, "INVALID_ARGUMENT", str(exc)) from None
        seconds = len(samples) / SAMPLE_RATE
        if seconds > self.config.max_audio_seconds:
            raise GatewayError(
                413,
                "PAYLOAD_TOO_LARGE",
                f"audio: {seconds:.1f} s is longer than the {self.config.max_audio_seconds:g} s limit",
            )
        return samples

    async def _run_session(
        self, request: web.Request, model: str, start_frame: int, drop_late: bool
    ) -> web.StreamResponse:
        assert self.stub is not None
        samples = await self._read_upload(request)
        audio_seconds = len(samples) / SAMPLE_RATE
        config = pb.SessionConfig(
            model_id=model,
            start_frame_idx=start_frame,
            output_format="jpeg",
            audio_encoding=inference_pb2.AUDIO_FLOAT32,
            sample_rate=SAMPLE_RATE,
            drop_late_frames=drop_late,
        )
        began = time.monotonic()
        call = self.stub.StreamSession(session_requests(config, samples), timeout=self.config.session_timeout)
        pump = ResponsePump(call, asyncio.get_running_loop())
        try:
            started = await first_message(pump)
            response = web.StreamResponse(
                headers={"Content-Type": NDJSON, "Cache-Control": "no-store", "X-Accel-Buffering": "no"}
            )
            response.enable_chunked_encoding()
            await response.prepare(request)
            await response.write(line({"started": started_line(started, model, audio_seconds)}))
            try:
                frames = await relay_frames(pump, response, began)
                log.info(
                    "session %s (%s): %.2f s of audio, %d frames in %.2f s",
                    started.session_id,
                    model,
                    audio_seconds,
                    frames,
                    time.monotonic() - began,
                )
            except grpc.RpcError as exc:
                log.warning("session %s failed: %s %s", started.session_id, exc.code().name, exc.details())
                await response.write(error_line(exc.code().name, exc.details() or exc.code().name).encode())
            await response.write_eof()
            return response
        finally:
            pump.close()


async def first_message(pump: ResponsePump) -> pb.SessionStarted:
    """The session's SessionStarted; a refusal before it is an HTTP error with the gRPC status."""
    try:
        first = await pump.get()
    except grpc.RpcError as exc:
        raise GatewayError.from_rpc(exc) from None
    if first is pump.EOF or first.WhichOneof("message") != "started":
        raise GatewayError(502, "INTERNAL", "the compositing service ended the session before it started")
    return first.started


def started_line(started: pb.SessionStarted, model: str, audio_seconds: float) -> dict[str, Any]:
    return {
        "session_id": started.session_id,
        "model": model,
        "width": started.frame_width,
        "height": started.frame_height,
        "fps": started.fps,
        "num_background_frames": started.num_background_frames,
        "audio_seconds": audio_seconds,
    }


async def relay_frames(pump: ResponsePump, response: web.StreamResponse, began: float) -> int:
    """Each frame as a JSON line with its JPEG in base64, then the session's end; how many frames went."""
    frames = 0
    while (message := await pump.get()) is not pump.EOF:
        kind = message.WhichOneof("message")
        if kind == "frame":
            frame = message.frame
            frames += 1
            jpeg = base64.b64encode(frame.image).decode("ascii")
            await response.write(
                line({"index": frame.frame_index, "t": frame.timestamp_s, "speech": frame.speech, "jpeg": jpeg})
            )
        elif kind == "ended":
            ended = message.ended
            summary = {
                "frames": ended.frames,
                "speech_frames": ended.speech_frames,
                "idle_frames": ended.idle_frames,
                "dropped_frames": ended.dropped_frames,
                "audio_seconds": ended.audio_seconds,
                "wall_seconds": round(time.monotonic() - began, 3),
            }
            await response.write(line({"ended": summary}))
    return frames


def build_app(config: GatewayConfig) -> web.Application:
    gateway = Gateway(config)
    app = web.Application(client_max_size=config.max_upload_bytes)
    app.cleanup_ctx.append(gateway.lifetime)
    app.router.add_get("/", gateway.index)
    app.router.add_get("/viewer.js", gateway.viewer_js)
    app.router.add_get("/healthz", gateway.healthz)
    app.router.add_get("/models", gateway.models)
    app.router.add_get("/sample-clip", gateway.sample_clip)
    app.router.add_post("/session", gateway.session)
    app.router.add_get("/talk.js", gateway.talk_js)
    app.router.add_post("/offer", gateway.peers.offer)
    app.router.add_get("/peers", gateway.peers.list)
    app.router.add_post("/peers/{peer_id}/speech", gateway.peers.speech)
    app.router.add_delete("/peers/{peer_id}", gateway.peers.delete)
    return app


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lipsync-gateway", description=__doc__.split("\n\n")[0])
    parser.add_argument("--server", required=True, help="the compositing service (or the cluster's nginx), HOST:PORT")
    parser.add_argument("--port", type=int, default=8090, help="HTTP port (default 8090)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--max-upload-mb", type=float, default=50.0, help="largest audio file accepted (MB)")
    parser.add_argument("--max-audio-seconds", type=float, default=300.0, help="longest decoded clip accepted")
    parser.add_argument("--max-sessions", type=int, default=4, help="sessions open at once (more get 503)")
    parser.add_argument("--session-timeout", type=float, default=600.0, help="gRPC deadline of a session (s)")
    parser.add_argument("--sample-clip", type=Path, help="an audio file the page offers (served at /sample-clip)")
    rtc = parser.add_argument_group("WebRTC (POST /offer; docs/webrtc.md)")
    rtc.add_argument("--max-peers", type=int, default=4, help="WebRTC peers open at once (more get 503; default 4)")
    rtc.add_argument(
        "--ice-server", action="append", default=[], metavar="URL", help="STUN/TURN server (repeatable); none: host"
    )
    rtc.add_argument("--ice-username", help="username for the turn: servers")
    rtc.add_argument("--ice-credential", help="credential for the turn: servers")
    rtc.add_argument(
        "--playout-delay", type=float, default=0.55, help="frames buffered before sending, s (>= the model's 0.45)"
    )
    rtc.add_argument("--peer-idle-timeout", type=float, default=300.0, help="free a peer silent this long (s)")
    rtc.add_argument("--peer-session-timeout", type=float, default=3600.0, help="longest peer session (s)")
    rtc.add_argument("--vad-threshold-db", type=float, default=-45.0, help="mic level that opens an utterance")
    rtc.add_argument("--vad-hangover", type=float, default=0.6, help="silence that ends an utterance (s)")
    add_connection_options(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.sample_clip is not None and not args.sample_clip.is_file():
        parser.error(f"--sample-clip: {args.sample_clip} does not exist")
    if args.max_upload_mb <= 0 or args.max_audio_seconds <= 0 or args.max_sessions < 1 or args.session_timeout <= 0:
        parser.error("--max-upload-mb, --max-audio-seconds, --max-sessions and --session-timeout must be positive")
    if args.max_peers < 1 or args.playout_delay < 0 or args.peer_idle_timeout <= 0 or args.peer_session_timeout <= 0:
        parser.error("--max-peers, --peer-idle-timeout and --peer-session-timeout must be positive")
    try:
        servers = ice_servers(args.ice_server, args.ice_username, args.ice_credential)
    except ValueError as exc:
        parser.error(str(exc))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        token, tls = connection(args)
    except LipsyncError as exc:
        parser.error(str(exc))
    config = GatewayConfig(
        token=token,
        tls=tls,
        server=args.server,
        host=args.host,
        port=args.port,
        max_upload_bytes=int(args.max_upload_mb * MB),
        max_audio_seconds=args.max_audio_seconds,
        max_sessions=args.max_sessions,
        session_timeout=args.session_timeout,
        sample_clip=args.sample_clip.resolve() if args.sample_clip else None,
        webrtc=WebRtcConfig(
            max_peers=args.max_peers,
            ice_servers=servers,
            playout_delay=args.playout_delay,
            idle_timeout=args.peer_idle_timeout,
            session_timeout=args.peer_session_timeout,
            vad_threshold_db=args.vad_threshold_db,
            vad_hangover_s=args.vad_hangover,
            max_upload_bytes=int(args.max_upload_mb * MB),
            max_audio_seconds=args.max_audio_seconds,
        ),
    )
    log.info("lipsync gateway on http://%s:%d/ for %s", config.host, config.port, config.server)
    with contextlib.suppress(KeyboardInterrupt):
        # SIGINT and SIGTERM stop it; open streams get a moment, then their handlers (and gRPC calls) are cancelled.
        web.run_app(
            build_app(config),
            host=config.host,
            port=config.port,
            handler_cancellation=True,
            shutdown_timeout=3.0,
            print=None,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
