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
:func:`reduced_member_mean`, :func:`average_members`, :func:`pull_to_mean`,
:func:`pair_mean`) take ``axis_name`` and pick the backend, so each method is
written once. Member means accumulate in float32 (or wider) and refuse
integer leaves, whose mean would be truncated.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from optax_wa._checks import leaf_name, require_floating
from optax_wa._mapping import map_members
from optax_wa._member_axis import UNROLL_LIMIT
from optax_wa._numerics import accumulation_dtype

__all__ = [
    "average_members",
    "broadcast_to_members",
    "init_members",
    "interpolate",
    "map_members",
    "member_mean",
    "member_sharding",
    "num_members",
    "pair_mean",
    "per_member",
    "pull_to_mean",
    "reduced_member_mean",
    "shard_members",
    "stack",
    "unstack",
]

PyTree = Any


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
                f"num_members: leaf {leaf_name(path)} is a scalar; every leaf of "
                "a stacked ensemble needs a leading member axis."
            )
        sizes.setdefault(shape[0], leaf_name(path))
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
        raise ValueError(
            f"init_members: num_members must be an int >= 1, got {num_members!r}."
        )
    if same_init:
        keys = jnp.stack([key] * num_members)
    else:
        keys = jax.random.split(key, num_members)
    return jax.vmap(init_fn)(keys)


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
    # The unrolled form reads each member once and keeps one running sum: the
    # same M - 1 float32 additions as the reduction, in member order, so the
    # two forms differ only in the order of the additions (an XLA reduction
    # may pair them as a tree). Written in lax, not jnp: a jnp operator is a
    # jitted function, traced again for every new shape, which for a model
    # of hundreds of tensors is seconds of tracing per compile.
    acc_dtype = accumulation_dtype(x.dtype)
    size = x.shape[0]
    if size > UNROLL_LIMIT or _member_axis_is_sharded(x):
        return jnp.sum(x.astype(acc_dtype), axis=0)
    members = [
        jax.lax.convert_element_type(
            jax.lax.index_in_dim(x, i, keepdims=False), acc_dtype
        )
        for i in range(size)
    ]
    acc = members[0]
    for member in members[1:]:
        acc = jax.lax.add(acc, member)
    return acc


def _reduced_mean_leaf(x: jax.Array, axis_name: str | None) -> jax.Array:
    """Member mean of one leaf in accumulation precision, without a member axis
    in stacked mode (``x.shape[1:]``); ``lax.pmean`` in named mode."""
    acc = jax.lax.convert_element_type(x, accumulation_dtype(x.dtype))
    if axis_name is not None:
        return jax.lax.pmean(acc, axis_name)
    return jax.lax.div(_sum_over_members(acc), jnp.asarray(x.shape[0], acc.dtype))


def reduced_member_mean(tree: PyTree, axis_name: str | None = None) -> PyTree:
    """The member mean as one model, in accumulation precision (float32 or wider).

    The building block of the averaging methods: stacked mode returns one model
    without the member axis (``leaf.shape[1:]``), so a caller that only
    sometimes needs the mean (inside a ``lax.cond``) moves ``1/M`` of the
    ensemble's values; named mode is ``lax.pmean`` over ``axis_name``.
    Broadcast back with :func:`broadcast_to_members`. :func:`average_members` is
    the same mean in each leaf's own dtype.

    Args:
      tree: a stacked ensemble (stacked mode) or one member (named mode), with
        floating-point leaves.
      axis_name: ``None`` for stacked mode, else the mapped axis name.

    Returns:
      The mean, each leaf in ``promote_types(leaf.dtype, float32)``.

    Raises:
      TypeError: if a leaf is not floating point.

    Examples:
      >>> import jax.numpy as jnp
      >>> from optax_wa import members
      >>> tree = {"w": jnp.array([[1.0, 2.0], [3.0, 6.0]], jnp.bfloat16)}
      >>> members.reduced_member_mean(tree)["w"]
      Array([2., 4.], dtype=float32)
    """
    require_floating("reduced_member_mean", tree)
    if axis_name is None:
        num_members(tree)  # a clear error for a missing or empty member axis
    return jax.tree.map(lambda x: _reduced_mean_leaf(x, axis_name), tree)


