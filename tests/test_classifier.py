"""The ImageClassifier Python API: loading, top-k, probabilities, labels, batches, bad images."""

from __future__ import annotations

import numpy as np
import pytest

from dinat_np.classifier import DEFAULT_BATCH_SIZE, ImageClassifier, Prediction
from dinat_np.labels import label_set_names, load_label_set, packaged_labels, read_label_file
from dinat_np.image_loading import ImageLoadError
from dinat_np.preprocessing import ImageProcessor

from tests.helpers import TINY_LABELS, make_tiny_model, random_image, write_photos


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def classifier(tiny_folder):
    return ImageClassifier.from_pretrained(tiny_folder, batch_size=2)


def test_predictions_are_ranked_softmax_of_the_logits(classifier, tmp_path):
    photos = write_photos(tmp_path, 3)
    results = classifier.predict([str(p) for p in photos], top_k=4)
    assert len(results) == 3
    pixels = classifier.processor([str(p) for p in photos])
    assert pixels.shape == (3, 3, 32, 32)
    logits = classifier.model(pixels).logits.astype(np.float64)
    probabilities = np.exp(logits - logits.max(1, keepdims=True))
    probabilities /= probabilities.sum(1, keepdims=True)
    for row, predictions in zip(probabilities, results, strict=True):
        assert [p.rank for p in predictions] == [1, 2, 3, 4]
        expected_order = np.argsort(-row, kind="stable")[:4]
        assert [p.index for p in predictions] == list(expected_order)
        np.testing.assert_allclose([p.score for p in predictions], row[expected_order], rtol=1e-6, atol=1e-7)
        assert all(p.label == TINY_LABELS[p.index] for p in predictions)
        assert all(isinstance(p, Prediction) and isinstance(p.score, float) for p in predictions)
    # Different photographs, different outputs (the model is not constant).
    assert not np.allclose(probabilities[0], probabilities[1])


def test_inputs_of_every_kind_and_batch_sizes_agree(classifier):
    images = [random_image(seed) for seed in range(5)]
    one_by_one = classifier.predict(images, top_k=3, batch_size=1)
    batched = classifier.predict(images, top_k=3, batch_size=4)
    for a, b in zip(one_by_one, batched, strict=True):
        assert [p.index for p in a] == [p.index for p in b]
        np.testing.assert_allclose([p.score for p in a], [p.score for p in b], rtol=1e-5)
    single = classifier.predict(np.asarray(images[0]), top_k=3)
    assert len(single) == 1 and [p.index for p in single[0]] == [p.index for p in batched[0]]
    # Encoded bytes, as bytes or a bytearray, are one image too.
    import io

    buffer = io.BytesIO()
    images[0].save(buffer, format="PNG")
    for encoded in (buffer.getvalue(), bytearray(buffer.getvalue())):
        (from_bytes,) = classifier.predict(encoded, top_k=3)
        assert [p.index for p in from_bytes] == [p.index for p in batched[0]]
        np.testing.assert_allclose([p.score for p in from_bytes], [p.score for p in batched[0]], rtol=1e-5)


def test_top_k_is_clamped_and_validated(classifier):
    (full,) = classifier.predict(random_image(1), top_k=50)
    assert len(full) == 10
    assert sum(p.score for p in full) == pytest.approx(1.0, abs=1e-9)
    assert sorted({p.index for p in full}) == list(range(10))
    with pytest.raises(ValueError, match="top_k"):
        classifier.predict(random_image(1), top_k=0)


