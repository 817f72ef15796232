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
from optax_wa._numerics import accumulation_dtype
from optax_wa._sharding import explicit_member_axes

__all__ = [
    "average_members",
    "broadcast_to_members",
    "init_members",
    "interpolate",
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

# Above this many members the unrolled sum is replaced by a reduction.
_UNROLL_LIMIT = 32


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
    # may pair them as a tree).
    acc_dtype = accumulation_dtype(x.dtype)
    size = x.shape[0]
    if size > _UNROLL_LIMIT or _member_axis_is_sharded(x):
        return jnp.sum(x.astype(acc_dtype), axis=0)
    acc = jax.lax.index_in_dim(x, 0, keepdims=False).astype(acc_dtype)
    for i in range(1, size):
        acc = acc + jax.lax.index_in_dim(x, i, keepdims=False).astype(acc_dtype)
    return acc


def _reduced_mean_leaf(x: jax.Array, axis_name: str | None) -> jax.Array:
    """Member mean of one leaf in accumulation precision, without a member axis
    in stacked mode (``x.shape[1:]``); ``lax.pmean`` in named mode."""
    acc = x.astype(accumulation_dtype(x.dtype))
    if axis_name is not None:
        return jax.lax.pmean(acc, axis_name)
    return _sum_over_members(acc) / x.shape[0]


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


# ---------------------------------------------------------------------------
# Mapping a per-member function over the member axis.

_MAP_MODES = ("auto", "vmap", "sequential")

# The mode "auto" picks, per backend, measured with benchmarks/ensemble_step.py
# (table in the docstring of map_members); backends not listed use "vmap".
_AUTO_MODES = {"cpu": "sequential"}


def _leaf_axes(in_axes, args: tuple) -> list:
    """One entry per leaf of ``args``: the mapped axis (an int) or ``None``.

    ``in_axes`` is an int, ``None``, or a tuple with one entry per positional
    argument, each an int, ``None`` or a pytree prefix of the argument, as in
    :func:`jax.vmap`.
    """
    if isinstance(in_axes, list):
        in_axes = tuple(in_axes)
    if not isinstance(in_axes, tuple):
        in_axes = (in_axes,) * len(args)
    elif len(in_axes) != len(args):
        raise ValueError(
            f"map_members: in_axes has {len(in_axes)} entries for {len(args)} "
            "positional arguments."
        )
    axes: list = []
    for i, (prefix, arg) in enumerate(zip(in_axes, args)):

        def spread(ax, sub):
            if ax is not None and not isinstance(ax, int):
                raise TypeError(
                    f"map_members: in_axes entries must be int or None, got {ax!r}."
                )
            return [ax] * len(jax.tree.leaves(sub))

        try:
            per_leaf = jax.tree.map(spread, prefix, arg, is_leaf=lambda x: x is None)
        except ValueError as err:
            raise ValueError(
                f"map_members: in_axes entry {i} is not a prefix of argument {i}: {err}"
            ) from None
        for chunk in jax.tree.leaves(per_leaf, is_leaf=lambda x: isinstance(x, list)):
            axes.extend(chunk)
    return axes


def _map_local(
    fn: Callable, leaf_axes: list, args: tuple, treedef, sequential: bool
) -> PyTree:
    """Maps ``fn`` over the members, batched (``jax.vmap``) or one after another
    (``jax.lax.scan``). When the member axis is split over an explicit mesh,
    one ``shard_map`` over it: each device maps its own members and nothing is
    gathered (and a vmapped convolution, whose batching rule reshapes the
    member axis into the features, stays legal under sharding in types)."""
    leaves = jax.tree.leaves(args)
    mapped = [
        jnp.moveaxis(x, ax, 0) for x, ax in zip(leaves, leaf_axes) if ax is not None
    ]
    shared = [x for x, ax in zip(leaves, leaf_axes) if ax is None]

    def call(mapped_one, shared):
        mapped_it, shared_it = iter(mapped_one), iter(shared)
        full = [next(shared_it) if ax is None else next(mapped_it) for ax in leaf_axes]
        return fn(*jax.tree.unflatten(treedef, full))

    def loop(mapped, shared):
        if not sequential:
            return jax.vmap(lambda m: call(m, shared))(mapped)
        # On CPU, unrolled up to _UNROLL_LIMIT members: XLA:CPU runs a
        # convolution in a ``while`` body (``jax.lax.map``) about 15x slower than
        # in straight code (benchmarks/README.md, "Mapping members"). Elsewhere
        # a rolled loop, which holds one member's temporaries at a time.
        size = mapped[0].shape[0]
        unroll = jax.default_backend() == "cpu" and size <= _UNROLL_LIMIT
        _, out = jax.lax.scan(
            lambda carry, m: (carry, call(m, shared)), None, mapped, unroll=unroll
        )
        return out

    placement = None
    for x in mapped:
        placement = explicit_member_axes(x)
        if placement is not None:
            break
    if placement is None:
        return loop(mapped, shared)
    mesh, axes = placement
    spec = P(axes if len(axes) > 1 else axes[0])
    mapped = [jax.sharding.reshard(x, spec) for x in mapped]
    shared = [jax.sharding.reshard(x, P()) for x in shared]
    return jax.shard_map(
        loop,
        mesh=mesh,
        in_specs=(spec, P()),
        out_specs=spec,
        check_vma=False,
    )(mapped, shared)


def map_members(fn: Callable, in_axes: Any = 0, *, mode: str = "auto") -> Callable:
    r"""Maps a per-member function over the leading member axis, like ``jax.vmap``.

    ``map_members(fn)(*args)[m] == fn(*[a[m] for a in args])`` for every
    member ``m``, computed in one of two ways that give the same numbers:

    * ``"vmap"``: ``jax.vmap(fn, in_axes)``, one batched program for all
      members (a convolution becomes one grouped convolution); with the member
      axis split over an explicit mesh, each device vmaps its own members in
      a ``jax.shard_map`` (a bare vmapped convolution is refused there);
    * ``"sequential"``: a loop over the members (``jax.lax.scan``), one member
      after another, each a plain single-model program. On CPU the loop is
      unrolled up to 32 members (XLA:CPU runs a convolution in a ``while``
      body many times slower) and XLA may then overlap members' temporaries;
      elsewhere it is a rolled loop holding one member's temporaries at a time.
      When the member axis is split over an explicit mesh (as ``jax.typeof``
      shows under :func:`jax.jit`, e.g. after :func:`shard_members` under
      ``jax.set_mesh``), each device loops over its own members inside
      ``jax.shard_map``: nothing moves between devices. Over ``Auto`` mesh
      axes the split is invisible at trace time and XLA moves members
      between devices (same numbers, more traffic): prefer ``"vmap"`` there;
    * ``"auto"`` (default): the mode measured fastest for the default backend
      with ``benchmarks/ensemble_step.py`` (Lookaround step of a 94.5k-param
      CNN, 32x32x3 inputs, batch 64, 3 members, 2-core CPU; median time per
      head-step over one model's step, interleaved rounds):

      =========  ==========  ==========  ============  ================
      backend    vmap        sequential  single model  ``"auto"``
      =========  ==========  ==========  ============  ================
      cpu        2.31x       1.02x       1.00x         ``"sequential"``
      others     --          --          --            ``"vmap"``
      =========  ==========  ==========  ============  ================

      (peak memory of the compiled step: 345 / 279 / 101 MiB). Accelerators default to ``"vmap"``: one
      program fills the chip.

    Outputs carry the member axis first, as with ``jax.vmap``'s default
    ``out_axes=0`` (an output that does not depend on a mapped argument is
    repeated per member). Keyword arguments are mapped over their leading axis,
    as ``jax.vmap`` maps them. Composes with :func:`jax.jit`, :func:`jax.grad`
    and :func:`optax_wa.sam_value_and_grad` (inside ``fn``).

    Args:
      fn: the per-member function.
      in_axes: as in ``jax.vmap``: an int, ``None`` (not mapped: shared by
        every member, e.g. one batch for all), or a tuple with one entry per
        positional argument, each an int, ``None`` or a pytree prefix of the
        argument.
      mode: ``"auto"``, ``"vmap"`` or ``"sequential"``.

    Returns:
      The mapped function.

    Raises:
      ValueError: for an unknown ``mode``; at the first call, when ``in_axes``
        does not fit the arguments, maps none of them or the mapped axes
        disagree on the number of members.

    Examples:
      >>> import jax.numpy as jnp
      >>> from optax_wa import members
      >>> w = jnp.array([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])   # 3 members
      >>> x = jnp.array([1.0, -1.0])                            # one shared input
      >>> members.map_members(jnp.dot, in_axes=(0, None), mode="sequential")(w, x)
      Array([-1., -1., -1.], dtype=float32)
      >>> members.map_members(lambda w: w.sum(), mode="vmap")(w)
      Array([ 3.,  7., 11.], dtype=float32)
    """
    if mode not in _MAP_MODES:
        raise ValueError(
            f"map_members: mode must be one of {_MAP_MODES}, got {mode!r}."
        )

    def mapped(*args, **kwargs):
        chosen = mode
        if chosen == "auto":
            chosen = _AUTO_MODES.get(jax.default_backend(), "vmap")
        axes_arg = in_axes
        if kwargs:
            axes_arg = (
                tuple(in_axes)
                if isinstance(in_axes, (tuple, list))
                else (in_axes,) * len(args)
            )
        leaf_axes = _leaf_axes(axes_arg, args)
        leaves = jax.tree.leaves(args)
        sizes = {jnp.shape(x)[ax] for x, ax in zip(leaves, leaf_axes) if ax is not None}
        if kwargs:
            sizes |= {jnp.shape(x)[0] for x in jax.tree.leaves(kwargs)}
        if not sizes:
            raise ValueError(
                "map_members: in_axes maps no argument; at least one needs a "
                "member axis."
            )
        if len(sizes) > 1:
            raise ValueError(
                "map_members: the mapped axes disagree on the number of members "
                f"(sizes {sorted(sizes)}); check in_axes."
            )
        sequential = chosen == "sequential"
        if kwargs:
            names = tuple(kwargs)
            call = lambda *a: fn(*a[: len(args)], **dict(zip(names, a[len(args) :])))
            all_args = (*args, *kwargs.values())
            leaf_axes = leaf_axes + [0] * len(jax.tree.leaves(tuple(kwargs.values())))
            return _map_local(
                call, leaf_axes, all_args, jax.tree.structure(all_args), sequential
            )
        return _map_local(fn, leaf_axes, args, jax.tree.structure(args), sequential)

    return mapped


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
