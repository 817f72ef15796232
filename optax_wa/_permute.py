"""Moving selected values across members: one permutation per item.

The communication step of WASH's exchange (``optax_wa._exchange`` draws the
items and their permutations). Stacked mode on one device is a gather over
the member axis; named mode, and stacked mode with the member axis split over
an explicit mesh, send each value to its receiver in one fixed-capacity
``all_to_all``. A buffer that is too small is never an error: the items from
the first one that did not fit are reported, and the caller moves them in
another round.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from optax_wa import _numerics
from optax_wa._member_axis import explicit_member_axes

__all__ = ["permute_members"]

PyTree = Any


def _exclusive_rank(groups: jax.Array, valid: jax.Array, num_groups: int) -> jax.Array:
    """For each item, the number of earlier valid items in the same group."""
    lanes = jnp.arange(num_groups, dtype=groups.dtype)
    onehot = (groups[:, None] == lanes) & valid[:, None]
    running = jnp.cumsum(onehot.astype(jnp.int32), axis=0)
    return jnp.take_along_axis(running, groups[:, None], axis=1)[:, 0] - 1


def _permute_named(values, perms, valid, axis_name, capacity):
    """Named-mode exchange: one fixed-capacity ``all_to_all`` per values leaf.

    Member ``i`` sends its value of item ``f`` to the member that takes it
    (``dest[f]``, where ``perms[f, dest[f]] == i``) into slot ``rank`` of the
    buffer for that member, ``rank`` counting the earlier valid items with the
    same destination. The receiver finds the slot with the same count on its
    side (earlier valid items with the same source): both orders are the item
    order, so no index travels. Items from the first overflowing slot on (any
    member, ``lax.pmin``) are left for the caller's next round.
    """
    size = jax.lax.axis_size(axis_name)
    me = jax.lax.axis_index(axis_name).astype(perms.dtype)
    num_items = perms.shape[0]
    item = jnp.arange(num_items, dtype=jnp.int32)
    src = jnp.take(perms, me, axis=1)
    dest = jnp.argmax(perms == me, axis=1).astype(perms.dtype)
    send_rank = _exclusive_rank(dest, valid, size)
    overflow = valid & (send_rank >= capacity)
    first = jnp.min(jnp.where(overflow, item, num_items))
    num_done = jax.lax.pmin(first, axis_name)
    done = valid & (item < num_done)
    row = jnp.where(done, dest, size)  # out of bounds: dropped
    col = jnp.clip(send_rank, 0, capacity - 1)
    recv_rank = jnp.clip(_exclusive_rank(src, valid, size), 0, capacity - 1)

    def one(v):
        # 16-bit floats travel as their bits: a backend without 16-bit float
        # collectives (XLA:CPU) would otherwise widen the buffer to float32.
        wire = v.dtype
        if jnp.issubdtype(wire, jnp.floating) and wire.itemsize <= 2:
            v = jax.lax.bitcast_convert_type(v, jnp.dtype(f"uint{8 * wire.itemsize}"))
        buf = jnp.zeros((size, capacity, *v.shape[1:]), v.dtype)
        buf = buf.at[row, col].set(v, mode="drop")
        got = jax.lax.all_to_all(buf, axis_name, 0, 0, tiled=True)
        new = got[src, recv_rank]
        if new.dtype != wire:
            new, v = (jax.lax.bitcast_convert_type(x, wire) for x in (new, v))
        keep = done.reshape(done.shape + (1,) * (v.ndim - 1))
        return jnp.where(keep, new, v)

    return jax.tree.map(one, values), num_done


def permute_members(
    values: PyTree,
    perms: jax.Array,
    *,
    axis_name: str | tuple[str, ...] | None = None,
    valid: jax.Array | None = None,
    capacity: int | None = None,
) -> tuple[PyTree, jax.Array]:
    r"""Permutes selected values across members, one permutation per item.

    For every item :math:`f` (a selected coordinate) member :math:`i` receives
    the value of member :math:`\pi_f(i)`:

    .. math::
      v'_{i, f} = v_{\pi_f(i), f}, \qquad \pi_f = \texttt{perms[f]} .

    The same ``perms`` must be given to every member and device (derive them
    from one shared key). Three backends, same numbers:

    * stacked, unsharded: a local gather over the member axis;
    * stacked with the member axis split over an explicit mesh (as
      ``jax.typeof`` shows it under ``jax.jit``): ``jax.shard_map`` over the
      mesh axes, then the named backend with the local members vmapped;
    * named (``axis_name`` given, inside ``vmap``/``shard_map``/``pmap``; a
      tuple of names spans several mapped axes): each member sends each value
      to its receiver through one ``all_to_all`` with ``capacity`` slots per
      pair of members. Only selected values travel, never the whole tensor.

    The exchange buffers have a static size, so in the named and sharded
    backends the items from the first one that does not fit on (ordered by
    index) may be left unmoved; ``num_done`` says where that happened (the
    number of items of ``values``, ``K``, when everything moved, which fails
    with probability below ``1e-9`` at the default ``capacity``).

    Args:
      values: a pytree whose leaves are ``(M, K, ...)`` (stacked mode) or
        ``(K, ...)`` (named mode); item ``f`` of every leaf moves together.
      perms: ``(K, M)`` integer permutations, shared by every member.
      axis_name: ``None`` (stacked mode) or the mapped member axis name(s).
      valid: optional ``(K,)`` boolean mask; invalid items are neither sent
        nor counted against the capacity (their outputs are unspecified in
        stacked mode and unchanged in named mode).
      capacity: slots per pair of members in the named backend; by default a
        bound on ``Binomial(K, 1/M)`` exceeded with probability ``<= 1e-9``.

    Returns:
      ``(permuted values, num_done)``; ``num_done`` is an int32 scalar,
      identical on every member.

    Examples:
      >>> import jax.numpy as jnp
      >>> from optax_wa._permute import permute_members
      >>> v = jnp.array([[1.0, 2.0], [10.0, 20.0]])   # 2 members, 2 items
      >>> perms = jnp.array([[1, 0], [0, 1]])           # swap item 0, keep item 1
      >>> new, done = permute_members(v, perms)
      >>> new
      Array([[10.,  2.],
             [ 1., 20.]], dtype=float32)
    """
    perms = jnp.asarray(perms, jnp.int32)
    if perms.ndim != 2:
        raise ValueError(
            f"permute_members: perms must be (K, M), got shape {perms.shape}."
        )
    num_items, size = perms.shape
    valid = jnp.ones((num_items,), bool) if valid is None else jnp.asarray(valid, bool)
    if capacity is None:
        capacity = _numerics.count_upper_bound(num_items / size, num_items)
    capacity = max(int(capacity), 1)

    if axis_name is not None:
        return _permute_named(values, perms, valid, axis_name, capacity)

    leaves = jax.tree.leaves(values)
    if not leaves:
        return values, jnp.asarray(num_items, jnp.int32)
    for leaf in leaves:
        if leaf.shape[:2] != (size, num_items):
            raise ValueError(
                "permute_members: stacked values must be (M, K, ...) = "
                f"({size}, {num_items}, ...), got {leaf.shape}."
            )
    placement = explicit_member_axes(leaves[0])
    if placement is None:
        items = jnp.arange(num_items)
        return (
            jax.tree.map(lambda v: v[perms.T, items], values),
            jnp.asarray(num_items, jnp.int32),
        )

    mesh, axes = placement
    local = "_members_local"

    def body(v, perms, valid):
        named = lambda x: _permute_named(x, perms, valid, (*axes, local), capacity)
        new, done = jax.vmap(named, axis_name=local)(v)
        return new, done[0]

    spec = jax.tree.map(lambda _: P(axes if len(axes) > 1 else axes[0]), values)
    return jax.shard_map(
        body,
        mesh=mesh,
        in_specs=(spec, P(), P()),
        out_specs=(spec, P()),
        check_vma=False,
    )(values, perms, valid)
