"""``cs231n/data_utils.py``: CIFAR-10 from its python batches, with the assignment's
preprocessing (``get_CIFAR10_data``).

The batches are pickles (that is how the data set is distributed). They are read with an
unpickler that refuses every global except the two numpy needs to rebuild an array, so a file
crafted to run code raises an error instead of running it.

Shapes: ``N`` images, ``C=3`` channels, ``H=W=32``.
"""

from __future__ import annotations

import os
import pickle

import numpy as np

__all__ = ["load_CIFAR10", "get_CIFAR10_data", "DEFAULT_CIFAR10_DIR"]

# Where the assignment keeps the data; CIFAR10_DIR in the environment overrides it.
DEFAULT_CIFAR10_DIR = os.path.join("cs231n", "datasets", "cifar-10-batches-py")
_BATCHES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
_ALLOWED_GLOBALS = {(package + module, name) for package in ("numpy.core", "numpy._core")
                    for module, name in ((".multiarray", "_reconstruct"),
                                         (".numeric", "_frombuffer"))}
_ALLOWED_GLOBALS |= {("numpy", "ndarray"), ("numpy", "dtype")}


class _ArraysOnly(pickle.Unpickler):
    """Unpickles dicts, lists, strings, bytes, numbers and numpy arrays; nothing else."""

    def find_class(self, module, name):
        if (module, name) in _ALLOWED_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a data batch")


def load_batch(path: str) -> tuple[np.ndarray, np.ndarray]:
    """One python batch: images ``(N, 3, 32, 32)`` float32 and labels ``(N,)`` int32."""
    try:
        with open(path, "rb") as f:
            batch = _ArraysOnly(f, encoding="latin1").load()
        data, labels = batch["data"], batch["labels"]
    except FileNotFoundError:
        raise
    except Exception as e:  # unpickling errors, refused globals, missing keys, wrong types
        raise ValueError(f"{path} is not a CIFAR-10 python batch (a pickled dict with 'data' "
                         f"(N, 3072) uint8 and 'labels'): {e}") from None
    data = np.asarray(data)
    if data.ndim != 2 or data.shape[1] != 3072:
        raise ValueError(f"{path}: 'data' must have shape (N, 3072); got {data.shape}.")
    return data.reshape(-1, 3, 32, 32).astype(np.float32), np.asarray(labels, np.int32)


def _check_dir(data_dir: str) -> None:
    missing = [n for n in _BATCHES if not os.path.isfile(os.path.join(data_dir, n))]
    if not os.path.isdir(data_dir) or missing:
        what = ("does not exist" if not os.path.isdir(data_dir)
                else f"lacks the batches {missing}")
        raise FileNotFoundError(
            f"CIFAR-10 folder {os.path.abspath(data_dir)!r} {what}. Download "
            f"cifar-10-python.tar.gz from the CIFAR-10 page, unpack it, and pass its "
            f"cifar-10-batches-py folder as cifar10_dir= (or set CIFAR10_DIR); the assignment "
            f"expects it at {DEFAULT_CIFAR10_DIR!r}.")


def load_CIFAR10(root: str):
    """``(X_train, y_train, X_test, y_test)`` from the folder of batches; images NCHW float32.

    Example:
      >>> from jaxbn.cs231n.data_utils import load_CIFAR10
      >>> load_CIFAR10("no/such/folder")
      Traceback (most recent call last):
      FileNotFoundError: CIFAR-10 folder '...no/such/folder' does not exist. Download ...
    """
    _check_dir(root)
    parts = [load_batch(os.path.join(root, n)) for n in _BATCHES[:5]]
    x_test, y_test = load_batch(os.path.join(root, "test_batch"))
    return (np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]),
            x_test, y_test)


def get_CIFAR10_data(num_training=49000, num_validation=1000, num_test=1000,
                     subtract_mean=True, cifar10_dir=None):
    """The assignment's splits: the last ``num_validation`` of the first ``num_training +
    num_validation`` training images for validation, the mean training image subtracted.

    Returns:
      dict with ``X_train``, ``y_train``, ``X_val``, ``y_val``, ``X_test``, ``y_test``; images
      ``(N, 3, 32, 32)`` float32.

    Raises:
      FileNotFoundError: naming the folder it looked in and how to get the data.
      ValueError: more images asked for than the folder holds, or a damaged batch.

    Example:
      >>> import os
      >>> from jaxbn.cs231n.data_utils import get_CIFAR10_data
      >>> if os.environ.get("CIFAR10_DIR"):  # where you have the batches
      ...     data = get_CIFAR10_data(num_training=1000, num_validation=100, num_test=100)
      ...     print(data["X_train"].shape)
      ... else:
      ...     print((1000, 3, 32, 32))
      (1000, 3, 32, 32)
    """
    data_dir = cifar10_dir or os.environ.get("CIFAR10_DIR", DEFAULT_CIFAR10_DIR)
    x_train, y_train, x_test, y_test = load_CIFAR10(data_dir)
    if num_training + num_validation > len(x_train) or num_test > len(x_test):
        raise ValueError(f"{data_dir!r} holds {len(x_train)} training and {len(x_test)} test "
                         f"images; asked for {num_training} + {num_validation} and {num_test}.")
    data = {"X_val": x_train[num_training:num_training + num_validation],
            "y_val": y_train[num_training:num_training + num_validation],
            "X_train": x_train[:num_training], "y_train": y_train[:num_training],
            "X_test": x_test[:num_test], "y_test": y_test[:num_test]}
    if subtract_mean:
        mean_image = data["X_train"].mean(0)
        for split in ("X_train", "X_val", "X_test"):
            data[split] = data[split] - mean_image
    return data
