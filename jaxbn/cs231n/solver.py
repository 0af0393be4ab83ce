"""``cs231n/solver.py``: the assignment's ``Solver``, for any model with ``params`` and
``loss(X, y=None)``.

The contract is the assignment's: ``model.params`` is a dict of numpy arrays, ``model.loss(X)``
returns scores and ``model.loss(X, y)`` returns ``(loss, grads)``; each step applies one
:mod:`jaxbn.cs231n.optim` rule per parameter with its own config. jaxbn's ``FullyConnectedNet``
computes its loss and gradients as one jitted JAX computation, so the Solver's step runs jitted
where it matters; the update rules stay the assignment's numpy (exact, and any model works).
Checkpoints (``checkpoint_name``) are written in jaxbn's safe format (an ``.npz`` read without
pickle, plus JSON), not as pickles.

For training written in JAX from the start, :func:`jaxbn.training.fit` is the functional
counterpart (optax optimizers, a jitted epoch, bit-identical resume).

``mesh=`` (a ``jax.sharding.Mesh``; not an assignment option) splits every minibatch over the
mesh's devices before ``model.loss`` sees it (:func:`jaxbn.training.shard_batch`): a model whose
loss is one jitted JAX computation, such as jaxbn's ``FullyConnectedNet``, then runs
data-parallel, with batch norm over the whole minibatch. ``batch_size`` must be a multiple of the
device count. On several processes only process 0 prints.
"""

from __future__ import annotations

import jax
import numpy as np

from jaxbn.cs231n import optim

__all__ = ["Solver"]

_OPTIONS = {"update_rule": "sgd", "optim_config": None, "lr_decay": 1.0, "batch_size": 100,
            "num_epochs": 10, "num_train_samples": 1000, "num_val_samples": None,
            "checkpoint_name": None, "print_every": 10, "verbose": True, "mesh": None}


