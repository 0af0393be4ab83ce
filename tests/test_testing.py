"""jaxbn.testing: each check passes on correct rules and fails, with a useful message, on the bug
it is for (a missing term, a wrong sign, a dropped cotangent, a rule wrong only under vmap, a
backward whose own derivative is wrong)."""

from __future__ import annotations

import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxbn
from jaxbn import reference, testing

X = jax.random.normal(jax.random.key(0), (8, 5), jnp.float64) * 2 + 1
G = jnp.linspace(0.5, 1.5, 5)
B = jnp.linspace(-1.0, 1.0, 5)


def naive(x, gamma, beta):
    return reference.batch_norm_train(x, gamma, beta)[0]


def _rule_bn(bwd):
    """A batch norm with a hand-written backward ``bwd(x_hat, inv_std, gamma, dy)``."""
    @jax.custom_vjp
    def bn(x, gamma, beta):
        return naive(x, gamma, beta)

    def fwd(x, gamma, beta):
        mean, var = x.mean(0), x.var(0)
        inv_std = 1 / jnp.sqrt(var + 1e-5)
        return naive(x, gamma, beta), ((x - mean) * inv_std, inv_std, gamma)

    bn.defvjp(fwd, lambda res, dy: bwd(*res, dy))
    return bn


def correct(x_hat, inv_std, gamma, dy):
    m = dy.shape[0]
    dx = gamma * inv_std / m * (m * dy - dy.sum(0) - x_hat * (dy * x_hat).sum(0))
    return dx, (dy * x_hat).sum(0), dy.sum(0)


def missing_term(x_hat, inv_std, gamma, dy):  # forgets the variance's path: - x_hat sum(dy x_hat)
    m = dy.shape[0]
    return gamma * inv_std / m * (m * dy - dy.sum(0)), (dy * x_hat).sum(0), dy.sum(0)


def wrong_sign(x_hat, inv_std, gamma, dy):
    dx, dgamma, dbeta = correct(x_hat, inv_std, gamma, dy)
    return dx, dgamma, -dbeta


def dropped_cotangent(x_hat, inv_std, gamma, dy):
    dx, _, dbeta = correct(x_hat, inv_std, gamma, dy)
    return dx, jnp.zeros_like(gamma), dbeta


def frozen_backward(x_hat, inv_std, gamma, dy):
    """Right to first order; its own derivative misses x_hat's dependence on x."""
    return correct(jax.lax.stop_gradient(x_hat), jax.lax.stop_gradient(inv_std), gamma, dy)


@pytest.mark.slow
def test_every_check_passes_on_a_correct_rule():
    bn = _rule_bn(correct)
    testing.check_vjp(bn, naive, X, G, B)
    testing.check_vjp(bn, naive, *(a.astype(jnp.float32) for a in (X, G, B)),
                      reference_dtype=jnp.float64)
    testing.check_finite_differences(jax.jit(bn), X, G, B)
    testing.check_finite_differences(jax.jit(bn), X, G, B, order=2)
    testing.check_transforms(bn, X, G, B)


def test_check_vjp_catches_a_missing_term_that_grad_of_sum_cannot_see():
    bn = _rule_bn(missing_term)
    # The trap: under a cotangent constant over the batch, the input gradient vanishes for both.
    trap = jax.grad(lambda x: jnp.sum(bn(x, G, B)))(X)
    trap_ref = jax.grad(lambda x: jnp.sum(naive(x, G, B)))(X)
    assert np.max(np.abs(trap_ref)) < 1e-12 and np.max(np.abs(trap - trap_ref)) < 1e-6
    with pytest.raises(AssertionError, match=r"VJP \(random cotangent 0\) w\.r\.t\. input 0 "
                                             r"differs from the reference: worst element at "
                                             r"index \(\d+, \d+\): .* vs .*tolerance"):
        testing.check_vjp(bn, naive, X, G, B)
    with pytest.raises(AssertionError, match="gradient w.r.t. input 0 differs from centered "
                                             "finite differences"):
        testing.check_finite_differences(bn, X, G, B)


def test_check_vjp_catches_a_wrong_sign_and_names_the_input():
    with pytest.raises(AssertionError, match=r"w\.r\.t\. input 2 differs"):
        testing.check_vjp(_rule_bn(wrong_sign), naive, X, G, B)


def test_check_vjp_catches_a_dropped_cotangent_of_one_input():
    with pytest.raises(AssertionError, match=r"w\.r\.t\. input 1 differs.*: 0 vs "):
        testing.check_vjp(_rule_bn(dropped_cotangent), naive, X, G, B)


def test_second_order_finite_differences_catch_a_backward_with_a_wrong_derivative():
    bn = _rule_bn(frozen_backward)
    testing.check_vjp(bn, naive, X, G, B)  # first order: right
    with pytest.raises(AssertionError, match="second-order .* w.r.t. input 0 differs"):
        testing.check_finite_differences(bn, X, G, B, order=2)


