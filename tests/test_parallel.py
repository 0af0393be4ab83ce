"""Local or global statistics, on purpose (jaxbn._parallel): ``jaxbn.LOCAL`` and the one-time
warning under ``shard_map``.

A one-device mesh is enough here: the warning is about what the code means (x varies over a mesh
axis and no axis_name joins it), which does not depend on the device count. The values on four
devices (LOCAL = each device's own statistics) are checked in tests/multidevice_training_check.py.
"""

from __future__ import annotations

import copy
import pickle
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jaxbn
from jaxbn import _parallel

MESH = jax.make_mesh((1,), ("data",), devices=jax.devices()[:1])
X = jax.device_put(jax.random.normal(jax.random.key(0), (8, 3), jnp.float32) * 2 + 1,
                   NamedSharding(MESH, P("data")))
IMAGES = jax.device_put(jax.random.normal(jax.random.key(1), (4, 3, 2, 2), jnp.float32),
                        NamedSharding(MESH, P("data")))
STATE = jaxbn.init_batch_norm_state(3)
ONES, ZEROS = jnp.ones(3, jnp.float32), jnp.zeros(3, jnp.float32)


@pytest.fixture(autouse=True)
def fresh_warning_registry():
    _parallel._warned.clear()
    yield
    _parallel._warned.clear()


def _per_device(axis_name, *, train=True, spatial=False):
    def fn(x):  # y and the running mean
        norm = jaxbn.spatial_batch_norm if spatial else jaxbn.batch_norm
        y, state = norm(x, ONES, ZEROS, STATE, train=train, axis_name=axis_name)
        return y, state.mean
    # The running means are per device (local statistics): out_specs P("data") stacks them.
    return jax.jit(jax.shard_map(fn, mesh=MESH, in_specs=P("data"), out_specs=P("data")))


def _silently(fn, *args):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return fn(*args)


@pytest.mark.parametrize("spatial", [False, True], ids=["batch_norm", "spatial_batch_norm"])
def test_shard_map_without_axis_name_warns_once_naming_both_spellings(spatial):
    x = IMAGES if spatial else X
    with pytest.warns(UserWarning) as record:
        _per_device(None, spatial=spatial)(x)
    assert len(record) == 1
    message = str(record[0].message)
    assert "mesh axes ('data',)" in message and "each device's own" in message
    assert "axis_name='data'" in message and "axis_name=jaxbn.LOCAL" in message
    assert record[0].filename == __file__  # points at the call, not into jaxbn
    _silently(_per_device(None, spatial=spatial), x)  # a second function, the same axes: once


def test_local_computes_what_none_computes_and_stays_silent():
    with pytest.warns(UserWarning):
        y_none, state_none = _per_device(None)(X)
    _parallel._warned.clear()
    y_local, state_local = _silently(_per_device(jaxbn.LOCAL), X)
    np.testing.assert_array_equal(y_local, y_none)
    np.testing.assert_array_equal(state_local, state_none)
    y_global, _ = _silently(_per_device("data"), X)
    np.testing.assert_allclose(y_global, y_local, rtol=1e-6, atol=1e-6)  # 1 device: local = global


def test_no_warning_where_the_statistics_are_global_or_absent():
    _silently(_per_device(None, train=False), X)  # test mode: running statistics, no batch ones
    bn = lambda x: jaxbn.batch_norm(x, ONES, ZEROS, STATE, train=True)
    _silently(jax.jit(bn), X)  # jit with sharded x: the partitioner makes the sums global
    _silently(jax.vmap(bn), jnp.stack([X, X]))  # stacked batches under vmap: no mesh axis
    y, _ = _silently(lambda x: jaxbn.batch_norm(x, ONES, ZEROS, STATE, train=True,
                                                axis_name=jaxbn.LOCAL), X)
    np.testing.assert_array_equal(y, bn(X)[0])  # outside shard_map LOCAL is None


def test_local_stands_alone():
    with pytest.raises(ValueError, match="jaxbn.LOCAL stands alone"):
        _per_device(("data", jaxbn.LOCAL))(X)


def test_local_is_one_object():
    assert copy.deepcopy(jaxbn.LOCAL) is jaxbn.LOCAL
    assert pickle.loads(pickle.dumps(jaxbn.LOCAL)) is jaxbn.LOCAL
    assert type(jaxbn.LOCAL)() is jaxbn.LOCAL and repr(jaxbn.LOCAL) == "jaxbn.LOCAL"
