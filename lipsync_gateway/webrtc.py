"""WebRTC peers: talk to an avatar with live audio in and lip-synced video (and its audio) out, one session each.

``POST /offer`` takes ``{"sdp", "type": "offer", "model"}`` (the usual aiortc handshake, ICE gathered before the
answer, so any WebRTC client can use it) and answers ``{"sdp", "type": "answer", "peer_id"}``. The peer's
``StreamSession`` (with idle frames) is open before the answer, so an unknown model or a full replica is an HTTP
error, not a silent stream. Its speech is the browser's microphone track, gated into utterances (audio_in.py), or
audio pushed with ``POST /peers/{id}/speech``; its frames go out through the playout clock (playout.py). A data
channel, if the client opens one, carries control in (``interrupt``, ``end_of_utterance``, ``ping``) and
per-frame stats out. A peer is freed when its connection fails or closes, when it stays disconnected, when it
idles past its timeout, when its session ends, and on ``DELETE /peers/{id}``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np
from aiohttp import web
from aiortc import RTCConfiguration, RTCIceServer, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError

from shared_proto import compositing_pb2 as pb
from shared_proto import inference_pb2

from .audio_in import BLOCK, RATE, MicResampler, SpeechGate, decode_body
from .live import LiveSession
from .playout import TIMERS, Playout, frame_message, time_encoders
from .rtp_clock import on_capture_clock

log = logging.getLogger(__name__)

DISCONNECT_GRACE_S = 10.0  # "disconnected" may recover (a network blip); after this it is given up
STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 503,
    grpc.StatusCode.UNAUTHENTICATED: 502,
    grpc.StatusCode.PERMISSION_DENIED: 502,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}


@dataclass(frozen=True)
class WebRtcConfig:
    max_peers: int = 4
    ice_servers: tuple[RTCIceServer, ...] = ()  # none: host candidates only (loopback, LAN)
    playout_delay: float = 0.55  # the model's look-ahead (~0.45 s) plus a margin: see playout.py
    idle_timeout: float = 300.0  # no speech, push or data-channel message for this long: the peer is freed
    session_timeout: float = 3600.0  # the gRPC deadline of a peer's session
    vad_threshold_db: float = -45.0
    vad_hangover_s: float = 0.6
    max_upload_bytes: int = 50 << 20
    max_audio_seconds: float = 300.0


def ice_servers(urls: list[str], username: str | None, credential: str | None) -> tuple[RTCIceServer, ...]:
    """``--ice-server`` URLs as aiortc wants them; the TURN ones get the username and credential."""
    servers = []
    for url in urls:
        if not url.startswith(("stun:", "turn:", "turns:")):
            raise ValueError(f"--ice-server: expected stun:, turn: or turns: URL, got {url!r}")
        turn = url.startswith("turn")
        servers.append(RTCIceServer(url, username if turn else None, credential if turn else None))
    return tuple(servers)


class PeerError(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message

    @classmethod
    def from_rpc(cls, exc: grpc.RpcError) -> PeerError:
        return cls(STATUS.get(exc.code(), 502), exc.code().name, exc.details() or exc.code().name)

    def response(self) -> web.Response:
        return web.json_response({"error": self.message, "code": self.code}, status=self.status)


class Peer:
    """One RTCPeerConnection and its session; every task it starts ends in ``close``."""

    def __init__(self, manager: PeerManager, model: str, session: LiveSession, started: pb.SessionStarted) -> None:
        config = manager.config
        self.manager = manager
        self.id = uuid.uuid4().hex[:12]
        self.model = model
        self.session = session
        self.started = started
        self.pc = RTCPeerConnection(RTCConfiguration(iceServers=list(config.ice_servers)))
        self.playout = Playout(config.playout_delay, self._send_stats, config.vad_threshold_db)
        self.gate = SpeechGate(config.vad_threshold_db, config.vad_hangover_s)
        self.channel: Any = None
        self.utterance = 0  # mirrors the service's numbering: a new one on the first audio after an end
        self.open = False
        self.pushing = False
        self._push_epoch = 0
        self.mic_samples = 0
        self.opened_at = time.time()
        self.last_activity = time.monotonic()
        self.closed = False
        self.close_reason = ""
        self._tasks: list[asyncio.Task] = []
        self._disconnect_timer: asyncio.TimerHandle | None = None

    # -- set-up -----------------------------------------------------------------------------------------

    async def answer(self, offer: RTCSessionDescription) -> RTCSessionDescription:
        pc = self.pc
        pc.on("track", self._on_track)
        pc.on("datachannel", self._on_datachannel)
        pc.on("connectionstatechange", self._on_state)
        await pc.setRemoteDescription(offer)
        kinds = {t.kind for t in pc.getTransceivers()}
        if "video" not in kinds:
            raise PeerError(400, "INVALID_ARGUMENT", "sdp: the offer has no video section to receive the avatar")
        video = on_capture_clock(pc.addTrack(self.playout.video))
        self.playout.video.sender = video
        if "audio" in kinds:
            on_capture_clock(pc.addTrack(self.playout.audio))
        await pc.setLocalDescription(await pc.createAnswer())  # gathers the ICE candidates into the answer
        self._start(self._read_session())
        self._start(self._watch_idle())
        return pc.localDescription

    def _start(self, coro: Any) -> None:
        self._tasks.append(asyncio.create_task(coro))

    def _on_track(self, track: Any) -> None:
        if track.kind == "audio":
            self._start(self._read_mic(track))

    def _on_datachannel(self, channel: Any) -> None:
        self.channel = channel
        channel.on("message", self._on_message)
        self._send(
            {
                "type": "started",
                "peer_id": self.id,
                "session_id": self.started.session_id,
                "model": self.model,
                "width": self.started.frame_width,
                "height": self.started.frame_height,
                "fps": self.started.fps,
                "playout_delay_s": self.manager.config.playout_delay,
                "server_time": time.time() * 1000,
            }
        )

    def _on_state(self) -> None:
        state = self.pc.connectionState
        log.info("peer %s: connection %s", self.id, state)
        if self._disconnect_timer is not None:
            self._disconnect_timer.cancel()
            self._disconnect_timer = None
        if state == "connected" and not self.playout.accepting:
            self.playout.accepting = True
            self._start(self.playout.run())
        elif state in ("failed", "closed"):
            self._start(self.close(f"connection {state}"))
        elif state == "disconnected":
            loop = asyncio.get_running_loop()
            self._disconnect_timer = loop.call_later(
                DISCONNECT_GRACE_S, lambda: self._start(self.close("disconnected too long"))
            )

    # -- speech in ----------------------------------------------------------------------------------------

    def feed(self, samples: np.ndarray, position: int | None = None) -> None:
        """Audio into the session's open utterance (opening one), kept for the frames that will show it."""
        if not self.open:
            self.open = self.playout.speaking = True
            self.utterance += 1
        self.playout.utterance(self.utterance).append(samples, time.time(), position)
        self.session.send_audio(samples)
        self.last_activity = time.monotonic()

    def end_utterance(self) -> None:
        if self.open:
            self.open = self.playout.speaking = False
            self.session.end_of_input()
            self._send({"type": "utterance_end", "utterance": self.utterance})

    def interrupt(self) -> None:
        """Barge-in: the session drops its queued audio and unsent frames, and so does the playout buffer."""
        self.session.interrupt()
        self.playout.interrupt(self.utterance)
        self.open = self.playout.speaking = False
        self.gate.reset()
        self._push_epoch += 1
        self._send({"type": "interrupted", "utterance": self.utterance})

    async def _read_mic(self, track: Any) -> None:
        resample = MicResampler()
        with contextlib.suppress(MediaStreamError):
            while True:
                frame = await track.recv()
                samples = resample(frame)
                self.mic_samples += len(samples)
                if self.pushing:
                    continue  # the application speaks: the microphone waits
                out, ended = self.gate.feed(samples)
                if len(out):
                    self.feed(out, self.mic_samples)
                if ended:
                    self.end_utterance()

    async def push(self, blocks: AsyncIterator[np.ndarray]) -> dict[str, Any]:
        """Pushed speech as one utterance, fed at real time (the mic is ignored meanwhile)."""
        if self.pushing:
            raise PeerError(409, "FAILED_PRECONDITION", f"peer {self.id} is already speaking pushed audio")
        self.pushing = True
        self.end_utterance()
        self.gate.reset()
        epoch = self._push_epoch
        fed = 0
        pending = np.zeros(0, np.float32)
        next_at = time.monotonic()
        try:
            async for block in blocks:
                pending = np.concatenate([pending, block])
                while len(pending) >= BLOCK and epoch == self._push_epoch:
                    await asyncio.sleep(max(0.0, next_at - time.monotonic()))
                    next_at = max(next_at + BLOCK / RATE, time.monotonic() - 0.1)  # real time, a late loop catches up
                    if epoch != self._push_epoch or self.closed:
                        break
                    self.feed(pending[:BLOCK])
                    fed += BLOCK
                    pending = pending[BLOCK:]
                if epoch != self._push_epoch or self.closed:
                    break
            if len(pending) and epoch == self._push_epoch and not self.closed:
                self.feed(pending)
                fed += len(pending)
            interrupted = epoch != self._push_epoch
            if not interrupted:
                self.end_utterance()
            return {"peer_id": self.id, "utterance": self.utterance, "seconds": fed / RATE, "interrupted": interrupted}
        finally:
            self.pushing = False

    # -- frames out -----------------------------------------------------------------------------------------

    async def _read_session(self) -> None:
        reason = "session ended"
        try:
            while True:
                message = await self.session.get()
                if message is LiveSession.EOF:
                    break
                if message.WhichOneof("message") == "frame":
                    self.playout.push(message.frame, time.time())
        except grpc.RpcError as exc:
            reason = f"session failed: {exc.code().name} {exc.details()}"
            self._send({"type": "error", "code": exc.code().name, "error": exc.details()})
        await self.close(reason)

    def _send(self, message: dict[str, Any]) -> None:
        if self.channel is not None and self.channel.readyState == "open":
            self.channel.send(json.dumps(message, separators=(",", ":")))

    def _send_stats(self, info: dict[str, Any]) -> None:
        if self.channel is not None and self.channel.readyState == "open":
            self.channel.send(frame_message(info))

    def _on_message(self, text: Any) -> None:
        try:
            message = json.loads(text)
            kind = message.get("type")
        except (ValueError, AttributeError):
            self._send({"type": "error", "code": "INVALID_ARGUMENT", "error": "expected a JSON object"})
            return
        self.last_activity = time.monotonic()
        if kind == "interrupt":
            self.interrupt()
        elif kind == "end_of_utterance":
            self.gate.reset()
            self.end_utterance()
        elif kind == "ping":  # the page's clock offset to ours, for latencies across machines
            self._send({"type": "pong", "t": message.get("t"), "server_time": time.time() * 1000})
        else:
            self._send({"type": "error", "code": "INVALID_ARGUMENT", "error": f"unknown message type {kind!r}"})

    async def _watch_idle(self) -> None:
        timeout = self.manager.config.idle_timeout
        while not self.closed:
            await asyncio.sleep(min(1.0, timeout / 4))
            if self.gate.open or self.pushing:
                self.last_activity = time.monotonic()
            elif time.monotonic() - self.last_activity > timeout:
                self._start(self.close(f"idle for {timeout:g} s"))
                return

    # -- teardown ---------------------------------------------------------------------------------------------

    def describe(self) -> dict[str, Any]:
        stats = self.playout.stats
        return {
            "peer_id": self.id,
            "model": self.model,
            "session_id": self.started.session_id,
            "connection": self.pc.connectionState,
            "seconds": round(time.time() - self.opened_at, 1),
            "ticks": stats.ticks,
            "frames": stats.frames,
            "speech_frames": stats.speech_frames,
            "underruns": stats.underruns,
            "late_sends": stats.late_sends,
            "late_audio": stats.late_audio,
            "shed": stats.shed,
            "skipped": stats.skipped,
            "repeated": stats.repeated,
            "dropped": stats.dropped,
            "mic_seconds": round(self.mic_samples / RATE, 2),
            "utterances": self.utterance,
            "buffer": len(self.playout.buffer),
            "send_lag_ms_p95": _percentile(stats.send_lag_ms, 95),
            "audio_lag_ms_p99": _percentile(stats.audio_lag_ms, 99),
            "audio_lag_ms_max": _percentile(stats.audio_lag_ms, 100),
            "audio_to_send_ms_p50": _percentile(stats.latencies_ms, 50),
            "audio_to_send_ms_p95": _percentile(stats.latencies_ms, 95),
        }

    async def close(self, reason: str) -> None:
        if self.closed:
            return
        self.closed = True
        self.close_reason = reason
        log.info("peer %s closed: %s (%s)", self.id, reason, json.dumps(self.describe()))
        self.manager.forget(self)
        self._push_epoch += 1
        self.session.close()
        current = asyncio.current_task()
        for task in self._tasks:
            if task is not current:
                task.cancel()
        with contextlib.suppress(Exception):
            await self.pc.close()
        self.playout.video.stop()
        self.playout.audio.stop()


