"""Sources and data params built in memory, for the prepare, spec and split tests."""

from __future__ import annotations

import numpy as np

from tasks.data.images import ArrayItems
from tasks.data.sources import Source
from tasks.params import DataParams, Params


def array_source(pixels: np.ndarray, labels: list[int], official=None) -> Source:
    return Source(
        name="memory",
        classes=tuple("abcdefghij"[: max(labels) + 1]),
        labels=np.asarray(labels, dtype=np.int64),
        items=ArrayItems(pixels),
        item_names=np.asarray([f"memory[{i}]" for i in range(len(labels))], dtype=object),
        official_test=None if official is None else np.asarray(official),
    )


def data_params(params: Params, **update: object) -> DataParams:
    return DataParams(**{**params.data.model_dump(), **update})
