"""``cs231n/optim.py``: the assignment's first-order update rules, in numpy.

Each rule is ``update(w, dw, config=None) -> (next_w, config)``: ``config`` holds the
hyperparameters and the rule's running state (velocity, cache, moments), is filled with the
assignment's defaults, and is returned for the next call (the :class:`~jaxbn.cs231n.solver.Solver`
keeps one per parameter). For training in JAX, optax gives the same rules (``optax.sgd``,
``optax.rmsprop``, ``optax.adam``); :mod:`jaxbn.training` uses them.
"""

from __future__ import annotations

import numpy as np

__all__ = ["sgd", "sgd_momentum", "rmsprop", "adam"]


def sgd(w, dw, config=None):
    """Vanilla SGD: ``w -= learning_rate * dw``. config: ``learning_rate`` (1e-2).

    Example:
      >>> import numpy as np
      >>> from jaxbn.cs231n.optim import sgd
      >>> w, config = sgd(np.ones(2), np.array([1.0, -1.0]), {"learning_rate": 0.5})
      >>> w.tolist()
      [0.5, 1.5]
    """
    config = {} if config is None else config
    config.setdefault("learning_rate", 1e-2)
    return w - config["learning_rate"] * dw, config


def sgd_momentum(w, dw, config=None):
    """SGD with momentum: ``v = momentum * v - learning_rate * dw``; ``w += v``.

    config: ``learning_rate`` (1e-2), ``momentum`` (0.9), ``velocity`` (zeros like ``w``).

    Example:
      >>> import numpy as np
      >>> from jaxbn.cs231n.optim import sgd_momentum
      >>> w, config = sgd_momentum(np.zeros(2), np.ones(2), {"learning_rate": 0.1})
      >>> w, config = sgd_momentum(w, np.ones(2), config)  # v = 0.9 * (-0.1) - 0.1
      >>> np.round(w, 6).tolist(), np.round(config["velocity"], 6).tolist()
      ([-0.29, -0.29], [-0.19, -0.19])
    """
    config = {} if config is None else config
    config.setdefault("learning_rate", 1e-2)
    config.setdefault("momentum", 0.9)
    v = config.get("velocity", np.zeros_like(w))
    v = config["momentum"] * v - config["learning_rate"] * dw
    config["velocity"] = v
    return w + v, config


def rmsprop(w, dw, config=None):
    """RMSProp: ``cache = decay_rate * cache + (1 - decay_rate) * dw^2``;
    ``w -= learning_rate * dw / (sqrt(cache) + epsilon)``.

    config: ``learning_rate`` (1e-2), ``decay_rate`` (0.99), ``epsilon`` (1e-8), ``cache`` (zeros).

    Example:
      >>> import numpy as np
      >>> from jaxbn.cs231n.optim import rmsprop
      >>> w, config = rmsprop(np.zeros(2), np.array([2.0, -2.0]), {"learning_rate": 0.01})
      >>> np.round(w, 4).tolist()  # the first step is learning_rate / sqrt(1 - decay_rate)
      [-0.1, 0.1]
    """
    config = {} if config is None else config
    config.setdefault("learning_rate", 1e-2)
    config.setdefault("decay_rate", 0.99)
    config.setdefault("epsilon", 1e-8)
    config.setdefault("cache", np.zeros_like(w))
    cache = config["decay_rate"] * config["cache"] + (1 - config["decay_rate"]) * dw * dw
    config["cache"] = cache
    return w - config["learning_rate"] * dw / (np.sqrt(cache) + config["epsilon"]), config


def adam(w, dw, config=None):
    """Adam with bias correction; ``t`` is incremented *before* it is used.

    ``m = beta1 m + (1 - beta1) dw``, ``v = beta2 v + (1 - beta2) dw^2``,
    ``w -= learning_rate * (m / (1 - beta1^t)) / (sqrt(v / (1 - beta2^t)) + epsilon)``.

    config: ``learning_rate`` (1e-3), ``beta1`` (0.9), ``beta2`` (0.999), ``epsilon`` (1e-8),
    ``m``, ``v`` (zeros), ``t`` (0).

    Example:
      >>> import numpy as np
      >>> from jaxbn.cs231n.optim import adam
      >>> w, config = adam(np.zeros(2), np.array([3.0, -0.5]))
      >>> np.round(w, 6).tolist(), config["t"]  # bias-corrected: the first step is learning_rate
      ([-0.001, 0.001], 1)
    """
    config = {} if config is None else config
    config.setdefault("learning_rate", 1e-3)
    config.setdefault("beta1", 0.9)
    config.setdefault("beta2", 0.999)
    config.setdefault("epsilon", 1e-8)
    config.setdefault("m", np.zeros_like(w))
    config.setdefault("v", np.zeros_like(w))
    config.setdefault("t", 0)
    config["t"] += 1
    beta1, beta2, t = config["beta1"], config["beta2"], config["t"]
    config["m"] = beta1 * config["m"] + (1 - beta1) * dw
    config["v"] = beta2 * config["v"] + (1 - beta2) * dw * dw
    m_hat = config["m"] / (1 - beta1 ** t)
    v_hat = config["v"] / (1 - beta2 ** t)
    return w - config["learning_rate"] * m_hat / (np.sqrt(v_hat) + config["epsilon"]), config