def _percentile(values: Any, q: float) -> float | None:
    return round(float(np.percentile(values, q)), 1) if values else None


class PeerManager:
    """The routes of the WebRTC part; ``stub`` gives the gateway's compositing stub (its channel carries the
    gateway's token)."""

    def __init__(self, config: WebRtcConfig, stub: Callable[[], Any]) -> None:
        self.config = config
        self._stub = stub
        self.peers: dict[str, Peer] = {}
        self.opening = 0
        self.total = 0
        self.refused = 0
        time_encoders()

    def forget(self, peer: Peer) -> None:
        self.peers.pop(peer.id, None)

    def health(self) -> dict[str, Any]:
        servers = [
            {k: v for k, v in {"urls": s.urls, "username": s.username, "credential": s.credential}.items() if v}
            for s in self.config.ice_servers
        ]  # the page's RTCPeerConnection needs the same ones
        return {
            "active": len(self.peers),
            "max": self.config.max_peers,
            "total": self.total,
            "refused": self.refused,
            "ice_servers": servers,
        }

    async def offer(self, request: web.Request) -> web.Response:
        try:
            body = await request.json()
            sdp, kind = body["sdp"], body.get("type", "offer")
            model = str(body.get("model") or request.query.get("model", "")).strip()
            start_frame = int(body.get("start_frame", 0))
        except (ValueError, KeyError, TypeError, AttributeError):
            expected = 'body: expected JSON {"sdp", "type": "offer", "model"}'
            return PeerError(400, "INVALID_ARGUMENT", expected).response()
        if kind != "offer" or not isinstance(sdp, str):
            return PeerError(400, "INVALID_ARGUMENT", "type: expected an SDP offer").response()
        if not model:
            return PeerError(400, "INVALID_ARGUMENT", "model: expected a model id (see /models)").response()
        if len(self.peers) + self.opening >= self.config.max_peers:
            self.refused += 1
            return PeerError(
                503, "RESOURCE_EXHAUSTED", f"peers: {self.config.max_peers} open on this gateway (--max-peers)"
            ).response()
        self.opening += 1
        peer: Peer | None = None
        session: LiveSession | None = None
        try:
            config = pb.SessionConfig(
                model_id=model,
                start_frame_idx=max(0, start_frame),
                output_format="jpeg",
                audio_encoding=inference_pb2.AUDIO_FLOAT32,
                sample_rate=RATE,
                idle_frames=True,
                drop_late_frames=True,
            )
            session = LiveSession(self._stub(), config, self.config.session_timeout)
            try:
                started = await session.start()
            except grpc.RpcError as exc:
                raise PeerError.from_rpc(exc) from None
            peer = Peer(self, model, session, started)
            answer = await peer.answer(RTCSessionDescription(sdp=sdp, type="offer"))
        except PeerError as exc:
            await self._abandon(peer, session)
            return exc.response()
        except ValueError as exc:  # aiortc: an SDP it cannot parse or answer
            await self._abandon(peer, session)
            return PeerError(400, "INVALID_ARGUMENT", f"sdp: {exc}").response()
        finally:
            self.opening -= 1
        self.peers[peer.id] = peer
        self.total += 1
        log.info("peer %s for %s: session %s", peer.id, model, started.session_id)
        return web.json_response({"sdp": answer.sdp, "type": answer.type, "peer_id": peer.id})

    @staticmethod
    async def _abandon(peer: Peer | None, session: LiveSession | None) -> None:
        if peer is not None:
            await peer.close("offer failed")
        elif session is not None:
            session.close()

    def _peer(self, request: web.Request) -> Peer:
        peer = self.peers.get(request.match_info["peer_id"])
        if peer is None:
            raise PeerError(404, "NOT_FOUND", f"peer {request.match_info['peer_id']}: no such peer (closed?)")
        return peer

    async def speech(self, request: web.Request) -> web.Response:
        try:
            peer = self._peer(request)
            limit = self.config.max_upload_bytes
            if request.content_length is not None and request.content_length > limit:
                raise PeerError(413, "PAYLOAD_TOO_LARGE", f"body: larger than the {limit / (1 << 20):g} MB limit")
            problems: list[str] = []

            async def body() -> AsyncIterator[bytes]:
                size = 0
                async for chunk in request.content.iter_chunked(64 * 1024):
                    size += len(chunk)
                    if size > limit:
                        problems.append(f"body: larger than the {limit / (1 << 20):g} MB limit")
                        return
                    yield chunk

            blocks = decode_body(
                body(), request.headers.get("Content-Type", ""), self.config.max_audio_seconds, problems.append
            )
            result = await peer.push(blocks)
            if problems:
                code = "PAYLOAD_TOO_LARGE" if "limit" in problems[0] else "INVALID_ARGUMENT"
                raise PeerError(413 if code == "PAYLOAD_TOO_LARGE" else 400, code, problems[0])
            if result["seconds"] == 0 and not result["interrupted"]:
                raise PeerError(400, "INVALID_ARGUMENT", "body: expected audio, got none")
            return web.json_response(result)
        except PeerError as exc:
            return exc.response()

    async def delete(self, request: web.Request) -> web.Response:
        try:
            peer = self._peer(request)
        except PeerError as exc:
            return exc.response()
        await peer.close("closed by DELETE")
        return web.json_response({"peer_id": peer.id, "closed": True})

    async def list(self, request: web.Request) -> web.Response:
        return web.json_response(
            {"peers": [p.describe() for p in self.peers.values()], **self.health(), "cpu": TIMERS.snapshot()}
        )

    async def close_all(self) -> None:
        for peer in list(self.peers.values()):
            await peer.close("gateway stopping")
