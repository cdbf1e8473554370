"""Client for the lip-sync server: speech file in, MP4 (and/or JPEG frames) out.

from lipsync_client import LipsyncClient

with LipsyncClient("127.0.0.1:50052") as client:
    result = client.render("demo", "speech.wav", out="talking.mp4")
    print(result.summary())
"""

from .api import LipsyncClient, LipsyncError, RenderResult

__all__ = ["LipsyncClient", "LipsyncError", "RenderResult"]