def average_members(tree: PyTree, axis_name: str | None = None) -> PyTree:
    """The uniform average of the members (a "soup"): one single model.

    :func:`reduced_member_mean` (float32 accumulation) cast back to each leaf's
    dtype. Use it to evaluate or export the averaged model.

    Args:
      tree: a stacked ensemble (stacked mode) or one member (named mode), with
        floating-point leaves.
      axis_name: ``None`` for stacked mode, else the mapped axis name.

    Returns:
      One model (stacked mode: every leaf without its member axis).

    Raises:
      TypeError: if a leaf is not floating point.

    Examples:
      >>> import jax.numpy as jnp
      >>> from optax_wa import members
      >>> members.average_members({"w": jnp.array([[1.0, 2.0], [3.0, 6.0]])})["w"]
      Array([2., 4.], dtype=float32)
    """
    require_floating("average_members", tree)
    if axis_name is None:
        num_members(tree)
    return jax.tree.map(
        lambda x: _reduced_mean_leaf(x, axis_name).astype(x.dtype), tree
    )


def broadcast_to_members(
    mean: jax.Array, like: jax.Array, axis_name: str | None = None
) -> jax.Array:
    """Broadcasts a reduced member mean back over ``like``'s member axis.

    Identity in named mode. Keeps ``like``'s split of the member axis under an
    explicit mesh.
    """
    if axis_name is not None:
        return mean
    out = jnp.broadcast_to(mean, like.shape)
    if _member_axis_is_sharded(like):
        out = jax.sharding.reshard(out, jax.typeof(like).sharding.spec)
    return out


def _mean_leaf(x: jax.Array, axis_name: str | None) -> jax.Array:
    """Member mean of one leaf in accumulation precision (broadcast in stacked mode)."""
    return broadcast_to_members(_reduced_mean_leaf(x, axis_name), x, axis_name)


def member_mean(tree: PyTree, axis_name: str | None = None) -> PyTree:
    """The member mean, shaped like the input: every member replaced by the mean.

    In stacked mode the mean is broadcast back over the member axis; in named
    mode it is ``lax.pmean`` over ``axis_name``. Accumulates in float32 and
    rounds once to each leaf's dtype.

    Args:
      tree: a stacked ensemble (stacked mode) or one member (named mode), with
        floating-point leaves.
      axis_name: ``None`` for stacked mode, else the mapped axis name.

    Returns:
      A tree like ``tree`` whose every member holds the mean.

    Raises:
      TypeError: if a leaf is not floating point.
      ValueError: in stacked mode, if the member axis is missing, empty or
        differs between leaves.
    """
    require_floating("member_mean", tree)
    if axis_name is None:
        num_members(tree)  # a clear error for a missing or empty member axis
    return jax.tree.map(lambda x: _mean_leaf(x, axis_name).astype(x.dtype), tree)


def interpolate(a: PyTree, b: PyTree, alpha: jax.typing.ArrayLike) -> PyTree:
    """``alpha * a + (1 - alpha) * b`` leafwise, in float32, cast to ``a``'s dtypes.

    The building block of exponential moving averages (``a`` the average, ``b``
    the new value) and of PAPA's pull toward the mean.
    """

    def one(x, y):
        acc = accumulation_dtype(x.dtype)
        al = jnp.asarray(alpha, acc)
        return (al * x.astype(acc) + (1 - al) * y.astype(acc)).astype(x.dtype)

    return jax.tree.map(one, a, b)


