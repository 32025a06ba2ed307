"""The conventions of transformers: the image-classification pipeline's answers, preprocessor_config.json
in converted folders, DinatConfig.from_pretrained with overrides."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from dinat_np import DinatConfig, ImageClassifier, ImageProcessor
from dinat_np.convert import convert_checkpoint
from dinat_np.modeling_auto import check_weights

from tests.helpers import random_image

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.torch

from tests.reference.torch_natten import patch_transformers  # noqa: E402

DATA = Path(__file__).parent / "data"
PREPROCESSOR = {"image_processor_type": "ViTImageProcessor", "do_resize": True, "size": {"height": 64, "width": 64},
                "resample": 3, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
                "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225]}


@pytest.fixture()
def hf_folder(tmp_path: Path) -> Path:
    """The reference model as a Hugging Face repository holds it: weights, config, image processor."""
    folder = tmp_path / "hf"
    folder.mkdir()
    for name in ("config.json", "pytorch_model.bin"):
        shutil.copy(DATA / "hf_dinat_small_cfg" / name, folder / name)
    (folder / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR))
    return folder


def test_calling_the_classifier_answers_as_the_image_classification_pipeline(hf_folder: Path, tmp_path: Path) -> None:
    converted = convert_checkpoint(hf_folder, tmp_path / "ours", check_weights=check_weights)
    ours = ImageClassifier.from_pretrained(converted)
    images = [random_image(seed, size) for seed, size in ((1, (80, 60)), (2, (64, 64)), (3, (50, 90)))]
    with patch_transformers():
        pipe = transformers.pipeline("image-classification", model=str(hf_folder), framework="pt")
        theirs_one, theirs_all = pipe(images[0], top_k=3), pipe(images, top_k=3)
    one, every = ours(images[0], top_k=3), ours(images, top_k=3)
    assert isinstance(one, list) and all(set(answer) == {"label", "score"} for answer in one)
    assert len(every) == 3 and all(len(answers) == 3 for answers in every)
    for mine, reference in zip([one] + every, [theirs_one] + theirs_all, strict=True):
        assert [a["label"] for a in mine] == [a["label"] for a in reference]
        np.testing.assert_allclose([a["score"] for a in mine], [a["score"] for a in reference], rtol=0, atol=1e-5)
    assert ours(images[0]) == ours(images[0], top_k=5) and len(ours(images[0], top_k=50)) == 10  # as the pipeline


def test_converted_folders_carry_a_preprocessor_config_that_auto_image_processor_loads(hf_folder: Path,
                                                                                      tmp_path: Path) -> None:
    out = convert_checkpoint(hf_folder, tmp_path / "out", check_weights=check_weights)
    assert json.loads((out / "preprocessor_config.json").read_text()) == PREPROCESSOR
    theirs = transformers.AutoImageProcessor.from_pretrained(str(out))
    ours = ImageProcessor.from_pretrained(out)
    images = [random_image(seed, (70 + 9 * seed, 50)) for seed in range(3)]
    np.testing.assert_allclose(ours(images), theirs(images, return_tensors="np")["pixel_values"], rtol=0, atol=1e-6)
    record = json.loads((out / "conversion.json").read_text())
    assert record["preprocessor_config"] == f"copied from {hf_folder / 'preprocessor_config.json'}"


def test_a_source_processor_dinat_np_cannot_apply_is_not_copied(hf_folder: Path, tmp_path: Path) -> None:
    (hf_folder / "preprocessor_config.json").write_text(json.dumps({"image_processor_type": "CLIPImageProcessor"}))
    out = convert_checkpoint(hf_folder, tmp_path / "out", check_weights=check_weights)
    assert not (out / "preprocessor_config.json").exists()
    assert "not copied" in json.loads((out / "conversion.json").read_text())["preprocessor_config"]


def test_config_from_pretrained_with_overrides() -> None:
    folder = DATA / "hf_dinat_small_cfg"
    plain = DinatConfig.from_pretrained(folder)
    changed = DinatConfig.from_pretrained(folder, num_labels=3, drop_path_rate=0.0, layer_norm_eps=1e-6)
    assert (plain.num_labels, changed.num_labels) == (10, 3)
    assert changed.id2label == {0: "LABEL_0", 1: "LABEL_1", 2: "LABEL_2"} and changed.label2id == {
        "LABEL_0": 0, "LABEL_1": 1, "LABEL_2": 2}
    assert (changed.drop_path_rate, changed.layer_norm_eps, changed.depths) == (0.0, 1e-6, plain.depths)
    reference = transformers.DinatConfig.from_pretrained(str(folder), num_labels=3, drop_path_rate=0.0)
    assert changed.id2label == reference.id2label and changed.label2id == reference.label2id
    with pytest.raises(ValueError, match="kernel_size"):
        DinatConfig.from_pretrained(folder, kernel_size=4)
