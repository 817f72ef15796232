r"""Permutation specs: which group acts on each axis, and applying permutations.

A :class:`PermutationSpec` records, for every leaf of a parameter tree, which
*permutation group* acts on each of its axes; a *permutation* is a dict
``{group: indices}`` with ``indices`` of shape ``(n,)``. Applying it takes
``jnp.take(leaf, indices, axis)`` along every axis that carries the group::

    permuted[..., i, ...] = leaf[..., perms[group][i], ...]

so unit ``i`` of the result is unit ``perms[group][i]`` of the input.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from optax_wa._checks import is_traced
from optax_wa.permutation._axes import (
    SubAxes,
    expand,
    named_leaves,
    path_str,
    permute_view,
    view_shape,
)

__all__ = [
    "PermutationSpec",
    "SubAxes",
    "apply_permutation",
    "compose",
    "identity_permutation",
    "invert",
    "random_permutation",
    "validate",
]

PyTree = Any
Perms = dict[str, jax.Array]

# --------------------------------------------------------------------------
# The spec
# --------------------------------------------------------------------------


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class PermutationSpec:
    """Which permutation group acts on each axis of each leaf.

    The spec is hashable and registered as a static pytree node, so it can be
    passed to a ``jax.jit``-compiled function as an ordinary argument.

    Attributes:
      axes: ``{leaf path: (group or None, ...)}``, one entry per axis of the
        leaf (``None``: the axis is not permuted; a :class:`SubAxes`: the
        axis is split into sub-axes with their own groups). Leaf paths join
        the tree's keys with ``/``. Given as a mapping; stored as a sorted
        tuple of pairs.
      batch_stats: paths of the leaves that hold batch statistics (running
        BatchNorm mean and variance). They are permuted like any leaf by
        :func:`apply_permutation`, but learning transfer refuses to transfer
        them (they are recomputed instead).

    Examples:
      >>> from optax_wa.permutation import PermutationSpec
      >>> spec = PermutationSpec({
      ...     "fc1/kernel": (None, "hidden"), "fc1/bias": ("hidden",),
      ...     "fc2/kernel": ("hidden", None), "fc2/bias": (None,)})
      >>> spec.groups["hidden"]
      (('fc1/bias', 0), ('fc1/kernel', 1), ('fc2/kernel', 0))
    """

    axes: Any
    batch_stats: Any = frozenset()

    def __post_init__(self):
        items = self.axes.items() if isinstance(self.axes, Mapping) else self.axes
        normalized = []
        for leaf, groups in items:
            if isinstance(leaf, tuple):
                leaf = "/".join(str(k) for k in leaf)
            if not isinstance(leaf, str):
                raise TypeError(
                    f"PermutationSpec: leaf paths must be str, got {leaf!r}."
                )
            if isinstance(groups, str) or not isinstance(groups, Sequence):
                raise TypeError(
                    f"PermutationSpec: leaf {leaf!r} needs a tuple with one group "
                    f"(or None) per axis, got {groups!r}."
                )
            groups = tuple(groups)
            for axis, g in enumerate(groups):
                if g is not None and not isinstance(g, (str, SubAxes)):
                    raise TypeError(
                        f"PermutationSpec: leaf {leaf!r} axis {axis}: a group is a "
                        f"str, a SubAxes or None, got {g!r}."
                    )
            seen = [g for g in expand(groups) if g is not None]
            if len(seen) != len(set(seen)):
                raise ValueError(
                    f"PermutationSpec: leaf {leaf!r} carries one group on two axes "
                    f"{groups}; matching needs each group at most once per leaf."
                )
            normalized.append((leaf, groups))
        names = [leaf for leaf, _ in normalized]
        if len(names) != len(set(names)):
            raise ValueError("PermutationSpec: a leaf path appears twice.")
        object.__setattr__(self, "axes", tuple(sorted(normalized)))
        object.__setattr__(self, "batch_stats", frozenset(self.batch_stats))
        unknown = sorted(self.batch_stats - set(names))
        if unknown:
            raise ValueError(
                f"PermutationSpec: batch_stats names leaves missing from axes: {unknown}."
            )

    @functools.cached_property
    def leaf_axes(self) -> dict[str, tuple]:
        """``{leaf path: entry per axis}``."""
        return dict(self.axes)

    @functools.cached_property
    def groups(self) -> dict[str, tuple[tuple[str, int], ...]]:
        """``{group: ((leaf path, view axis), ...)}``, groups and leaves sorted.

        The view axis indexes the leaf's axes with every :class:`SubAxes`
        expanded in place (the plain axis index when there is none).
        """
        out: dict[str, list[tuple[str, int]]] = {}
        for leaf, entry in self.axes:
            for axis, g in enumerate(expand(entry)):
                if g is not None:
                    out.setdefault(g, []).append((leaf, axis))
        return {g: tuple(out[g]) for g in sorted(out)}

    def __repr__(self) -> str:
        lines = [f"  {leaf!r}: {groups}," for leaf, groups in self.axes]
        return "PermutationSpec({\n" + "\n".join(lines) + "\n})"


def validate(
    spec: PermutationSpec, tree: PyTree, perms: Mapping[str, Any] | None = None
) -> dict[str, int]:
    """Checks that ``spec`` describes ``tree`` and returns the group sizes.

    ``tree`` may be a sub-tree of the one the spec was built for (e.g. the
    params without the batch statistics); every leaf of it must be in the
    spec with one entry per axis, and all axes of a group must have one size.
    Only shapes are read, so this works on tracers and ``ShapeDtypeStruct``.

    With ``perms``, also checks that it holds one permutation of
    ``0..n-1`` for every group of ``tree`` and names no other group (the
    values are checked where they are concrete; under ``jit`` only shapes).

    Args:
      spec: the permutation spec.
      tree: a pytree of arrays.
      perms: optional ``{group: indices}`` to check against ``tree``.

    Returns:
      ``{group: size}`` for the groups that occur in ``tree``.

    Raises:
      ValueError: naming the leaf and axis at fault.
    """
    if not isinstance(spec, PermutationSpec):
        raise TypeError(
            f"validate: expected a PermutationSpec, got {type(spec).__name__}."
        )
    axes = spec.leaf_axes
    sizes: dict[str, int] = {}
    source: dict[str, tuple[str, int]] = {}
    for leaf, x in named_leaves(tree).items():
        if leaf not in axes:
            raise ValueError(
                f"leaf {leaf!r} of the tree is not in the permutation spec "
                f"(a spec leaf that is never permuted needs an entry of Nones)."
            )
        shape = np.shape(x)
        entry = axes[leaf]
        if len(entry) != len(shape):
            raise ValueError(
                f"leaf {leaf!r} has {len(shape)} axes (shape {tuple(shape)}) but the "
                f"spec lists {len(entry)}: {entry}."
            )
        view = view_shape(leaf, shape, entry)
        for axis, g in enumerate(expand(entry)):
            if g is None:
                continue
            n = int(view[axis])
            if g not in sizes:
                sizes[g], source[g] = n, (leaf, axis)
            elif sizes[g] != n:
                first, first_axis = source[g]
                raise ValueError(
                    f"group {g!r} has size {sizes[g]} at leaf {first!r} axis "
                    f"{first_axis} but size {n} at leaf {leaf!r} axis {axis}."
                )
    sizes = {g: sizes[g] for g in sorted(sizes)}
    if perms is not None:
        _check_perms(spec, perms, sizes)
    return sizes


def _check_perms(spec: PermutationSpec, perms: Mapping[str, Any], sizes):
    if not isinstance(perms, Mapping):
        raise TypeError(
            f"perms must be a dict {{group: indices}}, got {type(perms).__name__}."
        )
    unknown = sorted(set(perms) - set(spec.groups))
    if unknown:
        raise ValueError(f"perms names groups that are not in the spec: {unknown}.")
    for g, n in sizes.items():
        if g not in perms:
            raise ValueError(f"perms has no entry for group {g!r} (size {n}).")
        shape = np.shape(perms[g])
        if shape != (n,):
            raise ValueError(f"perms[{g!r}] has shape {shape}; the group has size {n}.")
        p = perms[g]
        if not is_traced(p):
            if not np.array_equal(np.sort(np.asarray(p)), np.arange(n)):
                raise ValueError(f"perms[{g!r}] is not a permutation of 0..{n - 1}.")


# --------------------------------------------------------------------------
# Permutations
# --------------------------------------------------------------------------


def identity_permutation(spec: PermutationSpec, tree: PyTree) -> Perms:
    """The identity ``{group: arange(n)}`` for the groups of ``tree``."""
    return {g: jnp.arange(n) for g, n in validate(spec, tree).items()}


def random_permutation(key: jax.Array, spec: PermutationSpec, tree: PyTree) -> Perms:
    """A uniformly random permutation of every group of ``tree``.

    Args:
      key: a PRNG key; groups get keys split in sorted group order.
      spec: the permutation spec.
      tree: the tree whose groups to permute.

    Returns:
      ``{group: indices}``.
    """
    sizes = validate(spec, tree)
    keys = jax.random.split(key, max(len(sizes), 1))
    return {g: jax.random.permutation(k, n) for k, (g, n) in zip(keys, sizes.items())}


def _permute_leaf(leaf, x, entry, perms):
    groups = expand(entry)
    if all(g is None for g in groups):
        return x
    view = x.reshape(view_shape(leaf, x.shape, entry))
    return permute_view(view, groups, perms).reshape(x.shape)


def apply_permutation(
    spec: PermutationSpec, perms: Mapping[str, Any], tree: PyTree
) -> PyTree:
    r"""Permutes every leaf of ``tree`` along the axes the spec assigns.

    .. math::
      \pi(\theta)_{\ell}[\ldots, i, \ldots] =
      \theta_{\ell}[\ldots, \pi_g(i), \ldots]
      \quad\text{for every axis of leaf } \ell \text{ that carries group } g.

    Jittable (``spec`` is static); the tree keeps its structure and dtypes.

    Args:
      spec: the permutation spec.
      perms: ``{group: indices}`` for every group that occurs in ``tree``.
      tree: params, gradients or batch statistics (any sub-tree of the spec).

    Returns:
      The permuted tree.

    Examples:
      >>> import jax.numpy as jnp
      >>> from optax_wa.permutation import PermutationSpec, apply_permutation
      >>> spec = PermutationSpec({"w": (None, "h"), "b": ("h",)})
      >>> tree = {"w": jnp.array([[1.0, 2.0, 3.0]]), "b": jnp.array([10.0, 20.0, 30.0])}
      >>> out = apply_permutation(spec, {"h": jnp.array([2, 0, 1])}, tree)
      >>> out["b"]
      Array([30., 10., 20.], dtype=float32)

    References:
      Ainsworth, Hayase and Srinivasa, `Git Re-Basin: Merging Models modulo
      Permutation Symmetries <https://arxiv.org/abs/2209.04836>`_, ICLR 2023
    """
    validate(spec, tree, perms)
    axes = spec.leaf_axes

    def permute(path, x):
        leaf = path_str(path)
        return _permute_leaf(leaf, jnp.asarray(x), axes[leaf], perms)

    return jax.tree_util.tree_map_with_path(permute, tree)


def invert(perms: Mapping[str, Any]) -> Perms:
    r"""The inverse permutation: ``apply(invert(p), apply(p, x)) == x``.

    .. math:: \pi^{-1}_g = \operatorname{argsort}(\pi_g)

    Args:
      perms: ``{group: indices}``.

    Returns:
      ``{group: indices}`` of the inverse.
    """
    return {g: jnp.argsort(jnp.asarray(p)) for g, p in perms.items()}


def compose(outer: Mapping[str, Any], inner: Mapping[str, Any]) -> Perms:
    r"""The permutation that applies ``inner`` first, then ``outer``.

    .. math:: (\pi_{\text{outer}} \circ \pi_{\text{inner}})_g(i) =
      \pi_{\text{inner}, g}\big(\pi_{\text{outer}, g}(i)\big)

    so ``apply(compose(o, i), x) == apply(o, apply(i, x))``.

    Args:
      outer: ``{group: indices}`` applied second.
      inner: ``{group: indices}`` applied first, with the same groups.

    Returns:
      ``{group: indices}``.
    """
    if set(outer) != set(inner):
        raise ValueError(
            f"compose: the two permutations have different groups: "
            f"{sorted(set(outer) ^ set(inner))}."
        )
    return {g: jnp.asarray(inner[g])[jnp.asarray(outer[g])] for g in outer}
