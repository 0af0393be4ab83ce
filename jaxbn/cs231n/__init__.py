"""cs231n assignment 2 as a package, on jaxbn's core: replace ``cs231n.`` by ``jaxbn.cs231n.``.

=====================================  ================================================
the notebook imports                   from
=====================================  ================================================
``cs231n.layers``                      :mod:`jaxbn.cs231n.layers` (batch/layer/group norm, dropout)
``cs231n.layer_utils``                 :mod:`jaxbn.cs231n.layer_utils` (``affine_relu_*``, ...)
``cs231n.classifiers.fc_net``          :mod:`jaxbn.cs231n.classifiers.fc_net`
``cs231n.optim``                       :mod:`jaxbn.cs231n.optim` (sgd, sgd_momentum, rmsprop, adam)
``cs231n.solver``                      :mod:`jaxbn.cs231n.solver` (``Solver``)
``cs231n.gradient_check``              :mod:`jaxbn.cs231n.gradient_check`
``cs231n.data_utils``                  :mod:`jaxbn.cs231n.data_utils` (``get_CIFAR10_data``)
=====================================  ================================================

``from jaxbn.cs231n import *`` gives the layers, ``FullyConnectedNet``, ``Solver``, the optimizers
and the gradient checks.

The assignment's gradient checks need float64: put ``jax.config.update("jax_enable_x64", True)``
at the top of the notebook (a ``UserWarning`` says so once if float64 arrays arrive without it).

The dropout argument changed over the years, and jaxbn takes every spelling:

- 2016-17: ``FullyConnectedNet(dropout=p)`` and ``dropout_forward``'s ``p`` are the probability of
  *dropping* a unit; ``dropout=0`` is off. jaxbn follows this for ``dropout`` and ``p``.
- 2018-20: ``FullyConnectedNet(dropout=p)`` and ``dropout_forward``'s ``p`` are the probability of
  *keeping* a unit; ``dropout=1`` is off. ``FullyConnectedNet(dropout=1)`` raises a ``ValueError``
  that explains both meanings (read as a drop probability it would drop every unit); pass
  ``dropout_keep_ratio=`` for a keep probability. A 2018-20 ``dropout_forward`` cell with ``p``
  meaning "keep" must pass ``1 - p``.
- 2021+: ``FullyConnectedNet(dropout_keep_ratio=p)``, keep probability, 1 is off; and
  ``normalization=`` (``"batchnorm"``/``"layernorm"``) instead of 2016-17's ``use_batchnorm``.
"""

from jaxbn.cs231n import optim as optim
from jaxbn.cs231n.classifiers.fc_net import FullyConnectedNet
from jaxbn.cs231n.gradient_check import (
    eval_numerical_gradient,
    eval_numerical_gradient_array,
    grad_check_sparse,
    rel_error,
)
from jaxbn.cs231n.layer_utils import *  # noqa: F401,F403
from jaxbn.cs231n.layer_utils import __all__ as _utils_all
from jaxbn.cs231n.layers import *  # noqa: F401,F403
from jaxbn.cs231n.layers import __all__ as _layers_all
from jaxbn.cs231n.optim import adam, rmsprop, sgd, sgd_momentum
from jaxbn.cs231n.solver import Solver

__all__ = [*_layers_all, *_utils_all, "FullyConnectedNet", "Solver", "sgd", "sgd_momentum",
           "rmsprop", "adam", "eval_numerical_gradient", "eval_numerical_gradient_array",
           "grad_check_sparse", "rel_error"]
