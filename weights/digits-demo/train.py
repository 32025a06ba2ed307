"""Train the offline demo model: a small DiNAT on scikit-learn's 8x8 handwritten digits.

Run from the repository root (CPU, a few minutes on 2 cores)::

    python weights/digits-demo/train.py

It writes, next to this file: ``config.json`` + ``model.safetensors`` (Hugging Face layout,
float32, via ``save_pretrained``), ``preprocessor_config.json`` (via ``ViTImageProcessor.
save_pretrained``, so it is exactly what HF applies) and ``samples/digit_<label>.png`` (held-out
images, 8x8 RGB as the pipeline sees them before resizing).

The model is transformers 4.53.3's ``DinatForImageClassification``.  NATTEN is not installed
(and not needed): neighborhood attention comes from the small PyTorch reference in
``tests/reference/torch_natten.py`` (checked against NATTEN's own outputs by ``tests/test_torch_natten.py``),
which is why the repository's root is put on ``sys.path`` below.

Reproducible: the split, initialisation, batch order, augmentation and drop-path all draw from
``--seed``; torch runs with a fixed thread count (``--threads``) because the summation order of
the CPU kernels can depend on it.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
# The PyTorch NATTEN reference is a dev/test helper living in tests/, never part of the package.
sys.path.insert(0, str(REPO))
# data.py (split + image pipeline) is shared with the torch-free test.
sys.path.insert(0, str(HERE))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import data  # noqa: E402
from tests.reference.torch_natten import patch_transformers  # noqa: E402

from dinat_np.configuration import make_shareable  # noqa: E402

IMAGE_SIZE = 32
#: One sample PNG per class listed here (the first held-out image of that class).
SAMPLE_LABELS = (0, 2, 3, 5, 7, 9)


def make_processor():
    """The HF image processor of the model: bilinear 8x8 -> 32x32, /255, (x - 0.5) / 0.5."""
    from transformers import ViTImageProcessor

    return ViTImageProcessor(
        do_resize=True,
        size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        resample=2,  # PIL.Image.BILINEAR
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )


def make_config():
    """A small DiNAT (~180k parameters, 0.73 MB in float32).

    32x32 input -> 8x8 tokens (one per original digit pixel) -> 4x4 -> 2x2 -> 1x1; the last two
    stages are padded up to the 3x3 window by the model itself, as HF does.
    """
    from transformers import DinatConfig

    return DinatConfig(
        embed_dim=12,
        depths=[2, 2, 2, 1],
        num_heads=[1, 2, 4, 8],
        kernel_size=3,
        dilations=[[1, 2], [1, 1], [1, 1], [1]],
        mlp_ratio=2.0,
        drop_path_rate=0.1,
        num_labels=10,
        id2label={i: str(i) for i in range(10)},
        label2id={str(i): i for i in range(10)},
    )


def preprocess(processor, images: np.ndarray) -> np.ndarray:
    """Digit arrays (N, 8, 8) -> pixel_values float32 (N, 3, 32, 32) through the HF processor."""
    pil = [data.digit_to_pil(img) for img in images]
    return np.asarray(processor(pil, return_tensors="np")["pixel_values"], dtype=np.float32)


def random_shift(batch: torch.Tensor, max_shift: int, background: float, generator: torch.Generator) -> torch.Tensor:
    """Translate every image by up to ``max_shift`` pixels; uncovered pixels get the background.

    Handwriting is not centred consistently, so small translations are the cheapest useful
    augmentation here.
    """
    n, c, h, w = batch.shape
    padded = torch.full((n, c, h + 2 * max_shift, w + 2 * max_shift), background, dtype=batch.dtype)
    padded[:, :, max_shift : max_shift + h, max_shift : max_shift + w] = batch
    offsets = torch.randint(0, 2 * max_shift + 1, (n, 2), generator=generator)
    return torch.stack([padded[i, :, dy : dy + h, dx : dx + w] for i, (dy, dx) in enumerate(offsets.tolist())])


@torch.no_grad()
def predict(model, pixel_values: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """Arg-max class of every image (eval mode)."""
    model.eval()
    out = []
    for start in range(0, len(pixel_values), batch_size):
        logits = model(torch.from_numpy(pixel_values[start : start + batch_size])).logits
        out.append(logits.argmax(-1).numpy())
    return np.concatenate(out)


def _atomic_move(src: Path, dst: Path) -> None:
    make_shareable(src)  # files made inside mkdtemp() may be private (0600)
    # os.replace is atomic within one file system; src is a temp file in dst's folder.
    os.replace(src, dst)


def save(model, processor, images: np.ndarray, labels: np.ndarray, held_out: np.ndarray,
         out_dir: Path) -> list[tuple[str, int]]:
    """Write the model folder; every file goes to a temp name in the same folder, then renamed."""
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-save-", dir=out_dir))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        processor.save_pretrained(tmp)
        for name in ("config.json", "model.safetensors", "preprocessor_config.json"):
            _atomic_move(tmp / name, out_dir / name)
        samples_dir = out_dir / "samples"
        samples_dir.mkdir(exist_ok=True)
        written = []
        for label in SAMPLE_LABELS:
            index = int(held_out[np.flatnonzero(labels[held_out] == label)[0]])
            png = tmp / data.sample_name(label)
            data.digit_to_pil(images[index]).save(png, format="PNG")
            _atomic_move(png, samples_dir / data.sample_name(label))
            written.append((data.sample_name(label), index))
        return written
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seed", type=int, default=data.SPLIT_SEED)
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--weight-decay", type=float, default=0.05)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=HERE, help="model folder to write (default: next to this script)")
    parser.add_argument("--no-save", action="store_true", help="train and evaluate only")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)

    patch_transformers()
    from transformers import DinatForImageClassification

    images, labels = data.load_digits_arrays()
    train_idx, held_idx = data.held_out_split(labels, seed=args.seed)
    processor = make_processor()
    pixel_values = preprocess(processor, images)
    x_train = torch.from_numpy(pixel_values[train_idx])
    y_train = torch.from_numpy(labels[train_idx])
    background = float(pixel_values.min())  # digit value 0 after normalisation (-1.0)

    model = DinatForImageClassification(make_config())
    n_params = sum(p.numel() for p in model.parameters())
    print(f"train {len(train_idx)} / held-out {len(held_idx)} images; {n_params} parameters", flush=True)

    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    steps_per_epoch = math.ceil(len(train_idx) / args.batch_size)
    total_steps = args.epochs * steps_per_epoch
    warmup = 3 * steps_per_epoch

    def lr_factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, total_steps - warmup)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=0.1)

    start = time.perf_counter()
    for epoch in range(args.epochs):
        model.train()
        order = torch.randperm(len(train_idx), generator=generator)
        running = 0.0
        for s in range(steps_per_epoch):
            batch = order[s * args.batch_size : (s + 1) * args.batch_size]
            x = random_shift(x_train[batch], 3, background, generator)
            loss = loss_fn(model(x).logits, y_train[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            running += loss.item() * len(batch)
        if (epoch + 1) % 10 == 0 or epoch + 1 == args.epochs:
            acc = float(np.mean(predict(model, pixel_values[held_idx]) == labels[held_idx]))
            print(
                f"epoch {epoch + 1:3d}  loss {running / len(train_idx):.4f}  held-out acc {acc:.4f}  "
                f"({time.perf_counter() - start:.0f}s)",
                flush=True,
            )
    train_seconds = time.perf_counter() - start

    held_pred = predict(model, pixel_values[held_idx])
    train_pred = predict(model, pixel_values[train_idx])
    held_acc = float(np.mean(held_pred == labels[held_idx]))
    train_acc = float(np.mean(train_pred == labels[train_idx]))
    print(f"training time {train_seconds:.0f}s; train acc {train_acc:.4f}; held-out acc {held_acc:.4f} "
          f"({int(np.sum(held_pred == labels[held_idx]))}/{len(held_idx)})")

    if not args.no_save:
        written = save(model, processor, images, labels, held_idx, args.out)
        for name, index in written:
            print(f"sample {name}: digits index {index}, predicted {held_pred[np.searchsorted(held_idx, index)]}")
        print(f"saved to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
