r"""Permutation symmetry of hidden units: specs, application and matching.

A network computes the same function after its hidden units are permuted,
provided every array that reads or writes those units is permuted the same
way. A :class:`PermutationSpec` records, for every leaf of a parameter tree,
which *permutation group* acts on each of its axes; a *permutation* is a dict
``{group: indices}`` with ``indices`` of shape ``(n,)``. Applying it takes
``jnp.take(leaf, indices, axis)`` along every axis that carries the group::

    permuted[..., i, ...] = leaf[..., perms[group][i], ...]

so unit ``i`` of the result is unit ``perms[group][i]`` of the input.

Trees. Specs name leaves by their path with ``/`` between keys
(``"layers/0/kernel"``), so the same spec serves a pure dict, an
``nnx.State`` and any sub-tree of them. The recommended form is the pure dict
of a Flax NNX model's parameters and batch statistics::

    state = nnx.state(model, nnx.Any(nnx.Param, nnx.BatchStat)).to_pure_dict()

The builders (:func:`mlp_spec`, :func:`conv_spec`, :func:`resnet_spec`,
:func:`vit_block_spec`) take the model (or such a tree) and return a spec over
every leaf of it; a params-only tree (``nnx.split(model, nnx.Param, ...)``)
is a sub-tree and works with the same spec.

Matching. :func:`weight_matching` and :func:`gradient_matching` maximise
:math:`\sum_k \langle a_k, \pi(b_k)\rangle` over permutations by coordinate
descent over the groups, one linear assignment problem per group (Ainsworth
et al., 2023); the objective never decreases.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

PyTree = Any
Perms = dict[str, jax.Array]

_NORM_LEAVES = ("scale", "bias", "mean", "var")


# --------------------------------------------------------------------------
# Leaf paths
# --------------------------------------------------------------------------


def _key_str(entry) -> str:
    for attr in ("key", "idx", "name"):
        if hasattr(entry, attr):
            return str(getattr(entry, attr))
    return str(entry)


def _path_str(path) -> str:
    """``(DictKey('a'), SequenceKey(0), DictKey('kernel'))`` -> ``'a/0/kernel'``.

    A trailing ``.value`` (the array inside an ``nnx.Variable`` of an
    ``nnx.State``) is dropped, so a State and its pure dict share paths.
    """
    parts = list(path)
    if parts and isinstance(parts[-1], jax.tree_util.GetAttrKey):
        if parts[-1].name == "value":
            parts = parts[:-1]
    return "/".join(_key_str(p) for p in parts)


def _join(*parts: str) -> str:
    return "/".join(p.strip("/") for p in parts if p and p.strip("/"))


def _named_leaves(tree: PyTree) -> dict[str, Any]:
    """``{path: leaf}`` in tree order."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    out: dict[str, Any] = {}
    for path, leaf in flat:
        name = _path_str(path)
        if name in out:
            raise ValueError(f"two leaves of the tree share the path {name!r}.")
        out[name] = leaf
    return out


# --------------------------------------------------------------------------
# The spec
# --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SubAxes:
    """An axis viewed as several (row-major), each with its own group.

    For fused projections: the output axis of a fused QKV ``nnx.Linear``
    (size ``3 * heads * head_dim``, laid out as ``(3, heads, head_dim)``) is
    ``SubAxes((3, heads, head_dim), (None, "heads", None))``: whole heads
    move together inside each of the q, k and v blocks.

    Attributes:
      shape: sizes of the sub-axes; their product is the axis size.
      groups: one group (or ``None``) per sub-axis.
    """

    shape: tuple[int, ...]
    groups: tuple[str | None, ...]

    def __post_init__(self):
        object.__setattr__(self, "shape", tuple(int(n) for n in self.shape))
        object.__setattr__(self, "groups", tuple(self.groups))
        if len(self.shape) != len(self.groups) or not self.shape:
            raise ValueError(
                f"SubAxes needs one group per sub-axis, got shape {self.shape} and "
                f"groups {self.groups}."
            )
        for g in self.groups:
            if g is not None and not isinstance(g, str):
                raise TypeError(f"SubAxes: a group is a str or None, got {g!r}.")


def _expand(entry: tuple) -> tuple[str | None, ...]:
    """Groups per *view* axis: every :class:`SubAxes` expanded in place."""
    out: list[str | None] = []
    for g in entry:
        out.extend(g.groups if isinstance(g, SubAxes) else (g,))
    return tuple(out)


def _view_shape(leaf: str, shape: tuple[int, ...], entry: tuple) -> tuple[int, ...]:
    out: list[int] = []
    for axis, (n, g) in enumerate(zip(shape, entry)):
        if isinstance(g, SubAxes):
            if int(np.prod(g.shape)) != int(n):
                raise ValueError(
                    f"leaf {leaf!r} axis {axis} has size {n} but its SubAxes shape "
                    f"{g.shape} has {int(np.prod(g.shape))} entries."
                )
            out.extend(g.shape)
        else:
            out.append(int(n))
    return tuple(out)


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
            seen = [g for g in _expand(groups) if g is not None]
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
            for axis, g in enumerate(_expand(entry)):
                if g is not None:
                    out.setdefault(g, []).append((leaf, axis))
        return {g: tuple(out[g]) for g in sorted(out)}

    def __repr__(self) -> str:
        lines = [f"  {leaf!r}: {groups}," for leaf, groups in self.axes]
        return "PermutationSpec({\n" + "\n".join(lines) + "\n})"


