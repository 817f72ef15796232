r"""Weight and gradient matching: the permutation that best aligns two trees.

:func:`gradient_matching` maximises :math:`\sum_k \langle a_k, \pi(b_k)\rangle`
over permutations by coordinate descent over the groups, one linear
assignment problem per group (Ainsworth et al., 2023); :func:`weight_matching`
is the case of one pair. Matching runs on the host in float64.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from optax_wa._checks import differing_leaves, is_traced
from optax_wa.permutation._axes import expand, named_leaves, permute_view, view_shape
from optax_wa.permutation.spec import Perms, PermutationSpec, validate

__all__ = [
    "MatchResult",
    "MatchingOptions",
    "gradient_matching",
    "matching_objective",
    "weight_matching",
]

PyTree = Any

_SOLVERS = ("scipy", "optax")


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


@dataclasses.dataclass(frozen=True)
class MatchingOptions:
    """How a matching is solved: the options of :func:`gradient_matching`.

    Checked at construction. :func:`~optax_wa.transfer.transfer_trajectory`
    takes one of these for all its matchings.

    Attributes:
      solver: ``"scipy"`` (``scipy.optimize.linear_sum_assignment``) or
        ``"optax"`` (``optax.assignment.hungarian_algorithm``, float32).
      max_sweeps: maximum number of sweeps over the groups, >= 1.
      seed: seed (int >= 0) of the random group order.

    Examples:
      >>> from optax_wa.permutation import MatchingOptions
      >>> MatchingOptions(solver="optax", max_sweeps=20)
      MatchingOptions(solver='optax', max_sweeps=20, seed=0)
    """

    solver: str = "scipy"
    max_sweeps: int = 100
    seed: int = 0

    def __post_init__(self):
        if self.solver not in _SOLVERS:
            raise ValueError(f"solver must be one of {_SOLVERS}, got {self.solver!r}.")
        for name, low in (("max_sweeps", 1), ("seed", 0)):
            value = getattr(self, name)
            if (
                isinstance(value, bool)
                or not isinstance(value, (int, np.integer))
                or value < low
            ):
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}.")


# --------------------------------------------------------------------------
# Host arrays
# --------------------------------------------------------------------------


def _host_view(spec: PermutationSpec, tree, name: str) -> dict[str, np.ndarray]:
    """``{leaf: float64 array in view shape}``; refuses tracers and non-finite values."""
    axes = spec.leaf_axes
    out = {}
    for leaf, x in named_leaves(tree).items():
        if is_traced(x):
            raise TypeError(
                f"{name} is traced at leaf {leaf!r}: matching runs on the host with "
                "concrete arrays; call it outside jax.jit / jax.vmap."
            )
        x = np.asarray(x, np.float64)
        if not np.all(np.isfinite(x)):
            raise ValueError(
                f"{name} has a non-finite value (NaN or inf) at leaf {leaf!r}; "
                "matching needs finite arrays."
            )
        out[leaf] = x.reshape(view_shape(leaf, x.shape, axes[leaf]))
    return out


def _host_pairs(spec: PermutationSpec, pairs, names) -> tuple[list, dict[str, int]]:
    """Validates the pairs; returns ``[(a, b)]`` as host views and the group sizes.

    ``names[k][side]`` names tree ``side`` of pair ``k`` in error messages.
    """
    pairs = list(pairs)
    if not pairs:
        raise ValueError("matching needs at least one (a, b) pair.")
    sizes: dict[str, int] | None = None
    structure = None
    out = []
    for k, pair in enumerate(pairs):
        if not isinstance(pair, (tuple, list)) or len(pair) != 2:
            raise ValueError(f"pair {k} must be a tuple (a, b) of two trees.")
        for side, tree in zip(("a", "b"), pair):
            s = validate(spec, tree)
            leaves = {n: np.shape(x) for n, x in named_leaves(tree).items()}
            if structure is None:
                structure, sizes = leaves, s
            elif leaves != structure:
                raise ValueError(
                    f"pair {k} side {side!r} differs from the first tree at leaves "
                    f"{differing_leaves(leaves, structure)} (all trees must share "
                    "paths and shapes)."
                )
        out.append(tuple(_host_view(spec, t, n) for t, n in zip(pair, names(k))))
    return out, sizes


def _pair_names(k: int) -> tuple[str, str]:
    return f"pairs[{k}][0]", f"pairs[{k}][1]"


# --------------------------------------------------------------------------
# Coordinate descent
# --------------------------------------------------------------------------
#
# The objective, for pairs (a_k, b_k) and a permutation pi = (pi_g) per group:
#
#   F(pi) = sum_k sum_leaf < a_k[leaf], pi(b_k)[leaf] >.
#
# Fix every group but g. A leaf carries g on at most one (view) axis d (the
# spec enforces it). Slicing that leaf along d, pi(b)[i] = pi_{-g}(b)[pi_g(i)],
# where pi_{-g} applies the other groups only, so the leaf contributes
#
#   sum_i < a[i], pi_{-g}(b)[pi_g(i)] >  =  sum_i S_g[i, pi_g(i)],
#   S_g[i, j] = sum_k sum_{(leaf, d) in g} < a_k[leaf][i], pi_{-g}(b_k[leaf])[j] >,
#
# and leaves without g add a constant. F is therefore linear in the
# permutation matrix of pi_g: maximising F over pi_g with the others fixed is
# exactly one linear assignment problem on S_g, which the solver solves
# exactly. The current pi_g is one feasible assignment, so the optimum is at
# least as good; we accept it only when it is strictly better (by more than
# round-off), so F never decreases, and since there are finitely many
# permutations and every accepted change raises F, the descent stops.
#
# Leaves whose only group is g (biases, first-layer columns, last-layer rows)
# give a part of S_g that does not depend on pi_{-g}: it is computed once.


class _Problem(NamedTuple):
    """The pairs stacked on a leading axis, and each group's fixed scores."""

    sizes: dict[str, int]
    a: dict[str, np.ndarray]  # leaf -> (pairs, *view shape)
    b: dict[str, np.ndarray]
    groups: dict[str, tuple]  # leaf -> group per stacked axis (axis 0: pairs)
    constant: dict[str, np.ndarray]  # group -> (n, n) scores of its own leaves
    varying: dict[str, list[tuple[str, int]]]  # group -> (leaf, stacked axis)


