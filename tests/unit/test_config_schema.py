"""The schema engine on a small schema: unknown keys with a did-you-mean, defaults, tables, the environment."""

from __future__ import annotations

import logging

import pytest

from service_common.config_schema import (
    From,
    Key,
    Schema,
    Table,
    choice,
    flag,
    ignored,
    integer,
    number,
    path,
    text,
)
from service_common.config_source import ConfigError, parse_listen_address, read_config, valid_model_id

TOY = Schema(
    "toy",
    (
        path("root", "a folder", required="the folder of things"),
        flag("fast", True, "go fast"),
        Key("server.port", "address", ":7", "where", parse=parse_listen_address),
        integer("server.workers", 2, "workers", 1, 8),
        number("server.grace_seconds", 1.5, "grace", 0.0),
        text("server.name", None, "a name", aliases=("title",)),
        choice("server.mode", "a", "a b"),
        integer("pool.size", 4, "pool size", 1),
        ignored("pool.library_path", "the package brings its own"),
        Table(
            "models",
            (path("file", "the file", required=True), integer("size", From("pool.size"), "its own pool", 1)),
            valid_model_id,
            "invalid id",
        ),
    ),
)


def test_values_defaults_and_given() -> None:
    values = TOY.check({"root": "r", "server": {"workers": "3", "title": "t"}, "models": {"m": {"file": "f"}}})
    assert values["root"] == "r" and values["fast"] is True and values["server.port"] == ("0.0.0.0", 7)
    assert values["server.workers"] == 3 and values.given("server.workers") and not values.given("fast")
    assert values["server.name"] == "t" and values.key("server.name") == "server.title"  # the alias, as given
    assert values["server.grace_seconds"] == 1.5 and values["server.mode"] == "a"
    model = values.entries("models")["m"]
    assert model["file"] == "f" and model["size"] == 4 and model.key("size") == "models.m.size"  # From pool.size
    assert (
        TOY.check({"root": "r", "pool": {"size": 6}, "models": {"m": {"file": "f"}}}).entries("models")["m"]["size"]
        == 6
    )
    assert TOY.default("server.workers") == 2 and TOY.default("models.<id>.size") is None
    assert TOY.check({"root": "r", "server": {"workers": None}})["server.workers"] == 2  # empty: unset


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"rooot": "x"}, "rooot: unknown key (did you mean root?)"),
        ({"server": {"worker": 2}}, "server.worker: unknown key (did you mean server.workers?)"),
        ({"server": {"size": 2}}, "server.size: unknown key (did you mean pool.size?)"),  # the right key elsewhere
        ({"pool": {"zzz": 1}}, "pool.zzz: unknown key (expected one of library_path, size)"),
        ({"models": {"m": {"file": "f", "sise": 1}}}, "models.m.sise: unknown key (did you mean models.m.size?)"),
        ({"server": {"name": "a", "title": "b"}}, "server.name and server.title: two spellings of one key"),
        ({"root": None}, "root: required (the folder of things)"),
        ({"models": {"m": {}}}, "models.m.file: required"),
        ({"models": {"a/b": {"file": "f"}}}, "models.a/b: invalid id"),
        ({"models": ["m"]}, "models: expected a mapping, got list"),
        ({"server": "fast"}, "server: expected a mapping, got str"),
        ({"server": {"workers": 9}}, "server.workers: expected an integer <= 8, got 9"),
        ({"server": {"workers": 0}}, "server.workers: expected an integer >= 1, got 0"),
        ({"server": {"grace_seconds": "long"}}, "server.grace_seconds: expected a number, got 'long'"),
        ({"server": {"mode": "c"}}, "server.mode: expected one of a, b, got 'c'"),
        ({"fast": "maybe"}, "fast: expected true or false, got 'maybe'"),
        ({"server": {"name": ["x"]}}, "server.name: expected a string, got ['x']"),
    ],
)
def test_errors_name_the_key(raw: dict, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        TOY.check({"root": "r", **raw})
    assert str(err.value).startswith(message), str(err.value)


def test_ignored_keys_warn_whatever_their_value(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        TOY.check({"root": "r", "pool": {"library_path": {"any": ["shape"]}}})
    assert "config: pool.library_path is ignored (the package brings its own)" in caplog.text


def test_the_environment_keeps_this_services_keys(tmp_path, caplog: pytest.LogCaptureFixture) -> None:
    env = {
        "LIPSYNC_SERVER__WORKERS": "5",
        "LIPSYNC_MODELS__M__SIZE": "3",
        "LIPSYNC_TOKEN": "secret",  # the client's, not a key
        "LIPSYNC_SERVER__WORKER": "4",  # a typo
    }
    with caplog.at_level(logging.WARNING):
        raw, _ = read_config(None, {"root": "r", "models.m.file": "f"}, env, TOY)
    values = TOY.check(raw)
    assert values["server.workers"] == 5 and values.entries("models")["m"]["size"] == 3
    assert "token" not in raw
    assert "LIPSYNC_TOKEN names no key of the toy service; ignored" in caplog.text
    assert (
        "LIPSYNC_SERVER__WORKER names no key of the toy service; ignored (did you mean LIPSYNC_SERVER__WORKERS?)"
        in (caplog.text)
    )
    assert TOY.names("models.anything.file") and TOY.names("server") and not TOY.names("server.nope")


def test_rows_name_table_keys_with_their_placeholder() -> None:
    names = [name for name, _ in TOY.rows()]
    assert names[0] == "root" and names[-2:] == ["models.<id>.file", "models.<id>.size"]


def test_declaration_mistakes_fail_at_import() -> None:
    with pytest.raises(TypeError, match="needs a parse function"):
        Key("x", "address", ":1", "no parser")
    with pytest.raises(TypeError, match="declared twice"):
        Schema("bad", (flag("a", True, ""), flag("a", False, "")))
    with pytest.raises(TypeError, match="lies under the key"):
        Schema("bad", (flag("a", True, ""), flag("a.b", False, "")))
