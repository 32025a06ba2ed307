"""A tiny DiNAT classifier with seeded random weights (a model folder, a registry entry), and the bundled
digits demo."""

from __future__ import annotations

import json
from pathlib import Path

from .paths import REPO

DIGITS_DEMO = REPO / "weights" / "digits-demo"
TINY_LABELS = {i: f"class {i} ({'abcdefghij'[i]})" for i in range(10)}


def digits_demo_available() -> bool:
    return (DIGITS_DEMO / "config.json").is_file() and (DIGITS_DEMO / "model.safetensors").is_file()


def make_tiny_model(folder: Path, *, seed: int = 0, preprocessor: dict | None = None) -> Path:
    """A small DiNAT classifier with seeded random weights, in Hugging Face layout."""
    from dinat_np import DinatConfig, DinatForImageClassification

    config = DinatConfig(
        embed_dim=16,
        depths=[1, 1, 1, 1],
        num_heads=[1, 2, 2, 4],
        kernel_size=3,
        dilations=[[1], [2], [1], [1]],
        id2label=dict(TINY_LABELS),
    )
    DinatForImageClassification(config, seed=seed).save_pretrained(folder)
    if preprocessor is None:
        preprocessor = {
            "image_processor_type": "ViTImageProcessor",
            "size": {"height": 32, "width": 32},
            "resample": 2,
            "image_mean": [0.5, 0.5, 0.5],
            "image_std": [0.5, 0.5, 0.5],
        }
    if preprocessor:
        (folder / "preprocessor_config.json").write_text(json.dumps(preprocessor))
    return folder


def tiny_registry_entry(url: str) -> dict:
    """A registry entry for the :func:`make_tiny_model` architecture, its checkpoint at ``url``."""
    return {
        "model_type": "dinat",
        "description": "tiny random-weight test model",
        "architecture": {"embed_dim": 16, "depths": [1, 1, 1, 1], "num_heads": [1, 2, 2, 4], "kernel_size": 3,
                         "dilations": [[1], [2], [1], [1]], "mlp_ratio": 3.0},
        "url": url,
        "label_set": None,
        "preprocessing": {"resolution": 32, "crop_pct": 1.0, "interpolation": "bilinear"},
    }
