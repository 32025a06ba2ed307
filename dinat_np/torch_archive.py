"""The zip archive that ``torch.save`` writes (PyTorch >= 1.6): ``data.pkl`` and the storages' bytes.

Every entry is read with its size checked first and no more bytes than declared (a deflated entry cannot
inflate past its record), and everything one checkpoint's tensors take is counted against a budget in
proportion to the file's size. What the pickle means is :mod:`dinat_np.torch_pickle`'s business.
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["ArchiveReader", "TorchCheckpointError", "describe_non_zip", "is_torch_zip"]


class TorchCheckpointError(ValueError):
    """The file is not a readable ``torch.save`` zip checkpoint."""


def is_torch_zip(path: str | os.PathLike) -> bool:
    """True if ``path`` starts like a zip archive (the ``torch.save`` format since 1.6)."""
    with open(path, "rb") as fh:
        return fh.read(4) == b"PK\x03\x04"


_LEGACY_MAGIC = b"\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19"  # LONG1 0x1950a86a20f9469cfc6c


def describe_non_zip(path: Path) -> str:
    """Why ``path`` is not a torch.save zip archive, and what it is instead where that is recognisable."""
    with open(path, "rb") as fh:
        head = fh.read(64)
    if not head:
        return f"{path} is empty"
    if head[:1] == b"\x80" and _LEGACY_MAGIC in head[:16]:
        return (f"{path} uses the legacy (pre-1.6) torch.save format, which this reader does not support. "
                "Re-save it once with PyTorch >= 1.6: torch.save(torch.load(OLD, weights_only=True), NEW)")
    if head[:1] == b"\x80":
        return f"{path} is a plain pickle, not a torch.save zip archive (refusing to unpickle it directly)"
    if len(head) >= 9 and head[8:9] == b"{":
        return f"{path} looks like a safetensors file, not a torch.save zip archive"
    return f"{path} is not a torch.save zip archive (unrecognized header {head[:8]!r})"


_BYTEORDER_MAX = 16  # "little" / "big" plus whitespace
_PICKLE_MAX = 16 * 2**20  # data.pkl of a state dict: tens of kilobytes; bounded before it is inflated
# What reading one checkpoint may allocate: its storages (1x its size), their bfloat16 values widened to
# float32 (2x), transposed and shared views; plus room for small files.
_MEMORY_PER_FILE_BYTE = 4
_MEMORY_SLACK = 64 * 2**20


class ArchiveReader:
    """Locates ``data.pkl`` and the storages of one torch zip archive.

    A context manager: the zip file is closed on leaving the ``with`` block, also on errors.
    """

    def __init__(self, path: Path):
        self.path = path
        self.size = path.stat().st_size
        self.memory_limit = _MEMORY_PER_FILE_BYTE * self.size + _MEMORY_SLACK
        self.memory_used = 0
        try:
            self.zip = zipfile.ZipFile(path)  # closes its own file if it raises
        except zipfile.BadZipFile as exc:
            raise TorchCheckpointError(f"{path} is a damaged or truncated zip archive ({exc})") from None
        try:
            self._index()
        except BaseException:
            self.zip.close()
            raise

    def __enter__(self) -> ArchiveReader:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.zip.close()

    def _index(self) -> None:
        names = self.zip.namelist()
        pkl = [n for n in names if n == "data.pkl" or (n.endswith("/data.pkl") and n.count("/") == 1)]
        if len(pkl) != 1:
            raise TorchCheckpointError(
                f"{self.path} is a zip archive but not a torch.save checkpoint (expected one '<name>/data.pkl', "
                f"found {len(pkl)})"
            )
        self.prefix = pkl[0][: -len("data.pkl")]
        self.names = set(names)
        self.big_endian = False
        order_name = self.prefix + "byteorder"
        if order_name in self.names:
            size = self._entry(order_name).file_size
            if size > _BYTEORDER_MAX:
                raise TorchCheckpointError(f"{self.path}: unknown byteorder (a {size}-byte entry)")
            order = self._read(order_name, size).decode("ascii", "replace").strip()
            if order not in ("little", "big"):
                raise TorchCheckpointError(f"{self.path}: unknown byteorder {order!r}")
            self.big_endian = order == "big"

    def _entry(self, name: str) -> zipfile.ZipInfo:
        """The entry's directory record; only the methods torch.save writes are accepted."""
        info = self.zip.getinfo(name)
        if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
            raise TorchCheckpointError(
                f"{self.path}: entry '{name}' uses zip compression method {info.compress_type}; a torch.save "
                "checkpoint stores its entries uncompressed (deflate is accepted too)"
            )
        return info

    def _read(self, name: str, size: int) -> bytes:
        """Exactly ``size`` bytes of an entry whose declared size was checked against ``size``.

        Reading a bounded amount (instead of ``ZipFile.read``) means a deflated entry that inflates
        to more than its directory record claims cannot exhaust memory.
        """
        try:
            with self.zip.open(name) as stream:
                data = stream.read(size)
        except (zipfile.BadZipFile, EOFError, OSError, ValueError) as exc:
            raise TorchCheckpointError(f"{self.path}: entry '{name}' is damaged or truncated ({exc})") from None
        except Exception as exc:  # zlib.error, encrypted entries and friends
            raise TorchCheckpointError(f"{self.path}: entry '{name}' cannot be read ({exc})") from None
        if len(data) != size:
            raise TorchCheckpointError(f"{self.path}: entry '{name}' is damaged or truncated "
                                       f"({len(data)} of {size} bytes)")
        return data

    def data_pkl(self) -> bytes:
        name = self.prefix + "data.pkl"
        size = self._entry(name).file_size
        if size > _PICKLE_MAX:
            raise TorchCheckpointError(f"{self.path}: data.pkl is {size:,} bytes; a checkpoint's object tree "
                                       f"takes far less than the {_PICKLE_MAX:,} bytes allowed")
        return self._read(name, size)

    def reserve(self, nbytes: int, what: str) -> None:
        """Count ``nbytes`` that ``what`` is about to allocate; refuse past the file's memory limit."""
        self.memory_used += nbytes
        if self.memory_used > self.memory_limit:
            raise TorchCheckpointError(
                f"{self.path}: {what} would bring the memory its tensors take to {self.memory_used:,} bytes, "
                f"beyond the {self.memory_limit:,} a {self.size:,}-byte checkpoint may take "
                f"({_MEMORY_PER_FILE_BYTE} x its size + {_MEMORY_SLACK // 2**20} MiB): a damaged or crafted file "
                "(zero-stride or repeated views, storages that inflate far beyond their compressed size)"
            )

    def read_storage(self, key: str, dtype: np.dtype, numel: int) -> np.ndarray:
        name = f"{self.prefix}data/{key}"
        if name not in self.names:
            raise TorchCheckpointError(f"{self.path}: storage '{key}' referenced by data.pkl is missing "
                                       "(truncated archive?)")
        need = numel * dtype.itemsize
        size = self._entry(name).file_size
        # torch.save writes each storage's bytes exactly; any other size means a damaged or crafted
        # file, refused before a byte is read or inflated.
        if size != need:
            raise TorchCheckpointError(f"{self.path}: storage '{key}' has {size} bytes, but data.pkl describes "
                                       f"{numel} {dtype} elements ({need} bytes)")
        self.reserve(need, f"storage '{key}'")
        raw = self._read(name, need)
        src_dtype = dtype.newbyteorder(">") if self.big_endian and dtype.itemsize > 1 else dtype
        arr = np.frombuffer(raw, dtype=src_dtype, count=numel)
        if src_dtype is not dtype:
            self.reserve(need, f"storage '{key}' (byte order)")
            arr = arr.astype(dtype)
        return arr
