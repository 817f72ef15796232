"""The member axis: ensembles as one pytree with a leading member dimension.

An ensemble of ``M`` members is one pytree whose every leaf carries the member
index on a leading axis: ``leaf.shape == (M, *member_leaf_shape)``. Every
ensemble transformation of the library works in two execution modes and gives
the same numbers in both:

* **stacked mode** (``axis_name=None``): functions receive the stacked tree;
  cross-member operations reduce over the leading axis. Works unsharded and
  under :func:`jax.jit` with the member axis sharded over a mesh axis.
* **named mode** (``axis_name="members"``): functions see one member; the
  caller maps members with ``jax.vmap(..., axis_name=...)``, ``jax.shard_map``
  or ``jax.pmap`` and cross-member operations are collectives over that name.

The cross-member operations of this module (:func:`member_mean`,
:func:`pull_to_mean`, :func:`apply_and_mean`) take ``axis_name`` and pick the
backend, so each method is written once.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

PyTree = Any

# Above this many members the unrolled sum is replaced by a reduction.
_UNROLL_LIMIT = 32


def _path_str(path) -> str:
    return jax.tree_util.keystr(path) or "<root>"


def num_members(tree: PyTree) -> int:
    """Returns the size of the leading member axis shared by every leaf.

    Args:
      tree: a stacked ensemble pytree (arrays or ``jax.ShapeDtypeStruct``).

    Returns:
      The number of members ``M``.

    Raises:
      ValueError: if the tree has no leaves, a leaf is a scalar, the leaves
        disagree on the size of their leading axis, or that size is 0.

    Examples:
      >>> import jax.numpy as jnp
      >>> from optax_wa import members
      >>> members.num_members({"w": jnp.zeros((3, 2, 2)), "b": jnp.zeros((3, 2))})
      3
    """
    leaves = jax.tree_util.tree_leaves_with_path(tree)
    if not leaves:
        raise ValueError("num_members: the tree has no leaves.")
    sizes: dict[int, str] = {}
    for path, leaf in leaves:
        shape = jnp.shape(leaf)
        if len(shape) == 0:
            raise ValueError(
                f"num_members: leaf {_path_str(path)} is a scalar; every leaf of "
                "a stacked ensemble needs a leading member axis."
            )
        sizes.setdefault(shape[0], _path_str(path))
    if len(sizes) > 1:
        described = ", ".join(f"{name} has {size}" for size, name in sizes.items())
        raise ValueError(
            "num_members: leaves disagree on the size of the leading member axis "
            f"({described})."
        )
    (size,) = sizes
    if size == 0:
        raise ValueError("num_members: the member axis has size 0; need >= 1 member.")
    return size


def stack(trees: Sequence[PyTree]) -> PyTree:
    """Stacks single-model pytrees into one ensemble with a leading member axis.

    Args:
      trees: a non-empty sequence of pytrees with identical structure and
        leaf shapes.

    Returns:
      The stacked tree, ``leaf.shape == (len(trees), *shape)``.

    Examples:
      >>> import jax.numpy as jnp
      >>> from optax_wa import members
      >>> stacked = members.stack([{"w": jnp.ones(2)}, {"w": jnp.zeros(2)}])
      >>> stacked["w"].shape
      (2, 2)
    """
    trees = list(trees)
    if not trees:
        raise ValueError("stack: need at least one tree (got an empty sequence).")
    first = jax.tree.structure(trees[0])
    for i, tree in enumerate(trees[1:], start=1):
        if jax.tree.structure(tree) != first:
            raise ValueError(
                f"stack: tree {i} has structure {jax.tree.structure(tree)}, "
                f"tree 0 has {first}."
            )
    return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def unstack(tree: PyTree) -> list[PyTree]:
    """Splits a stacked ensemble into a list of single-model pytrees."""
    size = num_members(tree)
    return [jax.tree.map(lambda x, i=i: x[i], tree) for i in range(size)]


def init_members(
    init_fn: Callable[[jax.Array], PyTree],
    key: jax.Array,
    num_members: int,
    *,
    same_init: bool = False,
) -> PyTree:
    """Initializes ``num_members`` members with ``jax.vmap(init_fn)``.

    Args:
      init_fn: ``key -> params`` for one member.
      key: a PRNG key.
      num_members: the number of members, ``>= 1``.
      same_init: if True, every member starts from the same point (one key,
        as Lookaround and PAPA-all prescribe); otherwise each member gets its
        own key from ``jax.random.split(key, num_members)``.

    Returns:
      The stacked ensemble.

    Examples:
      >>> import jax
      >>> from optax_wa import members
      >>> init = lambda k: {"w": jax.random.normal(k, (4,))}
      >>> members.init_members(init, jax.random.key(0), 3)["w"].shape
      (3, 4)
    """
    if not isinstance(num_members, int) or num_members < 1:
        raise ValueError(f"init_members: num_members must be an int >= 1, got {num_members!r}.")
    if same_init:
        keys = jnp.stack([key] * num_members)
    else:
        keys = jax.random.split(key, num_members)
    return jax.vmap(init_fn)(keys)


def _accumulation_dtype(dtype):
    return jnp.promote_types(dtype, jnp.float32)


def _member_axis_is_sharded(x: jax.Array) -> bool:
    """Whether the leading axis is sharded over an explicit mesh axis."""
    try:
        spec = jax.typeof(x).sharding.spec
    except (AttributeError, TypeError):
        return False
    return len(spec) > 0 and spec[0] is not None


def _explicit_member_axis(tree: PyTree):
    """The explicit mesh axis (or axes) the leading axis of ``tree`` is split over."""
    for leaf in jax.tree.leaves(tree):
        if _member_axis_is_sharded(leaf):
            return jax.typeof(leaf).sharding.spec[0]
    return None


def _follow_member_sharding(tree: PyTree, like: PyTree) -> PyTree:
    """Splits the leading axis of every leaf of ``tree`` as ``like``'s is split.

    Under an explicit mesh, state made from scratch (step counters, zeros)
    would otherwise be replicated while params are split, and ``jax.vmap``
    over the member axis needs every operand split the same way.
    """
    axis = _explicit_member_axis(like)
    if axis is None:
        return tree
    return jax.tree.map(
        lambda x: x if _member_axis_is_sharded(x) else jax.sharding.reshard(x, P(axis)),
        tree,
    )


def _sum_over_members(x: jax.Array) -> jax.Array:
    """Sums over the leading axis in a form XLA fuses into one elementwise pass.

    ``x.sum(0)`` compiles to a slow reduction on XLA CPU for a short leading
    axis; an unrolled chain of adds fuses with its producers. When the member
    axis is sharded over an explicit mesh axis, a reduction is used instead
    (local partial sums, then one all-reduce).
    """
    acc_dtype = _accumulation_dtype(x.dtype)
    size = x.shape[0]
    if size > _UNROLL_LIMIT or _member_axis_is_sharded(x):
        return jnp.sum(x.astype(acc_dtype), axis=0)
    acc = x[0].astype(acc_dtype)
    for i in range(1, size):
        acc = acc + x[i].astype(acc_dtype)
    return acc


def average_members(tree: PyTree) -> PyTree:
    """The uniform average of the members (a "soup"): one single model.

    Accumulates in float32 (or wider) and returns each leaf in its dtype.

    Examples:
      >>> import jax.numpy as jnp
      >>> from optax_wa import members
      >>> members.average_members({"w": jnp.array([[1.0, 2.0], [3.0, 6.0]])})["w"]
      Array([2., 4.], dtype=float32)
    """
    size = num_members(tree)
    return jax.tree.map(lambda x: (_sum_over_members(x) / size).astype(x.dtype), tree)


def _mean_leaf(x: jax.Array, axis_name: str | None) -> jax.Array:
    """Member mean of one leaf in accumulation precision (broadcast in stacked mode)."""
    acc = x.astype(_accumulation_dtype(x.dtype))
    if axis_name is not None:
        return jax.lax.pmean(acc, axis_name)
    mean = jnp.broadcast_to(_sum_over_members(acc) / x.shape[0], x.shape)
    if _member_axis_is_sharded(x):
        mean = jax.sharding.reshard(mean, jax.typeof(x).sharding.spec)
    return mean


def member_mean(tree: PyTree, axis_name: str | None = None) -> PyTree:
    """The member mean, shaped like the input.

    In stacked mode the mean is broadcast back over the member axis; in named
    mode it is ``lax.pmean`` over ``axis_name``. Accumulates in float32.

    Args:
      tree: a stacked ensemble (stacked mode) or one member (named mode).
      axis_name: ``None`` for stacked mode, else the mapped axis name.

    Returns:
      A tree like ``tree`` whose every member holds the mean.
    """
    return jax.tree.map(lambda x: _mean_leaf(x, axis_name).astype(x.dtype), tree)


def interpolate(a: PyTree, b: PyTree, alpha) -> PyTree:
    """``alpha * a + (1 - alpha) * b`` leafwise, in float32, cast to ``a``'s dtypes.

    The building block of exponential moving averages (``a`` the average, ``b``
    the new value) and of PAPA's pull toward the mean.
    """

    def one(x, y):
        acc = _accumulation_dtype(x.dtype)
        al = jnp.asarray(alpha, acc)
        return (al * x.astype(acc) + (1 - al) * y.astype(acc)).astype(x.dtype)

    return jax.tree.map(one, a, b)


def pull_to_mean(tree: PyTree, alpha, axis_name: str | None = None) -> PyTree:
    r"""Pulls every member toward the member mean.

    .. math::
      w_i \leftarrow \alpha\, w_i + (1 - \alpha)\, \bar w, \qquad
      \bar w = \tfrac{1}{M} \textstyle\sum_j w_j .

    ``alpha = 1`` is the identity, ``alpha = 0`` replaces every member by the
    mean. The mean of the members is unchanged.

    Args:
      tree: a stacked ensemble (stacked mode) or one member (named mode).
      alpha: a scalar in ``[0, 1]`` (may be a traced array).
      axis_name: ``None`` for stacked mode, else the mapped axis name.
    """
    return jax.tree.map(
        lambda x: interpolate(x, _mean_leaf(x, axis_name), alpha), tree
    )


def apply_and_mean(params: PyTree, updates: PyTree, axis_name: str | None = None) -> PyTree:
    """Member mean of ``params + updates`` in one fused pass, shaped like ``params``."""

    def one(p, u):
        acc = _accumulation_dtype(p.dtype)
        return _mean_leaf(p.astype(acc) + u.astype(acc), axis_name)

    return jax.tree.map(one, params, updates)


def per_member(
    inner: optax.GradientTransformation, axis_name: str | None = None
) -> optax.GradientTransformationExtraArgs:
    """Applies ``inner`` to every member independently.

    In stacked mode ``init``/``update`` are vmapped over the leading member
    axis, so per-member non-elementwise transforms (global-norm clipping,
    SAM norms, schedule counters) never mix members. In named mode the caller
    already maps over members and ``inner`` is applied as is.

    Extra keyword arguments of ``update`` are passed to every member
    unchanged (shared by all members).
    """
    inner = optax.with_extra_args_support(inner)
    if axis_name is not None:
        return inner

    def init_fn(params):
        num_members(params)
        return _follow_member_sharding(jax.vmap(inner.init)(params), params)

    def update_fn(updates, state, params=None, **extra_args):
        if params is None:
            return jax.vmap(lambda u, s: inner.update(u, s, None, **extra_args))(
                updates, state
            )
        return jax.vmap(lambda u, s, p: inner.update(u, s, p, **extra_args))(
            updates, state, params
        )

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def member_sharding(mesh: Mesh, axis: str = "members") -> NamedSharding:
    """A ``NamedSharding`` splitting the leading (member) axis over ``axis``."""
    if axis not in mesh.axis_names:
        raise ValueError(
            f"member_sharding: axis {axis!r} is not an axis of the mesh "
            f"(axes: {mesh.axis_names})."
        )
    return NamedSharding(mesh, P(axis))


def shard_members(tree: PyTree, mesh: Mesh, axis: str = "members") -> PyTree:
    """Places a stacked ensemble with its member axis split over a mesh axis.

    Args:
      tree: a stacked ensemble.
      mesh: a ``jax.sharding.Mesh`` (e.g. from ``jax.make_mesh``).
      axis: the mesh axis that carries the members.

    Returns:
      The tree with every leaf placed as ``NamedSharding(mesh, P(axis))``.

    Raises:
      ValueError: if ``axis`` is not a mesh axis or the number of members is
        not a multiple of its size.
    """
    sharding = member_sharding(mesh, axis)
    size = num_members(tree)
    devices = mesh.shape[axis]
    if size % devices:
        raise ValueError(
            f"shard_members: {size} members cannot be split evenly over mesh axis "
            f"{axis!r} of size {devices}."
        )
    return jax.device_put(tree, sharding)