def pull_to_mean(
    tree: PyTree, alpha: jax.typing.ArrayLike, axis_name: str | None = None
) -> PyTree:
    r"""Pulls every member toward the member mean.

    .. math::
      w_i \leftarrow \alpha\, w_i + (1 - \alpha)\, \bar w, \qquad
      \bar w = \tfrac{1}{M} \textstyle\sum_j w_j .

    ``alpha = 1`` is the identity, ``alpha = 0`` replaces every member by the
    mean (as :func:`member_mean`). The mean of the members is unchanged.

    Args:
      tree: a stacked ensemble (stacked mode) or one member (named mode), with
        floating-point leaves.
      alpha: a scalar in ``[0, 1]`` (may be a traced array, e.g. from
        :func:`optax_wa.sync_weight`).
      axis_name: ``None`` for stacked mode, else the mapped axis name.

    Raises:
      TypeError: if a leaf is not floating point.
    """
    require_floating("pull_to_mean", tree)
    # The pull keeps the mean and shrinks each member's offset from it by
    # alpha: (1/M) sum_i (a w_i + (1 - a) m) = m, and (a w_i + (1 - a) m) - m
    # = a (w_i - m). The mean m is formed in float32 (_mean_leaf) and the
    # interpolation too (interpolate), so each leaf is rounded once at the end.
    return jax.tree.map(lambda x: interpolate(x, _mean_leaf(x, axis_name), alpha), tree)


def pair_mean(tree: PyTree, pairs: jax.Array, axis_name: str | None = None) -> PyTree:
    r"""Replaces member ``i`` by the mean of members ``pairs[i, 0]`` and ``pairs[i, 1]``.

    .. math::
      w_i \leftarrow \tfrac12 \big(w_{a_i} + w_{b_i}\big)

    PAPA-2's recombination (:func:`optax_wa.papa` with ``combine="pair_half"``
    draws the pairs). Computed in float32 and rounded once to each leaf's dtype.
    In named mode every member gathers the ensemble (``lax.all_gather``) and
    picks its pair by ``lax.axis_index``; in stacked mode with the member axis
    split over an explicit mesh axis the ensemble is gathered too, then split
    again.

    Args:
      tree: a stacked ensemble (stacked mode) or one member (named mode), with
        floating-point leaves.
      pairs: an int array of shape ``(M, 2)`` of member indices (may be traced).
      axis_name: ``None`` for stacked mode, else the mapped axis name.

    Raises:
      TypeError: if a leaf is not floating point.

    Examples:
      >>> import jax.numpy as jnp
      >>> from optax_wa import members
      >>> tree = {"w": jnp.array([0.0, 2.0, 6.0])}
      >>> members.pair_mean(tree, jnp.array([[0, 1], [1, 2], [0, 2]]))["w"]
      Array([1., 4., 3.], dtype=float32)
    """
    require_floating("pair_mean", tree)
    pairs = jnp.asarray(pairs)

    # The pairs are traced (PAPA-2 draws them each sync), so the member a device
    # reads from is unknown when compiling: a ppermute needs a static
    # source-target table, and the one collective that serves a traced index
    # is a gather of all members (M times one model per device), then a
    # local pick. With the member axis split over an explicit mesh the same
    # holds in stacked mode: gather, mix, split again. a + b of two bfloat16
    # (float16) values is exact in float32 when their exponents differ by at
    # most 16 (13), and halving is exact, so the result is rounded once.
    def one(x):
        acc = x.astype(accumulation_dtype(x.dtype))
        if axis_name is None:
            spec = jax.typeof(x).sharding.spec if _member_axis_is_sharded(x) else None
            if spec is not None:  # gather the members, mix, split them again
                acc = jax.sharding.reshard(acc, P())
            a, b = acc[pairs[:, 0]], acc[pairs[:, 1]]
            if spec is not None:
                return jax.sharding.reshard((0.5 * (a + b)).astype(x.dtype), spec)
        else:
            everyone = jax.lax.all_gather(acc, axis_name)
            a, b = (everyone[pairs[jax.lax.axis_index(axis_name), j]] for j in (0, 1))
        return (0.5 * (a + b)).astype(x.dtype)

    return jax.tree.map(one, tree)


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
        if not jax.tree.leaves(params):
            # Nothing to map over (an empty tree, or the placeholder that
            # ``optax.tree_utils.tree_map_params`` passes to read the state's
            # structure): the inner state's structure is all there is.
            return inner.init(params)
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
