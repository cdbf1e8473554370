"""Client for the lip-sync server: speech file in, MP4 (and/or JPEG frames) out; real-time sessions.

from lipsync_client import LipsyncClient

with LipsyncClient("127.0.0.1:50052") as client:
    result = client.render("demo", "speech.wav", out="talking.mp4")
    print(result.summary())
    live = client.stream("demo", "speech.wav", out="live.mp4", realtime=True)  # through a StreamSession
    print(live.summary())
"""

from .api import LipsyncClient, LipsyncError, RenderResult
from .session import LipsyncSession, SessionInfo, SessionStats, StreamFrame, StreamResult

__all__ = [
    "LipsyncClient",
    "LipsyncError",
    "LipsyncSession",
    "RenderResult",
    "SessionInfo",
    "SessionStats",
    "StreamFrame",
    "StreamResult",
]
