"""The baseline guard on real fits: a label-shuffled copy of a real folder is refused, the
same folder with its true labels passes.

The smallest case of ``benchmarks/guard.py`` (which runs 100 to 5,000 images and
several seeds: ``benchmarks/results/guard_cpu.json``): 100 digits, the train
stage's own fit with the committed budget (about 150 epochs, so 150 looks at a
15-image val split, the setting in which luck cleared the margin alone), then the
check the stage applies.
"""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks.guard import digits, judge, training_data


@pytest.mark.slow
def test_shuffled_labels_are_refused_and_true_labels_pass(params) -> None:
    images, labels = digits(10)
    true = judge(training_data(images, labels), params, seed=0)
    assert not true.not_significant, true.metrics()
    assert true.selection.looks >= 100 and true.selection.val_size == 15
    shuffled = np.random.default_rng(0).permutation(labels)
    check = judge(training_data(images, shuffled), params, seed=0)
    assert check.not_significant and check.weak, check.metrics()
