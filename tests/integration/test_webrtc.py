"""The gateway's WebRTC peers with aiortc as the client: real gRPC servers on loopback, the gateway app in this
event loop, real ICE/DTLS/SRTP between two aiortc peer connections."""

from __future__ import annotations

import asyncio
import io
import json
import time
import wave
from pathlib import Path

import aiohttp
import grpc
import numpy as np
import pytest
from aiohttp import web
from support import ServerThread, make_compositing_config, speech_with_pauses, wait_until_async

from lipsync_client.media import read_speech
from lipsync_gateway.rtc_client import SpeechTrack, TalkClient
from lipsync_gateway.rtp_clock import NTP_UNIX_OFFSET
from lipsync_gateway.server import GatewayConfig, build_app
from lipsync_gateway.webrtc import WebRtcConfig
from service_common.processes import free_port
from shared_proto import compositing_pb2 as pb
from shared_proto import compositing_pb2_grpc

SPEECH = Path(__file__).resolve().parents[1] / "data" / "speech_16k.wav"


@pytest.fixture(scope="module")
def compositing(models_dir: Path, inference_server):
    server = ServerThread.compositing(make_compositing_config(models_dir, inference_server.address))
    yield server
    server.stop()


@pytest.fixture()
async def gateway(compositing):
    """Starts gateways (the WebRTC options given) on free ports; their URLs."""
    runners: list[web.AppRunner] = []

    async def start(**options) -> str:
        app = build_app(GatewayConfig(server=compositing.address, webrtc=WebRtcConfig(**options)))
        runner = web.AppRunner(app)
        await runner.setup()
        port = free_port()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        runners.append(runner)
        return f"http://127.0.0.1:{port}/"

    yield start
    for runner in runners:
        await runner.cleanup()


def open_sessions(address: str) -> int:
    with grpc.insecure_channel(address) as channel:
        stub = compositing_pb2_grpc.CompositingServiceStub(channel)
        return stub.Health(pb.HealthRequest(), timeout=10).active_sessions


async def peers(url: str) -> dict:
    async with aiohttp.ClientSession() as http, http.get(url + "peers") as response:
        return await response.json()


async def freed(url: str, address: str) -> bool:
    """No peer on the gateway and no session on the replica, within a generous deadline."""

    async def check() -> bool:
        return (await peers(url))["active"] == 0 and await asyncio.to_thread(open_sessions, address) == 0

    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if await check():
            return True
        await asyncio.sleep(0.1)
    return False