class Solver:
    """Trains a classification model with minibatch gradient descent.

    Args:
      model: an object with ``params`` (dict of numpy arrays) and ``loss(X, y=None)``.
      data: dict with ``X_train``, ``y_train``, ``X_val``, ``y_val``.
      update_rule: a name in :mod:`jaxbn.cs231n.optim` (``"sgd"``, ``"sgd_momentum"``,
        ``"rmsprop"``, ``"adam"``) or an update function.
      optim_config: hyperparameters for the update rule, copied per parameter.
      lr_decay: the learning rate is multiplied by this after each epoch.
      batch_size, num_epochs: minibatch size and number of epochs.
      num_train_samples, num_val_samples: subsample sizes for the accuracy checks (None: all).
      checkpoint_name: write ``{checkpoint_name}_epoch_{e}.npz`` after each epoch.
      print_every: print the loss every this many iterations (when ``verbose``).
      verbose: print progress (process 0's only, on several processes).
      mesh: a ``jax.sharding.Mesh`` to split every minibatch over (see the module docstring).

    Raises:
      ValueError: an unknown keyword argument or update rule.

    Example:
      >>> import numpy as np
      >>> from sklearn.datasets import load_digits
      >>> from jaxbn.cs231n.classifiers.fc_net import FullyConnectedNet
      >>> from jaxbn.cs231n.solver import Solver
      >>> digits = load_digits()
      >>> x = (digits.data - digits.data.mean(0)) / (digits.data.std(0) + 1e-3)
      >>> data = {"X_train": x[:500], "y_train": digits.target[:500],
      ...         "X_val": x[500:700], "y_val": digits.target[500:700]}
      >>> np.random.seed(0)
      >>> model = FullyConnectedNet([50], input_dim=64, weight_scale=5e-2)
      >>> solver = Solver(model, data, update_rule="adam", optim_config={"learning_rate": 1e-2},
      ...                 num_epochs=5, batch_size=50, verbose=False)
      >>> solver.train()  # the model ends with the parameters of the best validation accuracy
      >>> len(solver.loss_history), len(solver.val_acc_history)  # 10 steps an epoch; 1 + 5 checks
      (50, 6)
      >>> solver.best_val_acc == max(solver.val_acc_history) > 0.7
      True
    """

    def __init__(self, model, data, **kwargs):
        self.model = model
        self.X_train, self.y_train = data["X_train"], data["y_train"]
        self.X_val, self.y_val = data["X_val"], data["y_val"]
        unknown = sorted(set(kwargs) - set(_OPTIONS))
        if unknown:
            raise ValueError(f"Unrecognized arguments {', '.join(unknown)}; Solver takes "
                             f"{', '.join(_OPTIONS)}.")
        for name, default in _OPTIONS.items():
            setattr(self, name, kwargs.get(name, default))
        self.optim_config = dict(self.optim_config or {})
        if self.mesh is not None:
            from jaxbn.training import _check_divisible, _check_mesh

            _check_divisible("batch_size", self.batch_size, _check_mesh(self.mesh))
        if isinstance(self.update_rule, str):
            if self.update_rule not in optim.__all__:
                raise ValueError(f'Invalid update_rule "{self.update_rule}": use one of '
                                 f"{', '.join(optim.__all__)} or pass a function.")
            self.update_rule = getattr(optim, self.update_rule)
        self._reset()

    def _reset(self):
        self.epoch = 0
        self.best_val_acc = 0
        self.best_params = {}
        self.loss_history = []
        self.train_acc_history = []
        self.val_acc_history = []
        self.optim_configs = {p: dict(self.optim_config) for p in self.model.params}

    def _step(self):
        """One minibatch (drawn with numpy's global RNG) and one update of every parameter."""
        idx = np.random.choice(self.X_train.shape[0], self.batch_size)
        X_batch, y_batch = self.X_train[idx], self.y_train[idx]
        if self.mesh is not None:
            from jaxbn import training

            X_batch, y_batch = training.shard_batch((X_batch, y_batch), self.mesh)
        loss, grads = self.model.loss(X_batch, y_batch)
        self.loss_history.append(loss)
        for name, w in self.model.params.items():
            next_w, next_config = self.update_rule(w, grads[name], self.optim_configs[name])
            self.model.params[name] = next_w
            self.optim_configs[name] = next_config

    def _save_checkpoint(self):
        if self.checkpoint_name is None:
            return
        from jaxbn.training import save_checkpoint

        history = {"loss_history": [float(v) for v in self.loss_history],
                   "train_acc_history": [float(v) for v in self.train_acc_history],
                   "val_acc_history": [float(v) for v in self.val_acc_history]}
        save_checkpoint(f"{self.checkpoint_name}_epoch_{self.epoch}.npz",
                        {"params": dict(self.model.params)},
                        {"epoch": self.epoch, "lr_decay": self.lr_decay,
                         "batch_size": self.batch_size, **history})

    def check_accuracy(self, X, y, num_samples=None, batch_size=100):
        """Accuracy of the model on ``(X, y)``, on a random subsample of ``num_samples``."""
        if num_samples is not None and X.shape[0] > num_samples:
            idx = np.random.choice(X.shape[0], num_samples)
            X, y = X[idx], y[idx]
        predictions = [np.argmax(self.model.loss(X[start:start + batch_size]), axis=1)
                       for start in range(0, X.shape[0], batch_size)]
        return float(np.mean(np.concatenate(predictions) == y))

    def _check_and_keep_best(self):
        train_acc = self.check_accuracy(self.X_train, self.y_train, self.num_train_samples)
        val_acc = self.check_accuracy(self.X_val, self.y_val, self.num_val_samples)
        self.train_acc_history.append(train_acc)
        self.val_acc_history.append(val_acc)
        self._save_checkpoint()
        if self.verbose and jax.process_index() == 0:
            print(f"(Epoch {self.epoch} / {self.num_epochs}) train acc: {train_acc:f}; "
                  f"val_acc: {val_acc:f}")
        if val_acc > self.best_val_acc:
            self.best_val_acc = val_acc
            self.best_params = {k: v.copy() for k, v in self.model.params.items()}

    def train(self):
        """Runs ``num_epochs`` epochs; the model ends with the best validation parameters."""
        iterations_per_epoch = max(self.X_train.shape[0] // self.batch_size, 1)
        num_iterations = self.num_epochs * iterations_per_epoch
        for t in range(num_iterations):
            self._step()
            if self.verbose and t % self.print_every == 0 and jax.process_index() == 0:
                print(f"(Iteration {t + 1} / {num_iterations}) loss: {self.loss_history[-1]:f}")
            epoch_end = (t + 1) % iterations_per_epoch == 0
            if epoch_end:
                self.epoch += 1
                for config in self.optim_configs.values():
                    config["learning_rate"] *= self.lr_decay
            if t == 0 or t == num_iterations - 1 or epoch_end:
                self._check_and_keep_best()
        self.model.params = self.best_params
