"""The notebooks' gradient checks (``cs231n/gradient_check.py``) and ``rel_error``.

These run the user's function on numpy arrays, entry by entry: they are the assignment's own
tools, kept for its notebooks. For checking a hand-written JAX VJP, :mod:`jaxbn.testing` compares
against ``jax.vjp`` of a naive forward under random cotangents, which is faster and stricter.
"""

from __future__ import annotations

import numpy as np

__all__ = ["eval_numerical_gradient", "eval_numerical_gradient_array", "grad_check_sparse",
           "rel_error"]


def rel_error(x, y):
    """The notebook's relative error: ``max |x - y| / max(1e-8, |x| + |y|)``.

    Example:
      >>> import numpy as np
      >>> from jaxbn.cs231n.gradient_check import rel_error
      >>> round(float(rel_error(np.array([1.0, 2.0]), np.array([1.0, 2.002]))), 8)  # 0.002/4.002
      0.00049975
    """
    return np.max(np.abs(x - y) / (np.maximum(1e-8, np.abs(x) + np.abs(y))))


def _plus_minus(evaluate, x, ix, h):
    """``(evaluate(x + h e_ix), evaluate(x - h e_ix))``, ``x`` perturbed in place and restored."""
    old = x[ix]
    x[ix] = old + h
    plus = evaluate(x)
    x[ix] = old - h
    minus = evaluate(x)
    x[ix] = old
    return plus, minus


def _centered_differences(evaluate, x, h, combine, verbose=False):
    """Perturbs each entry of the numpy array ``x`` in place by +-h (restoring it) and stores
    ``combine(evaluate(x + h e_i), evaluate(x - h e_i)) / (2 h)``."""
    grad = np.zeros_like(x)
    it = np.nditer(x, flags=["multi_index"], op_flags=["readwrite"])
    while not it.finished:
        ix = it.multi_index
        grad[ix] = combine(*_plus_minus(evaluate, x, ix, h)) / (2 * h)
        if verbose:
            print(ix, grad[ix])
        it.iternext()
    return grad


def eval_numerical_gradient(f, x, verbose=True, h=1e-5):
    """Centered finite-difference gradient of the scalar ``f`` at the numpy array ``x`` (modified
    in place and restored), as in cs231n's ``gradient_check``.

    Example:
      >>> import numpy as np
      >>> from jaxbn.cs231n.gradient_check import eval_numerical_gradient
      >>> x = np.array([1.0, -2.0])
      >>> np.round(eval_numerical_gradient(lambda x: np.sum(x ** 2), x, verbose=False), 6).tolist()
      [2.0, -4.0]
    """
    return _centered_differences(f, x, h, lambda plus, minus: plus - minus, verbose)


def eval_numerical_gradient_array(f, x, df, h=1e-5):
    """Centered finite differences of ``sum(f(x) * df)`` w.r.t. the numpy array ``x``; the outputs
    are differenced before the sum, so two large sums never cancel.

    Example:
      >>> import numpy as np
      >>> from jaxbn.cs231n.gradient_check import eval_numerical_gradient_array
      >>> x, dout = np.array([1.0, -2.0]), np.array([1.0, 10.0])
      >>> np.round(eval_numerical_gradient_array(lambda x: 3 * x, x, dout), 6).tolist()
      [3.0, 30.0]
    """
    return _centered_differences(lambda a: np.array(f(a), copy=True), x, h,
                                 lambda plus, minus: np.sum((plus - minus) * df))


def grad_check_sparse(f, x, analytic_grad, num_checks=10, h=1e-5):
    """Compares ``analytic_grad`` with centered differences of the scalar ``f`` at
    ``num_checks`` entries of ``x`` drawn with numpy's global RNG, printing each comparison.

    Returns the relative errors (the assignment prints them only).

    Example:
      >>> import numpy as np
      >>> from jaxbn.cs231n.gradient_check import grad_check_sparse
      >>> np.random.seed(0)
      >>> x = np.array([[1.0, -2.0], [0.5, 3.0]])
      >>> errors = grad_check_sparse(lambda x: np.sum(x ** 3), x, 3 * x ** 2, num_checks=2)
      numerical: ... analytic: ..., relative error: ...
      numerical: ... analytic: ..., relative error: ...
      >>> bool(max(errors) < 1e-8)
      True
    """
    errors = []
    for _ in range(num_checks):
        ix = tuple(int(np.random.randint(n)) for n in x.shape)
        plus, minus = _plus_minus(f, x, ix, h)
        numerical = (plus - minus) / (2 * h)
        analytic = analytic_grad[ix]
        error = abs(numerical - analytic) / max(abs(numerical) + abs(analytic), 1e-300)
        print(f"numerical: {numerical:f} analytic: {analytic:f}, relative error: {error:e}")
        errors.append(error)
    return errors