def _rows(x, axis, n):
    """The slices of ``x`` along ``axis`` as ``n`` flat rows."""
    return np.moveaxis(x, axis, 0).reshape(n, -1)


def _problem(spec: PermutationSpec, host_pairs, sizes) -> _Problem:
    leaves = list(host_pairs[0][0])
    a = {leaf: np.stack([p[0][leaf] for p in host_pairs]) for leaf in leaves}
    b = {leaf: np.stack([p[1][leaf] for p in host_pairs]) for leaf in leaves}
    groups = {leaf: (None,) + expand(spec.leaf_axes[leaf]) for leaf in leaves}
    constant = {g: np.zeros((n, n)) for g, n in sizes.items()}
    varying: dict[str, list[tuple[str, int]]] = {g: [] for g in sizes}
    for g, n in sizes.items():
        for leaf, axis in spec.groups[g]:
            if leaf not in a:
                continue
            if sum(x is not None for x in groups[leaf]) == 1:
                constant[g] += (
                    _rows(a[leaf], axis + 1, n) @ _rows(b[leaf], axis + 1, n).T
                )
            else:
                varying[g].append((leaf, axis + 1))
    return _Problem(sizes, a, b, groups, constant, varying)


def _objective(problem: _Problem, perms) -> float:
    """F(pi) in float64."""
    return float(
        sum(
            np.vdot(
                x,
                permute_view(
                    problem.b[leaf], problem.groups[leaf], perms, take=np.take
                ),
            )
            for leaf, x in problem.a.items()
        )
    )


def _scores(problem: _Problem, g: str, perms) -> np.ndarray:
    """S_g: the constant part plus the leaves that other groups also permute."""
    n = problem.sizes[g]
    scores = problem.constant[g].copy()
    for leaf, axis in problem.varying[g]:
        wb = permute_view(
            problem.b[leaf], problem.groups[leaf], perms, except_axis=axis, take=np.take
        )
        scores += _rows(problem.a[leaf], axis, n) @ _rows(wb, axis, n).T
    return scores


def _assign(scores: np.ndarray, solver: str) -> np.ndarray:
    """``col`` maximising ``sum_i scores[i, col[i]]``."""
    n = scores.shape[0]
    if not np.all(np.isfinite(scores)):
        # Finite inputs whose products overflow float64.
        raise ValueError("matching scores overflowed float64; rescale the trees.")
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


@functools.cache
def _optax_assignment():
    import optax

    return jax.jit(optax.assignment.hungarian_algorithm)


def _descend(problem: _Problem, perms, options: MatchingOptions) -> MatchResult:
    """Sweeps over the groups in random order until a sweep changes nothing."""
    perms = dict(perms)
    names = list(problem.sizes)
    rng = np.random.default_rng(options.seed)
    objectives = [_objective(problem, perms)]
    sweeps = 0
    for _ in range(options.max_sweeps):
        sweeps += 1
        improved = False
        for gi in rng.permutation(len(names)):
            g = names[gi]
            scores = _scores(problem, g, perms)
            index = np.arange(problem.sizes[g])
            new = _assign(scores, options.solver)
            old_value = scores[index, perms[g]].sum()
            new_value = scores[index, new].sum()
            # Strict improvements only (beyond round-off): F never decreases.
            if new_value > old_value + 1e-12 * max(abs(old_value), abs(new_value)):
                perms[g] = new
                improved = True
        objectives.append(_objective(problem, perms))
        if not improved:
            break
    return MatchResult(perms, objectives, sweeps)