def loud_blocks(received_audio: list[tuple[int, np.ndarray]]) -> dict[int, bool]:
    """Received audio per 40 ms tick (48 kHz RTP time from the first packet): loud or not."""
    first = received_audio[0][0]
    energy: dict[int, list[float]] = {}
    for pts, samples in received_audio:
        energy.setdefault((pts - first) % 2**32 // 1920, []).append(float(np.mean(np.square(samples / 32768.0))))
    return {tick: 10 * np.log10(max(np.mean(v), 1e-12)) > -40 for tick, v in energy.items()}


def tick_zero_times(received) -> list[tuple[str, float]]:
    """Per sender report: the Unix time it gives the track's first RTP timestamp (tick 0 on loopback).

    A report that aiortc sends before the track's first packet has an NTP time of 0, which receivers ignore."""
    clock = {"audio": 48000, "video": 90000}
    return [
        (kind, ntp / 2**32 - NTP_UNIX_OFFSET - ((rtp - received.first_rtp[kind]) % 2**32) / clock[kind])
        for kind, ntp, rtp in received.reports
        if ntp
    ]


async def test_talking_peer_gets_paced_lip_synced_video_and_its_audio(gateway, compositing) -> None:
    url = await gateway()
    talk = SpeechTrack(speech_with_pauses(("silence", 0.5), ("speech", 2.0), ("silence", 2.0)))
    async with TalkClient(url, "demo", talk, keep_audio=True) as client:
        assert await wait_until_async(lambda: len(client.received.video) >= 125, timeout=60, interval=0.05)

        def played_out() -> bool:  # the utterance's frames, its tail and some idle frames after it were sent
            frames = client.frames()
            spoken = [m["n"] for m in frames if m["speech"]]
            return len(spoken) >= 50 and frames[-1]["n"] > spoken[-1] + 10

        assert await wait_until_async(played_out, timeout=30)
        assert any(m.get("type") == "utterance_end" for m in client.received.messages)
        assert await asyncio.to_thread(open_sessions, compositing.address) == 1
        stats = client.frames()
        video = list(client.received.video)
        audio = list(client.received.audio)

    # 25 frames a second (over the whole call: a busy loop here decodes in bursts), pts exactly one 90 kHz frame
    # apart, and the data channel speaks of the same frames.
    rate = (len(video) - 1) / (video[-1][0] - video[0][0])
    assert 20 <= rate <= 28, rate
    pts = [p for _, p in video]
    steps = np.diff(pts)
    # exactly one frame apart, but for ticks an overloaded encoder skipped (shed) on a busy machine
    assert set(steps % 3600) == {0} and np.mean(steps == 3600) >= 0.95, sorted(set(steps))
    # one stats message per tick sent, in order: a shed tick (above) is never sent, so it has none
    ns = np.array([m["n"] for m in stats])
    assert ns[0] == 0 and (np.diff(ns) >= 1).all() and np.mean(np.diff(ns) == 1) >= 0.95, ns
    # aiortc's receiver counts pts from the first frame it got, which was tick 0 (loopback loses nothing)
    by_n = {m["n"]: m for m in stats}
    assert {p // 3600 for p in pts} <= set(by_n)
    assert len({m["rtp"] - 3600 * m["n"] for m in stats if "rtp" in m}) == 1  # one origin: rtp = origin + 3600 n
    speech = [m for m in stats if m["speech"]]
    assert len(speech) >= 50 and {m["utterance"] for m in speech} == {1}

    # Audio and video on one clock: the received audio (placed by its RTP timestamps) is loud on the ticks whose
    # frames the gateway made from loud speech, best matched with no shift (one tick is 40 ms).
    loud = loud_blocks(audio)
    expected = {m["n"]: (m.get("level_db") or -200) > -40 for m in stats}
    common = sorted(set(loud) & set(expected))
    assert sum(expected[n] for n in common) >= 20 and sum(not expected[n] for n in common) >= 20
    agreement = {
        lag: np.mean([loud.get(n + lag, False) == expected[n] for n in common if n + lag in loud])
        for lag in range(-5, 6)
    }
    best = max(agreement, key=agreement.get)
    assert abs(best) <= 1 and agreement[best] >= 0.9, agreement

    # The sender reports, which a browser plays the two tracks by, place both on the ticks' clock: every report
    # of either track puts tick 0 at the same instant (aiortc alone stamps each with its send time, and the
    # video leaves after its decode and encode).
    epochs = tick_zero_times(client.received)
    assert {kind for kind, _ in epochs} == {"audio", "video"}, epochs
    times = [t for _, t in epochs]
    assert max(times) - min(times) < 0.002, epochs

    # Mouth to frame: the client's own send time of the frame's last sample -> the frame decoded here.
    received_at = {p // 3600: t for t, p in video}
    latencies = [
        (received_at[m["n"]] - (talk.started + m["mic_pos"] / 16000)) * 1000
        for m in speech
        if m["n"] in received_at and m.get("mic_pos") is not None
    ]
    assert len(latencies) >= 30 and 300 < np.median(latencies) < 3000, latencies[:10]
    assert await freed(url, compositing.address)


async def test_pushed_speech_is_said_and_interrupt_stops_it(gateway, compositing) -> None:
    url = await gateway()
    speech = read_speech(SPEECH)[: 16000 * 2]
    wav = io.BytesIO()
    with wave.open(wav, "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(16000)
        out.writeframes((speech * 32767).astype("<i2").tobytes())
    async with TalkClient(url, "demo") as client, aiohttp.ClientSession() as http:
        speech_url = f"{url}peers/{client.peer_id}/speech"
        async with http.post(speech_url, data=wav.getvalue(), headers={"Content-Type": "audio/wav"}) as response:
            said = await response.json()
        assert response.status == 200, said
        assert said["utterance"] == 1 and abs(said["seconds"] - 2.0) < 0.05 and not said["interrupted"]
        assert await wait_until_async(lambda: any(m["speech"] for m in client.frames()), timeout=30)

        # Raw PCM at another rate (what a TTS stream sends), in a chunked body; interrupted half way.
        pcm = (speech[::2] * 32767).astype(">i2").tobytes()  # 8 kHz, big-endian as audio/L16 is

        async def body():
            for i in range(0, len(pcm), 1600):
                yield pcm[i : i + 1600]
                await asyncio.sleep(0.05)

        push = asyncio.ensure_future(
            http.post(speech_url, data=body(), headers={"Content-Type": "audio/L16;rate=8000"})
        )
        assert await wait_until_async(lambda: any(m.get("utterance") == 2 for m in client.frames()), timeout=30)
        async with http.post(speech_url, data=b"x", headers={"Content-Type": "audio/wav"}) as busy:
            assert busy.status == 409
        client.send({"type": "interrupt"})
        async with await push as response:
            cut = await response.json()
        assert response.status == 200 and cut["interrupted"] and cut["utterance"] == 2 and cut["seconds"] < 2.0

        async with http.post(speech_url, data=b"not audio at all", headers={"Content-Type": "audio/wav"}) as bad:
            assert bad.status == 400 and "decode" in (await bad.json())["error"]
        async with http.post(f"{url}peers/nobody/speech", data=b"") as missing:
            assert missing.status == 404
        client.send({"type": "ping", "t": 1})
        client.send({"type": "nonsense"})
        assert await wait_until_async(lambda: any(m.get("type") == "pong" for m in client.received.messages))
        # The answer to the second message comes after the pong, not necessarily with it: wait for it too.
        assert await wait_until_async(lambda: any(m.get("type") == "error" for m in client.received.messages))
    assert await freed(url, compositing.address)


async def test_max_peers_and_every_way_a_peer_is_freed(gateway, compositing) -> None:
    url = await gateway(max_peers=1, idle_timeout=1.0)
    first = TalkClient(url, "demo")
    assert await first.connect()
    second = TalkClient(url, "demo")
    assert not await second.connect()
    assert second.status == 503 and second.error["code"] == "RESOURCE_EXHAUSTED"
    await second.pc.close()
    # The client hangs up: the peer and its session go (whether or not the 1 s idle timeout came first).
    await first.close()
    assert await freed(url, compositing.address)

    # DELETE /peers/{id} closes one.
    third = TalkClient(url, "demo")
    assert await third.connect()
    async with aiohttp.ClientSession() as http, http.delete(f"{url}peers/{third.peer_id}") as response:
        assert response.status == 200
    assert await freed(url, compositing.address)
    await third.close()

    # A peer nobody speaks through is freed after --peer-idle-timeout.
    fourth = TalkClient(url, "demo")
    assert await fourth.connect()
    assert await freed(url, compositing.address)
    await fourth.close()
    health = await peers(url)
    assert health["total"] == 3 and health["refused"] == 1 and health["cpu"]["video_encode"]["count"] > 0


async def test_offer_errors_are_http_errors(gateway, compositing) -> None:
    url = await gateway()
    async with aiohttp.ClientSession() as http:
        async with http.post(url + "offer", data=b"{not json") as response:
            assert response.status == 400
        async with http.post(url + "offer", json={"sdp": "v=0", "type": "answer", "model": "demo"}) as response:
            assert response.status == 400
        async with http.post(url + "offer", json={"sdp": "v=0", "type": "offer"}) as response:
            assert response.status == 400 and "model" in (await response.json())["error"]
    ghost = TalkClient(url, "ghost")
    assert not await ghost.connect()
    assert ghost.status == 404 and ghost.error["code"] == "NOT_FOUND"
    await ghost.pc.close()

    # An offer with no video to receive cannot show the avatar.
    from aiortc import RTCConfiguration, RTCPeerConnection

    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    pc.addTrack(SpeechTrack())
    await pc.setLocalDescription(await pc.createOffer())
    body = {"sdp": pc.localDescription.sdp, "type": "offer", "model": "demo"}
    async with aiohttp.ClientSession() as http, http.post(url + "offer", json=body) as response:
        assert response.status == 400 and "video" in json.dumps(await response.json())
    await pc.close()
    assert await freed(url, compositing.address)
