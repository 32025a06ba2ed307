"""The torch-free checkpoint reader: formats, dtypes, views, and refusal of code-carrying pickles."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

from dinat_np import torch_archive
from dinat_np import torch_pickle as tp
from dinat_np.torch_pickle import (
    TorchCheckpointError,
    UnsafeCheckpointError,
    load_torch_checkpoint,
    load_torch_file,
)

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.torch

DATA = Path(__file__).parent / "data"


# ---------------------------------------------------------------------------------------------
# helpers


def _zip_with_pickle(path: Path, pkl: bytes, storages: dict[str, bytes] | None = None, prefix: str = "archive",
                     storage_compression: int = zipfile.ZIP_STORED) -> Path:
    """A torch-style zip archive whose data.pkl is ``pkl``."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as z:
        z.writestr(f"{prefix}/data.pkl", pkl)
        z.writestr(f"{prefix}/byteorder", "little")
        for key, blob in (storages or {}).items():
            z.writestr(f"{prefix}/data/{key}", blob, compress_type=storage_compression)
        z.writestr(f"{prefix}/version", "3\n")
    return path


def _global_call_p2(module: str, name: str, arg: str) -> bytes:
    """Protocol-2 pickle calling module.name(arg) through GLOBAL + REDUCE."""
    a = arg.encode()
    return b"\x80\x02c" + f"{module}\n{name}\n".encode() + b"X" + len(a).to_bytes(4, "little") + a + b"\x85R."


def _text(s: str) -> bytes:
    """BINUNICODE opcode pushing ``s``."""
    return b"X" + len(s.encode()).to_bytes(4, "little") + s.encode()


def _short(s: str) -> bytes:
    b = s.encode()
    return b"\x8c" + bytes([len(b)]) + b


def _stack_global_call_p4(module: str, name: str, arg: str) -> bytes:
    """Protocol-4 pickle calling module.name(arg) through STACK_GLOBAL (memoized strings)."""
    return b"\x80\x04" + _short(module) + b"\x94" + _short(name) + b"\x94\x93\x94" + _short(arg) + b"\x85R."


def _memo_indirect_call(module: str, name: str, arg: str) -> bytes:
    """STACK_GLOBAL whose module string is fetched back from the memo after other work."""
    return (b"\x80\x04" + _short(module) + b"\x94" + b"0"  # push, memoize as 0, POP
            + b"N0"  # push None, pop: unrelated work in between
            + b"h\x00" + _short(name) + b"\x93" + _short(arg) + b"\x85R.")


def _inst_call(module: str, name: str, arg: str) -> bytes:
    """Protocol-0 INST opcode: instantiate module.name(arg.split()) (a list argument, as Popen wants)."""
    words = b"".join(b"V" + w.encode() + b"\n" for w in arg.split())
    return b"((" + words + b"li" + f"{module}\n{name}\n".encode() + b"."


@pytest.fixture()
def marker(tmp_path: Path) -> Path:
    return tmp_path / "PWNED"


def _assert_refused(path: Path, marker: Path, global_name: str) -> None:
    with pytest.raises(UnsafeCheckpointError) as info:
        load_torch_checkpoint(path)
    assert global_name in str(info.value)
    assert not marker.exists(), "the checkpoint's code ran"


# ---------------------------------------------------------------------------------------------
# refusal of code


@pytest.mark.parametrize(
    "build, global_name",
    [
        (lambda m: _global_call_p2("os", "system", f"touch {m}"), "os.system"),
        (lambda m: _global_call_p2("posix", "system", f"touch {m}"), "posix.system"),
        (lambda m: _stack_global_call_p4("builtins", "eval", f"open({str(m)!r}, 'w')"), "builtins.eval"),
        (lambda m: _memo_indirect_call("builtins", "exec", f"open({str(m)!r}, 'w')"), "builtins.exec"),
        (lambda m: _inst_call("subprocess", "Popen", f"touch {m}"), "subprocess.Popen"),
        (lambda m: _global_call_p2("torch._utils", "_rebuild_device_tensor_from_numpy", "x"),
         "torch._utils._rebuild_device_tensor_from_numpy"),
        (lambda m: _global_call_p2("collections", "os", "x"), "collections.os"),
    ],
)
def test_malicious_globals_refused_before_running(tmp_path: Path, marker: Path, build, global_name: str) -> None:
    payload = build(marker)
    path = _zip_with_pickle(tmp_path / "evil.pth", payload)
    # Sanity: the payload really is live code for the standard unpickler (harmless ones excluded).
    if global_name in ("os.system", "posix.system"):
        assert b"system" in payload
    _assert_refused(path, marker, global_name)


