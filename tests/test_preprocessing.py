"""Image loading and preprocessing: parity with transformers' image processors, timm's eval transform,
and the bad-image list (truncated, not an image, decompression bombs, colour modes, EXIF, animation)."""

from __future__ import annotations

import io
import json
import warnings

import numpy as np
import pytest
from PIL import Image

from dinat_np.image_loading import ImageLoadError, ImageTooLargeError, is_single_image, load_image, to_rgb
from dinat_np.preprocessing import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, ImageProcessor, resample_from_name

skimage_data = pytest.importorskip("skimage.data")


@pytest.fixture(scope="module")
def photos() -> list[Image.Image]:
    """Real photographs of different shapes (portrait, square, landscape) and a grayscale one."""
    return [
        Image.fromarray(skimage_data.chelsea()),  # 451x300 landscape cat
        Image.fromarray(skimage_data.astronaut()),  # 512x512
        Image.fromarray(skimage_data.coffee()),  # 600x400
        Image.fromarray(skimage_data.rocket()),  # 427x640 portrait
        Image.fromarray(skimage_data.camera()).convert("RGB"),  # 512x512 grayscale content
    ]


# --------------------------------------------------------------------------------------------------
# Parity with transformers
# --------------------------------------------------------------------------------------------------

VIT_CONFIGS = [
    {"size": {"height": 224, "width": 224}, "resample": 2},
    {"size": {"height": 224, "width": 224}, "resample": 3,
     "image_mean": list(IMAGENET_DEFAULT_MEAN), "image_std": list(IMAGENET_DEFAULT_STD)},
    {"size": {"height": 160, "width": 96}, "resample": 1},
    {"size": {"height": 384, "width": 384}, "resample": 0, "do_normalize": False},
    {"size": {"height": 97, "width": 131}, "resample": 5, "rescale_factor": 1 / 127.5,
     "image_mean": [0.9, 1.0, 1.1], "image_std": [0.3, 0.6, 0.9]},
]

CONVNEXT_CONFIGS = [
    {"size": {"shortest_edge": 224}, "crop_pct": 0.875, "resample": 3,
     "image_mean": list(IMAGENET_DEFAULT_MEAN), "image_std": list(IMAGENET_DEFAULT_STD)},
    {"size": {"shortest_edge": 224}, "resample": 2},  # crop_pct default 224/256
    {"size": {"shortest_edge": 200}, "crop_pct": 0.9, "resample": 1},
    {"size": {"shortest_edge": 161}, "crop_pct": 0.95, "resample": 4},
    {"size": {"shortest_edge": 225}, "crop_pct": 1.2, "resample": 0},  # crop larger than resize: zero pad
    {"size": {"shortest_edge": 384}, "crop_pct": 0.875, "resample": 3},  # >= 384: warp, no crop
    {"size": {"shortest_edge": 448}, "resample": 2, "do_rescale": False},
]


@pytest.mark.parametrize("config", VIT_CONFIGS)
@pytest.mark.torch
def test_vit_image_processor_parity(photos, config):
    transformers = pytest.importorskip("transformers")
    expected = transformers.ViTImageProcessor(**config)(photos, return_tensors="np")["pixel_values"]
    ours = ImageProcessor.from_hf_config(dict(config, image_processor_type="ViTImageProcessor"))(photos)
    assert ours.dtype == np.float32 and ours.flags.c_contiguous
    assert ours.shape == expected.shape
    np.testing.assert_allclose(ours, expected, rtol=0, atol=1e-5)
    assert np.ptp(ours) >= 0.9  # real content, not a constant


@pytest.mark.parametrize("config", CONVNEXT_CONFIGS)
@pytest.mark.torch
def test_convnext_image_processor_parity(photos, config):
    transformers = pytest.importorskip("transformers")
    expected = transformers.ConvNextImageProcessor(**config)(photos, return_tensors="np")["pixel_values"]
    ours = ImageProcessor.from_hf_config(dict(config, image_processor_type="ConvNextImageProcessor"))(photos)
    shortest = config["size"]["shortest_edge"]
    assert ours.shape == expected.shape == (len(photos), 3, shortest, shortest)
    np.testing.assert_allclose(ours, expected, rtol=0, atol=1e-5)


