"""The evaluation preprocessing of DiNAT / NAT classifiers (Pillow + NumPy only); images are loaded by
:mod:`dinat_np.image_loading`.

Two transforms are reproduced number for number:

* Hugging Face's ``ViTImageProcessor`` (resize to ``height x width``) and ``ConvNextImageProcessor``
  (resize the shorter side to ``shortest_edge / crop_pct`` and center-crop, or warp to a square when
  ``shortest_edge >= 384``), driven by a model folder's ``preprocessor_config.json``;
* timm's ImageNet evaluation transform, which the SHI-Labs checkpoints were evaluated with (resize the
  shorter side to ``floor(resolution / crop_pct)``, center-crop ``resolution``, ImageNet mean/std),
  driven by a registry entry's ``"preprocessing"`` block.

Both resize with Pillow on 8-bit RGB, so the same Pillow gives bit-identical resized pixels.
"""

from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
from PIL import Image

from .configuration import read_json_object
from .image_loading import ImageInput, ImageLoadError, as_image_list, load_image, source_name

__all__ = [
    "IMAGENET_DEFAULT_MEAN",
    "IMAGENET_DEFAULT_STD",
    "IMAGENET_STANDARD_MEAN",
    "IMAGENET_STANDARD_STD",
    "MAX_OUTPUT_SIDE",
    "ImageProcessor",
    "resample_from_name",
]

IMAGENET_DEFAULT_MEAN = (0.485, 0.456, 0.406)
IMAGENET_DEFAULT_STD = (0.229, 0.224, 0.225)
# What Hugging Face calls IMAGENET_STANDARD: the defaults of ViT/ConvNext processors without a config value.
IMAGENET_STANDARD_MEAN = (0.5, 0.5, 0.5)
IMAGENET_STANDARD_STD = (0.5, 0.5, 0.5)

# Hugging Face stores `resample` as PIL's integer codes; timm stores names.
_RESAMPLE_BY_NAME = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "linear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "cubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}


# The largest side of a processed image (resize and crop sizes, or an image kept whole): far beyond the
# 224-512 pixels DiNAT classifiers are evaluated at, small enough to bound the memory of a batch.
MAX_OUTPUT_SIDE = 4096
# Pixel statistics are about 1 (about 255 for unscaled pixels); beyond this the values are typos, and the
# normalised pixels could overflow float32.
_STATISTIC_LIMIT = 1e6
# Beyond this many pixels a resize is computed only where the crop keeps it (see resize_and_crop).
_WHOLE_RESIZE_PIXELS = MAX_OUTPUT_SIDE**2


def resample_from_name(value: int | str | Image.Resampling) -> Image.Resampling:
    """Map a Hugging Face integer code, a timm/torchvision name or a PIL enum to ``PIL.Image.Resampling``."""
    if isinstance(value, Image.Resampling):
        return value
    if isinstance(value, bool):
        raise ValueError(f"invalid resample value {value!r}")
    if isinstance(value, int):
        try:
            return Image.Resampling(value)
        except ValueError:
            raise ValueError(
                f"invalid resample code {value}; expected one of "
                + ", ".join(f"{m.value} ({m.name.lower()})" for m in Image.Resampling)
            ) from None
    if isinstance(value, str):
        key = value.strip().lower()
        if key in _RESAMPLE_BY_NAME:
            return _RESAMPLE_BY_NAME[key]
        raise ValueError(
            f"unknown interpolation {value!r}; expected one of {', '.join(sorted(_RESAMPLE_BY_NAME))}"
        )
    raise ValueError(f"invalid resample value {value!r}")


