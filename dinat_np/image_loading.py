"""Image loading: a path, encoded bytes, a PIL image or a uint8 array to 8-bit RGB (Pillow + NumPy only).

Every failure is an :class:`ImageLoadError` that names the source and says why in plain words; files that
are not regular files are refused unread, and images above Pillow's decompression-bomb limit before they
are decoded (:class:`ImageTooLargeError`).
"""

from __future__ import annotations

import errno
import io
import os
import stat
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

__all__ = [
    "IMAGE_EXTENSIONS",
    "ImageInput",
    "ImageLoadError",
    "ImageTooLargeError",
    "as_image_list",
    "is_single_image",
    "load_image",
    "source_name",
    "to_rgb",
]

# File name endings that a directory walk treats as images (everything Pillow commonly decodes).
IMAGE_EXTENSIONS = frozenset(
    {
        ".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".apng", ".gif", ".bmp", ".dib", ".tif", ".tiff",
        ".webp", ".ppm", ".pgm", ".pbm", ".pnm", ".tga", ".ico", ".jp2", ".j2k", ".pcx", ".sgi",
        ".im", ".dds", ".qoi",
    }
)

ImageInput = str | os.PathLike | bytes | bytearray | Image.Image | np.ndarray
# What counts as one image (not a collection of them) where one image or a list is accepted.
_SINGLE_IMAGE_TYPES = (str, os.PathLike, bytes, bytearray, Image.Image, np.ndarray)


class ImageLoadError(ValueError):
    """An image could not be opened, decoded or converted; ``reason`` says why in plain words."""

    def __init__(self, source: str, reason: str) -> None:
        self.source = source
        self.reason = reason
        super().__init__(f"{source}: {reason}" if source else reason)


class ImageTooLargeError(ImageLoadError):
    """The image has more pixels than Pillow's decompression-bomb limit allows."""


def _bomb_message(pixels: int | None, detail: str = "") -> str:
    limit = Image.MAX_IMAGE_PIXELS
    size = f"{pixels:,} pixels, limit {limit:,}" if pixels is not None and limit else detail
    return (
        f"image is too large to decode safely ({size}); this guards against decompression bombs. "
        f"If you trust the file, raise PIL.Image.MAX_IMAGE_PIXELS (or set it to None) before loading"
    )


