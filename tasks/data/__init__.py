"""Data: from a source (digits, Fashion-MNIST, an ImageFolder) to prepared, resampled splits.

``sources`` lists and reads the raw images, ``images`` decodes and validates
one file (and says why a broken one is quarantined), ``prepare`` is the
prepare stage, ``datasets`` reads its output back, ``resample`` is the resample
stage (with ``embeddings`` for SMOTE in feature space), and ``baselines``
scores what learning nothing would on the same splits.
"""
