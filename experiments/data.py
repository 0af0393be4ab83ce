"""Data sets for the experiments: scikit-learn's bundled digits (default) and CIFAR-10.

Both return a dict of splits ``{"train": (x, y), "val": (x, y), "test": (x, y)}`` with float32
images in NCHW and int32 labels; :func:`flatten` gives the MLP view.
"""

from __future__ import annotations

import numpy as np

Splits = dict[str, tuple[np.ndarray, np.ndarray]]


def load_digits(seed: int = 0, num_val: int = 250, num_test: int = 250) -> Splits:
    """The 1797 8x8 digit images, shuffled with ``seed``, standardized with the training split's
    per-pixel mean and std, as ``(N, 1, 8, 8)`` float32."""
    from sklearn.datasets import load_digits as sklearn_digits

    data = sklearn_digits()
    order = np.random.default_rng(seed).permutation(len(data.target))
    x = data.images[order].astype(np.float32)[:, None]
    y = data.target[order].astype(np.int32)
    num_train = len(y) - num_val - num_test
    if num_train < 1:
        raise ValueError(f"num_val + num_test must leave training examples out of {len(y)}; "
                         f"got {num_val} + {num_test}.")
    mean = x[:num_train].mean(0)
    std = x[:num_train].std(0) + 1e-3  # constant border pixels have std 0
    x = (x - mean) / std
    return {"train": (x[:num_train], y[:num_train]),
            "val": (x[num_train:num_train + num_val], y[num_train:num_train + num_val]),
            "test": (x[num_train + num_val:], y[num_train + num_val:])}


def load_cifar10(data_dir: str, num_training: int = 49000, num_validation: int = 1000,
                 num_test: int = 1000) -> Splits:
    """CIFAR-10 with cs231n's preprocessing, through :func:`jaxbn.cs231n.data_utils.
    get_CIFAR10_data` (the one loader), as splits."""
    from jaxbn.cs231n.data_utils import get_CIFAR10_data

    data = get_CIFAR10_data(num_training, num_validation, num_test, cifar10_dir=data_dir)
    return {split: (data[f"X_{split}"], data[f"y_{split}"]) for split in ("train", "val", "test")}


def flatten(splits: Splits) -> Splits:
    """The MLP view: each image flattened to one row."""
    return {k: (x.reshape(len(x), -1), y) for k, (x, y) in splits.items()}
