"""What a fit leaves for MLflow: the augmentation pipelines and a grid of augmented images."""

from __future__ import annotations

from pathlib import Path

import albumentations as A
import numpy as np
import yaml
from PIL import Image

from tasks.data.datasets import PreparedData
from tasks.params import Params
from tasks.training.inputs import TrainingData
from tasks.training.outputs import augment_artifacts


def test_augment_artifacts_record_the_pipeline_and_show_it(
    params: Params, tiny_prepared: PreparedData, tmp_path: Path
) -> None:
    data = TrainingData(tiny_prepared, tiny_prepared.train, np.ones(len(tiny_prepared.train)))
    spec, grid = augment_artifacts(data, params.augment, seed=0, out_dir=tmp_path)
    recorded = yaml.safe_load(spec.read_text())
    pipeline = A.from_dict(recorded["all_classes"])  # albumentations reads its own format back
    assert [type(t).__name__ for t in pipeline.transforms] == ["Affine", "RandomBrightnessContrast"]
    assert recorded["minority_pipeline"] is None
    with Image.open(grid) as image:
        assert image.format == "PNG"
        assert image.size[0] > 100 and image.size[1] > 100