def _as_pair(value: Any, what: str) -> tuple[int, int]:
    if isinstance(value, bool):
        raise ValueError(f"{what} must be an integer or (height, width), got {value!r}")
    if isinstance(value, int):
        pair = (value, value)
    elif isinstance(value, (list, tuple)) and len(value) == 2 and all(
        isinstance(v, int) and not isinstance(v, bool) for v in value
    ):
        pair = (int(value[0]), int(value[1]))
    else:
        raise ValueError(f"{what} must be an integer or (height, width), got {value!r}")
    if pair[0] < 1 or pair[1] < 1:
        raise ValueError(f"{what} must be positive, got {value!r}")
    if max(pair) > MAX_OUTPUT_SIDE:
        raise ValueError(f"{what} must be at most {MAX_OUTPUT_SIDE} pixels, got {value!r}")
    return pair


def _as_triple(value: Any, what: str) -> tuple[float, float, float]:
    triple: tuple[float, ...] = ()
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        triple = (float(value),) * 3
    elif isinstance(value, (list, tuple)) and len(value) == 3:
        with contextlib.suppress(TypeError, ValueError):  # not numbers: refused below, with the value
            triple = tuple(float(v) for v in value)
    if len(triple) == 3 and all(math.isfinite(v) for v in triple):
        return triple  # type: ignore[return-value]
    raise ValueError(f"{what} must be a finite number or three (one per RGB channel), got {value!r}")


def _resize_for_crop(crop: int, crop_pct: Any, what: str) -> int:
    """The resize before a center crop of ``crop`` pixels that keeps ``crop_pct`` of the image."""
    if isinstance(crop_pct, bool) or not isinstance(crop_pct, (int, float)) or not math.isfinite(crop_pct) \
            or crop_pct <= 0:
        raise ValueError(f"{what} must be a positive number, got {crop_pct!r}")
    size = crop / crop_pct
    if size > MAX_OUTPUT_SIDE:
        raise ValueError(f"{what} {crop_pct!r} resizes to {size:.0f} pixels for a {crop}-pixel crop, more than "
                         f"{MAX_OUTPUT_SIDE}")
    return int(size)


