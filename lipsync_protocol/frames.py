"""A session's frame as both sides hold it: what ``SessionFrame`` carries, as a plain record."""

from __future__ import annotations

from dataclasses import dataclass, fields

from shared_proto import compositing_pb2 as pb


@dataclass(frozen=True)
class Frame:
    frame_index: int  # the session's frame number (idle frames included)
    timestamp_s: float  # frame_index / fps: the audio's clock, not the wall clock
    image: bytes  # JPEG (or PNG)
    background_index: int  # the avatar's background frame under it
    speech: bool  # made from speech (False: an idle frame)
    utterance: int  # which utterance (0: idle)
    utterance_frame: int  # its frame within the utterance

    def to_proto(self) -> pb.SessionFrame:
        return pb.SessionFrame(**{f.name: getattr(self, f.name) for f in fields(Frame)})

    @classmethod
    def field_values(cls, message: pb.SessionFrame) -> dict[str, object]:
        """The message's fields by name, for building this record or one that extends it."""
        return {f.name: getattr(message, f.name) for f in fields(Frame)}