def _coordinate_descent(problem: _Problem, init_perms, options) -> MatchResult:
    """From ``init_perms``, or the better of the warm start and the identity."""
    sizes = problem.sizes
    if init_perms is not None:
        start = {g: np.asarray(init_perms[g]).astype(np.int64) for g in sizes}
        result = _descend(problem, start, options)
    else:
        # Warm start: each group's assignment on the leaves it alone permutes,
        # which do not depend on the other groups; identity for a group
        # without any.
        warm = {
            g: _assign(problem.constant[g], options.solver)
            if np.any(problem.constant[g])
            else np.arange(n)
            for g, n in sizes.items()
        }
        identity = {g: np.arange(n) for g, n in sizes.items()}
        result = _descend(problem, warm, options)
        if any(not np.array_equal(warm[g], identity[g]) for g in sizes):
            other = _descend(problem, identity, options)
            if other.objectives[-1] > result.objectives[-1]:
                result = other
    return result._replace(
        perms={g: jnp.asarray(p, jnp.int32) for g, p in result.perms.items()}
    )


def _match(spec, pairs, names, options, init_perms) -> MatchResult:
    if not isinstance(spec, PermutationSpec):
        raise TypeError(f"spec must be a PermutationSpec, got {type(spec).__name__}.")
    host_pairs, sizes = _host_pairs(spec, pairs, names)
    if init_perms is not None:
        validate(spec, pairs[0][0], init_perms)
    return _coordinate_descent(_problem(spec, host_pairs, sizes), init_perms, options)


# --------------------------------------------------------------------------
# Public matchings
# --------------------------------------------------------------------------


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

    Without ``init_perms`` the descent runs twice, from the identity and from
    a warm start (each group assigned on the leaves that no other group
    permutes: biases, first-layer columns, last-layer rows), and keeps the
    run with the higher objective. The warm start finds a planted
    permutation at once when those leaves separate the units.

    With gradient pairs ``(grad_target, grad_source)`` this is the matching
    step of learning transfer; with one pair of weights it is weight matching.

    Runs on the host in float64 with concrete arrays: a NaN or infinite entry
    raises a ``ValueError`` naming the tree and leaf (with either solver),
    and a traced argument (inside ``jax.jit`` or ``jax.vmap``) raises a
    ``TypeError``.

    Args:
      spec: the permutation spec (each group on at most one axis per leaf).
      pairs: ``[(a, b), ...]``; all trees share paths and shapes.
      solver: ``"scipy"`` (``scipy.optimize.linear_sum_assignment``) or
        ``"optax"`` (``optax.assignment.hungarian_algorithm``, float32).
      max_sweeps: maximum number of sweeps over the groups, >= 1.
      seed: seed of the random group order, >= 0.
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
    options = MatchingOptions(solver, max_sweeps, seed)
    return _match(spec, list(pairs), _pair_names, options, init_perms)


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
    As there, a NaN or infinite entry raises a ``ValueError`` naming ``a`` or
    ``b`` and the leaf, and traced arguments raise a ``TypeError``.

    Args:
      spec: the permutation spec.
      a: the reference tree (e.g. params of model A, without batch stats).
      b: the tree to permute, same paths and shapes as ``a``.
      solver: ``"scipy"`` or ``"optax"``.
      max_sweeps: maximum number of sweeps, >= 1.
      seed: seed of the random group order, >= 0.
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
    options = MatchingOptions(solver, max_sweeps, seed)
    return _match(spec, [(a, b)], lambda k: ("a", "b"), options, init_perms)


def matching_objective(
    spec: PermutationSpec,
    perms: Mapping[str, Any],
    pairs: Sequence[tuple[PyTree, PyTree]],
) -> float:
    r""":math:`\sum_k \langle a_k, \pi(b_k) \rangle` in float64.

    Args:
      spec: the permutation spec.
      perms: ``{group: indices}`` applied to the ``b`` sides.
      pairs: ``[(a, b), ...]`` as in :func:`gradient_matching`.

    Returns:
      The objective as a Python float.

    Examples:
      >>> import jax.numpy as jnp
      >>> from optax_wa.permutation import PermutationSpec, matching_objective
      >>> spec = PermutationSpec({"w": ("h",)})
      >>> a, b = {"w": jnp.array([1.0, 2.0])}, {"w": jnp.array([3.0, 4.0])}
      >>> matching_objective(spec, {"h": jnp.array([1, 0])}, [(a, b)])
      10.0
    """
    pairs = list(pairs)
    host_pairs, sizes = _host_pairs(spec, pairs, _pair_names)
    validate(spec, pairs[0][0], perms)
    # Pair by pair, leaf by leaf: a second path to the descent's stacked sums.
    np_perms = {g: np.asarray(perms[g]) for g in sizes}
    total = 0.0
    for a, b in host_pairs:
        for leaf, x in a.items():
            groups = expand(spec.leaf_axes[leaf])
            total += float(
                np.vdot(x, permute_view(b[leaf], groups, np_perms, take=np.take))
            )
    return total
