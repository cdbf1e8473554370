"""Model inputs by reference on the compositing -> inference hop (docs/api.md, "Model inputs by reference").

The model input of background frame k of an avatar is the same bytes every time that frame comes round, so the
compositing service names it with a key and sends its pixels once; the inference service keeps them in a
byte-bounded cache under (model id, key). A key a server does not hold is answered with the frames' positions in
``missing_visual``, nothing run, and the caller sends those pixels again.
"""

from __future__ import annotations

import hashlib

MAX_KEY_BYTES = 200
REAL_CHANNELS = 3  # visual_channels: the real crop only; the server builds the masked copy
FULL_CHANNELS = 6  # the whole model input, as old clients send it


def avatar_scope(avatar_id: str, *identity: object) -> str:
    """A key prefix that changes whenever anything that shapes the avatar's model inputs changes (its frames on
    disk, its rectangles, the geometry), so a changed avatar never resolves to inputs cached before."""
    digest = hashlib.sha256(repr(identity).encode()).hexdigest()[:16]
    return f"{avatar_id}@{digest}"


def input_key(scope: str, frame_index: int) -> str:
    return f"{scope}/{frame_index}"


def check_key(key: str, field: str) -> None:
    """Keys are opaque to the server but bounded, so a client cannot make the cache hold huge names."""
    if not key or len(key.encode()) > MAX_KEY_BYTES or not key.isprintable():
        raise ValueError(f"{field}: expected 1..{MAX_KEY_BYTES} bytes of printable text, got {key[:40]!r}")