def validate(spec: PermutationSpec, tree: PyTree) -> dict[str, int]:
    """Checks that ``spec`` describes ``tree`` and returns the group sizes.

    ``tree`` may be a sub-tree of the one the spec was built for (e.g. the
    params without the batch statistics); every leaf of it must be in the
    spec with one entry per axis, and all axes of a group must have one size.
    Only shapes are read, so this works on tracers and ``ShapeDtypeStruct``.

    Args:
      spec: the permutation spec.
      tree: a pytree of arrays.

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
    for leaf, x in _named_leaves(tree).items():
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
        view = _view_shape(leaf, shape, entry)
        for axis, g in enumerate(_expand(entry)):
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
    return {g: sizes[g] for g in sorted(sizes)}


def _check_perms(
    spec: PermutationSpec, perms: Mapping[str, Any], sizes: Mapping[str, int]
):
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
        if not isinstance(p, jax.core.Tracer):
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


def _permute_view(x, groups, perms, except_axis=None, take=jnp.take):
    """Permutes an array in view shape along every grouped axis."""
    for axis, g in enumerate(groups):
        if g is not None and axis != except_axis:
            x = take(x, perms[g], axis=axis)
    return x


def _permute_leaf(leaf, x, entry, perms):
    groups = _expand(entry)
    if all(g is None for g in groups):
        return x
    view = x.reshape(_view_shape(leaf, x.shape, entry))
    return _permute_view(view, groups, perms).reshape(x.shape)


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
    sizes = validate(spec, tree)
    _check_perms(spec, perms, sizes)
    axes = spec.leaf_axes

    def permute(path, x):
        leaf = _path_str(path)
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


# --------------------------------------------------------------------------
# Matching
# --------------------------------------------------------------------------


class MatchResult(NamedTuple):
    r"""Result of :func:`weight_matching` / :func:`gradient_matching`.

    Attributes:
      perms: ``{group: indices}`` (int32 arrays) to apply to the ``b`` side.
      objectives: :math:`\sum_k \langle a_k, \pi(b_k)\rangle` (float64)
        at the initial permutation, then after each sweep; never decreasing.
      num_sweeps: sweeps run (the last one made no improvement unless
        ``max_sweeps`` stopped the loop).
    """

    perms: Perms
    objectives: list[float]
    num_sweeps: int


_SOLVERS = ("scipy", "optax")


@functools.cache
def _optax_assignment():
    import optax

    return jax.jit(optax.assignment.hungarian_algorithm)


def _assign(scores: np.ndarray, solver: str) -> np.ndarray:
    """``col`` maximising ``sum_i scores[i, col[i]]``."""
    n = scores.shape[0]
    if solver == "scipy":
        from scipy.optimize import linear_sum_assignment

        rows, cols = linear_sum_assignment(scores, maximize=True)
    else:
        # The Hungarian algorithm minimises; scale to O(1) for float32.
        scale = float(np.max(np.abs(scores))) or 1.0
        rows, cols = _optax_assignment()(jnp.asarray(-scores / scale, jnp.float32))
        rows, cols = np.asarray(rows), np.asarray(cols)
    out = np.empty(n, dtype=np.int64)
    out[rows] = cols
    return out


def _to_numpy_pairs(spec: PermutationSpec, pairs) -> tuple[list, dict[str, int]]:
    """Validates the pairs; returns ``[(a, b)]`` as dicts of float64 arrays."""
    pairs = list(pairs)
    if not pairs:
        raise ValueError("matching needs at least one (a, b) pair.")
    sizes: dict[str, int] | None = None
    structure = None
    out = []
    for k, pair in enumerate(pairs):
        if not isinstance(pair, (tuple, list)) or len(pair) != 2:
            raise ValueError(f"pair {k} must be a tuple (a, b) of two trees.")
        a, b = pair
        for side, tree in (("a", a), ("b", b)):
            s = validate(spec, tree)
            leaves = {n: np.shape(x) for n, x in _named_leaves(tree).items()}
            if structure is None:
                structure, sizes = leaves, s
            elif leaves != structure:
                diff = sorted(set(leaves.items()) ^ set(structure.items()))
                raise ValueError(
                    f"pair {k} side {side!r} differs from the first tree at leaves "
                    f"{[d[0] for d in diff][:4]} (all trees must share paths and shapes)."
                )
        out.append((_numpy_views(spec, a), _numpy_views(spec, b)))
    return out, sizes


def _numpy_views(spec: PermutationSpec, tree) -> dict[str, np.ndarray]:
    """``{leaf: float64 array in view shape}``."""
    axes = spec.leaf_axes
    out = {}
    for leaf, x in _named_leaves(tree).items():
        x = np.asarray(x, np.float64)
        out[leaf] = x.reshape(_view_shape(leaf, x.shape, axes[leaf]))
    return out


def _np_objective(spec, np_perms, np_pairs) -> float:
    groups = {leaf: _expand(entry) for leaf, entry in spec.axes}
    total = 0.0
    for a, b in np_pairs:
        for leaf, x in a.items():
            pb = _permute_view(b[leaf], groups[leaf], np_perms, take=np.take)
            total += float(np.vdot(x, pb))
    return total


def _check_matching_args(solver, max_sweeps):
    if solver not in _SOLVERS:
        raise ValueError(f"solver must be one of {_SOLVERS}, got {solver!r}.")
    if not isinstance(max_sweeps, (int, np.integer)) or max_sweeps < 1:
        raise ValueError(f"max_sweeps must be an int >= 1, got {max_sweeps!r}.")


def _coordinate_descent(spec, np_pairs, sizes, init_perms, *, solver, max_sweeps, seed):
    """Coordinate descent over groups; one linear assignment per group.

    The pairs are stacked on a leading axis so that each (group, leaf) costs
    one matrix product; leaves whose only group is ``g`` contribute a
    constant to ``g``'s scores, computed once. Without ``init_perms`` the
    descent runs from two starts, the identity and a warm start, and keeps
    the higher objective.
    """
    if init_perms is not None:
        _check_perms(spec, init_perms, sizes)
    leaves = list(np_pairs[0][0])
    a_stack = {leaf: np.stack([a[leaf] for a, _ in np_pairs]) for leaf in leaves}
    b_stack = {leaf: np.stack([b[leaf] for _, b in np_pairs]) for leaf in leaves}
    # Groups per axis of the stacked views (axis 0: the pair index).
    stacked_groups = {leaf: (None,) + _expand(spec.leaf_axes[leaf]) for leaf in leaves}

    def rows(x, axis, n):
        return np.moveaxis(x, axis, 0).reshape(n, -1)

    constant = {g: np.zeros((n, n)) for g, n in sizes.items()}
    varying: dict[str, list[tuple[str, int]]] = {g: [] for g in sizes}
    for g, n in sizes.items():
        for leaf, axis in spec.groups[g]:
            if leaf not in a_stack:
                continue
            if sum(x is not None for x in stacked_groups[leaf]) == 1:
                constant[g] += (
                    rows(a_stack[leaf], axis + 1, n)
                    @ rows(b_stack[leaf], axis + 1, n).T
                )
            else:
                varying[g].append((leaf, axis + 1))

    def objective(perms):
        return float(
            sum(
                np.vdot(
                    a_stack[leaf],
                    _permute_view(
                        b_stack[leaf], stacked_groups[leaf], perms, take=np.take
                    ),
                )
                for leaf in leaves
            )
        )

    def descend(perms):
        perms = dict(perms)
        names = list(sizes)
        rng = np.random.default_rng(seed)
        objectives = [objective(perms)]
        sweeps = 0
        for _ in range(max_sweeps):
            sweeps += 1
            improved = False
            for gi in rng.permutation(len(names)):
                g = names[gi]
                n = sizes[g]
                scores = constant[g].copy()
                for leaf, axis in varying[g]:
                    wb = _permute_view(
                        b_stack[leaf],
                        stacked_groups[leaf],
                        perms,
                        except_axis=axis,
                        take=np.take,
                    )
                    scores += rows(a_stack[leaf], axis, n) @ rows(wb, axis, n).T
                index = np.arange(n)
                new = _assign(scores, solver)
                old_value = scores[index, perms[g]].sum()
                new_value = scores[index, new].sum()
                # Accept strict improvements only: the objective never decreases.
                if new_value > old_value + 1e-12 * max(abs(old_value), abs(new_value)):
                    perms[g] = new
                    improved = True
            objectives.append(objective(perms))
            if not improved:
                break
        return MatchResult(perms, objectives, sweeps)

    if init_perms is not None:
        result = descend({g: np.asarray(init_perms[g]).astype(np.int64) for g in sizes})
    else:
        # Warm start: each group's assignment from the leaves it alone permutes
        # (biases, first-layer columns, last-layer rows), which do not depend
        # on the other groups; identity for a group without any.
        warm = {
            g: _assign(constant[g], solver) if np.any(constant[g]) else np.arange(n)
            for g, n in sizes.items()
        }
        identity = {g: np.arange(n) for g, n in sizes.items()}
        result = descend(warm)
        if any(not np.array_equal(warm[g], identity[g]) for g in sizes):
            other = descend(identity)
            if other.objectives[-1] > result.objectives[-1]:
                result = other
    return result._replace(
        perms={g: jnp.asarray(p, jnp.int32) for g, p in result.perms.items()}
    )


def gradient_matching(
    spec: PermutationSpec,
    pairs: Sequence[tuple[PyTree, PyTree]],
    *,
    solver: str = "scipy",
    max_sweeps: int = 100,
    seed: int = 0,
    init_perms: Mapping[str, Any] | None = None,
) -> MatchResult:
    r"""Permutation of the ``b`` side that best matches the ``a`` side, summed over pairs.

    .. math::
      \max_{\pi}\; \sum_{k} \big\langle a_k,\ \pi(b_k) \big\rangle

    Coordinate descent: each sweep visits the groups in a random order (from
    ``seed``); for group :math:`g` it builds
    :math:`S_{ij} = \sum_k \sum_{(\ell, d) \in g} \langle a_{k,\ell}[i],
    \pi_{-g}(b_{k,\ell})[j] \rangle` (slices along axis :math:`d`, the other
    groups' permutations applied) and solves one linear assignment
    :math:`\max_\sigma \sum_i S_{i\sigma(i)}`. A new assignment is kept only
    when it strictly improves, so the objective never decreases. The loop
    stops after a sweep without improvement or ``max_sweeps`` sweeps.
    Computed in float64 on the host.

    Without ``init_perms`` the descent runs twice, from the identity and from
    a warm start (each group assigned on the leaves that no other group
    permutes: biases, first-layer columns, last-layer rows), and keeps the
    run with the higher objective. The warm start finds a planted
    permutation at once when those leaves separate the units.

    With gradient pairs ``(grad_target, grad_source)`` this is the matching
    step of learning transfer; with one pair of weights it is weight matching.

    Args:
      spec: the permutation spec (each group on at most one axis per leaf).
      pairs: ``[(a, b), ...]``; all trees share paths and shapes.
      solver: ``"scipy"`` (``scipy.optimize.linear_sum_assignment``) or
        ``"optax"`` (``optax.assignment.hungarian_algorithm``, float32).
      max_sweeps: maximum number of sweeps over the groups, >= 1.
      seed: seed of the random group order.
      init_perms: starting permutation (default: the better of the identity
        and the warm start, see above).

    Returns:
      A :class:`MatchResult`.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from optax_wa.permutation import PermutationSpec, gradient_matching
      >>> spec = PermutationSpec({"w": (None, "h")})
      >>> a = {"w": jnp.array([[1.0, 5.0, 3.0]])}
      >>> b = {"w": jnp.array([[5.0, 3.0, 1.0]])}
      >>> gradient_matching(spec, [(a, b)]).perms["h"]
      Array([2, 0, 1], dtype=int32)

    References:
      Ainsworth, Hayase and Srinivasa, `Git Re-Basin: Merging Models modulo
      Permutation Symmetries <https://arxiv.org/abs/2209.04836>`_, ICLR 2023

      Chijiwa, `Transferring Learning Trajectories of Neural Networks
      <https://arxiv.org/abs/2305.14122>`_, ICLR 2024
    """
    _check_matching_args(solver, max_sweeps)
    np_pairs, sizes = _to_numpy_pairs(spec, pairs)
    return _coordinate_descent(
        spec,
        np_pairs,
        sizes,
        init_perms,
        solver=solver,
        max_sweeps=max_sweeps,
        seed=seed,
    )


def weight_matching(
    spec: PermutationSpec,
    a: PyTree,
    b: PyTree,
    *,
    solver: str = "scipy",
    max_sweeps: int = 100,
    seed: int = 0,
    init_perms: Mapping[str, Any] | None = None,
) -> MatchResult:
    r"""Permutation of ``b``'s hidden units that brings ``b`` closest to ``a``.

    .. math::
      \max_{\pi}\ \langle a, \pi(b) \rangle
      \;=\; \min_{\pi}\ \lVert a - \pi(b) \rVert^2

    by the coordinate descent of :func:`gradient_matching` on the one pair
    ``(a, b)``. ``apply_permutation(spec, result.perms, b)`` is the aligned
    ``b``; if ``a = π(b)`` for well-separated units, ``π`` is recovered.

    Args:
      spec: the permutation spec.
      a: the reference tree (e.g. params of model A, without batch stats).
      b: the tree to permute, same paths and shapes as ``a``.
      solver: ``"scipy"`` or ``"optax"``.
      max_sweeps: maximum number of sweeps, >= 1.
      seed: seed of the random group order.
      init_perms: starting permutation (default: both starts of
        :func:`gradient_matching`).

    Returns:
      A :class:`MatchResult`.

    Examples:
      >>> import jax
      >>> from optax_wa.permutation import (PermutationSpec, apply_permutation,
      ...     random_permutation, weight_matching)
      >>> spec = PermutationSpec({"w1": (None, "h"), "w2": ("h", None)})
      >>> k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
      >>> b = {"w1": jax.random.normal(k1, (4, 8)), "w2": jax.random.normal(k2, (8, 3))}
      >>> pi = random_permutation(k3, spec, b)
      >>> found = weight_matching(spec, apply_permutation(spec, pi, b), b).perms
      >>> bool((found["h"] == pi["h"]).all())
      True

    References:
      Ainsworth, Hayase and Srinivasa, `Git Re-Basin: Merging Models modulo
      Permutation Symmetries <https://arxiv.org/abs/2209.04836>`_, ICLR 2023
    """
    return gradient_matching(
        spec,
        [(a, b)],
        solver=solver,
        max_sweeps=max_sweeps,
        seed=seed,
        init_perms=init_perms,
    )


def matching_objective(
    spec: PermutationSpec,
    perms: Mapping[str, Any],
    pairs: Sequence[tuple[PyTree, PyTree]],
) -> float:
    r""":math:`\sum_k \langle a_k, \pi(b_k) \rangle` in float64."""
    np_pairs, sizes = _to_numpy_pairs(spec, pairs)
    _check_perms(spec, perms, sizes)
    return _np_objective(spec, {g: np.asarray(perms[g]) for g in sizes}, np_pairs)


# --------------------------------------------------------------------------
# Builders for Flax NNX models
# --------------------------------------------------------------------------


class _Tree(NamedTuple):
    pure: dict  # nested pure dict of arrays
    batch_stats: frozenset  # leaf paths of batch statistics
    modules: dict  # module path -> nnx.Module (empty for a plain tree)


def _as_tree(model_or_tree) -> _Tree:
    from flax import nnx

    if isinstance(model_or_tree, nnx.Module):
        state = nnx.state(model_or_tree, nnx.Any(nnx.Param, nnx.BatchStat))
        stats = nnx.state(model_or_tree, nnx.BatchStat)
        modules = {
            "/".join(str(k) for k in path): m
            for path, m in nnx.iter_modules(model_or_tree)
        }
        return _Tree(state.to_pure_dict(), frozenset(_named_leaves(stats)), modules)
    if isinstance(model_or_tree, nnx.State):
        flat, _ = jax.tree_util.tree_flatten_with_path(
            model_or_tree, is_leaf=lambda x: isinstance(x, nnx.Variable)
        )
        stats = {_path_str(p) for p, v in flat if isinstance(v, nnx.BatchStat)}
        return _Tree(model_or_tree.to_pure_dict(), frozenset(stats), {})
    if not isinstance(model_or_tree, Mapping):
        raise TypeError(
            "spec builders take an nnx.Module, an nnx.State or a nested dict of "
            f"arrays, got {type(model_or_tree).__name__}."
        )
    # A plain dict: leaves named mean/var beside each other are batch stats.
    stats = set()
    for leaf in _named_leaves(model_or_tree):
        parent, _, name = leaf.rpartition("/")
        if name in ("mean", "var"):
            stats.add(leaf)
    return _Tree(model_or_tree, frozenset(stats), {})


def _subtree(tree: _Tree, path: str):
    node = tree.pure
    walked = []
    for part in [p for p in path.split("/") if p]:
        if not isinstance(node, Mapping):
            raise ValueError(f"no module at {path!r}: {'/'.join(walked)!r} is a leaf.")
        if part in node:
            node = node[part]
        elif part.lstrip("-").isdigit() and int(part) in node:
            node = node[int(part)]
        else:
            keys = sorted(str(k) for k in node)
            raise ValueError(
                f"no module at {path!r}: {'/'.join(walked) or '<root>'!r} has keys {keys}."
            )
        walked.append(part)
    return node


def _children(tree: _Tree, path: str) -> list[str]:
    """Paths of the children of a container (list, nnx.List, nnx.Sequential)."""
    node = _subtree(tree, path)
    if not isinstance(node, Mapping):
        raise ValueError(f"{path!r} is a leaf, not a container of blocks.")
    if set(node) == {"layers"} and isinstance(node["layers"], Mapping):
        path, node = _join(path, "layers"), node["layers"]  # nnx.Sequential
    return [_join(path, str(k)) for k in sorted(node, key=lambda k: (str(type(k)), k))]


def _layer_kind(tree: _Tree, path: str) -> str:
    """``'linear'``, ``'conv'`` or ``'norm'``; errors for anything else."""
    from flax import nnx

    module = tree.modules.get(path)
    if module is not None:
        if isinstance(module, nnx.Linear):
            return "linear"
        if isinstance(module, nnx.Conv):
            if getattr(module, "feature_group_count", 1) != 1:
                raise ValueError(
                    f"layer {path!r}: grouped convolutions (feature_group_count="
                    f"{module.feature_group_count}) are not supported."
                )
            return "conv"
        if isinstance(module, (nnx.BatchNorm, nnx.LayerNorm, nnx.RMSNorm)):
            return "norm"
        if isinstance(module, nnx.GroupNorm) and module.num_groups == 1:
            return "norm"
        raise ValueError(
            f"layer {path!r} is a {type(module).__name__}; the builders handle "
            "nnx.Linear, nnx.Conv, nnx.BatchNorm, nnx.LayerNorm, nnx.RMSNorm."
        )
    node = _subtree(tree, path)
    if (
        isinstance(node, Mapping)
        and "kernel" in node
        and not isinstance(node["kernel"], Mapping)
    ):
        return "linear" if np.ndim(node["kernel"]) == 2 else "conv"
    if (
        isinstance(node, Mapping)
        and node
        and set(map(str, node)) <= set(_NORM_LEAVES)
        and all(np.ndim(v) == 1 for v in node.values())
    ):
        return "norm"
    raise ValueError(f"{path!r} is not a Linear, Conv or normalization layer.")


def _discover_layers(tree: _Tree, root: str = "") -> list[str]:
    """Every Linear/Conv/norm layer under ``root`` in tree order."""
    out = []

    def visit(path):
        node = _subtree(tree, path)
        if not isinstance(node, Mapping):
            return
        try:
            _layer_kind(tree, path)
            is_layer = True
        except ValueError:
            is_layer = False
        if is_layer:
            out.append(path)
            return
        for k in sorted(node, key=lambda k: (str(type(k)), k)):
            visit(_join(path, str(k)))

    visit(root)
    return out


class _Builder:
    """Accumulates spec entries over a tree; every leaf starts unpermuted."""

    def __init__(self, model_or_tree):
        self.tree = _as_tree(model_or_tree)
        self.leaves = _named_leaves(self.tree.pure)
        self.entries = {leaf: (None,) * np.ndim(x) for leaf, x in self.leaves.items()}
        self.sizes: dict[str, int] = {}

    def set(self, leaf: str, groups: tuple):
        if leaf not in self.leaves:
            raise ValueError(f"no leaf {leaf!r} in the tree.")
        if len(groups) != np.ndim(self.leaves[leaf]):
            raise ValueError(
                f"leaf {leaf!r} has shape {np.shape(self.leaves[leaf])}, expected "
                f"{len(groups)} axes."
            )
        self.entries[leaf] = tuple(groups)

    def chain(self, layers: Sequence[str], in_group, out_group, *, what: str):
        """Assigns groups along a chain of layers; returns its output group.

        Each Linear/Conv writes a new group named after its path, except the
        last one of the chain, which writes ``out_group`` (``None``: the
        chain's outputs are not permuted). Norm layers take the current group.
        """
        kinds = {p: _layer_kind(self.tree, p) for p in layers}
        kernels = [p for p in layers if kinds[p] in ("linear", "conv")]
        current, previous = in_group, "the input"
        width = None if in_group is None else self.sizes[in_group]
        for p in layers:
            node = _subtree(self.tree, p)
            if kinds[p] == "norm":
                n = int(np.shape(next(iter(node.values())))[0])
                if width is not None and n != width:
                    raise ValueError(
                        f"{what}: norm layer {p!r} has {n} features but {previous} "
                        f"gives {width}. Pass the layers in forward order."
                    )
                for name in node:
                    self.set(_join(p, str(name)), (current,))
                width, previous = n, f"layer {p!r}"
                continue
            kernel = node["kernel"]
            n_in, n_out = np.shape(kernel)[-2], np.shape(kernel)[-1]
            if width is not None and width != n_in:
                raise ValueError(
                    f"{what}: layer {p!r} takes {n_in} input features but {previous} "
                    f"gives {width}. Pass the layers in forward order "
                    "(a dense layer after convolutions needs global pooling, not "
                    "flattening)."
                )
            out = out_group if p == kernels[-1] else p
            if out is not None:
                if out in self.sizes and self.sizes[out] != n_out:
                    raise ValueError(
                        f"{what}: layer {p!r} gives {n_out} features but its output "
                        f"joins group {out!r} of size {self.sizes[out]} (an identity "
                        "shortcut needs equal widths; list the projection layers)."
                    )
                self.sizes[out] = n_out
            self.set(
                _join(p, "kernel"), (None,) * (np.ndim(kernel) - 2) + (current, out)
            )
            if "bias" in node:
                self.set(_join(p, "bias"), (out,))
            current, previous, width = out, f"layer {p!r}", n_out
        return current

    def build(self) -> PermutationSpec:
        spec = PermutationSpec(self.entries, batch_stats=self.tree.batch_stats)
        validate(spec, self.tree.pure)
        return spec


def _layer_list(
    builder: _Builder, layers, kinds: tuple[str, ...], fn: str
) -> list[str]:
    if layers is None:
        layers = _discover_layers(builder.tree)
        if not layers:
            raise ValueError(f"{fn}: found no layers in the model.")
    elif isinstance(layers, str):
        raise TypeError(f"{fn}: layers must be a sequence of paths, not a str.")
    layers = [
        _join(str(p)) if not isinstance(p, tuple) else _join(*map(str, p))
        for p in layers
    ]
    for p in layers:
        kind = _layer_kind(builder.tree, p)
        if kind not in kinds:
            raise ValueError(
                f"{fn}: layer {p!r} is a {kind} layer; this builder takes {kinds}."
            )
    return layers


def mlp_spec(model, *, layers: Sequence[str] | None = None) -> PermutationSpec:
    """Spec of an MLP: a chain of ``nnx.Linear`` (and optional norm) layers.

    Each hidden layer's output units form one group named after the layer's
    path; the inputs and the last layer's outputs are not permuted.

    Args:
      model: an ``nnx.Module``, an ``nnx.State`` or a pure dict of it.
      layers: the layer paths in forward order (``"layers/0"``). Default:
        every Linear/norm layer in tree order, which is the forward order for
        layers held in a list (``nnx.List``); attributes are visited in
        sorted name order, so pass ``layers`` when names don't sort that way.

    Returns:
      A :class:`PermutationSpec` over every Param and BatchStat leaf.

    Examples:
      >>> from flax import nnx
      >>> from optax_wa.permutation import mlp_spec
      >>> class MLP(nnx.Module):
      ...   def __init__(self, rngs):
      ...     self.layers = nnx.List([nnx.Linear(4, 8, rngs=rngs),
      ...                             nnx.Linear(8, 2, rngs=rngs)])
      >>> mlp_spec(MLP(nnx.Rngs(0))).leaf_axes["layers/0/kernel"]
      (None, 'layers/0')
    """
    builder = _Builder(model)
    layers = _layer_list(builder, layers, ("linear", "norm"), "mlp_spec")
    builder.chain(layers, None, None, what="mlp_spec")
    return builder.build()


def conv_spec(model, *, layers: Sequence[str] | None = None) -> PermutationSpec:
    """Spec of a conv stack: ``nnx.Conv`` (+ norm) layers, then dense layers.

    Channels of each hidden conv and units of each hidden dense layer form a
    group named after the layer's path; BatchNorm scale, bias, mean and var
    follow their channels. A dense layer after the convolutions must see
    globally pooled channels (its input width equals the channel count).

    Args:
      model: an ``nnx.Module``, an ``nnx.State`` or a pure dict of it.
      layers: layer paths in forward order (default: tree order, see
        :func:`mlp_spec`).

    Returns:
      A :class:`PermutationSpec`.
    """
    builder = _Builder(model)
    layers = _layer_list(builder, layers, ("linear", "conv", "norm"), "conv_spec")
    builder.chain(layers, None, None, what="conv_spec")
    return builder.build()


def _paths(x, what: str) -> list[str]:
    if isinstance(x, str):
        return [x]
    if not isinstance(x, Sequence):
        raise TypeError(f"{what} must be a path or a sequence of paths, got {x!r}.")
    return [str(p) for p in x]


def resnet_spec(
    model,
    *,
    stem: Sequence[str],
    stages: Sequence[str | Sequence[str]],
    head: Sequence[str],
    block: Sequence[str] = ("conv1", "bn1", "conv2", "bn2"),
    shortcut: Sequence[str] = ("shortcut_conv", "shortcut_bn"),
) -> PermutationSpec:
    """Spec of a ResNet: residual streams share one permutation per stage.

    The residual stream (the stem's output and every block's output) carries
    one group, ``"residual/0"``; a block with projection layers (``shortcut``
    present in it) starts a new stream group ``"residual/1"``, ... which the
    rest of its stage shares. Inside a block, every conv but the last writes
    its own group (named after its path); the last conv and the projection
    write the stream group. Norm layers (BatchNorm scale/bias/mean/var)
    follow the channels before them, so post-activation (conv, bn) and
    pre-activation (bn, conv) blocks both work. The head reads the last
    stream (after global pooling) and its outputs are not permuted.

    Args:
      model: an ``nnx.Module``, an ``nnx.State`` or a pure dict of it.
      stem: paths of the stem layers in forward order, e.g. ``("conv", "bn")``.
      stages: one entry per stage: the path of a container of blocks
        (``nnx.List``/list/``nnx.Sequential``, blocks in index order) or an
        explicit sequence of block paths.
      head: paths of the head layers, e.g. ``("fc",)``.
      block: layer names inside a block, in forward order (bottleneck:
        ``("conv1", "bn1", "conv2", "bn2", "conv3", "bn3")``).
      shortcut: layer names of the projection shortcut inside a block; a block
        without them has an identity shortcut.

    Returns:
      A :class:`PermutationSpec`.
    """
    builder = _Builder(model)
    stem, head = _paths(stem, "stem"), _paths(head, "head")
    block, shortcut = _paths(block, "block"), _paths(shortcut, "shortcut")
    if not stem or not head:
        raise ValueError("resnet_spec: stem and head each need at least one layer.")
    num_streams = 0
    stream = builder.chain(stem, None, "residual/0", what="resnet_spec stem")
    for k, stage in enumerate(stages):
        blocks = (
            _children(builder.tree, stage) if isinstance(stage, str) else list(stage)
        )
        if not blocks:
            raise ValueError(f"resnet_spec: stage {k} has no blocks.")
        for b in blocks:
            b = str(b)
            node = _subtree(builder.tree, b)
            present = [name for name in shortcut if _first(name) in node]
            if present and len(present) != len(shortcut):
                raise ValueError(
                    f"resnet_spec: block {b!r} has shortcut layers {present} but not "
                    f"all of {list(shortcut)}."
                )
            missing = [name for name in block if _first(name) not in node]
            if missing:
                raise ValueError(
                    f"resnet_spec: block {b!r} has no layer(s) {missing}; its keys are "
                    f"{sorted(map(str, node))}. Pass `block=` with its layer names."
                )
            out = stream
            if present:
                num_streams += 1
                out = f"residual/{num_streams}"
                builder.chain(
                    [_join(b, s) for s in shortcut], stream, out, what=f"block {b!r}"
                )
            builder.chain(
                [_join(b, s) for s in block], stream, out, what=f"block {b!r}"
            )
            stream = out
    builder.chain(head, stream, None, what="resnet_spec head")
    return builder.build()


def _first(name: str):
    first = name.split("/")[0]
    return int(first) if first.isdigit() else first


def vit_block_spec(
    model,
    *,
    blocks: str | Sequence[str] | None = None,
    attention: str = "attention",
    mlp: Sequence[str] = ("mlp_in", "mlp_out"),
    permute_head_dims: bool = False,
    num_heads: int | None = None,
) -> PermutationSpec:
    """Spec of transformer blocks: whole attention heads and MLP hidden units.

    Two attention layouts are recognised:

    * ``nnx.MultiHeadAttention`` (query/key/value kernels
      ``(features, heads, head_dim)``, out kernel ``(heads, head_dim,
      features)``): the head axis of all four projections carries one group
      ``"<attention path>/heads"``. With ``permute_head_dims`` the head
      dimension is permuted too, one permutation shared by all heads: query
      and key jointly (``.../qk_dims``), value with the out projection's
      input (``.../v_dims``).
    * A fused ``qkv`` ``nnx.Linear`` (outputs laid out as ``(3, heads,
      head_dim)``) and an ``out`` ``nnx.Linear`` (inputs ``(heads,
      head_dim)``): the head sub-axis carries ``.../heads`` (see
      :class:`SubAxes`); with ``permute_head_dims`` one group
      ``.../head_dims`` permutes the head dimension of q, k, v and out
      jointly. The head count comes from the module's ``num_heads``
      attribute or the ``num_heads`` argument.

    The MLP's hidden units form groups named after its layers. The residual
    stream (embeddings, norms, block inputs/outputs) is not permuted.

    Args:
      model: an ``nnx.Module``, an ``nnx.State`` or a pure dict of it.
      blocks: ``None`` (the model is one block), the path of a container of
        blocks, or a sequence of block paths.
      attention: path of the attention module inside a block.
      mlp: paths of the MLP layers inside a block, in forward order.
      permute_head_dims: also permute inside heads (see above).
      num_heads: heads of a fused ``qkv`` attention when the model is given
        as a tree (ignored when the module has ``num_heads``).

    Returns:
      A :class:`PermutationSpec`.
    """
    builder = _Builder(model)
    if blocks is None:
        block_paths = [""]
    elif isinstance(blocks, str):
        block_paths = _children(builder.tree, blocks)
    else:
        block_paths = [str(b) for b in blocks]
    for b in block_paths:
        attn = _join(b, attention)
        node = _subtree(builder.tree, attn)
        keys = set(map(str, node)) if isinstance(node, Mapping) else set()
        if {"query", "key", "value", "out"} <= keys:
            _attention_heads(builder, attn, node, permute_head_dims)
        elif {"qkv", "out"} <= keys:
            module = builder.tree.modules.get(attn)
            heads = getattr(module, "num_heads", None) or num_heads
            _fused_attention_heads(builder, attn, node, heads, permute_head_dims)
        else:
            raise ValueError(
                f"vit_block_spec: {attn or '<root>'!r} is neither an "
                "nnx.MultiHeadAttention (query, key, value, out) nor a fused "
                f"attention (qkv, out); its keys are {sorted(keys)}."
            )
        builder.chain(
            [_join(b, m) for m in _paths(mlp, "mlp")], None, None, what=f"block {b!r}"
        )
    return builder.build()


def _attention_heads(builder: _Builder, attn: str, node, permute_head_dims: bool):
    q_shape = np.shape(node["query"]["kernel"])
    if len(q_shape) != 3:
        raise ValueError(
            f"vit_block_spec: {_join(attn, 'query/kernel')!r} has shape {q_shape}; "
            "expected (features, heads, head_dim)."
        )
    for proj in ("key", "value"):
        heads = np.shape(node[proj]["kernel"])[1]
        if heads != q_shape[1]:
            raise ValueError(
                f"vit_block_spec: {_join(attn, proj)!r} has {heads} heads but the "
                f"query has {q_shape[1]}; grouped key/value heads are not supported."
            )
    heads = _join(attn, "heads")
    qk = _join(attn, "qk_dims") if permute_head_dims else None
    v = _join(attn, "v_dims") if permute_head_dims else None
    for proj, dims in (("query", qk), ("key", qk), ("value", v)):
        builder.set(_join(attn, proj, "kernel"), (None, heads, dims))
        if "bias" in node[proj]:
            builder.set(_join(attn, proj, "bias"), (heads, dims))
    builder.set(_join(attn, "out", "kernel"), (heads, v, None))
    for ln in ("query_ln", "key_ln"):
        for name in node.get(ln, {}):
            builder.set(_join(attn, ln, str(name)), (qk,))


def _fused_attention_heads(
    builder: _Builder, attn: str, node, heads, permute_head_dims
):
    width = np.shape(node["qkv"]["kernel"])[-1]
    if not isinstance(heads, (int, np.integer)) or heads < 1:
        raise ValueError(
            f"vit_block_spec: the fused attention {attn!r} needs its head count: "
            "pass num_heads= (the module has no num_heads attribute)."
        )
    if width % (3 * heads):
        raise ValueError(
            f"vit_block_spec: {_join(attn, 'qkv/kernel')!r} has {width} outputs, not "
            f"a multiple of 3 * num_heads = {3 * heads}."
        )
    head_dim = width // (3 * heads)
    group = _join(attn, "heads")
    dims = _join(attn, "head_dims") if permute_head_dims else None
    qkv = SubAxes((3, heads, head_dim), (None, group, dims))
    builder.set(_join(attn, "qkv", "kernel"), (None, qkv))
    if "bias" in node["qkv"]:
        builder.set(_join(attn, "qkv", "bias"), (qkv,))
    out_in = np.shape(node["out"]["kernel"])[0]
    if out_in != heads * head_dim:
        raise ValueError(
            f"vit_block_spec: {_join(attn, 'out/kernel')!r} takes {out_in} inputs; "
            f"expected heads * head_dim = {heads * head_dim}."
        )
    builder.set(
        _join(attn, "out", "kernel"), (SubAxes((heads, head_dim), (group, dims)), None)
    )


__all__ = [
    "MatchResult",
    "PermutationSpec",
    "SubAxes",
    "apply_permutation",
    "compose",
    "conv_spec",
    "gradient_matching",
    "identity_permutation",
    "invert",
    "matching_objective",
    "mlp_spec",
    "random_permutation",
    "resnet_spec",
    "validate",
    "vit_block_spec",
    "weight_matching",
]
