"""Reading torch checkpoints without torch: the layout, the refused globals, the key/shape checks."""

from __future__ import annotations

import pickle
import struct
import zipfile
from pathlib import Path

import numpy as np
import pytest
from synctalk import (
    View,
    global_op,
    random_state,
    require_fixtures,
    state_pickle,
    write_checkpoint,
    write_zip,
)

from model_import import ModelImportError
from model_import.checkpoint import ALLOWED_GLOBALS, load_pickle, pick_checkpoint, read_state_dict
from model_import.networks import check_unet, encoder_state, expected_table


@pytest.fixture()
def synctalk_fixtures() -> Path:
    return require_fixtures()


def test_tables_have_the_reference_counts() -> None:
    """SyncTalk_2D's own counts (keys, and every element of the state_dict) for the three networks."""
    for network, keys, elements in (
        ("328", 556, 12_251_587),
        ("160", 484, 12_226_887),
        ("audio_encoder", 91, 2_817_101),
    ):
        table = expected_table(network)
        assert len(table) == keys
        assert sum(int(np.prod(shape)) for shape, _ in table.values()) == elements
        assert sum(dtype == "int64" for _, dtype in table.values()) == {"328": 92, "160": 80}.get(network, 13)
    assert "down5.maxpool_conv.0.double_conv.1.conv.7.running_var" in expected_table("328")
    assert not any(k.startswith("down5.") for k in expected_table("160"))
    assert expected_table("328")["outc.conv.weight"] == ((3, 16, 1, 1), "float32")
    assert expected_table("160")["outc.conv.weight"] == ((3, 32, 1, 1), "float32")


def test_fixture_checkpoints_match_the_tables_exactly(synctalk_fixtures: Path) -> None:
    for network, name in (("328", "unet328"), ("160", "unet160"), ("audio_encoder", "audio_encoder")):
        state = read_state_dict(synctalk_fixtures / f"{name}_randbn.pth")
        assert {k: (v.shape, str(v.dtype)) for k, v in state.items()} == expected_table(network)


def test_a_written_checkpoint_reads_back_exactly(tmp_path: Path) -> None:
    state = random_state("audio_encoder", seed=3)
    path = write_checkpoint(tmp_path / "enc.pth", state)
    got = read_state_dict(path)
    assert list(got) == list(state)
    for key, value in state.items():
        assert got[key].dtype == value.dtype
        np.testing.assert_array_equal(got[key], value)
    assert encoder_state(got, str(path)).keys() == state.keys()


def test_trainer_layout_prefix_cuda_location_and_model_wrapper(tmp_path: Path) -> None:
    """What a real training run writes: `99.pth` holds `99/...`, CUDA storages; some trainers wrap it."""
    state = random_state("160", seed=1)
    path = write_checkpoint(tmp_path / "99.pth", state, location="cuda:0", wrapper=True)
    with zipfile.ZipFile(path) as zf:
        assert zf.namelist()[0] == "99/data.pkl"
        assert b"cuda:0" in zf.read("99/data.pkl")
    got = read_state_dict(path)
    assert check_unet(got, "auto", str(path)) == "160"
    np.testing.assert_array_equal(got["outc.conv.weight"], state["outc.conv.weight"])


def test_genuine_fixture_rewritten_as_a_trainer_file(synctalk_fixtures: Path, tmp_path: Path) -> None:
    """The fixture's own pickle, moved to prefix `99/`, its storages relocated to 'cuda:0' and wrapped in
    {'model': ...}: byte-level edits of a real torch.save file."""
    source = synctalk_fixtures / "unet328_randbn.pth"
    out = tmp_path / "99.pth"
    with zipfile.ZipFile(source) as zin, zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            data = zin.read(info)
            name = "99/" + info.filename.split("/", 1)[1]
            if name == "99/data.pkl":
                cpu, cuda = b"X" + struct.pack("<I", 3) + b"cpu", b"X" + struct.pack("<I", 6) + b"cuda:0"
                assert data.count(cpu) == 1  # memoised after the first use
                body = data[2:-1].replace(cpu, cuda)  # between PROTO 2 and STOP
                data = b"\x80\x02}" + b"X" + struct.pack("<I", 5) + b"model" + body + b"s."
            zout.writestr(name, data)
    got = read_state_dict(out)
    want = read_state_dict(source)
    assert check_unet(got, "auto", str(out)) == "328"
    assert got.keys() == want.keys()
    np.testing.assert_array_equal(got["inc.inconv.0.conv.0.weight"], want["inc.inconv.0.conv.0.weight"])


def test_offsets_strides_and_shared_storages(tmp_path: Path) -> None:
    flat = np.arange(24, dtype=np.float32)
    state = {
        "transposed": View(flat, 2, (4, 3), (1, 4)),  # t[i, j] = flat[2 + i + 4j]
        "tail": View(flat, 20, (4,), (1,)),
        "scalar": np.array(7, np.int64),
    }
    got = read_state_dict(write_checkpoint(tmp_path / "views.pth", state))
    np.testing.assert_array_equal(got["transposed"], np.lib.stride_tricks.as_strided(flat[2:], (4, 3), (4, 16)))
    np.testing.assert_array_equal(got["tail"], flat[20:])
    assert got["scalar"].shape == () and int(got["scalar"]) == 7