def test_convnext_384_rule_warps_without_crop(photos):
    processor = ImageProcessor.from_hf_config(
        {"image_processor_type": "ConvNextImageProcessor", "size": {"shortest_edge": 384}, "crop_pct": 0.5}
    )
    assert processor.resize_size == (384, 384) and processor.crop_size is None
    below = ImageProcessor.from_hf_config(
        {"image_processor_type": "ConvNextImageProcessor", "size": {"shortest_edge": 383}, "crop_pct": 0.5}
    )
    assert below.shortest_edge == 766 and below.crop_size == (383, 383)


@pytest.mark.torch
def test_from_pretrained_folder_and_legacy_keys(tmp_path, photos):
    """Old `feature_extractor_type` and integer `size`, as many hub repos still have them."""
    transformers = pytest.importorskip("transformers")
    config = {
        "feature_extractor_type": "ConvNextFeatureExtractor",
        "size": 224,
        "crop_pct": 0.875,
        "resample": 3,
        "do_normalize": True,
        "do_resize": True,
        "image_mean": list(IMAGENET_DEFAULT_MEAN),
        "image_std": list(IMAGENET_DEFAULT_STD),
    }
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(config))
    processor = ImageProcessor.from_pretrained(tmp_path)
    assert processor.shortest_edge == 256 and processor.crop_size == (224, 224)
    hf_kwargs = {k: v for k, v in config.items() if k != "feature_extractor_type"}
    expected = transformers.ConvNextImageProcessor(**hf_kwargs)(photos, return_tensors="np")["pixel_values"]
    np.testing.assert_allclose(processor(photos), expected, rtol=0, atol=1e-5)


@pytest.mark.torch
def test_missing_type_follows_model_type(tmp_path, photos):
    """Without a processor type, DiNAT/NAT folders use ViTImageProcessor (transformers' auto mapping)."""
    transformers = pytest.importorskip("transformers")
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"size": 96, "resample": 3}))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "dinat"}))
    processor = ImageProcessor.from_pretrained(tmp_path)
    assert processor.resize_size == (96, 96)
    expected = transformers.ViTImageProcessor(size=96, resample=3)(photos, return_tensors="np")["pixel_values"]
    np.testing.assert_allclose(processor(photos), expected, rtol=0, atol=1e-5)


@pytest.mark.torch
def test_file_pipeline_matches_transformers_load_image(tmp_path, photos):
    """Path -> our loader + processor equals transformers' load_image + processor on saved files."""
    transformers = pytest.importorskip("transformers")
    from transformers.image_utils import load_image as hf_load_image

    paths = []
    for i, photo in enumerate(photos):
        path = tmp_path / f"photo{i}.jpg"
        photo.save(path, quality=90)
        paths.append(str(path))
    hf = transformers.ViTImageProcessor(size={"height": 224, "width": 224}, resample=3)
    expected = hf([hf_load_image(p) for p in paths], return_tensors="np")["pixel_values"]
    ours = ImageProcessor.from_hf_config({"image_processor_type": "ViTImageProcessor", "resample": 3})(paths)
    np.testing.assert_allclose(ours, expected, rtol=0, atol=1e-5)


