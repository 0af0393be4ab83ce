"""PyTorch compatibility: ``BatchNorm1d/2d/3d`` state dicts and the momentum convention.

PyTorch's ``momentum`` weights the *new* batch (default 0.1); jaxbn's weights the *old* running
value (default 0.9): ``jaxbn_momentum = 1 - torch_momentum``, and ``None`` (the cumulative
average) means the same in both. Nothing can tell the two conventions apart from a number, so
convert explicitly with :func:`momentum_from_torch`.

To reproduce ``nn.BatchNorm2d(C, momentum=m, affine=a, track_running_stats=True)``::

    gamma, beta, state = torch_compat.from_state_dict(module.state_dict())
    y, state = jaxbn.spatial_batch_norm(x, gamma, beta, state, train=True,
                                        momentum=torch_compat.momentum_from_torch(m),
                                        running_var="unbiased", eps=module.eps)

No torch import is needed: state dicts of numpy arrays work, and tensors are read through their
own ``.detach().cpu().numpy()``.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import numpy as np

from jaxbn._batch_norm import BatchNormState

__all__ = ["momentum_from_torch", "momentum_to_torch", "from_state_dict", "to_state_dict"]


def _momentum(name: str, value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
        raise TypeError(f"{name} must be a number in [0, 1] or None; got {value!r}.")
    if not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"{name} must be in [0, 1] or None; got {value!r}. (PyTorch's momentum "
                         f"is the weight of the new batch, jaxbn's the weight of the old running "
                         f"value: jaxbn_momentum = 1 - torch_momentum.)")
    return 1.0 - float(value)


def momentum_from_torch(torch_momentum: float | None) -> float | None:
    """PyTorch's ``momentum`` (weight of the new batch, default 0.1) as jaxbn's (weight of the
    old value): ``1 - m``; ``None`` (cumulative average) stays ``None``.

    Example:
      >>> from jaxbn import torch_compat
      >>> torch_compat.momentum_from_torch(0.1), torch_compat.momentum_from_torch(None)
      (0.9, None)
    """
    return _momentum("torch_momentum", torch_momentum)


def momentum_to_torch(momentum: float | None) -> float | None:
    """jaxbn's ``momentum`` as PyTorch's: ``1 - m``; ``None`` stays ``None``.

    Example:
      >>> from jaxbn import torch_compat
      >>> round(torch_compat.momentum_to_torch(0.99), 10)
      0.01
    """
    return _momentum("momentum", momentum)


def _array(value: Any) -> np.ndarray:
    """A copy of ``value`` that shares no memory with it (a tensor's ``.numpy()`` and
    ``jnp.asarray`` of a numpy array can both alias the source's buffer)."""
    if hasattr(value, "detach"):  # a torch tensor, without importing torch
        value = value.detach().cpu().numpy()
    return np.array(value, copy=True)


def from_state_dict(state_dict: dict, prefix: str = "") -> tuple[Any, Any, BatchNormState]:
    """``(gamma, beta, state)`` from a PyTorch batch norm's ``state_dict()``.

    Keys (after ``prefix``, e.g. ``"bn1."``): ``weight``/``bias`` (absent for ``affine=False``:
    gamma/beta are then None), ``running_mean``, ``running_var``, ``num_batches_tracked``.
    The running variance keeps PyTorch's meaning (unbiased): use ``running_var="unbiased"``.
    Every array is copied: later in-place updates of the source tensors (a train-mode forward,
    ``weight.mul_(...)``) leave the returned state as it was converted.

    Example:
      >>> import numpy as np
      >>> from jaxbn import torch_compat
      >>> state_dict = {"bn1.weight": np.ones(3), "bn1.bias": np.zeros(3),  # or torch tensors
      ...               "bn1.running_mean": np.zeros(3), "bn1.running_var": np.ones(3),
      ...               "bn1.num_batches_tracked": np.array(5)}
      >>> gamma, beta, state = torch_compat.from_state_dict(state_dict, prefix="bn1.")
      >>> gamma.shape, int(state.count)
      ((3,), 5)
    """
    def get(name, required=True):
        key = prefix + name
        if key not in state_dict:
            if required:
                raise KeyError(f"state_dict has no {key!r}; it has {sorted(state_dict)}.")
            return None
        return _array(state_dict[key])

    mean, var = get("running_mean"), get("running_var")
    if mean.ndim != 1 or var.shape != mean.shape:
        raise ValueError(f"running_mean and running_var must be (C,) vectors; got {mean.shape} "
                         f"and {var.shape}.")
    count = get("num_batches_tracked", required=False)
    state = BatchNormState(jnp.asarray(mean, jnp.float32), jnp.asarray(var, jnp.float32),
                           jnp.asarray(0 if count is None else int(count), jnp.int32))
    gamma, beta = get("weight", False), get("bias", False)
    as_param = lambda a: None if a is None else jnp.asarray(a, jnp.float32)
    return as_param(gamma), as_param(beta), state


def to_state_dict(gamma: Any, beta: Any, state: BatchNormState, prefix: str = "") -> dict:
    """A PyTorch batch norm ``state_dict`` of numpy arrays (load it with
    ``module.load_state_dict({k: torch.from_numpy(v) for k, v in d.items()})``).

    The arrays are fresh, writable copies: changing them in place (or the tensors
    ``torch.from_numpy`` makes of them) changes nothing on the jaxbn side.

    Example:
      >>> import jax.numpy as jnp, jaxbn
      >>> from jaxbn import torch_compat
      >>> sd = torch_compat.to_state_dict(jnp.ones(3), jnp.zeros(3),
      ...                                 jaxbn.init_batch_norm_state(3), prefix="bn1.")
      >>> sorted(sd)
      ['bn1.bias', 'bn1.num_batches_tracked', 'bn1.running_mean', 'bn1.running_var', 'bn1.weight']
    """
    out = {}
    if gamma is not None:
        out[prefix + "weight"] = np.array(gamma, np.float32, copy=True)
    if beta is not None:
        out[prefix + "bias"] = np.array(beta, np.float32, copy=True)
    out[prefix + "running_mean"] = np.array(state.mean, np.float32, copy=True)
    out[prefix + "running_var"] = np.array(state.var, np.float32, copy=True)
    count = 0 if state.count is None else int(state.count)
    out[prefix + "num_batches_tracked"] = np.asarray(count, np.int64)
    return out
