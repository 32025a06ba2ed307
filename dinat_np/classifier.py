"""A small image-classification API: images in, ranked labels with probabilities out.

``ImageClassifier.from_pretrained("dinat-mini-in1k-224").predict(["cat.jpg"], top_k=5)`` loads the
model (a registry name through the cache, or a folder), picks its evaluation preprocessing and
returns, per image, a list of :class:`Prediction`. The ``dinat-classify`` command is a thin shell
over :meth:`ImageClassifier.iter_predict`.

Importing this module loads only the standard library (NumPy, Pillow and the model code load on first
use), so ``dinat-classify`` can read :data:`DEFAULT_BATCH_SIZE` before it applies ``--threads``.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np

    from .image_loading import ImageInput, ImageLoadError
    from .preprocessing import ImageProcessor

__all__ = ["ClassificationResult", "DEFAULT_BATCH_SIZE", "ImageClassifier", "Prediction"]

# Images per forward pass unless told otherwise (the command line's --batch-size default too).
DEFAULT_BATCH_SIZE = 8


@dataclass(frozen=True)
class Prediction:
    """One ranked class: ``rank`` 1 is the most probable; ``score`` is a probability in [0, 1]."""

    rank: int
    index: int
    label: str
    score: float

    def to_dict(self) -> dict[str, Any]:
        """``{"rank", "index", "label", "score"}`` with plain Python types (JSON-ready)."""
        return asdict(self)


@dataclass(frozen=True)
class ClassificationResult:
    """What :meth:`ImageClassifier.iter_predict` yields per input: predictions, or the load error."""

    source: Any
    predictions: list[Prediction] | None = None
    error: ImageLoadError | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    def to_dict(self, path: str | None = None) -> dict[str, Any]:
        """``{"path", "predictions"}`` or, for an image that failed, ``{"path", "error"}`` (JSON-ready);
        ``path`` names the input (default: the source as text)."""
        name = str(self.source) if path is None else path
        if self.error is not None:
            return {"path": name, "error": self.error.reason}
        return {"path": name, "predictions": [p.to_dict() for p in self.predictions]}


def _labels_from_config(config: Any) -> list[str]:
    id2label = {int(k): str(v) for k, v in getattr(config, "id2label", {}).items()}
    count = len(id2label)
    labels = [id2label.get(i, f"LABEL_{i}") for i in range(count)]
    if all(label == f"LABEL_{i}" for i, label in enumerate(labels)):
        # Converted original checkpoints may carry only placeholders: use the shipped ImageNet names.
        from .labels import packaged_labels

        return packaged_labels(count) or labels
    return labels


def _registry_entry(name_or_folder: str | os.PathLike, folder: Path) -> dict | None:
    """The registry entry of a model given by name; None for a folder given as such (or no entry)."""
    from .registry import registry_entry

    if folder == Path(name_or_folder).expanduser():  # resolve_model hands folders back unchanged
        return None
    try:
        return registry_entry(os.fspath(name_or_folder))
    except (LookupError, ValueError):  # unknown name (UnknownModelError is a LookupError), bad registry
        return None


def _conversion_preprocessing(folder: Path) -> dict | None:
    """The registry's evaluation transform that dinat-convert recorded in ``conversion.json``."""
    import json

    path = folder / "conversion.json"
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    block = record.get("preprocessing") if isinstance(record, dict) else None
    return block if isinstance(block, dict) else None


def _softmax(logits: np.ndarray) -> np.ndarray:
    import numpy as np

    shifted = logits.astype(np.float64) - logits.max(axis=-1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=-1, keepdims=True)


def _sigmoid(logits: np.ndarray) -> np.ndarray:
    import numpy as np

    return 1.0 / (1.0 + np.exp(-logits.astype(np.float64)))