def test_a_view_past_its_storage_is_refused(tmp_path: Path) -> None:
    flat = np.arange(6, dtype=np.float32)
    path = write_checkpoint(tmp_path / "bad.pth", {"w": View(flat, 4, (2, 2), (2, 1))})
    with pytest.raises(ModelImportError, match="runs past its storage"):
        read_state_dict(path)


def test_folder_takes_the_highest_epoch_numerically(tmp_path: Path) -> None:
    for name in ("2.pth", "10.pth", "9.pth", "best.pth", "10.pth.bak", "notes.txt"):
        (tmp_path / name).write_bytes(b"")
    assert pick_checkpoint(tmp_path) == tmp_path / "10.pth"  # not 9.pth (lexical) nor best.pth
    assert pick_checkpoint(tmp_path / "2.pth") == tmp_path / "2.pth"
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelImportError, match=r"no <epoch>\.pth"):
        pick_checkpoint(empty)
    with pytest.raises(ModelImportError, match="no such checkpoint"):
        pick_checkpoint(tmp_path / "missing.pth")


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # the classic: unpickling runs os.system
        import os

        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("protocol", [2, 4])
def test_a_pickle_that_would_run_os_system_is_refused_unrun(tmp_path: Path, protocol: int) -> None:
    marker = tmp_path / "pwned"
    payload = pickle.dumps({"w": _Evil(marker)}, protocol=protocol)
    path = write_zip(tmp_path / "evil.pth", payload, {})
    with pytest.raises(ModelImportError) as info:
        read_state_dict(path)
    assert "posix.system" in str(info.value) and str(path) in str(info.value)
    assert not marker.exists()
    # The same pickle really does run it when loaded without the restriction: the test's premise holds.
    pickle.loads(payload)
    assert marker.exists()


@pytest.mark.parametrize(
    "module,name", [("os", "system"), ("builtins", "eval"), ("torch", "load"), ("torch._utils", "_rebuild_parameter")]
)
def test_any_other_global_is_refused_by_name(tmp_path: Path, module: str, name: str) -> None:
    """A hand-built pickle: a valid tensor entry first, then the foreign global, called by REDUCE."""
    marker = tmp_path / "ran"
    good, storages = state_pickle({"ok": np.zeros(2, np.float32)}, metadata=False)
    command = f"touch {marker}".encode()
    evil = global_op(module, name) + b"X" + struct.pack("<I", len(command)) + command + b"\x85R"  # f((command,))
    payload = good[:-2] + b"X\x03\x00\x00\x00bad" + evil + b"u."  # one more entry before SETITEMS and STOP
    path = write_zip(tmp_path / "hostile.pth", payload, storages)
    with pytest.raises(ModelImportError, match=rf"names the global {module}\.{name}, "):
        load_pickle(path)
    assert not marker.exists()
    assert "collections.OrderedDict" in ALLOWED_GLOBALS and f"{module}.{name}" not in ALLOWED_GLOBALS


def test_renamed_key_is_named(tmp_path: Path) -> None:
    state = random_state("328")
    state["outc.conv.bia5"] = state.pop("outc.conv.bias")
    path = write_checkpoint(tmp_path / "renamed.pth", state)
    with pytest.raises(ModelImportError) as info:
        check_unet(read_state_dict(path), "auto", str(path))
    message = str(info.value)
    assert "1 missing: outc.conv.bias" in message and "1 unexpected: outc.conv.bia5" in message
    assert "328 UNet" in message and str(path) in message


def test_wrong_shape_is_named_with_both_shapes(tmp_path: Path) -> None:
    state = random_state("160")
    state["fuse_conv.0.double_conv.0.conv.1.weight"] = np.ones(7, np.float32)
    with pytest.raises(ModelImportError, match=r"fuse_conv\.0\.double_conv\.0\.conv\.1\.weight \(expected \[2048\] "):
        check_unet(state, "auto", "x.pth")


def test_renamed_key_in_the_genuine_fixture(synctalk_fixtures: Path, tmp_path: Path) -> None:
    out = tmp_path / "renamed.pth"
    with zipfile.ZipFile(synctalk_fixtures / "unet160_randbn.pth") as zin, zipfile.ZipFile(out, "w") as zout:
        for info in zin.infolist():
            data = zin.read(info)
            if info.filename.endswith("/data.pkl"):
                assert data.count(b"outc.conv.bias") == 1
                data = data.replace(b"outc.conv.bias", b"outc.conv.bia5")  # same length: the pickle stays valid
            zout.writestr(info, data)
    with pytest.raises(ModelImportError, match=r"missing: outc\.conv\.bias; 1 unexpected: outc\.conv\.bia5"):
        check_unet(read_state_dict(out), "auto", str(out))


