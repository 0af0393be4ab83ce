"""Data sets for the experiments: scikit-learn's bundled digits (default) and CIFAR-10.

Both return a dict of splits ``{"train": (x, y), "val": (x, y), "test": (x, y)}`` with float32
images in NCHW and int32 labels; :func:`flatten` gives the MLP view.
"""

from __future__ import annotations

import os
import pickle

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


def _load_batch(path: str) -> tuple[np.ndarray, np.ndarray]:
    try:
        with open(path, "rb") as f:
            batch = pickle.load(f, encoding="latin1")
        data, labels = batch["data"], batch["labels"]
    except FileNotFoundError:
        raise
    except Exception as e:  # unpickling errors, missing keys, wrong types
        raise ValueError(f"{path} is not a CIFAR-10 python batch (a pickled dict with 'data' "
                         f"(N, 3072) uint8 and 'labels'): {e}") from None
    data = np.asarray(data)
    if data.ndim != 2 or data.shape[1] != 3072:
        raise ValueError(f"{path}: 'data' must have shape (N, 3072); got {data.shape}.")
    return data.reshape(-1, 3, 32, 32).astype(np.float32), np.asarray(labels, np.int32)


def load_cifar10(data_dir: str, num_training: int = 49000, num_validation: int = 1000,
                 num_test: int = 1000) -> Splits:
    """CIFAR-10 from the standard python batches (``data_batch_1..5``, ``test_batch``) with
    cs231n's preprocessing: the last ``num_validation`` of the first ``num_training +
    num_validation`` training images for validation, the mean training image subtracted, NCHW."""
    if not os.path.isdir(data_dir):
        raise FileNotFoundError(f"--data-dir {data_dir!r} is not a directory; download "
                                f"cifar-10-python.tar.gz and point to cifar-10-batches-py.")
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    missing = [n for n in names if not os.path.isfile(os.path.join(data_dir, n))]
    if missing:
        raise FileNotFoundError(f"{data_dir!r} lacks the CIFAR-10 batches {missing}.")
    parts = [_load_batch(os.path.join(data_dir, n)) for n in names[:5]]
    x_train = np.concatenate([p[0] for p in parts])
    y_train = np.concatenate([p[1] for p in parts])
    x_test, y_test = _load_batch(os.path.join(data_dir, "test_batch"))
    if num_training + num_validation > len(x_train) or num_test > len(x_test):
        raise ValueError(f"{data_dir!r} holds {len(x_train)} training and {len(x_test)} test "
                         f"images; asked for {num_training} + {num_validation} and {num_test}.")
    x_val = x_train[num_training:num_training + num_validation]
    y_val = y_train[num_training:num_training + num_validation]
    x_train, y_train = x_train[:num_training], y_train[:num_training]
    x_test, y_test = x_test[:num_test], y_test[:num_test]
    mean_image = x_train.mean(0)
    return {"train": (x_train - mean_image, y_train), "val": (x_val - mean_image, y_val),
            "test": (x_test - mean_image, y_test)}


def flatten(splits: Splits) -> Splits:
    """The MLP view: each image flattened to one row."""
    return {k: (x.reshape(len(x), -1), y) for k, (x, y) in splits.items()}