def _sixteen_bit_to_8bit(values: np.ndarray) -> np.ndarray:
    """Scale 0..65535 to 0..255 with rounding (65535 -> 255, 257*k -> k)."""
    wide = np.clip(values, 0, 65535).astype(np.uint32)
    return ((wide * 255 + 32767) // 65535).astype(np.uint8)


def _wide_to_8bit(values: np.ndarray, ranges: tuple[float, ...]) -> np.ndarray:
    """Scale 32-bit integer or float samples to 0..255: the first of ``ranges`` that holds the
    largest finite value is taken as white, or that value itself above them all. Negative values and
    NaN become 0, +inf white."""
    finite = values[np.isfinite(values)]
    peak = float(finite.max()) if finite.size else 0.0
    white = next((top for top in ranges if peak <= top), peak)
    values = np.nan_to_num(values.astype(np.float64), nan=0.0, posinf=white, neginf=0.0)
    return np.clip(np.rint(values * (255.0 / white)), 0, 255).astype(np.uint8)


def to_rgb(image: Image.Image) -> Image.Image:
    """Return ``image`` as an 8-bit RGB ``PIL.Image``.

    Alpha is dropped without compositing, as ``PIL.Image.convert("RGB")`` does and as Hugging Face's
    ``load_image`` / ``convert_rgb`` do, so results match models evaluated through transformers.
    Integer and float images are scaled to 8 bits instead of being clipped at 255 the way Pillow's own
    conversion does (which turns most 16-bit photographs white):

    * ``I;16*``: 0..65535 to 0..255;
    * ``I`` (32-bit integers): values up to 255 are kept, up to 65535 scaled as 16-bit samples, larger
      ones scaled so that the largest is white;
    * ``F`` (floats): values up to 1 are scaled from 0..1, up to 255 kept, larger ones scaled so
      that the largest is white.

    Negative values and NaN become black, +inf white.
    """
    mode = image.mode
    if mode == "RGB":
        return image
    if mode.startswith("I;16"):
        return Image.fromarray(_sixteen_bit_to_8bit(np.asarray(image)), mode="L").convert("RGB")
    if mode in ("I", "F"):
        # 32-bit integer images in practice carry 8- or 16-bit samples (older Pillow opened 16-bit PNGs
        # as "I"); float images 0..1 or 0..255 values.
        ranges = (255.0, 65535.0) if mode == "I" else (1.0, 255.0)
        return Image.fromarray(_wide_to_8bit(np.asarray(image), ranges), mode="L").convert("RGB")
    if mode == "P" and isinstance(image.info.get("transparency"), bytes):
        # Pillow warns when a direct conversion drops per-entry palette alpha; through RGBA the colours
        # are the same and nothing warns (silencing it would change process-wide warning filters).
        image = image.convert("RGBA")
    try:
        return image.convert("RGB")
    except ValueError:
        pass
    try:
        # Modes without a direct route (e.g. premultiplied "La") go through RGBA.
        return image.convert("RGBA").convert("RGB")
    except ValueError as exc:
        raise ImageLoadError("", f"unsupported colour mode {mode!r} ({exc})") from None


def is_single_image(value: Any) -> bool:
    """Whether ``value`` is one image (path, bytes, PIL image or array) rather than a collection of them."""
    return isinstance(value, _SINGLE_IMAGE_TYPES)


def as_image_list(images: Any) -> Iterable[ImageInput]:
    """One image as a list of one, a collection of images as it is; TypeError for anything else."""
    if is_single_image(images):
        return [images]
    if isinstance(images, Iterable) and not isinstance(images, Mapping):
        return images
    raise TypeError(
        f"expected an image (a path, bytes, a PIL image or a uint8 array) or a list of them, "
        f"got {type(images).__name__}"
    )


def source_name(source: Any) -> str:
    """How messages name an image source: its path, ``<bytes>``, a PIL image's file name or its type."""
    if isinstance(source, (str, os.PathLike)):
        return os.fspath(source)
    if isinstance(source, (bytes, bytearray)):
        return "<bytes>"
    return getattr(source, "filename", None) or f"<{type(source).__name__}>"


def _finish(image: Image.Image, name: str) -> Image.Image:
    """Decode the current (first) frame, apply EXIF orientation and convert to RGB."""
    if 0 in image.size:
        raise ImageLoadError(name, f"empty image ({image.size[0]} x {image.size[1]} pixels)")
    try:
        if getattr(image, "n_frames", 1) > 1:
            image.seek(0)
        image.load()
        image = ImageOps.exif_transpose(image)
        return to_rgb(image)
    except ImageLoadError as exc:
        raise ImageLoadError(name, exc.reason) from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        # Some formats check the size again when seeking or decoding a frame.
        raise ImageTooLargeError(name, _bomb_message_from(exc)) from None
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, KeyError, TypeError) as exc:
        raise ImageLoadError(name, _decode_reason(exc)) from None


