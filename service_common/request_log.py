"""Per-request context (id, model, frames, stage timings), structured logs, and the one line per request.

The interceptor opens a RequestRecord for each call and the servicer fills in what only it knows (the model, the
frames, the stage timings); when the call ends the interceptor writes one line with all of it. Every other log
line written while a request is served carries its id too, so the lines of one request can be found together,
on both services: the compositing service passes the id on to inference in the call metadata.
"""

from __future__ import annotations

import contextvars
import json
import logging
import re
import sys
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

REQUEST_ID_KEY = "x-request-id"
_VALID_ID = re.compile(r"[A-Za-z0-9._:/+=-]{1,128}")

request_log = logging.getLogger("lipsync.requests")


@dataclass
class RequestRecord:
    request_id: str
    method: str
    peer: str = ""
    principal: str = ""
    model: str = ""
    frames: int = 0
    stages: dict[str, float] = field(default_factory=dict)  # milliseconds
    started: float = field(default_factory=time.perf_counter)


_current: contextvars.ContextVar[RequestRecord | None] = contextvars.ContextVar("lipsync_request", default=None)


def begin(record: RequestRecord) -> contextvars.Token:
    return _current.set(record)


def end(token: contextvars.Token) -> None:
    _current.reset(token)


def note(*, model: str | None = None, frames: int | None = None, **stages_ms: float) -> None:
    """Add what the servicer knows to the request being served (a no-op outside a request)."""
    record = _current.get()
    if record is None:
        return
    if model is not None:
        record.model = model
    if frames is not None:
        record.frames = frames
    record.stages.update({k: round(float(v), 3) for k, v in stages_ms.items()})


def request_id_from(metadata: Any) -> str:
    """The caller's id when it sent a sane one, else a new one."""
    for key, value in metadata or ():
        if key == REQUEST_ID_KEY:
            text = value.decode(errors="replace") if isinstance(value, bytes) else str(value)
            if _VALID_ID.fullmatch(text):
                return text
            break
    return uuid.uuid4().hex


CLIENT_KEY = "x-client-id"


def request_id() -> str:
    """The current request's id ("" outside a request)."""
    record = _current.get()
    return record.request_id if record is not None else ""


def client_name() -> str:
    """Who the current request is for: its token's name, else its peer address ("" outside a request)."""
    record = _current.get()
    if record is None:
        return ""
    return record.principal or record.peer


def outgoing_metadata() -> list[tuple[str, str]]:
    """Metadata to pass on to the next service: the request's id, and the end client it serves (so inference
    can share batches fairly between end clients, not between compositing replicas)."""
    record = _current.get()
    if record is None:
        return []
    return [(REQUEST_ID_KEY, record.request_id), (CLIENT_KEY, client_name()[:128])]


# -- log output ---------------------------------------------------------------------


class _RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "request_id"):
            current_record = _current.get()
            record.request_id = current_record.request_id if current_record is not None else ""
        return True


_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime", "request_id"}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time (UTC), level, logger, message, request id, and any ``extra`` fields."""

    converter = time.gmtime

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if getattr(record, "request_id", ""):
            out["request_id"] = record.request_id
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                out[key] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


class TextFormatter(logging.Formatter):
    converter = time.gmtime

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        rid = getattr(record, "request_id", "")
        return f"{text} [{rid}]" if rid else text


def configure_logging(level: str = "INFO", fmt: str = "text") -> None:
    """Root logging for a service process: ``text`` (human) or ``json`` (one object per line, for collectors)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    handler.addFilter(_RequestIdFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)


def log_request(record: RequestRecord, code: str, service: str) -> None:
    total_ms = (time.perf_counter() - record.started) * 1000.0
    fields = {
        "request_id": record.request_id,
        "service": service,
        "method": record.method,
        "code": code,
        "ms": round(total_ms, 3),
        "peer": record.peer,
        "principal": record.principal,
        "model": record.model,
        "frames": record.frames,
        "stages": record.stages,
    }
    stages = " ".join(f"{k}={v:.1f}" for k, v in record.stages.items())
    request_log.info(
        "%s %s %.1f ms model=%s frames=%d %s",
        record.method,
        code,
        total_ms,
        record.model or "-",
        record.frames,
        stages,
        extra=fields,
    )