def test_torch_saved_state_dict_with_hidden_payload(tmp_path: Path, marker: Path) -> None:
    """A real torch.save file: valid tensors, plus an object whose unpickling would run a command."""

    class Evil:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    path = tmp_path / "evil_state.pth"
    torch.save({"weight": torch.randn(3, 3), "bias": torch.zeros(3), "evil": Evil()}, path)
    _assert_refused(path, marker, f"{os.system.__module__}.system")


def test_dynamic_global_name_refused(tmp_path: Path) -> None:
    # STACK_GLOBAL whose operands are not string constants (None from the memo): unverifiable.
    payload = b"\x80\x04N\x94" + _short("system") + b"\x93."
    path = _zip_with_pickle(tmp_path / "dyn.pth", payload)
    with pytest.raises(UnsafeCheckpointError, match="computes a global"):
        load_torch_file(path)


def test_extension_registry_opcode_refused(tmp_path: Path) -> None:
    path = _zip_with_pickle(tmp_path / "ext.pth", b"\x80\x02\x82\x01.")
    with pytest.raises(UnsafeCheckpointError, match="EXT1"):
        load_torch_file(path)


def test_runtime_guard_also_refuses() -> None:
    """Second line of defence: the unpickler itself resolves nothing outside the allow-list."""

    class _Reader:
        path = Path("x.pth")

    unpickler = tp._RestrictedUnpickler(b".", _Reader())
    with pytest.raises(UnsafeCheckpointError, match="builtins.getattr"):
        unpickler.find_class("builtins", "getattr")
    assert unpickler.find_class("collections", "OrderedDict") is tp._OrderedDict


def test_scan_numbers_memo_slots_as_the_unpickler_does(tmp_path: Path, marker: Path) -> None:
    """MEMOIZE takes the memo's size as its index, counting slots BINPUT set: the scan once numbered
    them on its own and listed torch.Size for this pickle, whose global is posix.system."""
    payload = (b"\x80\x04" + _short("posix") + b"q\x00"  # BINPUT 0
               + _short("torch") + b"\x94" + _short("system") + b"\x94" + _short("Size") + b"\x94"  # MEMOIZE 1..3
               + b"0000" + b"h\x00h\x02\x93" + _short(f"touch {marker}") + b"\x85R.")
    with pytest.raises(UnsafeCheckpointError, match=r"'posix\.system'"):
        tp.scan_pickle_globals(payload)
    _assert_refused(_zip_with_pickle(tmp_path / "memo.pth", payload), marker, "posix.system")