@dataclass(frozen=True)
class ImageProcessor:
    """Evaluation preprocessing: resize, optional center crop, rescale, normalize -> float32 (B, 3, H, W).

    Build it with :meth:`from_pretrained` (a folder's ``preprocessor_config.json``),
    :meth:`from_hf_config`, :meth:`from_registry_entry` or :meth:`timm_eval`; calling it on images
    (paths, bytes, PIL images, uint8 arrays; one or a list) returns the batch of ``pixel_values``.

    Attributes:
        resize_size: resize to exactly (height, width) (ViT; ConvNext at >= 384), or None.
        shortest_edge: resize so the shorter side has this length, keeping the aspect ratio, or None.
        crop_size: center crop (height, width) after resizing, or None.
        crop_rounding: "floor" places the crop at ``(size - crop) // 2`` (Hugging Face);
            "round" at ``round((size - crop) / 2)`` with Python's rounding (torchvision / timm).
        resample: Pillow filter for the resize.
        rescale_factor: multiply pixel values by this (1/255), or None to skip.
        image_mean, image_std: per-channel normalisation, or None to skip.
        name: where the settings came from (for messages and ``repr``).
    """

    resize_size: tuple[int, int] | None = None
    shortest_edge: int | None = None
    crop_size: tuple[int, int] | None = None
    crop_rounding: str = "floor"
    resample: Image.Resampling = Image.Resampling.BILINEAR
    rescale_factor: float | None = 1 / 255
    image_mean: tuple[float, float, float] | None = IMAGENET_STANDARD_MEAN
    image_std: tuple[float, float, float] | None = IMAGENET_STANDARD_STD
    name: str = field(default="custom", compare=False)

    def __post_init__(self) -> None:
        if self.resize_size is not None and self.shortest_edge is not None:
            raise ValueError("give either resize_size or shortest_edge, not both")
        if self.resize_size is not None:
            object.__setattr__(self, "resize_size", _as_pair(self.resize_size, "resize_size"))
        if self.shortest_edge is not None and (
            not isinstance(self.shortest_edge, int) or isinstance(self.shortest_edge, bool)
            or not 1 <= self.shortest_edge <= MAX_OUTPUT_SIDE
        ):
            raise ValueError(
                f"shortest_edge must be an integer from 1 to {MAX_OUTPUT_SIDE}, got {self.shortest_edge!r}")
        if self.crop_size is not None:
            object.__setattr__(self, "crop_size", _as_pair(self.crop_size, "crop_size"))
        if self.crop_rounding not in ("floor", "round"):
            raise ValueError(f"crop_rounding must be 'floor' or 'round', got {self.crop_rounding!r}")
        object.__setattr__(self, "resample", resample_from_name(self.resample))
        if self.rescale_factor is not None and (
            isinstance(self.rescale_factor, bool) or not isinstance(self.rescale_factor, (int, float))
            or not abs(self.rescale_factor) <= _STATISTIC_LIMIT
        ):
            raise ValueError(f"rescale_factor must be a number of magnitude at most {_STATISTIC_LIMIT:g}, "
                             f"got {self.rescale_factor!r}")
        if (self.image_mean is None) != (self.image_std is None):
            raise ValueError("give both image_mean and image_std, or neither")
        if self.image_mean is not None:
            mean, std = _as_triple(self.image_mean, "image_mean"), _as_triple(self.image_std, "image_std")
            if any(abs(m) > _STATISTIC_LIMIT for m in mean):
                raise ValueError(f"image_mean must be of magnitude at most {_STATISTIC_LIMIT:g}, got {mean}")
            if any(not 1 / _STATISTIC_LIMIT <= abs(s) <= _STATISTIC_LIMIT for s in std):
                raise ValueError(f"image_std must be of magnitude {1 / _STATISTIC_LIMIT:g} to {_STATISTIC_LIMIT:g}, "
                                 f"got {std}")
            object.__setattr__(self, "image_mean", mean)
            object.__setattr__(self, "image_std", std)

    # -- constructors ------------------------------------------------------------------------------------

    @classmethod
    def timm_eval(
        cls,
        resolution: int | Sequence[int] = 224,
        crop_pct: float = 0.875,
        interpolation: str | int = "bicubic",
        mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
        std: Sequence[float] = IMAGENET_DEFAULT_STD,
    ) -> ImageProcessor:
        """timm's ImageNet evaluation transform (what the SHI-Labs checkpoints were scored with).

        Resize the shorter side to ``floor(resolution / crop_pct)`` keeping the aspect ratio, center
        crop ``resolution`` (torchvision's rounding), scale to [0, 1], normalize with ``mean``/``std``.
        """
        height, width = _as_pair(list(resolution) if isinstance(resolution, (list, tuple)) else resolution,
                                 "resolution")
        if height != width:
            raise ValueError(f"only square evaluation resolutions are supported, got {height}x{width}")
        if isinstance(crop_pct, bool) or not isinstance(crop_pct, (int, float)) or not 0 < crop_pct <= 1:
            raise ValueError(f"crop_pct must be in (0, 1], got {crop_pct!r}")
        scale_size = _resize_for_crop(height, crop_pct, "crop_pct")
        return cls(
            shortest_edge=scale_size,
            crop_size=(height, width),
            crop_rounding="round",
            resample=resample_from_name(interpolation),
            rescale_factor=1 / 255,
            image_mean=tuple(mean),  # type: ignore[arg-type]
            image_std=tuple(std),  # type: ignore[arg-type]
            name=f"timm eval {height}px crop_pct={crop_pct} {resample_from_name(interpolation).name.lower()}",
        )

    @classmethod
    def from_registry_entry(cls, entry: str | Mapping[str, Any]) -> ImageProcessor:
        """The evaluation transform of a registry entry (a dict, or a model name looked up in the registry).

        The entry's ``"preprocessing"`` block has ``resolution``, ``crop_pct``, ``interpolation``, ``mean``
        and ``std``; missing keys take timm's defaults (224, 0.875, bicubic, ImageNet mean/std).
        """
        if isinstance(entry, str):
            from .registry import registry_entry  # lazy: the registry is only needed for names

            entry = registry_entry(entry)
        block = entry.get("preprocessing", entry) if isinstance(entry, Mapping) else None
        if not isinstance(block, Mapping):
            raise ValueError(f"registry entry has no 'preprocessing' block: {entry!r}")
        crop_mode = block.get("crop_mode", "center")
        if crop_mode != "center":
            raise ValueError(f"unsupported crop_mode {crop_mode!r} in registry preprocessing (only 'center')")
        return cls.timm_eval(
            resolution=block.get("resolution", 224),
            crop_pct=block.get("crop_pct", 0.875),
            interpolation=block.get("interpolation", "bicubic"),
            mean=block.get("mean", IMAGENET_DEFAULT_MEAN),
            std=block.get("std", IMAGENET_DEFAULT_STD),
        )

    @classmethod
    def from_hf_config(cls, config: Mapping[str, Any], model_type: str | None = None) -> ImageProcessor:
        """Settings of a Hugging Face ``preprocessor_config.json`` (ViT or ConvNext image processor).

        The processor class comes from ``image_processor_type`` (or the older ``feature_extractor_type``);
        without either, ``model_type`` decides as transformers' AutoImageProcessor does (DiNAT and NAT map
        to ``ViTImageProcessor``). Missing keys take that class's defaults.
        """
        kind = _hf_processor_kind(config, model_type)
        do_resize = bool(config.get("do_resize", True))
        resample = config.get("resample", Image.Resampling.BILINEAR)
        if resample is None:
            resample = Image.Resampling.BILINEAR
        do_rescale = bool(config.get("do_rescale", True))
        rescale_factor = config.get("rescale_factor", 1 / 255)
        if rescale_factor is None:
            rescale_factor = 1 / 255
        if isinstance(rescale_factor, bool) or not isinstance(rescale_factor, (int, float)):
            raise ValueError(f"rescale_factor must be a number, got {rescale_factor!r}")
        do_normalize = bool(config.get("do_normalize", True))
        mean = config.get("image_mean")
        std = config.get("image_std")
        mean = IMAGENET_STANDARD_MEAN if mean is None else mean
        std = IMAGENET_STANDARD_STD if std is None else std
        common = dict(
            resample=resample,
            rescale_factor=float(rescale_factor) if do_rescale else None,
            image_mean=mean if do_normalize else None,
            image_std=std if do_normalize else None,
        )
        size = config.get("size")
        if kind == "vit":
            height, width = _hf_size_hw(size if size is not None else {"height": 224, "width": 224})
            return cls(
                resize_size=(height, width) if do_resize else None,
                name=f"ViTImageProcessor {height}x{width}",
                **common,  # type: ignore[arg-type]
            )
        # ConvNext
        shortest = _hf_shortest_edge(size if size is not None else {"shortest_edge": 384})
        crop_pct = config.get("crop_pct")
        crop_pct = 224 / 256 if crop_pct is None else crop_pct
        resize = _resize_for_crop(shortest, crop_pct, "crop_pct")
        name = f"ConvNextImageProcessor shortest_edge={shortest} crop_pct={crop_pct:g}"
        if not do_resize:
            return cls(name=name, **common)  # type: ignore[arg-type]
        if shortest >= 384:
            # transformers warps (no crop) at 384 and above, as ConvNeXt was evaluated at those sizes.
            return cls(resize_size=(shortest, shortest), name=name, **common)  # type: ignore[arg-type]
        return cls(
            shortest_edge=resize,
            crop_size=(shortest, shortest),
            crop_rounding="floor",
            name=name,
            **common,  # type: ignore[arg-type]
        )

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike) -> ImageProcessor:
        """Read ``folder/preprocessor_config.json`` (model type from ``folder/config.json`` if needed)."""
        folder = Path(folder)
        path = folder / "preprocessor_config.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path} does not exist")
        config = read_json_object(path, "preprocessor configuration")
        model_type = None
        config_path = folder / "config.json"
        if config_path.is_file():
            try:
                model_type = read_json_object(config_path, "model configuration").get("model_type")
            except ValueError:
                model_type = None
        try:
            return cls.from_hf_config(config, model_type=model_type)
        except ValueError as exc:
            raise ValueError(f"{path}: {exc}") from None

    # -- the transform -----------------------------------------------------------------------------------

    @property
    def output_size(self) -> tuple[int, int] | None:
        """(height, width) of every output image, or None when it depends on the input."""
        if self.crop_size is not None:
            return self.crop_size
        return self.resize_size

    def _resized_size(self, width: int, height: int) -> tuple[int, int]:
        """(width, height) of the whole image after the resize (which is never computed as a whole)."""
        if self.resize_size is not None:
            return self.resize_size[1], self.resize_size[0]
        if self.shortest_edge is not None:
            short, long = (width, height) if width <= height else (height, width)
            new_short, new_long = self.shortest_edge, int(self.shortest_edge * long / short)
            return (new_short, new_long) if width <= height else (new_long, new_short)
        return width, height

    def resize_and_crop(self, image: Image.Image) -> np.ndarray:
        """Resize and crop an RGB image; returns uint8 (H, W, 3).

        The whole image is resized, then cropped, as the reference implementations do; where that
        would make more than ``_WHOLE_RESIZE_PIXELS`` (a 60000 x 1 strip resized to a 256-pixel short
        side makes 15 million pixels) only the part the crop keeps is resized, so an extreme aspect
        ratio costs no more memory than a square image. An image smaller than the crop is zero-padded
        around it, as transformers does.
        """
        width, height = image.size
        resized_width, resized_height = self._resized_size(width, height)
        crop_height, crop_width = self.crop_size or (resized_height, resized_width)
        if max(crop_height, crop_width) > MAX_OUTPUT_SIDE:  # no crop: the whole (resized) image is kept
            raise ImageLoadError(
                "", f"the processed image would be {resized_width} x {resized_height} pixels, more than "
                f"{MAX_OUTPUT_SIDE} on a side, and {self.name} does not crop"
            )
        top, bottom, pad_top = _crop_window(resized_height, crop_height, self.crop_rounding)
        left, right, pad_left = _crop_window(resized_width, crop_width, self.crop_rounding)
        if (resized_width, resized_height) == (width, height):
            kept = image.crop((left, top, right, bottom))
        elif resized_width * resized_height <= _WHOLE_RESIZE_PIXELS:
            resized = image.resize((resized_width, resized_height), resample=self.resample)
            kept = resized.crop((left, top, right, bottom))
        else:
            # Pillow resizes a box of the source with the filter of the whole resize, but takes its
            # corners in single precision and may pass the two axes in the other order: pixels may
            # differ from the whole resize by a level or two.
            scale_x, scale_y = width / resized_width, height / resized_height
            box = (left * scale_x, top * scale_y, min(right * scale_x, width), min(bottom * scale_y, height))
            kept = image.resize((right - left, bottom - top), resample=self.resample, box=box)
        pixels = np.asarray(kept, dtype=np.uint8)
        if pixels.shape[:2] == (crop_height, crop_width):
            return pixels
        padded = np.zeros((crop_height, crop_width, 3), dtype=np.uint8)
        padded[pad_top:pad_top + pixels.shape[0], pad_left:pad_left + pixels.shape[1]] = pixels
        return padded

    def to_pixel_values(self, pixels: np.ndarray) -> np.ndarray:
        """uint8 (H, W, 3) -> float32 (3, H, W): rescale then normalize, with transformers' arithmetic."""
        if self.rescale_factor is not None:
            # transformers multiplies in float64 and rounds to float32 once.
            values = (pixels.astype(np.float64) * self.rescale_factor).astype(np.float32)
        else:
            values = pixels.astype(np.float32)
        if self.image_mean is not None:
            mean = np.asarray(self.image_mean, dtype=np.float32)
            std = np.asarray(self.image_std, dtype=np.float32)
            values = (values - mean) / std
        return np.ascontiguousarray(values.transpose(2, 0, 1), dtype=np.float32)

    def preprocess(self, image: ImageInput) -> np.ndarray:
        """One image (anything :func:`load_image` takes) -> float32 (3, H, W)."""
        loaded = load_image(image)
        try:
            pixels = self.resize_and_crop(loaded)
        except ImageLoadError as error:
            raise ImageLoadError(source_name(image), error.reason) from None
        return self.to_pixel_values(pixels)

    def __call__(self, images: ImageInput | Iterable[ImageInput]) -> np.ndarray:
        """One image or a list of images -> float32 ``pixel_values`` of shape (B, 3, H, W)."""
        arrays = [self.preprocess(image) for image in as_image_list(images)]
        if not arrays:
            raise ValueError("no images given")
        shapes = {a.shape for a in arrays}
        if len(shapes) > 1:
            raise ValueError(
                f"images of different sizes {sorted(shapes)} cannot be batched; this processor does not resize"
            )
        return np.stack(arrays)


