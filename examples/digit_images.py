"""Write held-out handwritten digits as PNG files, to try the scale-out examples on (needs scikit-learn).

    python examples/digit_images.py DIR [--count 240]

Files are named ``digit_<index>_<label>.png``, so that the examples can report their accuracy with
``--model digits-demo`` (the model bundled with dinat-np, trained on the other digits).
"""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

DIGITS_DEMO = Path(__file__).resolve().parent.parent / "weights" / "digits-demo"  # in the source checkout


def _digits_data():
    """``data.py`` of the digits-demo model folder: the data set, its held-out split and image pipeline."""
    spec = importlib.util.spec_from_file_location("digits_data", DIGITS_DEMO / "data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--count", type=int, default=240, help="how many images (at most 359, the held-out set)")
    args = parser.parse_args()
    data = _digits_data()
    images, labels = data.load_digits_arrays()
    _, held_out = data.held_out_split(labels)
    args.folder.mkdir(parents=True, exist_ok=True)
    for index in held_out[: args.count]:
        data.digit_to_pil(images[index]).save(args.folder / f"digit_{index}_{labels[index]}.png")
    print(f"wrote {min(args.count, len(held_out))} images to {args.folder}")


if __name__ == "__main__":
    main()