def test_scan_bounds_the_opcode_count() -> None:
    payload = b"\x80\x02" + b"N0" * (tp._MAX_PICKLE_OPS // 2 + 1) + b"N."
    with pytest.raises(TorchCheckpointError, match="more than 2,000,000 opcodes"):
        tp.scan_pickle_globals(payload)


def test_scan_lists_only_allowed_globals_of_a_real_checkpoint() -> None:
    with zipfile.ZipFile(DATA / "original_nat_layerscale" / "checkpoint.pth") as z:
        pkl = z.read(next(n for n in z.namelist() if n.endswith("data.pkl")))
    found = set(tp.scan_pickle_globals(pkl))
    assert found == {("collections", "OrderedDict"), ("torch._utils", "_rebuild_tensor_v2"), ("torch", "FloatStorage")}


def _build_on(target: bytes, state: bytes) -> bytes:
    """Protocol-2 pickle: push ``target`` (opcodes), then BUILD it with ``state`` (opcodes)."""
    return b"\x80\x02" + target + state + b"b."


_BF16_TRUE = b"}" + _text("is_bf16") + b"\x88s"  # {"is_bf16": True}


@pytest.mark.parametrize(
    "pkl, error",
    [
        # BUILD with a dict state: would land in the instance dict of the shared stand-in
        (_build_on(b"ctorch\nFloatStorage\n", _BF16_TRUE), UnsafeCheckpointError),
        # BUILD with (None, slotstate): would setattr on it
        (_build_on(b"ctorch\nFloatStorage\n", b"N" + _BF16_TRUE + b"\x86"), UnsafeCheckpointError),
        (_build_on(b"ctorch\nbfloat16\n", b"}" + _text("is_bf16") + b"\x89s"), UnsafeCheckpointError),
        (_build_on(b"ctorch\nTensor\n", b"}" + _text("name") + _text("x") + b"s"), UnsafeCheckpointError),
        # a shared stand-in handed back by a rebuild function, then BUILT
        (_build_on(b"ctorch._utils\n_rebuild_parameter\nctorch\nFloatStorage\n\x85R", _BF16_TRUE),
         UnsafeCheckpointError),
        # an allow-listed function: defaults / attributes
        (_build_on(b"ctorch._utils\n_rebuild_tensor_v2\n", b"N}" + _text("__defaults__") + b"\x88\x85s\x86"),
         UnsafeCheckpointError),
        (_build_on(b"ctorch\nSize\n", b"}" + _text("x") + b"K\x01s"), UnsafeCheckpointError),
        # the allow-listed classes themselves
        (_build_on(b"ccollections\nOrderedDict\n", b"N}" + _text("__setstate__") + b"Ns\x86"), TorchCheckpointError),
        (_build_on(b"cargparse\nNamespace\n", b"}" + _text("__init__") + b"Ns"), TorchCheckpointError),
    ],
)
def test_pickle_cannot_mutate_shared_stand_ins(tmp_path: Path, pkl: bytes, error: type) -> None:
    """A crafted pickle must not change how later checkpoints in the same process are read."""
    real = DATA / "original_dinat_small_cfg" / "checkpoint.pth"
    first = load_torch_checkpoint(real)
    classes_before = (dict(vars(tp._OrderedDict)), dict(vars(tp._Inert)))

    path = _zip_with_pickle(tmp_path / "mutate.pth", pkl)
    tp.scan_pickle_globals(pkl)  # only allow-listed names: the static scan alone does not stop it
    with pytest.raises(error):
        load_torch_file(path)

    float_storage = tp._ALLOWED[("torch", "FloatStorage")]
    assert float_storage.is_bf16 is False and float_storage.dtype == np.float32
    assert tp._ALLOWED[("torch", "bfloat16")].is_bf16 is True
    assert not hasattr(float_storage, "__dict__")
    assert (dict(vars(tp._OrderedDict)), dict(vars(tp._Inert))) == classes_before
    after = load_torch_checkpoint(real)
    reference = torch.load(real, weights_only=True)  # what a fresh process reads
    assert list(after) == list(first) == list(reference)
    for name, tensor in reference.items():
        assert after[name].dtype == np.float32, name
        np.testing.assert_array_equal(after[name], first[name], err_msg=name)
        np.testing.assert_array_equal(after[name], tensor.numpy(), err_msg=name)


# ---------------------------------------------------------------------------------------------
# formats


def test_legacy_format_gets_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "legacy.pth"
    torch.save({"w": torch.ones(2)}, path, _use_new_zipfile_serialization=False)
    with pytest.raises(TorchCheckpointError, match="legacy"):
        load_torch_checkpoint(path)


def test_plain_pickle_is_not_unpickled(tmp_path: Path, marker: Path) -> None:
    path = tmp_path / "plain.pkl"
    path.write_bytes(_global_call_p2("os", "system", f"touch {marker}"))
    with pytest.raises(TorchCheckpointError, match="plain pickle"):
        load_torch_checkpoint(path)
    assert not marker.exists()


def test_truncated_zip(tmp_path: Path) -> None:
    blob = (DATA / "original_nat_layerscale" / "checkpoint.pth").read_bytes()
    path = tmp_path / "cut.pth"
    path.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(TorchCheckpointError, match="damaged or truncated"):
        load_torch_checkpoint(path)


def test_corrupted_storage_bytes_detected(tmp_path: Path) -> None:
    blob = bytearray((DATA / "original_nat_layerscale" / "checkpoint.pth").read_bytes())
    with zipfile.ZipFile(DATA / "original_nat_layerscale" / "checkpoint.pth") as z:
        info = z.getinfo("checkpoint/data/2")
    # flip bytes inside the stored (uncompressed) data of one storage: its CRC no longer matches
    local = info.header_offset
    name_len = int.from_bytes(blob[local + 26:local + 28], "little")
    extra_len = int.from_bytes(blob[local + 28:local + 30], "little")
    start = local + 30 + name_len + extra_len + 16
    blob[start:start + 8] = bytes(b ^ 0xFF for b in blob[start:start + 8])
    path = tmp_path / "flipped.pth"
    path.write_bytes(bytes(blob))
    with pytest.raises(TorchCheckpointError, match="checkpoint/data/2"):
        load_torch_checkpoint(path)


def test_garbage_files(tmp_path: Path) -> None:
    rng = np.random.default_rng(7)
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(rng.integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(TorchCheckpointError, match="not a torch.save zip"):
        load_torch_checkpoint(garbage)
    fake_zip = tmp_path / "fake.pth"
    fake_zip.write_bytes(b"PK\x03\x04" + rng.integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(TorchCheckpointError, match="damaged or truncated"):
        load_torch_checkpoint(fake_zip)
    empty = tmp_path / "empty.pth"
    empty.write_bytes(b"")
    with pytest.raises(TorchCheckpointError, match="empty"):
        load_torch_checkpoint(empty)
    other_zip = tmp_path / "other.zip"
    with zipfile.ZipFile(other_zip, "w") as z:
        z.writestr("readme.txt", "hello")
    with pytest.raises(TorchCheckpointError, match="not a torch.save checkpoint"):
        load_torch_checkpoint(other_zip)


def test_missing_storage_entry(tmp_path: Path) -> None:
    src = DATA / "original_nat_layerscale" / "checkpoint.pth"
    path = tmp_path / "missing.pth"
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(path, "w") as zout:
        for item in zin.infolist():
            if item.filename != "checkpoint/data/3":
                zout.writestr(item, zin.read(item.filename))
    with pytest.raises(TorchCheckpointError, match="storage '3'.*missing"):
        load_torch_checkpoint(path)


_FOUR_FLOATS = (b"\x80\x02}" + _text("w") + b"ctorch._utils\n_rebuild_tensor_v2\n(("
                + _text("storage") + b"ctorch\nFloatStorage\n" + _text("0") + _text("cpu") + b"K\x04tQ"
                + b"K\x00K\x04\x85K\x01\x85\x89ccollections\nOrderedDict\n)RtRs.")


@pytest.mark.parametrize("nbytes, compression", [(32, zipfile.ZIP_STORED), (8, zipfile.ZIP_STORED),
                                                 (1 << 22, zipfile.ZIP_DEFLATED)])
def test_storage_entry_size_must_match(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, nbytes: int,
                                       compression: int) -> None:
    """data.pkl describes 4 float32 (16 bytes); an entry of another declared size is refused unread."""
    values = np.random.default_rng(11).standard_normal(4).astype(np.float32).tobytes()
    ok = _zip_with_pickle(tmp_path / "ok.pth", _FOUR_FLOATS, {"0": values})
    np.testing.assert_array_equal(load_torch_checkpoint(ok)["w"], np.frombuffer(values, np.float32))

    blob = (values * (nbytes // 16 + 1))[:nbytes]  # the 4 MiB deflated one compresses to a few KiB
    path = _zip_with_pickle(tmp_path / "size.pth", _FOUR_FLOATS, {"0": blob}, storage_compression=compression)
    reads: list[str] = []
    real_read = torch_archive.ArchiveReader._read

    def tracking_read(self, name: str, size: int) -> bytes:
        reads.append(name)
        return real_read(self, name, size)

    monkeypatch.setattr(torch_archive.ArchiveReader, "_read", tracking_read)
    with pytest.raises(TorchCheckpointError, match=rf"storage '0' has {nbytes} bytes.*4 float32 elements \(16 bytes\)"):
        load_torch_checkpoint(path)
    assert "archive/data/0" not in reads and "archive/data.pkl" in reads


def test_unsupported_zip_compression(tmp_path: Path) -> None:
    values = np.arange(4, dtype=np.float32).tobytes()
    path = _zip_with_pickle(tmp_path / "bz2.pth", _FOUR_FLOATS, {"0": values},
                            storage_compression=zipfile.ZIP_BZIP2)
    with pytest.raises(TorchCheckpointError, match="'archive/data/0' uses zip compression method 12"):
        load_torch_checkpoint(path)


def test_archive_closed_on_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every path out of the reader closes the zip file: not a checkpoint, refused pickle, success."""
    opened: list[zipfile.ZipFile] = []
    real_init = zipfile.ZipFile.__init__

    def tracking_init(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        opened.append(self)

    monkeypatch.setattr(zipfile.ZipFile, "__init__", tracking_init)
    other = tmp_path / "other.zip"
    with zipfile.ZipFile(other, "w") as z:
        z.writestr("readme.txt", "hello")
    bad_order = tmp_path / "order.pth"
    with zipfile.ZipFile(bad_order, "w") as z:
        z.writestr("a/data.pkl", b"\x80\x02}.")
        z.writestr("a/byteorder", "middle")
    evil = _zip_with_pickle(tmp_path / "evil.pth", _global_call_p2("os", "system", "true"))
    opened.clear()
    for path, match in ((other, "not a torch.save checkpoint"), (bad_order, "unknown byteorder"),
                        (evil, "os.system")):
        with pytest.raises(TorchCheckpointError, match=match):
            load_torch_file(path)
    load_torch_checkpoint(DATA / "original_nat_layerscale" / "checkpoint.pth")
    assert len(opened) == 4
    assert all(z.fp is None for z in opened), "a zip file was left open"


def _tensor_record(offset: int, size: int, stride: int) -> bytes:
    """Pickle opcodes for _rebuild_tensor_v2(storage '0' of 4 floats, offset, (size,), (stride,))."""

    def text(s: str) -> bytes:
        return b"X" + len(s).to_bytes(4, "little") + s.encode()

    def integer(value: int) -> bytes:
        return b"J" + value.to_bytes(4, "little")

    return (b"ctorch._utils\n_rebuild_tensor_v2\n("
            b"(" + text("storage") + b"ctorch\nFloatStorage\n" + text("0") + text("cpu") + b"K\x04tQ"
            + integer(offset) + integer(size) + b"\x85" + integer(stride) + b"\x85"
            + b"\x89ccollections\nOrderedDict\n)RtR")


@pytest.mark.parametrize("offset, size, stride, ok", [(0, 4, 1, True), (1, 2, 2, True), (2, 4, 1, False),
                                                      (0, 3, 2, False)])
def test_view_bounds_checked(tmp_path: Path, offset: int, size: int, stride: int, ok: bool) -> None:
    pkl = b"\x80\x02}X\x01\x00\x00\x00w" + _tensor_record(offset, size, stride) + b"s."
    storage = np.array([1.5, -2.0, 3.25, 4.0], dtype=np.float32)
    path = _zip_with_pickle(tmp_path / "view.pth", pkl, {"0": storage.tobytes()})
    if ok:
        np.testing.assert_array_equal(load_torch_checkpoint(path)["w"], storage[offset::stride][:size])
    else:
        with pytest.raises(TorchCheckpointError, match="out of bounds"):
            load_torch_checkpoint(path)


def test_memory_is_bounded_by_the_file(tmp_path: Path) -> None:
    """Zero-stride and repeated views of a small storage: at most 4 x the file + 64 MiB is handed out."""
    storage = np.array([1.5, -2.0, 3.25, 4.0], dtype=np.float32)

    def views(count: int) -> bytes:  # {"00": 2 MiB of storage[1], "01": ..., ...}
        items = b"".join(b"X\x02\x00\x00\x00" + f"{i:02d}".encode() + _tensor_record(1, 2**19, 0) + b"s"
                         for i in range(count))
        return b"\x80\x02}" + items + b"."

    path = _zip_with_pickle(tmp_path / "many.pth", views(40), {"0": storage.tobytes()})  # 80 MiB from 2 KB
    with pytest.raises(TorchCheckpointError, match=r"tensor of shape \(524288,\) would bring the memory its tensors "
                                                   r"take to [\d,]+ bytes, beyond the [\d,]+ a [\d,]+-byte checkpoint"):
        load_torch_checkpoint(path)
    loaded = load_torch_checkpoint(_zip_with_pickle(tmp_path / "few.pth", views(4), {"0": storage.tobytes()}))
    assert sorted(loaded) == ["00", "01", "02", "03"]
    np.testing.assert_array_equal(loaded["02"], np.full(2**19, -2.0, np.float32))


def test_oversized_pickle_is_refused_unread(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch_archive, "_PICKLE_MAX", 100)
    path = _zip_with_pickle(tmp_path / "big.pth", b"\x80\x02N" + b"N0" * 100 + b".")
    with pytest.raises(TorchCheckpointError, match="data.pkl is 204 bytes"):
        load_torch_checkpoint(path)


# ---------------------------------------------------------------------------------------------
# content


def test_fixture_checkpoints_match_torch() -> None:
    for path in (DATA / "original_nat_layerscale" / "checkpoint.pth",
                 DATA / "hf_dinat_small_cfg" / "pytorch_model.bin"):
        ours = load_torch_checkpoint(path)
        ref = torch.load(path, weights_only=True)
        assert list(ours) == list(ref)
        for name, tensor in ref.items():
            assert ours[name].dtype == np.float32
            np.testing.assert_array_equal(ours[name], tensor.numpy(), err_msg=name)


def test_dtypes_views_and_shared_storage(tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(3)
    base = torch.randn(6, 10, generator=gen)
    doubles = torch.randn(5, 6, dtype=torch.float64, generator=gen)
    tensors = {
        "f32": torch.randn(4, 3, generator=gen),
        "f64": doubles,
        "f64_transposed": doubles.t(),  # strided view of a shared storage
        "f16": torch.randn(7, generator=gen).half(),
        "bf16": torch.randn(3, 5, generator=gen).bfloat16(),
        "bf16_transposed": torch.randn(3, 5, generator=gen).bfloat16().t(),
        "i64": torch.randint(-1000, 1000, (9,), generator=gen),
        "i32": torch.randint(-5, 5, (2, 2), generator=gen, dtype=torch.int32),
        "u8": torch.randint(0, 255, (4,), generator=gen, dtype=torch.uint8),
        "bool": torch.tensor([True, False, True]),
        "base": base,
        "slice_offset": base[1:4, 2:9:3],  # offset + strides into the same storage
        "row": base[5],
        "param": torch.nn.Parameter(torch.randn(2, 3, generator=gen)),
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 4),
        "expanded": torch.randn(3, 1, generator=gen).expand(3, 4),  # zero stride
    }
    path = tmp_path / "mixed.pth"
    torch.save({"state_dict": {"module." + k: v for k, v in tensors.items()}, "epoch": 12}, path)
    loaded = load_torch_checkpoint(path)
    assert set(loaded) == set(tensors)
    for name, tensor in tensors.items():
        ref = tensor.detach()
        ref = ref.float().numpy() if ref.dtype == torch.bfloat16 else ref.numpy()
        assert loaded[name].dtype == ref.dtype, name
        assert loaded[name].shape == ref.shape, name
        np.testing.assert_array_equal(loaded[name], ref, err_msg=name)


@pytest.mark.parametrize("wrapper", ["model", "state_dict", "state_dict_ema", None])
def test_unwrapping(tmp_path: Path, wrapper: str | None) -> None:
    sd = {"module.a.weight": torch.arange(6, dtype=torch.float32).reshape(2, 3), "module.a.bias": torch.ones(2)}
    obj = sd if wrapper is None else {wrapper: sd, "optimizer_step": 7}
    path = tmp_path / "w.pth"
    torch.save(obj, path)
    loaded = load_torch_checkpoint(path)
    assert sorted(loaded) == ["a.bias", "a.weight"]
    np.testing.assert_array_equal(loaded["a.weight"], np.arange(6, dtype=np.float32).reshape(2, 3))


def test_training_checkpoint_with_namespace(tmp_path: Path) -> None:
    import argparse

    path = tmp_path / "train.pth"
    torch.save({"args": argparse.Namespace(lr=0.1, model="dinat_mini"), "state_dict": {"w": torch.ones(2)},
                "state_dict_ema": {"w": torch.zeros(2)}}, path)
    np.testing.assert_array_equal(load_torch_checkpoint(path)["w"], np.ones(2, np.float32))
    np.testing.assert_array_equal(load_torch_checkpoint(path, key="state_dict_ema")["w"], np.zeros(2, np.float32))
    with pytest.raises(TorchCheckpointError, match="no entry 'nope'"):
        load_torch_checkpoint(path, key="nope")


def test_big_endian_archive(tmp_path: Path) -> None:
    src = tmp_path / "le.pth"
    values = np.arange(12, dtype=np.float32).reshape(3, 4) * 0.5
    torch.save({"w": torch.from_numpy(values)}, src)
    dst = tmp_path / "be.pth"
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for item in zin.infolist():
            blob = zin.read(item.filename)
            if item.filename.endswith("/byteorder"):
                blob = b"big"
            elif "/data/" in item.filename:
                blob = np.frombuffer(blob, dtype="<f4").astype(">f4").tobytes()
            zout.writestr(item.filename, blob)
    np.testing.assert_array_equal(load_torch_checkpoint(dst)["w"], values)


def test_importing_reader_does_not_import_torch() -> None:
    code = (
        "import sys; import dinat_np.torch_pickle as t, dinat_np.convert, dinat_np.hub; "
        f"sd = t.load_torch_checkpoint({str(DATA / 'original_nat_layerscale' / 'checkpoint.pth')!r}); "
        "assert len(sd) == 94; assert 'torch' not in sys.modules, 'torch was imported'"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
