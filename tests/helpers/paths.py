"""Where the repository and the copied reference fixtures (tests/data) are."""

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DATA = REPO / "tests" / "data"