class ImageClassifier:
    """Classify images with a model of the DiNAT family (DiNAT, NAT, DiNAT_s, the isotropic models, ViT-rpb).

    Args:
        model: a classification model of the family (or anything called on float32 (B, 3, H, W) pixels
            that returns an object with ``.logits`` and has a ``config``), or a name / folder that
            :meth:`from_pretrained` accepts.
        processor: the preprocessing; by default the model folder's ``preprocessor_config.json``,
            else its registry entry's evaluation transform, else timm's 224-pixel ImageNet transform.
        labels: class names by index; by default the config's ``id2label``.
        device: "cpu" or "cuda" when ``model`` is a name or folder.
        batch_size: images per forward pass in :meth:`predict`.
    """

    def __init__(
        self,
        model: Any,
        processor: ImageProcessor | None = None,
        labels: Sequence[str] | None = None,
        device: str = "cpu",
        batch_size: int = DEFAULT_BATCH_SIZE,
    ) -> None:
        from .preprocessing import ImageProcessor

        if isinstance(model, (str, os.PathLike)):
            loaded = type(self).from_pretrained(model, device=device, batch_size=batch_size)
            model = loaded.model
            processor = processor or loaded.processor
            labels = labels if labels is not None else loaded.labels
        _check_positive(batch_size, "batch_size")
        self.model = model
        self.config = getattr(model, "config", None)
        self.processor = processor if processor is not None else ImageProcessor.timm_eval()
        self.labels = list(labels) if labels is not None else _labels_from_config(self.config)
        self.batch_size = batch_size
        problem = getattr(self.config, "problem_type", None)
        # As transformers' image-classification pipeline: independent sigmoids for multi-label heads.
        self._multi_label = problem == "multi_label_classification" or len(self.labels) == 1

    @classmethod
    def from_pretrained(
        cls,
        name_or_folder: str | os.PathLike,
        device: str = "cpu",
        batch_size: int = DEFAULT_BATCH_SIZE,
        progress: bool = True,
        *,
        revision: str | None = None,
        cache_dir: str | os.PathLike | None = None,
        local_files_only: bool = False,
        token: str | bool | None = None,
    ) -> ImageClassifier:
        """Load a folder, a registry name or Hub repo id (cached, else downloaded and converted) or a
        bundled model; ``revision``, ``cache_dir``, ``local_files_only`` and ``token`` as in
        :func:`dinat_np.hub.resolve_model`.

        ``progress`` shows a download progress bar (and the conversion message) on stderr when the
        name is not cached yet; False keeps stderr quiet.

        Raises:
            dinat_np.hub.UnknownModelError: not a folder, a registry name nor a DiNAT / NAT Hub repository.
            dinat_np.hub.WeightsUnavailableError: not cached and cannot be downloaded (the message
                names the checkpoint, its URL and the ways out).
        """
        from . import hub
        from .modeling_auto import AutoModelForImageClassification, check_weights
        from .preprocessing import ImageProcessor

        folder = Path(hub.resolve_model(name_or_folder, check_weights=check_weights, revision=revision,
                                        cache_dir=cache_dir, local_files_only=local_files_only, token=token,
                                        progress=progress))
        model = AutoModelForImageClassification.from_pretrained(folder, device=device)
        # Most specific first: the folder's HF processor config, the transform recorded when the
        # folder was converted, the registry entry of the name, timm's 224-pixel default.
        recorded = _conversion_preprocessing(folder)
        if (folder / "preprocessor_config.json").is_file():
            processor = ImageProcessor.from_pretrained(folder)
        elif recorded is not None:
            processor = ImageProcessor.from_registry_entry({"preprocessing": recorded})
        elif (entry := _registry_entry(name_or_folder, folder)) is not None and entry.get("preprocessing"):
            processor = ImageProcessor.from_registry_entry(entry)
        else:
            processor = ImageProcessor.timm_eval()
        return cls(model, processor=processor, batch_size=batch_size)

    # -- prediction -------------------------------------------------------------------------------------

    def predict_pixels(self, pixel_values: np.ndarray, top_k: int = 5) -> list[list[Prediction]]:
        """Top-k predictions for already preprocessed float32 (B, 3, H, W) pixels."""
        import numpy as np

        _check_positive(top_k, "top_k")
        logits = np.asarray(self.model(pixel_values).logits)
        if logits.ndim != 2:
            raise ValueError(f"the model returned logits of shape {logits.shape}, expected (batch, classes)")
        scores = _sigmoid(logits) if self._multi_label else _softmax(logits)
        k = min(top_k, scores.shape[1])
        # Stable sort on the negated scores: ties keep the lower class index first.
        order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        results = []
        for row, indices in zip(scores, order, strict=True):
            results.append(
                [
                    Prediction(rank=r + 1, index=int(i), label=self._label(int(i)), score=float(row[i]))
                    for r, i in enumerate(indices)
                ]
            )
        return results

    def _label(self, index: int) -> str:
        return self.labels[index] if 0 <= index < len(self.labels) else f"LABEL_{index}"

    def iter_predict(
        self,
        images: Iterable[ImageInput],
        top_k: int = 5,
        batch_size: int | None = None,
        on_progress: Callable[[int], None] | None = None,
    ) -> Iterator[ClassificationResult]:
        """Yield one :class:`ClassificationResult` per image, in input order, batch by batch.

        Images that cannot be loaded yield a result with ``error`` set (an :class:`ImageLoadError`)
        and do not stop the others. ``on_progress(n)`` is called after each batch with the number of
        images it handled.
        """
        from .image_loading import as_image_list

        _check_positive(top_k, "top_k")
        size = self.batch_size if batch_size is None else batch_size
        _check_positive(size, "batch_size")
        pending: list[Any] = []
        for image in as_image_list(images):
            pending.append(image)
            if len(pending) == size:
                yield from self._run_batch(pending, top_k)
                if on_progress is not None:
                    on_progress(len(pending))
                pending = []
        if pending:
            yield from self._run_batch(pending, top_k)
            if on_progress is not None:
                on_progress(len(pending))

    def _run_batch(self, sources: list[Any], top_k: int) -> list[ClassificationResult]:
        import numpy as np

        from .image_loading import ImageLoadError

        arrays: list[np.ndarray | None] = []
        errors: list[ImageLoadError | None] = []
        for source in sources:
            try:
                arrays.append(self.processor.preprocess(source))
                errors.append(None)
            except ImageLoadError as error:
                arrays.append(None)
                errors.append(error)
        predictions: list[list[Prediction] | None] = [None] * len(sources)
        # Without resizing, sizes can differ: run each shape as its own batch.
        by_shape: dict[tuple, list[int]] = {}
        for i, array in enumerate(arrays):
            if array is not None:
                by_shape.setdefault(array.shape, []).append(i)
        for positions in by_shape.values():
            batch = np.stack([arrays[i] for i in positions])
            for i, result in zip(positions, self.predict_pixels(batch, top_k), strict=True):
                predictions[i] = result
        return [
            ClassificationResult(source=s, predictions=p, error=e)
            for s, p, e in zip(sources, predictions, errors, strict=True)
        ]

    def predict(
        self,
        images: ImageInput | Iterable[ImageInput],
        top_k: int = 5,
        batch_size: int | None = None,
    ) -> list[list[Prediction]]:
        """Top-k predictions for each image (paths, bytes, PIL images or uint8 arrays; one or a list).

        Raises:
            ImageLoadError: an image cannot be read or decoded (its message names it).
        """
        results = []
        for result in self.iter_predict(images, top_k=top_k, batch_size=batch_size):
            if result.error is not None:
                raise result.error
            results.append(result.predictions)
        return results

    def __call__(
        self, images: ImageInput | Iterable[ImageInput], top_k: int = 5
    ) -> list[dict[str, Any]] | list[list[dict[str, Any]]]:
        """What transformers' ``pipeline("image-classification")`` returns: ``[{"label", "score"}]``
        (best first) for one image, a list of those for several.

        Raises:
            ImageLoadError: an image cannot be read or decoded (its message names it).
        """
        from .image_loading import is_single_image

        single = is_single_image(images)
        ranked = self.predict(images, top_k=top_k)
        answers = [[{"label": p.label, "score": p.score} for p in predictions] for predictions in ranked]
        return answers[0] if single else answers

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(classes={len(self.labels)}, processor={self.processor.name!r}, "
            f"batch_size={self.batch_size})"
        )


def _check_positive(value: Any, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
