"""Local or global batch statistics, always on purpose.

Where batch norm's statistics come from depends on how the program is parallelized:

- ``jax.jit`` with ``x`` sharded over a mesh (auto axes, or explicit axes under ``jax.set_mesh``)
  and several processes feeding one global array: the code sees the *global* batch, and XLA's
  partitioner turns the reductions into all-reduces. The statistics are global; nothing to say.
- ``jax.shard_map`` and ``jax.pmap``: the code sees each device's slice. Without
  ``axis_name`` the statistics are each device's own (local); with ``axis_name`` naming the
  mapped axes they are the global batch's.

The second case used to be silent. Now a batch norm in train mode whose ``x`` varies over
``shard_map``'s mesh axes, called without ``axis_name``, warns once (per set of axes, per
process) and says both fixes: ``axis_name=<the axes>`` for global statistics, or
``axis_name=jaxbn.LOCAL`` for per-device statistics on purpose (ghost batch norm per device, as
large-batch training sometimes wants). ``LOCAL`` computes exactly what ``axis_name=None`` does.

Detection reads the varying-manual-axes type JAX gives values under ``shard_map`` (its
``check_vma=True`` default). ``jax.pmap`` and ``shard_map(..., check_vma=False)`` carry no such
type, so there nothing warns: the rule above still holds.

Example (each device normalizes its own rows, on purpose; no warning):
  >>> import jax, jax.numpy as jnp, jaxbn
  >>> from jax.sharding import NamedSharding, PartitionSpec as P
  >>> mesh = jax.make_mesh((jax.device_count(),), ("data",))
  >>> state = jaxbn.init_batch_norm_state(3)
  >>> per_device = jax.shard_map(
  ...     lambda x: jaxbn.batch_norm(x, jnp.ones(3), jnp.zeros(3), state, train=True,
  ...                                axis_name=jaxbn.LOCAL)[0],
  ...     mesh=mesh, in_specs=P("data"), out_specs=P("data"))
  >>> rows = 2 * jax.device_count()  # two per device
  >>> x = jax.device_put(jnp.arange(3.0 * rows).reshape(rows, 3), NamedSharding(mesh, P("data")))
  >>> jax.jit(per_device)(x).shape == (rows, 3)
  True
"""

from __future__ import annotations

import warnings
from typing import Any

from jaxbn._rules import _varying_axes as varying_axes

__all__ = ["LOCAL", "resolve_axis_name"]


class _Local:
    """The type of :data:`LOCAL` (one instance)."""

    _instance: _Local | None = None

    def __new__(cls) -> _Local:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "jaxbn.LOCAL"

    def __reduce__(self) -> str:
        return "LOCAL"  # copies and pickles are the same object


LOCAL = _Local()
"""``axis_name=jaxbn.LOCAL``: batch statistics of each device's own slice, on purpose.

It computes what ``axis_name=None`` computes and silences the warning that ``None`` gives under
``jax.shard_map`` when ``x`` varies over mesh axes. Outside ``shard_map`` it is ``None``.
"""

_warned: set[tuple[str, ...]] = set()


def resolve_axis_name(x: Any, axis_name: Any, *, train: bool) -> Any:
    """The ``axis_name`` batch norm runs with: ``LOCAL`` becomes ``None``; ``None`` in train mode
    with an ``x`` that varies over ``shard_map``'s mesh axes warns once that the statistics are
    local."""
    if axis_name is LOCAL:
        return None
    if isinstance(axis_name, (tuple, list)) and any(a is LOCAL for a in axis_name):
        raise ValueError(f"axis_name=jaxbn.LOCAL stands alone (per-device statistics); got it "
                         f"inside {axis_name!r}. Pass the axes to reduce over, or LOCAL alone.")
    if axis_name is None and train:
        axes = tuple(sorted(varying_axes(x), key=str))  # shard_map's manual mesh axes
        if axes and axes not in _warned:
            _warned.add(axes)
            spelled = repr(axes[0]) if len(axes) == 1 else repr(axes)
            warnings.warn(
                f"jaxbn batch norm: under jax.shard_map x varies over the mesh axes {axes} and "
                f"no axis_name was given, so the batch statistics are each device's own "
                f"slice's, not the global batch's. Pass axis_name={spelled} for "
                f"statistics over the global batch, or axis_name=jaxbn.LOCAL to keep per-device "
                f"statistics on purpose. (Shown once.)", UserWarning, stacklevel=4)
    return axis_name
