"""RTCP sender reports on the media's own clock: each RTP timestamp paired with the time its frame was due.

A sender report pairs an RTP timestamp with the wall-clock time of the same sampling instant (RFC 3550, 6.4.1).
The browser maps both tracks onto wall-clock time with those pairs and plays audio and video by them, so
they decide lip sync. aiortc pairs the last packet's timestamp with the moment that packet left. For the audio,
that is its tick. For the video, it is the tick plus the JPEG decode, the VP8/H.264 encode and any wait in the
event loop: 15-200 ms here, and it changes with the load. The video's pairs then moved against the audio's by
that varying delay. Chromium's sync followed them half an error per second behind, and its audio - video
playout offset sat at -60 to -200 ms for seconds at a time on a loaded machine. Each of our tracks knows when
the frame it last handed to the encoder was due (``captured``, Unix seconds), so the pair here says exactly that.
"""

from __future__ import annotations

from typing import Any

from aiortc import RTCRtpSender

NTP_UNIX_OFFSET = 2_208_988_800  # seconds from 1900 (NTP) to 1970 (Unix)


def ntp_time(unix_seconds: float) -> int:
    """64-bit NTP time (seconds since 1900 in the high word, the fraction in the low one)."""
    return round((unix_seconds + NTP_UNIX_OFFSET) * (1 << 32))


class CaptureClockSender(RTCRtpSender):
    """An RTCRtpSender whose sender reports pair the last RTP timestamp with its frame's due time.

    aiortc stores the pair in two private fields after each packet it sends: the NTP time first, then the RTP
    timestamp. The second is a property here, which overwrites the first with the time the track's last frame
    was due. The track hands out one frame at a time, and aiortc sends all of a frame's packets before it asks
    for the next one, so the last frame handed out is the one these packets belong to.
    """

    @property
    def _RTCRtpSender__rtp_timestamp(self) -> int:  # aiortc's mangled name
        return self.__dict__.get("_capture_clock_rtp", 0)

    @_RTCRtpSender__rtp_timestamp.setter
    def _RTCRtpSender__rtp_timestamp(self, value: int) -> None:
        self.__dict__["_capture_clock_rtp"] = value
        captured = getattr(self.track, "captured", None)
        if captured is not None:
            self.__dict__["_RTCRtpSender__ntp_timestamp"] = ntp_time(captured)


def on_capture_clock(sender: Any) -> Any:
    """``sender`` (from ``addTrack``), its reports from now on stamped with its track's ``captured`` time."""
    if isinstance(sender, RTCRtpSender) and not isinstance(sender, CaptureClockSender):
        rtp = sender.__dict__.pop("_RTCRtpSender__rtp_timestamp", 0)
        sender.__class__ = CaptureClockSender
        sender.__dict__["_capture_clock_rtp"] = rtp
    return sender