def test_other_architectures_and_wrong_variants_are_refused() -> None:
    unet160 = random_state("160")
    with pytest.raises(ModelImportError, match=r"not a SyncTalk_2D 328 UNet .*missing: down5\."):
        check_unet(unet160, "328", "a.pth")
    # Ultralight-Digital-Human's newer keys drop the Sequential index: inc.inconv.conv.* instead of inc.inconv.0.conv.*
    other = {k.replace("inc.inconv.0.", "inc.inconv."): v for k, v in unet160.items()}
    with pytest.raises(ModelImportError, match=r"18 unexpected: inc\.inconv\.conv\.0\.weight"):
        check_unet(other, "auto", "b.pth")
    with pytest.raises(ModelImportError, match="audio encoder checkpoint; pass it as --audio-encoder"):
        check_unet(random_state("audio_encoder"), "auto", "enc.pth")
    with pytest.raises(ModelImportError, match="not the SyncTalk_2D ave audio encoder"):
        encoder_state(unet160, "c.pth")
    prefixed = {f"audio_encoder.{k}": v for k, v in random_state("audio_encoder").items()}
    assert set(encoder_state(prefixed, "d.pth")) == set(expected_table("audio_encoder"))


def test_truncated_and_corrupt_files_name_the_file(tmp_path: Path) -> None:
    path = write_checkpoint(tmp_path / "whole.pth", random_state("audio_encoder"))
    data = path.read_bytes()
    cut = tmp_path / "cut.pth"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelImportError, match=rf"{cut}: the zip archive is truncated or corrupt"):
        read_state_dict(cut)
    # Intact directory, damaged record: the CRC check catches it.
    flipped = tmp_path / "flipped.pth"
    at = data.index(b"data/7") + 200  # inside a 36 kB weight
    flipped.write_bytes(data[:at] + bytes([data[at] ^ 0xFF]) + data[at + 1 :])
    with pytest.raises(ModelImportError, match=rf"{flipped}: the zip archive is truncated or corrupt"):
        read_state_dict(flipped)
    legacy = tmp_path / "legacy.pth"
    legacy.write_bytes(b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19.")
    with pytest.raises(ModelImportError, match="legacy"):
        read_state_dict(legacy)
    text = tmp_path / "notes.pth"
    text.write_text("hello")
    with pytest.raises(ModelImportError, match="not a torch checkpoint"):
        read_state_dict(text)


def test_odd_archives_are_refused(tmp_path: Path) -> None:
    two = tmp_path / "two.pth"
    with zipfile.ZipFile(two, "w") as zf:
        zf.writestr("a/data.pkl", b"")
        zf.writestr("b/data.pkl", b"")
    with pytest.raises(ModelImportError, match=r"expected one <prefix>/data\.pkl"):
        read_state_dict(two)
    pickle_bytes, _ = state_pickle({"w": np.zeros(3, np.float32)})
    missing = write_zip(tmp_path / "missing.pth", pickle_bytes, {})
    with pytest.raises(ModelImportError, match="record missing/data/0 is missing"):
        read_state_dict(missing)
    short = write_zip(tmp_path / "short.pth", pickle_bytes, {"0": b"\x00" * 8})
    with pytest.raises(ModelImportError, match="storage 0 holds 8 bytes, expected 3 x 4"):
        read_state_dict(short)
    not_state = write_zip(tmp_path / "list.pth", pickle.dumps([1, 2], protocol=2), {})
    with pytest.raises(ModelImportError, match="holds a list, not a state_dict"):
        read_state_dict(not_state)
    junk = write_zip(tmp_path / "junk.pth", b"\x80\x02}X\x01\x00\x00\x00aK\x01s.", {})
    with pytest.raises(ModelImportError, match="entry 'a': expected a tensor, found int"):
        read_state_dict(junk)
    garbled = write_zip(tmp_path / "garbled.pth", b"\x80\x02(X\x01", {})
    with pytest.raises(ModelImportError, match="not a readable checkpoint pickle"):
        read_state_dict(garbled)


def test_big_endian_archives_are_read(tmp_path: Path) -> None:
    values = np.arange(5, dtype=np.float32)
    pickle_bytes, _ = state_pickle({"w": values})
    path = tmp_path / "be.pth"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("be/data.pkl", pickle_bytes)
        zf.writestr("be/byteorder", "big")
        zf.writestr("be/data/0", values.astype(">f4").tobytes())
    np.testing.assert_array_equal(read_state_dict(path)["w"], values)


def test_the_package_never_imports_torch(tmp_path: Path) -> None:
    """torch is no dependency: not in any module of the package, and not loaded by reading a checkpoint."""
    import re
    import sys

    import model_import

    package = Path(model_import.__file__).parent
    for source in package.glob("*.py"):
        assert not re.search(r"^\s*(import|from)\s+torch\b", source.read_text(), re.MULTILINE), source
    read_state_dict(write_checkpoint(tmp_path / "w.pth", {"w": np.zeros(2, np.float32)}))
    assert "torch" not in sys.modules
