"""Debian's Fashion-MNIST for the tests that read the real files, and the marker that skips them.

.ci/run installs Debian's dataset-fashion-mnist and sets VISIONPIPE_REQUIRE_FASHION_MNIST=1,
so in CI a missing dataset fails these tests instead of skipping them silently.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
REQUIRE_FASHION_MNIST = os.environ.get("VISIONPIPE_REQUIRE_FASHION_MNIST") == "1"

needs_fashion_mnist = pytest.mark.skipif(
    not (FASHION_MNIST_DIR.is_dir() or REQUIRE_FASHION_MNIST),
    reason="Debian's dataset-fashion-mnist is not installed (.ci/run installs it)",
)
