"""docs/configuration.md is what the schemas give, and `make config-docs-check` fails when it is not."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import pytest

from compositing_service.config import SCHEMA as COMPOSITING
from inference_service.config import SCHEMA as INFERENCE
from service_common.config_reference import yaml_text
from service_common.config_source import env_name

REPO = Path(__file__).resolve().parents[2]
REFERENCE = REPO / "docs" / "configuration.md"


@pytest.fixture(scope="module")
def tool() -> ModuleType:
    spec = importlib.util.spec_from_file_location("config_docs", REPO / "tools" / "config_docs.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_committed_reference_is_current(tool: ModuleType) -> None:
    assert REFERENCE.read_text() == tool.render(), "docs/configuration.md is stale: run `make config-docs`"


def test_the_check_fails_on_a_stale_file_and_write_fixes_it(tool: ModuleType, tmp_path: Path, capsys) -> None:
    path = tmp_path / "configuration.md"
    assert tool.main(["--check", str(path)]) == 1  # missing
    path.write_text(tool.render().replace("`9091`", "`9090`"))
    assert tool.main(["--check", str(path)]) == 1
    assert "is stale: run `make config-docs`" in capsys.readouterr().err
    assert tool.main(["--write", str(path)]) == 0
    assert tool.main(["--check", str(path)]) == 0


@pytest.mark.parametrize("schema", [INFERENCE, COMPOSITING], ids=["inference", "compositing"])
def test_every_key_has_a_row_with_its_variable_or_is_listed_as_ignored(schema) -> None:
    text = REFERENCE.read_text()
    section = text.split(f"## {schema.service.capitalize()} service\n", 1)[1].split("\n## ", 1)[0]
    for name, key in schema.rows():
        if key.ignored:
            assert f"| `{name}` | {key.ignored} |" in section
        else:
            assert f"| `{name}` | {key.kind} | " in section and f"`{env_name(name)}`" in section, name
            assert key.doc, f"{name}: no doc line"


def test_rows_show_defaults_and_bounds_as_a_config_writes_them() -> None:
    text = REFERENCE.read_text()
    assert '| `server.port` | address | `":50051"` |  | `LIPSYNC_SERVER__PORT` |' in text
    assert "| `server.max_batch_size` | int | `64` | 1 to 4096 |" in text
    assert "| `models.<id>.batching.enabled` | bool | as `batching.enabled` |" in text
    assert "`LIPSYNC_MODELS__<ID>__PRELOAD`" in text
    assert '| `output.jpeg_subsampling` | choice | `"420"` | `420`, `422`, `444` |' in text
    assert [yaml_text(v) for v in ("round-robin", "", "160", True, [1, 2], 0.5)] == [
        "round-robin",
        '""',
        '"160"',
        "true",
        "[1, 2]",
        "0.5",
    ]
