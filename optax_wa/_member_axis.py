"""Private helpers of the member axis shared by members.py, map_members and
the exchange: how many members are unrolled, where the axis lives on a mesh."""

from __future__ import annotations

from typing import Any

import jax
from jax.sharding import NamedSharding

__all__ = ["UNROLL_LIMIT", "explicit_member_axes"]

# Above this many members, a sum or a map over the member axis is rolled
# (a reduction, a loop) instead of unrolled.
UNROLL_LIMIT = 32


def explicit_member_axes(x) -> tuple[Any, tuple[str, ...]] | None:
    """``(mesh, mesh_axes)`` when the leading axis of ``x`` is split over mesh
    axes of an explicit mesh (visible in ``jax.typeof(x)``), else ``None``."""
    try:
        sharding = jax.typeof(x).sharding
    except (AttributeError, TypeError):
        return None
    if not isinstance(sharding, NamedSharding) or not sharding.spec:
        return None
    lead = sharding.spec[0]
    if lead is None:
        return None
    axes = (lead,) if isinstance(lead, str) else tuple(lead)
    mesh = sharding.mesh
    types = dict(zip(mesh.axis_names, mesh.axis_types))
    if not all(types.get(a) == jax.sharding.AxisType.Explicit for a in axes):
        return None
    return mesh, axes