def _callback_bn():
    """Batch norm computed in numpy through pure_callback: right on one batch, but with
    vmap_method='expand_dims' the callback gets the batch axis first and pools over it."""
    def np_forward(x, gamma, beta):
        x = np.asarray(x)
        y = (x - x.mean(0)) / np.sqrt(x.var(0) + 1e-5)  # axis 0 is the vmapped axis under vmap
        gamma, beta = np.asarray(gamma)[..., None, :], np.asarray(beta)[..., None, :]
        return (y * gamma + beta).astype(x.dtype)

    @jax.custom_vjp
    def bn(x, gamma, beta):
        return jax.pure_callback(np_forward, jax.ShapeDtypeStruct(x.shape, x.dtype), x, gamma,
                                 beta, vmap_method="expand_dims")

    def fwd(x, gamma, beta):
        return bn(x, gamma, beta), (x, gamma)

    def bwd(res, dy):
        x, gamma = res
        inv_std = 1 / jnp.sqrt(x.var(0) + 1e-5)
        return correct((x - x.mean(0)) * inv_std, inv_std, gamma, dy)

    bn.defvjp(fwd, bwd)
    return bn


def test_check_transforms_catches_a_rule_that_is_right_eagerly_and_wrong_under_vmap():
    bn = _callback_bn()
    testing.check_vjp(bn, naive, X, G, B)  # eagerly right
    with pytest.raises(AssertionError, match=r"under jax\.vmap \(batch element 0\): output"):
        testing.check_transforms(bn, X, G, B, second_order=False)


def test_cotangents_are_never_constant_along_an_axis():
    out = jax.ShapeDtypeStruct((16, 4, 3), jnp.float32)
    ct = np.asarray(testing._random_cotangent(jax.random.key(3), out))
    for axis in range(3):
        assert np.all(np.std(ct, axis=axis) > 0)


def test_pytrees_in_and_out_and_aux_outputs():
    state = jaxbn.init_batch_norm_state(5, jnp.float64)

    def f(p, x):
        y, new = jaxbn.batch_norm(x, p["gamma"], p["beta"], state, train=True)
        return {"y": y, "twice": 2 * y}, new

    def f_ref(p, x):
        y, mean, var = reference.batch_norm_train(x, p["gamma"], p["beta"])
        return {"y": y, "twice": 2 * y}, jaxbn.BatchNormState(0.1 * mean, 0.9 + 0.1 * var,
                                                              jnp.ones((), jnp.int32))

    params = {"gamma": G, "beta": B}
    testing.check_vjp(f, f_ref, params, X, has_aux=True, compare_aux=True)
    wrong = lambda p, x: (f_ref(p, x)[0], jaxbn.BatchNormState(0.2 * p["beta"], p["gamma"],
                                                               jnp.ones((), jnp.int32)))
    with pytest.raises(AssertionError, match=r"aux output\.mean differs"):
        testing.check_vjp(f, wrong, params, X, has_aux=True, compare_aux=True)
    flipped = lambda b: 2 * jax.lax.stop_gradient(b) - b  # same value, gradient -1
    with pytest.raises(AssertionError, match=r"input 0\['beta'\] differs"):
        testing.check_vjp(lambda p, x: f(p, x)[0], lambda p, x: f_ref(
            {"gamma": p["gamma"], "beta": flipped(p["beta"])}, x)[0], params, X)


def test_default_tolerances_follow_dtype_and_reduction_size():
    assert testing.default_rtol(jnp.float32, 100) == pytest.approx(
        4 * 1.1920929e-07 * 10 + 8 * 1.1920929e-07 + 2 * 1.1920929e-07, rel=1e-6)
    assert testing.default_rtol(jnp.float64, 100) < 1e-13
    assert 1e-2 < testing.default_rtol(jnp.bfloat16, 100) < 2e-2


def test_finite_differences_without_x64_says_how_to_enable_it():
    code = ("import jax, jax.numpy as jnp, jaxbn.testing as t\n"
            "try:\n    t.check_finite_differences(jnp.sin, jnp.ones(3))\n"
            "except RuntimeError as e:\n    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120).stdout
    assert "jax.config.update('jax_enable_x64', True)" in out


def test_check_vjp_runs_a_reference_that_reads_values_eagerly():
    """``jit=True`` (the default) compiles each side where it traces; a reference that needs
    concrete values (numpy indexing with a mask it closes over) runs eagerly instead of failing,
    and is still compared."""
    x = jnp.asarray([[1.0, -2.0, 3.0], [0.5, 4.0, -1.0]])
    mask = jnp.asarray([[True, False, True], [False, True, True]])
    f = lambda x: jnp.where(mask, x * x, 0.0)

    def by_index(x):  # np.asarray of a staged op fails under jax.jit
        rows = []
        for i in range(2):
            idx = np.flatnonzero(np.asarray(mask[i]))
            rows.append(jnp.zeros(3, x.dtype).at[idx].set(x[i, idx] ** 2))
        return jnp.stack(rows)

    with pytest.raises(jax.errors.TracerArrayConversionError):
        jax.jit(by_index)(x)
    testing.check_vjp(f, by_index, x)
    with pytest.raises(AssertionError, match="differs"):
        testing.check_vjp(lambda x: 2 * f(x), by_index, x)
