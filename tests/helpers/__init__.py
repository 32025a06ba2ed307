"""What the test files share: paths, a local HTTP file server, a fake Hugging Face Hub, a tiny model and
test images. Imported as ``tests.helpers`` (tests/ is a package; pytest puts the repository root first on
the path)."""

from .fake_hub import FakeHub, fake_hub
from .file_server import http_file_server
from .images import random_image, write_photos
from .paths import DATA, REPO
from .tiny_model import DIGITS_DEMO, TINY_LABELS, digits_demo_available, make_tiny_model, tiny_registry_entry

__all__ = [
    "DATA", "DIGITS_DEMO", "REPO", "TINY_LABELS", "FakeHub", "digits_demo_available", "fake_hub",
    "http_file_server", "make_tiny_model", "random_image", "tiny_registry_entry", "write_photos",
]
