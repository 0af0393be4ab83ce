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

The assignment's arguments changed over the years. jaxbn follows the 2016-17 write-ups by default,
and takes every later spelling; one line at the top of a notebook from 2018 on switches dropout's
``p`` to the later meaning::

    import jaxbn.cs231n; jaxbn.cs231n.set_dropout_p("keep")   # 2018 on: p is the keep probability

.. list-table:: What changed year by year
   :header-rows: 1

   * - the assignment's
     - 2016-17 (jaxbn's default)
     - 2018-20
     - 2021 on
   * - ``dropout_forward``'s ``p``
     - probability of *dropping* a unit
     - probability of *keeping* a unit
     - probability of *keeping* a unit
   * - ``FullyConnectedNet``'s dropout
     - ``dropout=p``, drop probability; 0 (default) is off
     - ``dropout=p``, keep probability; 1 (default) is off
     - ``dropout_keep_ratio=p``, keep probability; 1 (default) is off
   * - normalization
     - ``use_batchnorm=True``
     - ``normalization="batchnorm"`` or ``"layernorm"``
     - ``normalization="batchnorm"`` or ``"layernorm"``
   * - what a notebook adds for jaxbn
     - nothing
     - ``set_dropout_p("keep")``
     - ``set_dropout_p("keep")`` (for its ``dropout_forward`` cells)

Every spelling works in either setting, except where the two meanings collide: by default
``FullyConnectedNet(dropout=1)`` (the 2018-20 "off") raises a ``ValueError`` that explains both
meanings, because read as a drop probability it would drop every unit; after
``set_dropout_p("keep")``, ``dropout=0`` raises for the same reason. ``dropout_keep_ratio`` is a
keep probability in either setting, and ``FullyConnectedNet.dropout_param["p"]`` holds ``p`` in
the setting's meaning, as that era's notebook reads it.
"""

from jaxbn.cs231n import optim as optim
from jaxbn.cs231n._dropout_p import dropout_p, set_dropout_p
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
           "grad_check_sparse", "rel_error", "set_dropout_p", "dropout_p"]
