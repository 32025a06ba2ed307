"""model.safetensors through the safetensors package: the reference's rules, bfloat16, atomic writes, no copy
at load."""

from __future__ import annotations

import json
import os
import stat
import struct
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
import safetensors
import safetensors.numpy

from dinat_np import state_dict
from dinat_np.configuration import _UMASK
from dinat_np.state_dict import SafetensorsError, read_safetensors, write_safetensors

DATA = Path(__file__).parent / "data"


def _file(header: str, data: bytes) -> bytes:
    """A safetensors file from a header written by hand (so it can break the rules)."""
    text = header.encode()
    return struct.pack("<Q", len(text)) + text + data


def _entry(shape: object, begin: int, end: int, dtype: str = "F32") -> str:
    return json.dumps({"dtype": dtype, "shape": shape, "data_offsets": [begin, end]})


HOSTILE = {  # each breaks one rule of the format
    # two tensors on the same bytes: a change to one would change the other
    "overlap": _file('{"a":%s,"b":%s}' % (_entry([2], 0, 8), _entry([2], 4, 12)), bytes(12)),
    "trailing bytes": _file('{"a":%s}' % _entry([2], 0, 8), bytes(12)),
    "a gap": _file('{"a":%s}' % _entry([1], 4, 8), bytes(8)),
    "a name twice": _file('{"a":%s,"a":%s}' % (_entry([2], 0, 8), _entry([2], 8, 16)), bytes(16)),
    "a float shape": _file('{"a":%s}' % _entry([2.0], 0, 8), bytes(8)),
    "a string shape": _file('{"a":%s}' % _entry(["2"], 0, 8), bytes(8)),
    "a negative shape": _file('{"a":%s}' % _entry([-2], 0, 8), bytes(8)),
    "a boolean shape": _file('{"a":%s}' % _entry([True, 2], 0, 8), bytes(8)),
    "a shape larger than the data": _file('{"a":%s}' % _entry([4], 0, 8), bytes(8)),
    "a header longer than the file": struct.pack("<Q", 1 << 40) + b"{}",
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_files_the_reference_refuses_are_refused(tmp_path: Path, case: str) -> None:
    blob = HOSTILE[case]
    path = tmp_path / "bad.safetensors"
    path.write_bytes(blob)
    with pytest.raises(safetensors.SafetensorError):
        safetensors.numpy.load_file(path)
    with pytest.raises(SafetensorsError, match="not a valid safetensors file") as info:
        read_safetensors(path)
    assert str(path) in str(info.value)


def test_a_name_given_twice_with_the_same_entry_is_refused(tmp_path: Path) -> None:
    """The reference keeps the last of two identical entries; a file naming a tensor twice is still wrong."""
    path = tmp_path / "twice.safetensors"
    path.write_bytes(_file('{"a":%s,"a":%s}' % (_entry([2], 0, 8), _entry([2], 0, 8)), bytes(8)))
    assert list(safetensors.numpy.load_file(path)) == ["a"]  # accepted by the library
    with pytest.raises(SafetensorsError, match=r"names tensor\(s\) \['a'\] more than once"):
        read_safetensors(path)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no weights file"):
        read_safetensors(tmp_path / "absent.safetensors")


def test_round_trip_in_each_storage_dtype_and_the_reference_reads_it(tmp_path: Path) -> None:
    rng = np.random.default_rng(7)
    tensors = {
        "layer.weight": rng.standard_normal((5, 3)).astype(np.float32),
        "layer.bias": rng.standard_normal(5).astype(np.float32),
        "attention.rpb": rng.standard_normal((2, 3, 3)).astype(np.float32),
        "steps": np.arange(4, dtype=np.int64),
    }
    for dtype, stored in (("float32", np.float32), ("float16", np.float16), ("bfloat16", ml_dtypes.bfloat16)):
        path = tmp_path / f"{dtype}.safetensors"
        write_safetensors(path, tensors, dtype)
        raw = read_safetensors(path, as_float32=False)
        assert raw["layer.weight"].dtype == stored  # weight matrices in the storage dtype
        assert raw["layer.bias"].dtype == raw["attention.rpb"].dtype == np.float32  # the rest stays float32
        np.testing.assert_array_equal(raw["layer.weight"], tensors["layer.weight"].astype(stored))
        np.testing.assert_array_equal(raw["steps"], tensors["steps"])
        widened = read_safetensors(path)
        assert widened["layer.weight"].dtype == np.float32
        np.testing.assert_array_equal(widened["layer.weight"],
                                      tensors["layer.weight"].astype(stored).astype(np.float32))
        reference = safetensors.numpy.load_file(path)
        assert sorted(reference) == sorted(tensors)
        assert reference["layer.weight"].tobytes() == raw["layer.weight"].tobytes()
        with safetensors.safe_open(path, framework="numpy") as reader:
            assert reader.metadata() == {"format": "pt", "storage": dtype}


def test_bfloat16_bits_widen_exactly() -> None:
    values = np.random.default_rng(3).standard_normal(64).astype(np.float32)
    bits = values.astype(ml_dtypes.bfloat16).view(np.uint16)
    widened = state_dict.bfloat16_bits_to_float32(bits)
    np.testing.assert_array_equal(widened, (bits.astype(np.uint32) << 16).view(np.float32))


def test_write_is_atomic_and_takes_the_mode_of_the_umask(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "model.safetensors"
    tensors = {"w": np.random.default_rng(1).standard_normal((4, 4)).astype(np.float32)}
    write_safetensors(path, tensors)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~_UMASK
    before = path.read_bytes()

    def cut_short(arrays: dict, filename: os.PathLike, metadata: dict) -> None:
        Path(filename).write_bytes(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(state_dict, "save_file", cut_short)
    with pytest.raises(OSError, match="disk full"):
        write_safetensors(path, {"w": np.zeros((2, 2), np.float32)})
    assert path.read_bytes() == before  # the old file is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]  # no temporary left


def _resident_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="needs /proc to read the resident memory")
def test_loading_maps_the_file_instead_of_copying_it(tmp_path: Path) -> None:
    path = tmp_path / "large.safetensors"
    size = 64 << 20
    write_safetensors(path, {"w": np.random.default_rng(0).standard_normal((size // 4096, 1024)).astype(np.float32)})
    before = _resident_bytes()
    tensors = read_safetensors(path)
    grown = _resident_bytes() - before
    assert grown < 4 << 20, f"loading {size >> 20} MiB grew the resident memory by {grown >> 20} MiB"
    weight = tensors["w"]
    assert isinstance(weight.base, np.memmap) and not weight.flags.writeable
    assert weight.shape == (size // 4096, 1024)