def _crop_window(length: int, crop: int, rounding: str) -> tuple[int, int, int]:
    """Along one axis of ``length`` pixels: the kept range ``start, stop`` of a center crop of ``crop``
    pixels, and where it lands in the output (after the zero padding of an axis shorter than the crop,
    whose extra pixel goes at the start: ceil, as transformers pads)."""
    if length < crop:
        return 0, length, math.ceil((crop - length) / 2)
    excess = length - crop
    start = excess // 2 if rounding == "floor" else int(round(excess / 2))
    return start, start + crop, 0


def _hf_processor_kind(config: Mapping[str, Any], model_type: str | None) -> str:
    name = config.get("image_processor_type") or config.get("feature_extractor_type")
    if name:
        base = str(name).replace("FeatureExtractor", "ImageProcessor").removesuffix("Fast")
        if base == "ViTImageProcessor":
            return "vit"
        if base == "ConvNextImageProcessor":
            return "convnext"
        raise ValueError(
            f"unsupported image processor {name!r}; dinat-np implements ViTImageProcessor and "
            f"ConvNextImageProcessor"
        )
    if model_type in (None, "dinat", "nat"):
        return "vit"
    raise ValueError(
        f"preprocessor config names no image_processor_type and model_type {model_type!r} has no default"
    )


def _hf_size_hw(size: Any) -> tuple[int, int]:
    if isinstance(size, Mapping):
        if "height" in size and "width" in size:
            return _as_pair((size["height"], size["width"]), "size")
        raise ValueError(f"ViTImageProcessor needs size with 'height' and 'width', got {dict(size)}")
    if isinstance(size, (list, tuple)) and len(size) == 2:
        return _as_pair(tuple(size), "size")
    if isinstance(size, int) and not isinstance(size, bool):
        return _as_pair(size, "size")
    raise ValueError(f"invalid size {size!r}")


def _hf_shortest_edge(size: Any) -> int:
    if isinstance(size, Mapping):
        if "shortest_edge" in size:
            return _as_pair(size["shortest_edge"], "size['shortest_edge']")[0]
        raise ValueError(f"ConvNextImageProcessor needs size with 'shortest_edge', got {dict(size)}")
    if isinstance(size, int) and not isinstance(size, bool):
        return _as_pair(size, "size")[0]
    raise ValueError(f"invalid size {size!r} for ConvNextImageProcessor (expected an int or shortest_edge)")