def test_unsupported_processor_type_is_a_clear_error(tmp_path):
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"image_processor_type": "CLIPImageProcessor"}))
    with pytest.raises(ValueError, match="CLIPImageProcessor.*ViTImageProcessor and ConvNextImageProcessor"):
        ImageProcessor.from_pretrained(tmp_path)
    (tmp_path / "preprocessor_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        ImageProcessor.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="shortest_edge"):
        ImageProcessor.from_hf_config({"image_processor_type": "ConvNextImageProcessor",
                                       "size": {"height": 3, "width": 3}})


# --------------------------------------------------------------------------------------------------
# timm evaluation transform (registry entries)
# --------------------------------------------------------------------------------------------------


def _normalize(pixels: np.ndarray, mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD) -> np.ndarray:
    values = pixels.astype(np.float32) / np.float32(255)
    values = (values - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return values.transpose(2, 0, 1)


def test_timm_eval_transform_on_a_photo(photos):
    cat = photos[0]  # 451 wide, 300 high
    processor = ImageProcessor.from_registry_entry(
        {"preprocessing": {"resolution": 224, "crop_pct": 0.875, "interpolation": "bicubic",
                           "mean": list(IMAGENET_DEFAULT_MEAN), "std": list(IMAGENET_DEFAULT_STD)}}
    )
    assert processor.shortest_edge == 256 and processor.crop_size == (224, 224)
    out = processor(cat)
    assert out.shape == (1, 3, 224, 224) and out.dtype == np.float32
    # timm: shorter side 300 -> 256, longer int(256 * 451 / 300) = 384; crop at round(32/2), round(160/2).
    resized = np.asarray(cat.resize((384, 256), Image.Resampling.BICUBIC))
    expected = _normalize(resized[16:240, 80:304])
    np.testing.assert_allclose(out[0], expected, rtol=0, atol=1e-6)


def test_timm_eval_crop_uses_torchvision_rounding():
    """(387 - 224) / 2 = 81.5 rounds to 82 in torchvision's CenterCrop (Python round), 81 in HF's floor."""
    columns = np.tile(np.arange(387, dtype=np.uint8)[None, :, None], (256, 1, 3))
    image = Image.fromarray(columns)
    timm_like = ImageProcessor.timm_eval(224, 0.875, "nearest", mean=(0, 0, 0), std=(1, 1, 1))
    hf_like = ImageProcessor(shortest_edge=256, crop_size=(224, 224), resample="nearest",
                             image_mean=(0, 0, 0), image_std=(1, 1, 1))
    first_col_timm = round(float(timm_like(image)[0, 0, 0, 0]) * 255)
    first_col_hf = round(float(hf_like(image)[0, 0, 0, 0]) * 255)
    assert (first_col_timm, first_col_hf) == (82, 81)


def _center_crop(pixels: np.ndarray, size: tuple[int, int], rounding: str) -> np.ndarray:
    processor = ImageProcessor(crop_size=size, crop_rounding=rounding, rescale_factor=None, image_mean=None,
                               image_std=None)
    return processor.resize_and_crop(Image.fromarray(pixels))


@pytest.mark.parametrize("rounding", ["floor", "round"])
def test_center_crop_of_a_smaller_image_pads_to_the_crop_size(rounding):
    """A 12x12 image cropped to 13x13 is zero-padded to 13x13 (one extra row and column at the start,
    as transformers), whatever the rounding; Python's round(-0.5) == 0 once shifted the crop off by one."""
    pixels = np.random.default_rng(11).integers(1, 256, size=(12, 12, 3), dtype=np.uint8)
    out = _center_crop(pixels, (13, 13), rounding)
    assert out.shape == (13, 13, 3)
    np.testing.assert_array_equal(out[1:, 1:], pixels)
    assert not out[0].any() and not out[:, 0].any()
    # Through the processor (no resize): the same 13x13 output.
    processor = ImageProcessor(crop_size=13, crop_rounding=rounding, rescale_factor=None, image_mean=None,
                               image_std=None)
    batch = processor(pixels)
    assert batch.shape == (1, 3, 13, 13)
    np.testing.assert_array_equal(batch[0].transpose(1, 2, 0), out.astype(np.float32))
    # Padded along one axis, cropped along the other: that axis keeps its own rule, (20 - 13) / 2 = 3.5.
    wide = np.random.default_rng(12).integers(1, 256, size=(12, 20, 3), dtype=np.uint8)
    mixed = _center_crop(wide, (13, 13), rounding)
    left = 3 if rounding == "floor" else 4
    assert mixed.shape == (13, 13, 3)
    np.testing.assert_array_equal(mixed[1:], wide[:, left:left + 13])
    assert not mixed[0].any()
    # Larger on both axes: a plain crop; (15 - 13) / 2 = 1 and (18 - 13) / 2 = 2.5.
    large = np.random.default_rng(13).integers(0, 256, size=(15, 18, 3), dtype=np.uint8)
    # round(2.5) == 2 (Python rounds halves to even, as torchvision does): both rules start at column 2.
    np.testing.assert_array_equal(_center_crop(large, (13, 13), rounding), large[1:14, 2:15])
    odd = np.random.default_rng(14).integers(0, 256, size=(13, 20, 3), dtype=np.uint8)
    left = 3 if rounding == "floor" else 4  # round(3.5) == 4
    np.testing.assert_array_equal(_center_crop(odd, (13, 13), rounding), odd[:, left:left + 13])
    # Every size from much smaller to larger than the crop gives exactly the crop size.
    for height in range(1, 18):
        for width in range(1, 18):
            image = np.ones((height, width, 3), dtype=np.uint8)
            cropped = _center_crop(image, (9, 10), rounding)
            assert cropped.shape == (9, 10, 3), (height, width)
            assert int(cropped[:, :, 0].sum()) == min(height, 9) * min(width, 10)


def test_registry_entry_defaults_and_384():
    default = ImageProcessor.from_registry_entry({"preprocessing": {}})
    assert default == ImageProcessor.timm_eval(224, 0.875, "bicubic")
    assert default.resample == Image.Resampling.BICUBIC
    large = ImageProcessor.from_registry_entry(
        {"preprocessing": {"resolution": 384, "crop_pct": 1.0, "interpolation": "bicubic"}}
    )
    assert large.shortest_edge == 384 and large.crop_size == (384, 384)
    odd = ImageProcessor.timm_eval(224, 0.9, "bilinear")
    assert odd.shortest_edge == 248  # floor(224 / 0.9) = floor(248.88...)
    with pytest.raises(ValueError, match="crop_pct"):
        ImageProcessor.timm_eval(224, 0.0)
    with pytest.raises(ValueError, match="unknown interpolation"):
        ImageProcessor.timm_eval(224, 0.875, "spline")


def test_resample_names():
    assert resample_from_name(3) == Image.Resampling.BICUBIC
    assert resample_from_name("BILINEAR") == Image.Resampling.BILINEAR
    with pytest.raises(ValueError, match="invalid resample code 9"):
        resample_from_name(9)


def test_batch_of_mixed_inputs(photos):
    """Paths, encoded bytes, PIL images and uint8 arrays give the same pixel values."""
    processor = ImageProcessor.timm_eval(64, 0.875, "bicubic")
    photo = photos[2]
    buffer = io.BytesIO()
    photo.save(buffer, format="PNG")
    batch = processor([photo, buffer.getvalue(), np.asarray(photo)])
    assert batch.shape == (3, 3, 64, 64)
    np.testing.assert_array_equal(batch[0], batch[1])
    np.testing.assert_array_equal(batch[0], batch[2])
    with pytest.raises(ValueError, match="no images"):
        processor([])
    with pytest.raises(ImageLoadError, match="uint8"):
        processor(np.asarray(photo, dtype=np.float32))
    # A bytearray is one image, as bytes are.
    single = processor(bytearray(buffer.getvalue()))
    assert single.shape == (1, 3, 64, 64)
    np.testing.assert_array_equal(single[0], batch[0])


def test_is_single_image(photos, tmp_path):
    from pathlib import Path

    for value in ("cat.jpg", Path("cat.jpg"), b"\x89PNG", bytearray(b"\x89PNG"), photos[0], np.zeros((2, 2), np.uint8)):
        assert is_single_image(value), value
    for value in (["cat.jpg"], ("cat.jpg",), [photos[0]], iter([b"x"]), None, 3):
        assert not is_single_image(value), value


# --------------------------------------------------------------------------------------------------
# Bad images
# --------------------------------------------------------------------------------------------------


def _gradient(width: int = 48, height: int = 32, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(1, 255, size=(height, width, 3), dtype=np.uint8)


def test_truncated_files(tmp_path):
    photo = Image.fromarray(skimage_data.chelsea())
    for fmt, suffix in (("JPEG", "jpg"), ("PNG", "png")):
        buffer = io.BytesIO()
        photo.save(buffer, format=fmt)
        data = buffer.getvalue()
        path = tmp_path / f"cut.{suffix}"
        path.write_bytes(data[: len(data) // 2])
        with pytest.raises(ImageLoadError) as info:
            load_image(path)
        assert str(path) in str(info.value)
        assert "truncated" in info.value.reason or "cannot decode" in info.value.reason


def test_not_an_image(tmp_path):
    text = tmp_path / "notes.jpg"
    text.write_text("this is not a picture\n")
    with pytest.raises(ImageLoadError, match="not an image file"):
        load_image(text)
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    with pytest.raises(ImageLoadError, match="not an image file"):
        load_image(empty)
    with pytest.raises(ImageLoadError, match="no such file"):
        load_image(tmp_path / "missing.png")
    with pytest.raises(ImageLoadError, match="is a directory"):
        load_image(tmp_path)


@pytest.mark.parametrize(
    "pillow_warning",
    [
        # Pillow's own warning between the limit and twice it: either way the error is ours.
        pytest.param("ignore", marks=pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")),
        pytest.param("error", marks=pytest.mark.filterwarnings("error::PIL.Image.DecompressionBombWarning")),
    ],
)
def test_decompression_bomb_limit(tmp_path, monkeypatch, pillow_warning):
    path = tmp_path / "big.png"
    Image.fromarray(_gradient(100, 80)).save(path)  # 8000 pixels
    # Between the limit and twice the limit Pillow only warns: that must already be our error.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 5000)
    with pytest.raises(ImageTooLargeError, match=r"too large.*8,000 pixels.*limit 5,000.*MAX_IMAGE_PIXELS"):
        load_image(path)
    # Beyond twice the limit Pillow raises its own error: same message from us.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 3000)
    with pytest.raises(ImageTooLargeError, match=r"8,000 pixels.*limit 3,000"):
        load_image(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 8000)
    assert load_image(path).size == (100, 80)
    # The check reads the limit at each load and changes no warning filter.
    filters = list(warnings.filters)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 7999)
    with pytest.raises(ImageTooLargeError, match=r"8,000 pixels.*limit 7,999"):
        load_image(path.read_bytes())
    assert warnings.filters == filters
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    assert load_image(bytearray(path.read_bytes())).size == (100, 80)


def _hf_load(image: Image.Image) -> np.ndarray:
    from transformers.image_utils import load_image as hf_load_image

    return np.asarray(hf_load_image(image))


@pytest.mark.parametrize("mode", ["L", "1", "P", "RGBA", "LA", "PA", "CMYK", "YCbCr", "RGBX"])
@pytest.mark.torch
def test_mode_conversions_match_pil_and_transformers(tmp_path, mode):
    pytest.importorskip("transformers")
    rng = np.random.default_rng(7)
    base = Image.fromarray(_gradient(40, 30, seed=3))
    if mode == "P":
        image = base.quantize(16)
    elif mode == "PA":
        image = base.quantize(16).convert("PA")
    elif mode in ("RGBA", "LA"):
        rgba = np.concatenate([np.asarray(base), rng.integers(0, 256, (30, 40, 1), dtype=np.uint8)], axis=2)
        image = Image.fromarray(rgba, "RGBA").convert(mode)
    else:
        image = base.convert(mode)
    # Round-trip through a file where the format keeps the mode (no format writes PA: use it in memory).
    fmt = {"CMYK": "JPEG", "YCbCr": "JPEG", "RGBX": "TIFF"}.get(mode, "PNG")
    if mode == "PA":
        loaded = load_image(image)
        assert loaded.mode == "RGB"
        np.testing.assert_array_equal(np.asarray(loaded), _hf_load(image))
        return
    if fmt == "JPEG":
        path = tmp_path / "image.jpg"
        image.save(path, quality=95)
    else:
        path = tmp_path / ("image.tif" if fmt == "TIFF" else "image.png")
        image.save(path)
    opened = Image.open(path)
    loaded = load_image(path)
    assert loaded.mode == "RGB" and loaded.size == (40, 30)
    np.testing.assert_array_equal(np.asarray(loaded), _hf_load(opened))
    np.testing.assert_array_equal(np.asarray(loaded), np.asarray(Image.open(path).convert("RGB")))


def test_palette_with_transparency_is_quiet(tmp_path, recwarn):
    image = Image.fromarray(_gradient(20, 20)).quantize(8)
    path = tmp_path / "transparent.png"
    image.save(path, transparency=bytes([0, 128] + [255] * 6))
    loaded = load_image(path)
    assert loaded.mode == "RGB"
    assert not [w for w in recwarn if issubclass(w.category, UserWarning)]
    with warnings.catch_warnings():  # Pillow's direct conversion warns; its colours are the reference
        warnings.simplefilter("ignore", UserWarning)
        expected = np.asarray(Image.open(path).convert("RGB"))
    np.testing.assert_array_equal(np.asarray(loaded), expected)
    assert len(np.unique(expected.reshape(-1, 3), axis=0)) > 4  # real colours, not a blank image


@pytest.mark.parametrize("mode", ["I;16", "I;16B"])
def test_sixteen_bit_images_are_scaled_not_clipped(tmp_path, mode):
    values = (np.arange(24 * 16, dtype=np.uint32).reshape(16, 24) * 171).astype(np.uint16)
    values[0, 0], values[0, 1], values[0, 2] = 0, 65535, 257 * 100
    path = tmp_path / ("deep.png" if mode == "I;16" else "deep.tif")
    if mode == "I;16":
        image = Image.fromarray(values)
    else:  # Pillow's convert() to I;16B clips at 255, so build the big-endian image from bytes
        image = Image.frombytes(mode, (24, 16), values.astype(">u2").tobytes())
    image.save(path)
    assert Image.open(path).mode.startswith("I;16")
    rgb = np.asarray(load_image(path))
    expected = np.rint(values / 257.0).astype(np.uint8)
    np.testing.assert_array_equal(rgb[..., 0], expected)
    np.testing.assert_array_equal(rgb[..., 0], rgb[..., 2])
    assert rgb[0, 1, 0] == 255 and rgb[0, 2, 0] == 100
    # Pillow's own convert("RGB") would saturate almost everything at 255.
    assert (rgb[..., 0] == 255).mean() < 0.05


def test_int32_and_float_images():
    as_int = Image.fromarray(np.array([[0, 65535], [257, 32896]], dtype=np.int32), mode="I")
    np.testing.assert_array_equal(np.asarray(to_rgb(as_int))[..., 1], [[0, 255], [1, 128]])
    small_int = Image.fromarray(np.array([[0, 200]], dtype=np.int32), mode="I")
    np.testing.assert_array_equal(np.asarray(to_rgb(small_int))[..., 0], [[0, 200]])
    unit_float = Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32), mode="F")
    np.testing.assert_array_equal(np.asarray(to_rgb(unit_float))[..., 0], [[0, 128, 255]])
    byte_float = Image.fromarray(np.array([[-3.0, 17.4, 255.0]], dtype=np.float32), mode="F")
    np.testing.assert_array_equal(np.asarray(to_rgb(byte_float))[..., 0], [[0, 17, 255]])


def test_wide_value_ranges_are_scaled_not_clipped():
    """Above 255 a float image (and above 65535 an integer one) is scaled to its largest value: such
    images once came out white. Negative values and NaN are black, +inf white."""
    big_float = Image.fromarray(np.array([[-3.0, 17.4, 300.0, 600.0]], dtype=np.float32), mode="F")
    np.testing.assert_array_equal(np.asarray(to_rgb(big_float))[..., 0], [[0, 7, 128, 255]])
    rng = np.random.default_rng(5)
    scientific = rng.uniform(0, 4000, size=(20, 30)).astype(np.float32)
    gray = np.asarray(to_rgb(Image.fromarray(scientific, mode="F")))[..., 0]
    np.testing.assert_array_equal(gray, np.rint(scientific.astype(np.float64) * 255 / scientific.max()))
    assert (gray == 255).mean() < 0.01
    odd = Image.fromarray(np.array([[np.nan, np.inf, -np.inf, 0.5]], dtype=np.float32), mode="F")
    np.testing.assert_array_equal(np.asarray(to_rgb(odd))[..., 0], [[0, 255, 0, 128]])
    big_int = Image.fromarray(np.array([[0, 70000, 140000, -5]], dtype=np.int32), mode="I")
    np.testing.assert_array_equal(np.asarray(to_rgb(big_int))[..., 0], [[0, 128, 255, 0]])


def test_extreme_aspect_ratios_resize_only_the_crop(photos, monkeypatch):
    """A strip whose whole resize would be huge is resized only where the crop keeps it: the same
    picture as the whole resize, within the rounding Pillow's box resize allows."""
    from dinat_np import preprocessing

    astronaut = photos[1]
    for box in ((0, 200, 512, 223), (200, 0, 223, 512), (0, 250, 512, 256), (100, 100, 105, 105)):
        image = astronaut.crop(box)  # 512 x 23, 23 x 512, 512 x 6, 5 x 5
        for processor in (ImageProcessor.timm_eval(64, 0.875, "bicubic"),
                          ImageProcessor(shortest_edge=50, crop_size=(60, 40), resample="bilinear")):
            whole = processor.resize_and_crop(image)
            monkeypatch.setattr(preprocessing, "_WHOLE_RESIZE_PIXELS", 1)
            boxed = processor.resize_and_crop(image)
            monkeypatch.undo()
            assert boxed.shape == whole.shape == processor.crop_size + (3,)
            difference = np.abs(boxed.astype(int) - whole)
            assert difference.max() <= 2 and difference.mean() < 0.3, (box, processor.name)
    # 60000 x 1 strips (12 GB resized whole) run in test_hostile.py, in a child with capped memory.


def test_sizes_and_statistics_are_bounded(photos):
    for settings, message in [
        ({"image_processor_type": "ViTImageProcessor", "size": {"height": 5000, "width": 224}}, "at most 4096"),
        ({"image_processor_type": "ConvNextImageProcessor", "size": {"shortest_edge": 224}, "crop_pct": 1e-300},
         r"crop_pct 1e-300 resizes to \d+ pixels"),
        ({"image_processor_type": "ConvNextImageProcessor", "size": 224, "crop_pct": "0.9"}, "crop_pct must be"),
        ({"image_mean": [0.5, 0.5, float("nan")]}, "image_mean must be a finite number"),
        ({"image_std": [1e-30, 1, 1]}, "image_std must be of magnitude"),
        ({"image_mean": 1e300}, "image_mean must be of magnitude"),
        ({"rescale_factor": 1e30}, "rescale_factor must be a number of magnitude"),
    ]:
        with pytest.raises(ValueError, match=message):
            ImageProcessor.from_hf_config(settings)
    with pytest.raises(ValueError, match="shortest_edge must be an integer from 1 to 4096"):
        ImageProcessor(shortest_edge=10**9)
    with pytest.raises(ValueError, match="crop_pct 1e-09"):
        ImageProcessor.timm_eval(224, crop_pct=1e-9)
    # Without resizing, an image is kept whole: beyond 4096 pixels on a side it is refused.
    keep = ImageProcessor(rescale_factor=None, image_mean=None, image_std=None)
    with pytest.raises(ImageLoadError, match=r"<Image>: the processed image would be 5000 x 2 pixels"):
        keep(Image.new("RGB", (5000, 2)))


def test_special_files_are_refused_without_blocking(tmp_path):
    import os

    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    with pytest.raises(ImageLoadError, match=r"pipe\.png: is a FIFO \(named pipe\), not an image file"):
        load_image(fifo)  # a blocking open would wait for a writer forever
    with pytest.raises(ImageLoadError, match="is a directory"):
        load_image(tmp_path)
    (tmp_path / "loop.png").symlink_to(tmp_path / "loop.png")
    with pytest.raises(ImageLoadError, match="a symbolic link loop"):
        load_image(tmp_path / "loop.png")
    (tmp_path / "broken.png").symlink_to(tmp_path / "gone.png")
    with pytest.raises(ImageLoadError, match=r"no such file \(a broken symbolic link\)"):
        load_image(tmp_path / "broken.png")
    with pytest.raises(ImageLoadError, match="is a character device"):
        load_image("/dev/zero")


@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_exif_orientation_is_applied(tmp_path, orientation):
    pixels = _gradient(40, 24, seed=5)
    stored = Image.fromarray(pixels)
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / f"rotated{orientation}.png"
    stored.save(path, exif=exif)
    loaded = np.asarray(load_image(path))
    # Orientation 6 means "rotate 90 degrees clockwise to display", 8 counter-clockwise, 3 by 180.
    expected = {3: np.rot90(pixels, 2), 6: np.rot90(pixels, -1), 8: np.rot90(pixels, 1)}[orientation]
    np.testing.assert_array_equal(loaded, expected)
    # The processor sees the upright image too.
    processor = ImageProcessor(resize_size=loaded.shape[:2], resample="nearest", rescale_factor=None,
                               image_mean=None, image_std=None)
    np.testing.assert_array_equal(processor(str(path))[0].transpose(1, 2, 0), expected.astype(np.float32))


def test_animated_gif_uses_first_frame(tmp_path):
    colours = [(200, 30, 30), (30, 200, 30), (30, 30, 200)]
    frames = [Image.new("RGB", (16, 12), c) for c in colours]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=50, loop=0)
    with Image.open(path) as check:
        assert check.n_frames == 3
    loaded = np.asarray(load_image(path))
    np.testing.assert_allclose(loaded.reshape(-1, 3).mean(axis=0), colours[0], atol=8)
    # A PIL image left on a later frame is rewound too.
    opened = Image.open(path)
    opened.seek(2)
    np.testing.assert_array_equal(np.asarray(load_image(opened)), loaded)


def test_animated_png_uses_first_frame(tmp_path):
    frames = [Image.new("RGBA", (10, 10), (10 + 100 * i, 20, 30, 255)) for i in range(3)]
    path = tmp_path / "anim.png"
    frames[0].save(path, save_all=True, append_images=frames[1:])
    loaded = np.asarray(load_image(path))
    assert (loaded == (10, 20, 30)).all()
