"""Mapping a per-member function over the member axis: ``map_members``.

One vmapped program, or the members one after another (``"sequential"``),
with the member axis split over a mesh handled per device. Re-exported by
``optax_wa.members``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from optax_wa._member_axis import UNROLL_LIMIT, explicit_member_axes

__all__ = ["map_members"]

PyTree = Any

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
        # On CPU, unrolled up to UNROLL_LIMIT members: XLA:CPU runs a
        # convolution in a ``while`` body (``jax.lax.map``) about 15x slower than
        # in straight code (benchmarks/README.md, "Mapping members"). Elsewhere
        # a rolled loop, which holds one member's temporaries at a time.
        size = mapped[0].shape[0]
        unroll = jax.default_backend() == "cpu" and size <= UNROLL_LIMIT
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
      cpu        2.46x       0.86x       1.00x         ``"sequential"``
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
