"""Log lines: UTC times whatever the machine's zone, the request id on every line of a request."""

from __future__ import annotations

import logging
import time

import pytest

from service_common import request_log
from service_common.request_log import JsonFormatter, RequestRecord, TextFormatter


@pytest.fixture()
def new_york(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("TZ", "America/New_York")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


def test_times_are_utc(new_york) -> None:
    record = logging.makeLogRecord({"msg": "x", "created": 0.0, "msecs": 0, "levelname": "INFO", "name": "t"})
    assert JsonFormatter().format(record).startswith('{"ts": "1970-01-01T00:00:00.000Z"')
    assert TextFormatter().format(record).startswith("1970-01-01 00:00:00,000 INFO t: x")


def test_lines_inside_a_request_carry_its_id(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    caplog.handler.addFilter(request_log._RequestIdFilter())
    token = request_log.begin(RequestRecord("req-42", "M", principal="alice"))
    try:
        logging.getLogger("x").info("inside")
        assert request_log.client_name() == "alice"
        assert ("x-request-id", "req-42") in request_log.outgoing_metadata()
    finally:
        request_log.end(token)
    logging.getLogger("x").info("outside")
    ids = {r.getMessage(): r.request_id for r in caplog.records}
    assert ids == {"inside": "req-42", "outside": ""}
    assert request_log.outgoing_metadata() == [] and request_log.client_name() == ""
