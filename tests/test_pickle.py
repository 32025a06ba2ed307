"""Models and ImageClassifier travel through the standard pickle: to spawned processes, Dask, Ray, Spark."""

from __future__ import annotations

import multiprocessing
import pickle
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from dinat_np import DinatBackbone, DinatConfig, DinatForImageClassification, DinatModel, ImageClassifier
from dinat_np.registry import packaged_weights_dir

DATA = Path(__file__).parent / "data"
SAMPLES = sorted(str(p) for p in (packaged_weights_dir() / "digits-demo" / "samples").glob("*.png"))


def _round_trip(obj):
    return pickle.loads(pickle.dumps(obj))


def test_a_classification_model_pickles_and_answers_as_before() -> None:
    folder = DATA / "hf_dinat_small_cfg"
    expected = np.load(folder / "expected.npz")
    model = DinatForImageClassification.from_pretrained(folder)
    copy = _round_trip(model)
    assert copy.device == "cpu" and copy.config == model.config
    np.testing.assert_array_equal(copy(expected["pixel_values"]).logits, model(expected["pixel_values"]).logits)
    np.testing.assert_allclose(copy(expected["pixel_values"]).logits, expected["logits"], rtol=0, atol=1e-4)
    state, original = copy.state_dict(), model.state_dict()
    assert sorted(state) == sorted(original) and all(np.array_equal(state[k], original[k]) for k in original)


def test_base_models_and_backbones_keep_their_settings() -> None:
    config = DinatConfig(embed_dim=8, depths=[1, 1], num_heads=[1, 2], dilations=[[1], [2]], kernel_size=3,
                         out_features=["stage1", "stage2"])
    pixels = np.random.default_rng(5).standard_normal((1, 3, 32, 32)).astype(np.float32)
    bare = DinatModel(config, add_pooling_layer=False, seed=3)
    copy = _round_trip(bare)
    assert copy.add_pooling_layer is False and copy(pixels).pooler_output is None
    np.testing.assert_array_equal(copy(pixels).last_hidden_state, bare(pixels).last_hidden_state)
    backbone = DinatBackbone(config, seed=4)
    maps, copied = backbone(pixels).feature_maps, _round_trip(backbone)(pixels).feature_maps
    assert len(maps) == len(copied) == 2
    for ours, theirs in zip(maps, copied, strict=True):
        np.testing.assert_array_equal(ours, theirs)


def test_an_image_classifier_pickles_with_its_processor_and_labels() -> None:
    classifier = ImageClassifier.from_pretrained("digits-demo", batch_size=4)
    copy = _round_trip(classifier)
    assert (copy.labels, copy.processor, copy.batch_size) == (classifier.labels, classifier.processor, 4)
    assert copy.predict(SAMPLES, top_k=3) == classifier.predict(SAMPLES, top_k=3)


def _predict(classifier: ImageClassifier, paths: list[str]) -> list:
    return classifier.predict(paths, top_k=2)


def test_a_spawned_process_pool_receives_the_classifier() -> None:
    classifier = ImageClassifier.from_pretrained("digits-demo")
    halves = [SAMPLES[: len(SAMPLES) // 2], SAMPLES[len(SAMPLES) // 2:]]
    with ProcessPoolExecutor(max_workers=2, mp_context=multiprocessing.get_context("spawn")) as pool:
        remote = [p for half in pool.map(_predict, [classifier] * 2, halves) for p in half]
    assert remote == [p for half in halves for p in _predict(classifier, half)]  # batched alike, equal
