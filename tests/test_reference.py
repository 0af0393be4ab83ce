"""The oracle's independence: jaxbn.reference imports nothing from the implementation, and nothing
in the implementation imports it (``backward="autodiff"`` differentiates the implementation's own
plain forward), so a shared bug cannot hide."""

from __future__ import annotations

import ast
import pathlib

import jax
import jax.numpy as jnp
import numpy as np

import jaxbn
from jaxbn import reference

from helpers import rand

PACKAGE = pathlib.Path(jaxbn.__file__).parent


def _imports(path: pathlib.Path | str):
    """(module imported, enclosing function name or None) for every import in a file (or in
    source text)."""
    tree = ast.parse(path.read_text() if isinstance(path, pathlib.Path) else path)
    found = []

    def visit(node, function):
        for child in ast.iter_child_nodes(node):
            inner = child.name if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)) \
                else function
            if isinstance(child, ast.Import):
                found.extend((alias.name, function) for alias in child.names)
            elif isinstance(child, ast.ImportFrom):
                module = child.module or ""
                found.extend((f"{module}.{alias.name}" if module else alias.name, function)
                             for alias in child.names)
            visit(child, inner)

    visit(tree, None)
    return found


def test_the_oracle_imports_nothing_from_jaxbn():
    imported = [name for name, _ in _imports(PACKAGE / "reference.py")]
    assert imported, "the parse found no import at all: the check itself is broken"
    assert not [name for name in imported if name.split(".")[0] == "jaxbn"], imported


def test_nothing_in_the_implementation_imports_the_oracle():
    users = []
    for path in PACKAGE.rglob("*.py"):
        if path.name == "reference.py":
            continue
        for name, function in _imports(path):
            if name in ("jaxbn.reference", "jaxbn.reference.*") or name.startswith(
                    "jaxbn.reference."):
                users.append((path.name, function))
    assert users == [], users


def test_the_import_parse_sees_function_level_imports():
    """The check above would have caught the old lazy ``from jaxbn import reference``."""
    source = "import os\ndef normalize():\n    from jaxbn import reference\n"
    assert _imports(source) == [("os", None), ("jaxbn.reference", "normalize")]


def test_oracle_group_norm_is_a_loop_over_groups_that_matches_the_definition():
    """The oracle's own group norm against numpy, so an oracle bug cannot hide either."""
    x = rand(0, (2, 6, 3, 2))
    gamma, beta = rand(1, (6,)), rand(2, (6,))
    y = np.asarray(reference.group_norm(x, gamma, beta, groups=3))
    xn = np.asarray(x).reshape(2, 3, 2, 3, 2)
    expected = (xn - xn.mean((2, 3, 4), keepdims=True)) / np.sqrt(
        xn.var((2, 3, 4), keepdims=True) + 1e-5)
    expected = expected.reshape(x.shape) * np.asarray(gamma)[:, None, None] + \
        np.asarray(beta)[:, None, None]
    np.testing.assert_allclose(y, expected, rtol=1e-12, atol=1e-12)


def test_oracle_mask_selects_so_padding_cannot_leak():
    x = jnp.array([[1.0], [jnp.nan], [3.0], [jnp.inf]])
    mask = jnp.array([[True], [False], [True], [False]])
    y, mean, var = reference.normalize(x, jnp.ones((1, 1)), jnp.zeros((1, 1)), (0,), 0.0,
                                       mask=mask)
    np.testing.assert_allclose(mean, [[2.0]])
    np.testing.assert_allclose(var, [[1.0]])
    np.testing.assert_allclose(y, [[-1.0], [0.0], [1.0], [0.0]])
    grad = jax.grad(lambda x: jnp.sum(reference.normalize(
        x, jnp.ones((1, 1)), jnp.zeros((1, 1)), (0,), 1e-5, mask=mask)[0]
        * jnp.arange(4.0)[:, None]))(x)
    assert np.all(np.isfinite(grad)) and grad[1, 0] == 0 and grad[3, 0] == 0


def test_oracle_complex_statistics_and_group_axes_match_their_definitions():
    """The oracle's new cases against numpy: complex batch norm (a complex mean, the real
    variance of |x - mean|), and group norm with statistics over the batch axis too."""
    x = np.asarray(jax.lax.complex(rand(3, (5, 2)), rand(4, (5, 2))))
    y, mean, var = reference.normalize(jnp.asarray(x), jnp.ones((1, 2)), jnp.zeros((1, 2)),
                                       (0,), 1e-5)
    m = x.mean(0, keepdims=True)
    v = np.mean((x - m).real ** 2 + (x - m).imag ** 2, 0, keepdims=True)
    assert var.dtype == jnp.float64 and mean.dtype == jnp.complex128
    np.testing.assert_allclose(mean, m, rtol=1e-12)
    np.testing.assert_allclose(var, v, rtol=1e-12)
    np.testing.assert_allclose(y, (x - m) / np.sqrt(v + 1e-5), rtol=1e-12)
    xg = rand(5, (3, 4, 6))  # channels last, 3 groups of 2, statistics over axes 0, 1 as well
    yg = np.asarray(reference.group_norm(xg, jnp.ones(6), jnp.zeros(6), groups=3, layout="NWC",
                                         axes=(0, 1)))
    blocks = np.asarray(xg).reshape(3, 4, 3, 2)
    expected = (blocks - blocks.mean((0, 1, 3), keepdims=True)) / np.sqrt(
        blocks.var((0, 1, 3), keepdims=True) + 1e-5)
    np.testing.assert_allclose(yg, expected.reshape(3, 4, 6), rtol=1e-12, atol=1e-12)