def test_bad_image_raises_in_predict_and_is_reported_by_iter_predict(classifier, tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    good = random_image(3)
    with pytest.raises(ImageLoadError, match="bad.png"):
        classifier.predict([good, str(bad)])
    results = list(classifier.iter_predict([good, str(bad), good], top_k=2, batch_size=2))
    assert [r.ok for r in results] == [True, False, True]
    assert results[1].predictions is None and "bad.png" in str(results[1].error)
    assert [p.index for p in results[0].predictions] == [p.index for p in results[2].predictions]


def test_inputs_that_are_not_images_are_clear_errors(classifier):
    with pytest.raises(TypeError, match="expected an image .* or a list of them, got int"):
        classifier.predict(5)
    with pytest.raises(TypeError, match="got dict"):
        list(classifier.iter_predict({"a": 1}))
    with pytest.raises(ImageLoadError, match=r"empty image \(0 x 0 pixels\)"):
        classifier.predict(np.zeros((0, 0, 3), np.uint8))
    with pytest.raises(ImageLoadError, match=r"empty image \(7 x 0 pixels\)"):
        classifier.predict(np.zeros((0, 7), np.uint8))


def test_iter_predict_reports_progress(classifier):
    seen = []
    results = list(
        classifier.iter_predict([random_image(s) for s in range(5)], top_k=1, batch_size=2, on_progress=seen.append)
    )
    assert seen == [2, 2, 1] and len(results) == 5


def test_constructor_with_a_model_object_and_folder_name(tiny_folder):
    from dinat_np import DinatForImageClassification

    model = DinatForImageClassification.from_pretrained(tiny_folder)
    processor = ImageProcessor(resize_size=(32, 32), image_mean=(0.5,) * 3, image_std=(0.5,) * 3)
    direct = ImageClassifier(model, processor=processor)
    by_name = ImageClassifier(str(tiny_folder))
    image = random_image(9)
    a, b = direct.predict(image)[0], by_name.predict(image)[0]
    assert [p.index for p in a] == [p.index for p in b]
    np.testing.assert_allclose([p.score for p in a], [p.score for p in b], rtol=1e-6)


def test_preprocessing_choice(tmp_path):
    # No preprocessor_config.json and no registry entry: timm's 224-pixel ImageNet transform.
    folder = make_tiny_model(tmp_path / "plain", preprocessor={})
    classifier = ImageClassifier.from_pretrained(folder)
    assert classifier.processor == ImageProcessor.timm_eval(224, 0.875, "bicubic")
    convnext = make_tiny_model(
        tmp_path / "convnext",
        preprocessor={"image_processor_type": "ConvNextImageProcessor", "size": {"shortest_edge": 48},
                      "crop_pct": 0.75, "resample": 3},
    )
    processor = ImageClassifier.from_pretrained(convnext).processor
    assert processor.shortest_edge == 64 and processor.crop_size == (48, 48)


def test_placeholder_labels_fall_back_to_packaged_imagenet():
    """A converted original checkpoint may carry LABEL_i only: 1000 classes get ImageNet-1k names."""
    from pathlib import Path

    import dinat_np
    from dinat_np import DinatConfig
    from dinat_np.classifier import _labels_from_config

    config = DinatConfig(num_labels=1000)
    labels = _labels_from_config(config)
    assert len(labels) == 1000
    if (Path(dinat_np.__file__).parent / "labels" / "imagenet1k.tsv").is_file():
        assert labels[281] == "tabby, tabby cat" and labels[0] == "tench, Tinca tinca"
    else:  # the weights helper copies the label files in; until then the placeholders stay
        assert labels[281] == "LABEL_281"
    named = DinatConfig(id2label={0: "cat", 1: "dog"})
    assert _labels_from_config(named) == ["cat", "dog"]


def test_label_file_reader(tmp_path):
    path = tmp_path / "labels.tsv"
    path.write_text("1\tn2\ttiger cat\n0\tn1\ttabby, tabby cat\n")
    assert read_label_file(path) == ["tabby, tabby cat", "tiger cat"]
    path.write_text("0\tn1\ta\n2\tn2\tb\n")
    with pytest.raises(ValueError, match="not 0..1"):
        read_label_file(path)
    # The synset column is optional; blank lines and Windows line ends are fine.
    path.write_bytes(b"0\tcat\r\n\r\n1\tdog\r\n")
    assert read_label_file(path) == ["cat", "dog"]
    for text, message in (
        ("0\tn1\ta\n0\tn2\tb\n", "labels.tsv:2: class index 0 appears twice"),
        ("0\tn1\ta\textra\n", "labels.tsv:1: expected 'index<TAB>"),
        ("zero\tn1\ta\n", "labels.tsv:1: expected"),
        ("0 a\n", "labels.tsv:1: expected"),
    ):
        path.write_text(text)
        with pytest.raises(ValueError, match=message):
            read_label_file(path)


def test_packaged_label_sets():
    """One reader serves the classifier's fallback names and dinat-convert's registry labels."""
    from dinat_np.convert import load_label_set as convert_load_label_set

    assert label_set_names() == ["imagenet1k", "imagenet22k"]
    in1k = load_label_set("imagenet1k")
    assert len(in1k) == 1000 and in1k[281] == "tabby, tabby cat"
    assert in1k[999] == "toilet tissue, toilet paper, bathroom tissue"
    assert convert_load_label_set is load_label_set
    assert packaged_labels(1000) == in1k
    in22k = packaged_labels(21841)
    assert in22k is not None and len(in22k) == 21841 and in22k[0] == "organism, being"
    assert packaged_labels(999) is None and packaged_labels(10) is None
    with pytest.raises(ValueError, match="unknown label set 'imagenet2k'.*imagenet1k, imagenet22k"):
        load_label_set("imagenet2k")
    with pytest.raises(ValueError, match="unknown label set"):
        load_label_set("../labels/imagenet1k")


def test_from_pretrained_passes_progress_to_the_hub(tiny_folder, monkeypatch):
    """A name is resolved (downloaded if needed) with the caller's progress choice."""
    from dinat_np import hub

    calls = []
    real = hub.resolve_model

    def recording(name, **kwargs):
        calls.append((name, kwargs.get("progress")))
        return real(name, **kwargs)

    monkeypatch.setattr(hub, "resolve_model", recording)
    quiet = ImageClassifier.from_pretrained(tiny_folder, progress=False)
    loud = ImageClassifier.from_pretrained(str(tiny_folder))
    assert calls == [(tiny_folder, False), (str(tiny_folder), True)]
    assert quiet.batch_size == loud.batch_size == DEFAULT_BATCH_SIZE == 8
    image = random_image(4)
    assert [p.index for p in quiet.predict(image)[0]] == [p.index for p in loud.predict(image)[0]]


def test_registry_preprocessing_for_names_only(tmp_path, monkeypatch):
    """A name's registry entry supplies the transform when its folder records none; a folder given as
    such never takes a registry transform, even when its path spells a registry name."""
    import json

    from dinat_np import hub
    from dinat_np.modeling_auto import check_weights

    folder = make_tiny_model(tmp_path / "cache" / "tiny-net", preprocessor={})
    registry = tmp_path / "registry.json"
    block = {"resolution": 160, "crop_pct": 0.9, "interpolation": "bilinear"}
    registry.write_text(json.dumps({"models": {"tiny-net": {"local": str(folder), "preprocessing": block}}}))
    monkeypatch.setenv("DINAT_NP_REGISTRY", str(registry))
    # an absolute "local" path is taken as is
    assert hub.resolve_model("tiny-net", check_weights=check_weights) == folder
    by_name = ImageClassifier.from_pretrained("tiny-net")
    assert by_name.processor == ImageProcessor.timm_eval(160, 0.9, "bilinear")
    monkeypatch.chdir(folder.parent)  # now "tiny-net" is also a folder, which wins over the name
    by_folder = ImageClassifier.from_pretrained("tiny-net")
    assert by_folder.processor == ImageProcessor.timm_eval(224, 0.875, "bicubic")


def test_classifier_module_is_light():
    """dinat-classify reads DEFAULT_BATCH_SIZE before --threads is applied: no NumPy at import."""
    import subprocess
    import sys

    code = "import sys, dinat_np.classifier; print(sorted(m for m in ('numpy', 'PIL', 'numba') if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.stdout.strip() == "[]", result.stderr


def test_missing_folder_or_unknown_name_is_a_clear_error(tmp_path):
    with pytest.raises(LookupError, match="not a folder and not in the registry"):
        ImageClassifier.from_pretrained(str(tmp_path / "nowhere" / "model"))
    with pytest.raises(LookupError, match="no-such-model"):
        ImageClassifier.from_pretrained("no-such-model")


def test_converted_folder_uses_the_recorded_registry_transform(tmp_path):
    """dinat-convert records the registry's evaluation transform in conversion.json."""
    import json

    folder = make_tiny_model(tmp_path / "converted", preprocessor={})
    block = {"resolution": 384, "crop_pct": 1.0, "interpolation": "bicubic",
             "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
    (folder / "conversion.json").write_text(json.dumps({"converted_by": "dinat-np", "preprocessing": block}))
    processor = ImageClassifier.from_pretrained(folder).processor
    assert processor == ImageProcessor.timm_eval(384, 1.0, "bicubic")


def test_bundled_demo_by_name():
    from tests.helpers import digits_demo_available

    if not digits_demo_available():
        pytest.skip("weights/digits-demo not built yet")
    classifier = ImageClassifier.from_pretrained("digits-demo")
    assert len(classifier.labels) == 10
    assert classifier.processor.output_size is not None


@pytest.mark.torch
def test_end_to_end_equals_transformers_pipeline(tmp_path):
    """Files -> labels and probabilities equal transformers' image-classification pipeline (HF's
    DiNAT on the reference neighborhood attention, ViTImageProcessor) on real photographs."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from tests.reference.torch_natten import patch_transformers

    config = transformers.DinatConfig(
        embed_dim=16, depths=[1, 1, 2, 1], num_heads=[1, 2, 2, 4], kernel_size=5,
        dilations=[[2], [1], [1, 2], [1]], id2label={i: f"class {i}" for i in range(7)},
    )
    with patch_transformers():
        torch.manual_seed(0)
        model = transformers.DinatForImageClassification(config).eval()
        generator = torch.Generator().manual_seed(1)
        with torch.no_grad():  # HF initialises biases/rpb at zero: draw everything
            for parameter in model.parameters():
                parameter.add_(0.3 * torch.randn(parameter.shape, generator=generator))
        processor = transformers.ViTImageProcessor(size={"height": 64, "width": 64}, resample=3,
                                                   image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225])
        folder = tmp_path / "hf"
        model.save_pretrained(folder, safe_serialization=True)
        processor.save_pretrained(folder)
        photos = [str(p) for p in write_photos(tmp_path / "photos", 4)]
        pipe = transformers.pipeline("image-classification", model=model, image_processor=processor,
                                     framework="pt", device="cpu")
        expected = pipe(photos, top_k=5)

    ours = ImageClassifier.from_pretrained(folder).predict(photos, top_k=5)
    for hf_rows, our_rows in zip(expected, ours, strict=True):
        assert [row["label"] for row in hf_rows] == [p.label for p in our_rows]
        np.testing.assert_allclose([p.score for p in our_rows], [row["score"] for row in hf_rows], atol=1e-5)
    assert max(ours[0][0].score, ours[1][0].score) > 0.3  # confident enough that the ranking means something
