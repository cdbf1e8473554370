"""A stopping replica ends its sessions with a status that says so, and a new session takes over exactly."""

from __future__ import annotations

import threading
import time
import wave
from pathlib import Path

import grpc
import numpy as np
import pytest
from support import ServerThread, make_compositing_config

from lipsync_client import LipsyncClient, LipsyncError
from lipsync_client.session import LipsyncSession, StreamFrame

SPEECH = Path(__file__).resolve().parents[1] / "data" / "speech_16k.wav"


def speech(seconds: float) -> np.ndarray:
    with wave.open(str(SPEECH)) as w:
        pcm = np.frombuffer(w.readframes(w.getnframes()), "<i2")
    return pcm[: round(seconds * 16000)].astype(np.float32) / 32768.0


def whole(session: LipsyncSession, samples: np.ndarray) -> list[StreamFrame]:
    session.send_audio(samples)
    session.end_of_input()
    session.close()
    return list(session.frames())


def test_a_stopping_replica_ends_sessions_with_unavailable_and_a_new_one_resumes_exactly(
    models_dir: Path, inference_server
) -> None:
    config = make_compositing_config(models_dir, inference_server.address, **{"server.grace_seconds": 30})
    stopping, other = ServerThread.compositing(config), ServerThread.compositing(config)
    samples = speech(2.0)
    try:
        with LipsyncClient(other.address) as client, client.session("demo", start_frame=3) as session:
            reference = whole(session, samples)

        received: list[StreamFrame] = []
        with LipsyncClient(stopping.address) as client, client.session("demo", start_frame=3) as session:
            session.send_audio(samples)  # no end_of_input: the session waits for more audio when the stop comes
            frames = session.frames()
            while len(received) < 5:
                received.append(next(frames))
            started = time.monotonic()
            stopper = threading.Thread(target=stopping.stop)
            stopper.start()
            with pytest.raises(LipsyncError) as err:
                received.extend(frames)
            # Not cut when the 30 s grace ends (CANCELLED): ended at once, saying why.
            assert err.value.code == grpc.StatusCode.UNAVAILABLE, err.value
            assert "shutting down" in str(err.value) and time.monotonic() - started < 10
            start_frame, skip = session.resume_point()
        stopper.join(60)
        assert not stopper.is_alive()
        # Every frame the audio allowed was sent before the end (frames need about 450 ms of audio ahead).
        assert 5 <= len(received) < len(reference)
        assert (start_frame, skip) == (3, len(received))

        with LipsyncClient(other.address) as client, client.session("demo", start_frame=start_frame) as session:
            rest = whole(session, samples)[skip:]
        resumed = [(f.image, f.background_index) for f in [*received, *rest]]
        assert resumed == [(f.image, f.background_index) for f in reference]
    finally:
        other.stop()
        if stopping.thread.is_alive():
            stopping.stop()
