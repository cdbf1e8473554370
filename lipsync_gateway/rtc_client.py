"""A Python WebRTC peer for the gateway's ``POST /offer``, with aiortc: speech out as a microphone would send it,
the avatar's video and audio back, and the data channel's per-frame stats.

For bots that talk without a browser, and for the tests and the benchmark, which need a receiver whose
clock they can read: ``SpeechTrack`` records when each sample was "captured", ``received`` when each frame
was decoded.
"""

from __future__ import annotations

import asyncio
import contextlib
import fractions
import json
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import av
import numpy as np
from aiortc import MediaStreamTrack, RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError
from aiortc.rtp import RtcpSrPacket

RATE = 16000
FRAME = RATE // 50  # 20 ms, what a browser's microphone track sends


class SpeechTrack(MediaStreamTrack):
    """16 kHz mono speech sent at real time, then silence; ``say`` queues more. ``started`` (time.time()) is when
    sample 0 was sent: sample ``s`` went out at ``started + s / 16000``."""

    kind = "audio"

    def __init__(self, samples: np.ndarray | None = None) -> None:
        super().__init__()
        self._pending = np.zeros(0, np.float32)
        self.sent = 0
        self.started: float | None = None
        self._t0 = 0.0
        if samples is not None:
            self.say(samples)

    def say(self, samples: np.ndarray) -> None:
        self._pending = np.concatenate([self._pending, np.asarray(samples, np.float32)])

    async def recv(self) -> av.AudioFrame:
        if self.readyState != "live":
            raise MediaStreamError
        if self.started is None:
            self._t0 = time.monotonic()
            self.started = time.time()
        else:
            await asyncio.sleep(max(0.0, self._t0 + self.sent / RATE - time.monotonic()))
        chunk = np.zeros(FRAME, np.float32)
        take = self._pending[:FRAME]
        chunk[: len(take)] = take
        self._pending = self._pending[len(take) :]
        pcm = (np.clip(chunk, -1, 1) * 32767).astype(np.int16)
        frame = av.AudioFrame.from_ndarray(pcm[None], format="s16", layout="mono")
        frame.sample_rate = RATE
        frame.pts = self.sent
        frame.time_base = fractions.Fraction(1, RATE)
        self.sent += FRAME
        return frame


@dataclass
class Received:
    """What came back: per video frame (decode time, RTP pts, frame), per audio frame (pts, samples at 48 kHz),
    and the data channel's messages."""

    video: list[tuple[float, int]] = field(default_factory=list)
    images: list[np.ndarray] = field(default_factory=list)
    audio: list[tuple[int, np.ndarray]] = field(default_factory=list)
    messages: list[dict[str, Any]] = field(default_factory=list)
    # per track kind, the first RTP timestamp that arrived, and every sender report as (kind, NTP, RTP time)
    first_rtp: dict[str, int] = field(default_factory=dict)
    reports: list[tuple[str, int, int]] = field(default_factory=list)


class TalkClient:
    """``async with TalkClient(url, model) as client``: offer, answer, media both ways; ``close`` hangs up."""

    def __init__(
        self,
        url: str,
        model: str,
        speech: SpeechTrack | None = None,
        keep_images: bool = False,
        keep_audio: bool = False,
    ) -> None:
        self.url = url.rstrip("/") + "/"
        self.model = model
        self.speech = speech or SpeechTrack()
        self.keep_images = keep_images
        self.keep_audio = keep_audio
        self.pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        self.received = Received()
        self.peer_id: str | None = None
        self.channel: Any = None
        self.status: int | None = None
        self.error: dict[str, Any] | None = None
        self._tasks: list[asyncio.Task] = []

    async def connect(self) -> bool:
        """Offers and applies the answer; False (with ``status`` and ``error``) when the gateway refuses."""
        pc = self.pc
        pc.addTrack(self.speech)
        pc.addTransceiver("video", direction="recvonly")
        for transceiver in pc.getTransceivers():
            self._tap(transceiver.receiver, transceiver.kind)
        self.channel = pc.createDataChannel("lipsync")
        self.channel.on("message", self._on_message)
        pc.on("track", self._on_track)
        await pc.setLocalDescription(await pc.createOffer())
        body = {"sdp": pc.localDescription.sdp, "type": "offer", "model": self.model}
        async with aiohttp.ClientSession() as http, http.post(self.url + "offer", json=body) as response:
            self.status = response.status
            reply = await response.json()
        if self.status != 200:
            self.error = reply
            return False
        self.peer_id = reply["peer_id"]
        await pc.setRemoteDescription(RTCSessionDescription(sdp=reply["sdp"], type=reply["type"]))
        return True

    def _tap(self, receiver: Any, kind: str) -> None:
        """Records the track's first RTP timestamp and its sender reports (aiortc keeps neither)."""
        on_rtp, on_rtcp = receiver._handle_rtp_packet, receiver._handle_rtcp_packet

        async def rtp(packet: Any, arrival_time_ms: int) -> None:
            self.received.first_rtp.setdefault(kind, packet.timestamp)
            await on_rtp(packet, arrival_time_ms)

        async def rtcp(packet: Any) -> None:
            if isinstance(packet, RtcpSrPacket):
                info = packet.sender_info
                self.received.reports.append((kind, info.ntp_timestamp, info.rtp_timestamp))
            await on_rtcp(packet)

        receiver._handle_rtp_packet, receiver._handle_rtcp_packet = rtp, rtcp

    def _on_message(self, text: Any) -> None:
        with contextlib.suppress(ValueError):
            self.received.messages.append(json.loads(text))

    def _on_track(self, track: Any) -> None:
        self._tasks.append(asyncio.create_task(self._read(track)))

    async def _read(self, track: Any) -> None:
        with contextlib.suppress(MediaStreamError):
            while True:
                frame = await track.recv()
                if track.kind == "video":
                    self.received.video.append((time.time(), frame.pts))
                    if self.keep_images:
                        self.received.images.append(frame.to_ndarray(format="gray"))
                elif self.keep_audio:
                    self.received.audio.append((frame.pts, frame.to_ndarray().reshape(-1)))

    def send(self, message: dict[str, Any]) -> None:
        self.channel.send(json.dumps(message))

    def frames(self) -> list[dict[str, Any]]:
        return [m for m in self.received.messages if m.get("type") == "frame"]

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await self.pc.close()

    async def __aenter__(self) -> TalkClient:
        if not await self.connect():
            await self.pc.close()
            raise RuntimeError(f"offer refused: HTTP {self.status} {self.error}")
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