def _decode_reason(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    if "truncated" in text.lower():
        return f"file is truncated or corrupt ({text})"
    return f"cannot decode image ({text})"


def load_image(source: ImageInput) -> Image.Image:
    """Open an image and return it as 8-bit RGB, ready for an :class:`ImageProcessor`.

    ``source`` is a path, raw encoded bytes (``bytes`` or ``bytearray``), a ``PIL.Image`` or a uint8 array
    (H, W) / (H, W, 3|4).
    The first frame of animated files is used, EXIF orientation is applied, and every colour mode
    (grayscale, palette, RGBA/LA, CMYK, 16-bit, float) becomes RGB (see :func:`to_rgb`).

    Raises:
        ImageLoadError: missing/unreadable file, not an image, truncated or corrupt data, odd mode.
        ImageTooLargeError: a file with more pixels than ``PIL.Image.MAX_IMAGE_PIXELS`` (decompression
            bombs). Between that limit and twice it, Pillow itself may also emit a
            ``DecompressionBombWarning``; warning filters are left alone, as changing them is not thread-safe.
    """
    name = source_name(source)
    if isinstance(source, Image.Image):
        return _finish(source, name)
    if isinstance(source, np.ndarray):
        return _finish(_array_to_image(source), name)
    if isinstance(source, (bytes, bytearray)):
        return _open_and_finish(io.BytesIO(bytes(source)), name)
    if isinstance(source, (str, os.PathLike)):
        with _open_regular_file(source, name) as handle:
            return _open_and_finish(handle, name)
    raise TypeError(
        f"cannot load an image from {type(source).__name__}; pass a path, bytes, a PIL image or a uint8 array"
    )


def _file_kind(mode: int) -> str:
    for test, kind in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
                       (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device")):
        if test(mode):
            return kind
    return "not a regular file"


def _open_regular_file(path: str | os.PathLike, name: str) -> io.BufferedReader:
    """Open an image file for reading; anything but a regular file is refused, never read.

    Opening without blocking, then checking what was opened, means a FIFO without a writer (or a
    device that never ends) cannot hang the caller, and nothing can be swapped in between.
    """
    try:
        handle = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError:
        broken = os.path.islink(path)
        raise ImageLoadError(name, "no such file" + (" (a broken symbolic link)" if broken else "")) from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise ImageLoadError(name, "a symbolic link loop (too many levels of symbolic links)") from None
        if exc.errno == errno.ENXIO:  # a socket
            raise ImageLoadError(name, f"is {_file_kind(os.stat(path).st_mode)}, not an image file") from None
        raise ImageLoadError(name, f"cannot read file ({exc.strerror or exc})") from None
    mode = os.fstat(handle).st_mode
    if not stat.S_ISREG(mode):
        os.close(handle)
        raise ImageLoadError(name, f"is {_file_kind(mode)}, not an image file")
    return os.fdopen(handle, "rb")


def _open_and_finish(stream: io.BufferedIOBase, name: str) -> Image.Image:
    try:
        image = Image.open(stream)
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as exc:
        # Pillow raises beyond twice MAX_IMAGE_PIXELS (and warns, or raises where warnings are errors, above it).
        raise ImageTooLargeError(name, _bomb_message_from(exc)) from None
    except UnidentifiedImageError:
        raise ImageLoadError(name, "not an image file (or a format Pillow cannot read)") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ImageLoadError(name, _decode_reason(exc)) from None
    with image:
        # Pillow only warns between MAX_IMAGE_PIXELS and twice that; we refuse from MAX_IMAGE_PIXELS on,
        # before anything is decoded. Comparing here needs no (process-wide) warning filter.
        limit = Image.MAX_IMAGE_PIXELS
        width, height = image.size
        pixels = max(1, width) * max(1, height)  # Pillow's own count
        if limit is not None and pixels > limit:
            raise ImageTooLargeError(name, _bomb_message(pixels))
        result = _finish(image, name)
        if result is image:
            # `image` is about to be closed together with its file: hand back a detached copy.
            result = image.copy()
        return result


def _bomb_message_from(exc: BaseException) -> str:
    # Pillow's message starts with the pixel count: "Image size (N pixels) exceeds limit of ...".
    text = str(exc)
    numbers = [int(tok) for tok in text.replace("(", " ").replace(")", " ").split() if tok.isdigit()]
    return _bomb_message(numbers[0] if numbers else None, text)


def _array_to_image(array: np.ndarray) -> Image.Image:
    if array.dtype != np.uint8:
        raise ImageLoadError(
            "<ndarray>", f"arrays must be uint8 with values 0..255, got dtype {array.dtype}"
        )
    if array.ndim == 2 or (array.ndim == 3 and array.shape[2] in (1, 3, 4)):
        if array.ndim == 3 and array.shape[2] == 1:
            array = array[:, :, 0]
        return Image.fromarray(np.ascontiguousarray(array))
    raise ImageLoadError("<ndarray>", f"arrays must have shape (H, W) or (H, W, 1|3|4), got {array.shape}")
