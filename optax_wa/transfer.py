r"""Learning-trajectory transfer: move a training run onto a new initialization.

Given a source trajectory :math:`\theta_1^0, \ldots, \theta_1^T` and a new
initialization :math:`\theta_2^0`, learning transfer (Chijiwa, 2024) builds

.. math::
  \theta_2^t = \theta_2^0 + \pi_t\big(\theta_1^t - \theta_1^0\big),

with a permutation :math:`\pi_t` of hidden units (see
:mod:`optax_wa.permutation`) chosen so that the transferred steps point where
the target's own gradients point: at step :math:`t` it maximises
:math:`\sum_s \langle \nabla L(\theta_2^s),\ \pi(\nabla L(\theta_1^s))\rangle`
over gradient pairs on shared minibatches.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from optax_wa._checks import differing_leaves
from optax_wa.permutation import (
    MatchingOptions,
    PermutationSpec,
    apply_permutation,
    gradient_matching,
    named_leaves,
    validate,
    weight_matching,
)

__all__ = [
    "TrajectoryScores",
    "TransferResult",
    "evaluate_trajectory",
    "schedule_coefficients",
    "source_trajectory",
    "transfer_params",
    "transfer_trajectory",
]

PyTree = Any

_SCHEDULES = ("uniform", "cosine")


class TransferResult(NamedTuple):
    r"""Result of :func:`transfer_trajectory`.

    Attributes:
      params: :math:`\theta_2^t` for ``t = 0..T`` (``params[0]`` is the
        target init).
      perms: :math:`\pi_t` for ``t = 0..T`` (``perms[0]``: the permutation
        before any matching: identity, or the single permutation of
        ``naive``/``oracle``/``init_matching``).
      objectives: the matching objective after each step ``t = 1..T``
        (``fgmt``/``gmt``: the gradient-matching objective over the pairs
        used at that step); one value for ``oracle``/``init_matching`` (the
        weight-matching objective); empty for ``naive``.
      grad_calls: number of ``grad_fn`` calls (``2T`` for FGMT, ``T(T+1)``
        for GMT, 0 otherwise).
    """

    params: list[PyTree]
    perms: list[dict[str, jax.Array]]
    objectives: list[float]
    grad_calls: int


class TrajectoryScores(NamedTuple):
    """Result of :func:`evaluate_trajectory`.

    Attributes:
      scores: ``eval_fn`` at every step ``t = 0..T``.
      best_step: the step with the highest score (first on ties; NaN scores
        never win).
      batch_stats: ``batch_stats_fn(params[t])`` for ``t = 0..T`` (``None``
        without ``batch_stats_fn``).
    """

    scores: list[float]
    best_step: int
    batch_stats: list[PyTree] | None


def transfer_params(
    target_init: PyTree,
    source_init: PyTree,
    source_t: PyTree,
    perms: Mapping[str, jax.Array],
    spec: PermutationSpec,
) -> PyTree:
    r"""Transfers one source step onto the target init.

    .. math:: \theta_2^t = \theta_2^0 + \pi\big(\theta_1^t - \theta_1^0\big)

    Jittable: ``spec`` is a static pytree node, so
    ``jax.jit(transfer_params)(..., spec)`` compiles once per spec and shape.

    Args:
      target_init: :math:`\theta_2^0`.
      source_init: :math:`\theta_1^0`, same structure.
      source_t: :math:`\theta_1^t`, same structure.
      perms: ``{group: indices}``.
      spec: the permutation spec.

    Returns:
      :math:`\theta_2^t` with the dtypes of ``target_init``.

    Examples:
      >>> import jax.numpy as jnp
      >>> from optax_wa.permutation import PermutationSpec
      >>> from optax_wa.transfer import transfer_params
      >>> spec = PermutationSpec({"w": ("h",)})
      >>> out = transfer_params({"w": jnp.zeros(3)}, {"w": jnp.zeros(3)},
      ...     {"w": jnp.array([1.0, 2.0, 3.0])}, {"h": jnp.array([2, 1, 0])}, spec)
      >>> out["w"]
      Array([3., 2., 1.], dtype=float32)

    References:
      Chijiwa, `Transferring Learning Trajectories of Neural Networks
      <https://arxiv.org/abs/2305.14122>`_, ICLR 2024
    """
    delta = jax.tree.map(lambda a, b: a - b, source_t, source_init)
    moved = apply_permutation(spec, perms, delta)
    return jax.tree.map(lambda t, d: (t + d).astype(t.dtype), target_init, moved)


_transfer_params_jit = jax.jit(transfer_params)


def _interpolate(a, b, c):
    return jax.tree.map(lambda x, y: (x + c * (y - x)).astype(x.dtype), a, b)


_interpolate_jit = jax.jit(_interpolate)


def schedule_coefficients(num_points: int, schedule: str = "uniform") -> np.ndarray:
    r"""Positions ``c_1..c_S`` in (0, 1] of the points along one segment.

    .. math::
      c_s = \frac{\sum_{u=0}^{s-1} w_u}{\sum_{u=0}^{S-1} w_u}, \qquad
      w_u = 1 \ (\text{uniform}), \quad
      w_u = 1 + \cos(\pi u / S) \ (\text{cosine}),

    so ``uniform`` spaces the points evenly and ``cosine`` takes larger steps
    first, like the parameter displacement under a cosine learning-rate decay.

    Args:
      num_points: :math:`S \geq 1`.
      schedule: ``"uniform"`` or ``"cosine"``.

    Returns:
      ``float64`` array of shape ``(S,)``, increasing, ending at 1.

    Examples:
      >>> from optax_wa.transfer import schedule_coefficients
      >>> schedule_coefficients(4).tolist()
      [0.25, 0.5, 0.75, 1.0]
    """
    if schedule not in _SCHEDULES:
        raise ValueError(f"schedule must be one of {_SCHEDULES}, got {schedule!r}.")
    if not isinstance(num_points, (int, np.integer)) or num_points < 1:
        raise ValueError(f"num_points must be an int >= 1, got {num_points!r}.")
    u = np.arange(num_points, dtype=np.float64)
    w = (
        np.ones_like(u)
        if schedule == "uniform"
        else 1.0 + np.cos(np.pi * u / num_points)
    )
    c = np.cumsum(w) / np.sum(w)
    c[-1] = 1.0
    return c


def source_trajectory(
    checkpoints: Sequence[PyTree], num_steps: int, schedule: str = "uniform"
) -> list[PyTree]:
    r"""The source trajectory :math:`\theta_1^0..\theta_1^T` from checkpoints.

    ``K + 1`` checkpoints give ``K`` segments; each is split into ``T / K``
    steps at :func:`schedule_coefficients` (piecewise-linear interpolation).
    Two checkpoints (init and final) give the straight line between them.

    Args:
      checkpoints: ``K + 1 >= 2`` trees, first the source init.
      num_steps: ``T``, a multiple of ``K``.
      schedule: ``"uniform"`` or ``"cosine"``.

    Returns:
      ``T + 1`` trees; the checkpoints appear at steps ``0, T/K, ..., T``.
    """
    checkpoints = list(checkpoints)
    if len(checkpoints) < 2:
        raise ValueError(
            f"source needs at least 2 checkpoints (init and final), got {len(checkpoints)}."
        )
    segments = len(checkpoints) - 1
    if not isinstance(num_steps, (int, np.integer)) or num_steps < 1:
        raise ValueError(f"num_steps must be an int >= 1, got {num_steps!r}.")
    if num_steps % segments:
        raise ValueError(
            f"num_steps={num_steps} must be a multiple of the {segments} segments "
            f"between the {len(checkpoints)} source checkpoints."
        )
    coeffs = schedule_coefficients(num_steps // segments, schedule)
    out = [checkpoints[0]]
    for a, b in itertools.pairwise(checkpoints):
        for c in coeffs[:-1]:
            out.append(_interpolate_jit(a, b, jnp.float32(c)))
        out.append(b)
    return out


# --------------------------------------------------------------------------
# Checks
# --------------------------------------------------------------------------


def _check_params_only(spec, tree, name):
    leaves = named_leaves(tree)
    stats = sorted(set(leaves) & spec.batch_stats)
    if stats:
        raise ValueError(
            f"{name} contains batch-statistics leaf {stats[0]!r}: transfer parameters "
            "only (nnx.Param); batch statistics are recomputed by batch_stats_fn."
        )
    return {n: np.shape(x) for n, x in leaves.items()}


def _check_same_structure(ref_shapes, tree, name, spec):
    shapes = _check_params_only(spec, tree, name)
    if shapes != ref_shapes:
        raise ValueError(
            f"{name} does not match target_init (paths and shapes) at leaves "
            f"{differing_leaves(shapes, ref_shapes)}."
        )


def _take_batches(batches, count):
    if isinstance(batches, Sequence):
        out = list(batches[:count])
    else:
        out = list(itertools.islice(iter(batches), count))
    if len(out) < count:
        raise ValueError(
            f"batches must hold at least num_steps={count} batches, got {len(out)}."
        )
    return out


# --------------------------------------------------------------------------
# Methods: one function each, chosen from _METHODS
# --------------------------------------------------------------------------


class _Transfer(NamedTuple):
    """What every method sees: the source steps, the target init and options."""

    spec: PermutationSpec
    sizes: dict[str, int]
    trajectory: list[PyTree]  # theta_1^0..theta_1^T
    target_init: PyTree
    grad_fn: Callable[[PyTree, Any], PyTree] | None
    batches: Iterable[Any] | None
    target_trained: PyTree | None
    ref_shapes: dict[str, tuple[int, ...]]
    matching: MatchingOptions

    @property
    def num_steps(self) -> int:
        return len(self.trajectory) - 1

    def identity(self) -> dict[str, jax.Array]:
        return {g: jnp.arange(n, dtype=jnp.int32) for g, n in self.sizes.items()}

    def transfer(self, t: int, perms) -> PyTree:
        """theta_2^t for the permutation ``perms``."""
        return _transfer_params_jit(
            self.target_init, self.trajectory[0], self.trajectory[t], perms, self.spec
        )

    def weight_matching(self, a, b):
        m = self.matching
        return weight_matching(
            self.spec, a, b, solver=m.solver, max_sweeps=m.max_sweeps, seed=m.seed
        )


def _fixed(job: _Transfer, perms, objectives) -> TransferResult:
    """One permutation for every step."""
    T = job.num_steps
    params = [job.target_init]
    params += [job.transfer(t, perms) for t in range(1, T + 1)]
    return TransferResult(params, [perms] * (T + 1), objectives, 0)


def _naive(job: _Transfer) -> TransferResult:
    return _fixed(job, job.identity(), [])


def _init_matching(job: _Transfer) -> TransferResult:
    result = job.weight_matching(job.target_init, job.trajectory[0])
    return _fixed(job, result.perms, [result.objectives[-1]])


def _oracle(job: _Transfer) -> TransferResult:
    """Aligns the two training displacements."""
    if job.target_trained is None:
        raise ValueError("method='oracle' needs target_trained (the trained target).")
    _check_same_structure(
        job.ref_shapes, job.target_trained, "target_trained", job.spec
    )
    a = jax.tree.map(lambda x, y: x - y, job.target_trained, job.target_init)
    traj = job.trajectory
    b = jax.tree.map(lambda x, y: x - y, traj[-1], traj[0])
    result = job.weight_matching(a, b)
    return _fixed(job, result.perms, [result.objectives[-1]])


def _along_gradients(job: _Transfer, method: str, step_pairs) -> TransferResult:
    """The loop of FGMT and GMT: at step t, match the pairs ``step_pairs`` gives.

    ``step_pairs(t, grad_pair, params, perms)`` returns the gradient pairs of
    step ``t``, given ``grad_pair(target_params, s)`` (target and source
    gradients on batch ``s``, on the host), the params so far and the
    current permutation (``None`` before the first matching).
    """
    if job.grad_fn is None or job.batches is None:
        raise ValueError(f"method={method!r} needs grad_fn and batches.")
    batches = _take_batches(job.batches, job.num_steps)
    calls = []

    def grad_pair(target_params, s):
        calls.append(s)
        g2 = job.grad_fn(target_params, batches[s])
        g1 = job.grad_fn(job.trajectory[s], batches[s])
        # (a, b) of gradient_matching: pi permutes the source side.
        return _on_host(g2), _on_host(g1)

    m = job.matching
    perms = None  # the first matching warm-starts (see gradient_matching)
    out = TransferResult([job.target_init], [job.identity()], [], 0)
    for t in range(1, job.num_steps + 1):
        result = gradient_matching(
            job.spec,
            step_pairs(t, grad_pair, out.params, perms),
            solver=m.solver,
            max_sweeps=m.max_sweeps,
            seed=m.seed + t,
            init_perms=perms,
        )
        perms = result.perms
        out.objectives.append(result.objectives[-1])
        out.perms.append(perms)
        out.params.append(job.transfer(t, perms))
    return out._replace(grad_calls=2 * len(calls))


def _on_host(tree):
    return jax.tree.map(lambda x: np.asarray(x, np.float64), tree)


def _fgmt(job: _Transfer) -> TransferResult:
    """One new pair per step, at the target's own previous step; all kept."""
    cache = []

    def step_pairs(t, grad_pair, params, perms):
        cache.append(grad_pair(params[t - 1], t - 1))
        return cache

    return _along_gradients(job, "fgmt", step_pairs)


def _gmt(job: _Transfer) -> TransferResult:
    """All pairs recomputed along the trajectory the current permutation gives."""

    def step_pairs(t, grad_pair, params, perms):
        current = job.identity() if perms is None else perms
        return [grad_pair(job.transfer(s, current), s) for s in range(t)]

    return _along_gradients(job, "gmt", step_pairs)


_METHODS = {
    "fgmt": _fgmt,
    "gmt": _gmt,
    "naive": _naive,
    "oracle": _oracle,
    "init_matching": _init_matching,
}


def transfer_trajectory(
    source: Sequence[PyTree],
    target_init: PyTree,
    grad_fn: Callable[[PyTree, Any], PyTree] | None,
    batches: Iterable[Any] | None,
    spec: PermutationSpec,
    *,
    method: str = "fgmt",
    num_steps: int = 10,
    schedule: str = "uniform",
    target_trained: PyTree | None = None,
    matching: MatchingOptions | None = None,
) -> TransferResult:
    r"""Transfers a source learning trajectory onto a new initialization.

    .. math::
      \theta_2^t = \theta_2^0 + \pi_t\big(\theta_1^t - \theta_1^0\big),
      \qquad t = 1, \ldots, T.

    Methods (how :math:`\pi_t` is chosen):

    * ``"fgmt"`` (fast gradient matching along the trajectory): at step
      :math:`t` compute, on minibatch ``batches[t-1]``, the target gradient
      at :math:`\theta_2^{t-1}` and the source gradient at
      :math:`\theta_1^{t-1}`, add the pair to a cache, and set
      :math:`\pi_t = \arg\max_\pi \sum_{s<t} \langle g_2^s, \pi(g_1^s)\rangle`
      over all cached pairs (coordinate descent of
      :func:`~optax_wa.permutation.gradient_matching` started from
      :math:`\pi_{t-1}`; at ``t = 1`` from its two default starts). Two
      gradient calls per step: ``2T`` in all.
    * ``"gmt"``: as FGMT, but every step recomputes all pairs ``s < t`` with
      the target at :math:`\theta_2^0 + \pi_{t-1}(\theta_1^s - \theta_1^0)`
      (the trajectory the current permutation gives): ``T(T+1)`` calls.
    * ``"naive"``: :math:`\pi = \text{id}`.
    * ``"oracle"``: one :math:`\pi` from weight matching the trained
      target's displacement :math:`\theta_2^{T'} - \theta_2^0`
      (``target_trained``) with the source's :math:`\theta_1^T - \theta_1^0`.
    * ``"init_matching"``: one :math:`\pi` from weight matching the two
      inits, :math:`\theta_2^0` with :math:`\theta_1^0`.

    BatchNorm statistics are never transferred: pass parameters only (the
    spec's ``batch_stats`` leaves are refused); :func:`evaluate_trajectory`
    recomputes them at every step and scores the steps.

    Args:
      source: the source checkpoints, first the source init
        :math:`\theta_1^0`: two trees (init and final: the straight line
        between them) or ``K + 1`` trees (piecewise-linear); see
        :func:`source_trajectory`.
      target_init: :math:`\theta_2^0`, same paths and shapes.
      grad_fn: ``(params, batch) -> grads`` (same structure as params);
        needed by ``fgmt``/``gmt``.
      batches: at least ``num_steps`` minibatches (a sequence or an
        iterable); pair ``s`` uses ``batches[s]`` for both networks.
      spec: the permutation spec of the parameters.
      method: ``"fgmt"``, ``"gmt"``, ``"naive"``, ``"oracle"`` or
        ``"init_matching"``.
      num_steps: :math:`T \geq 1`, a multiple of ``len(source) - 1``.
      schedule: ``"uniform"`` or ``"cosine"`` spacing of the source steps.
      target_trained: the trained target, for ``method="oracle"``.
      matching: a :class:`~optax_wa.permutation.MatchingOptions` (solver,
        sweeps, seed) for every matching (default ``MatchingOptions()``);
        FGMT and GMT use ``seed + t`` at step ``t``.

    Returns:
      A :class:`TransferResult`.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from optax_wa.permutation import PermutationSpec
      >>> from optax_wa.transfer import transfer_trajectory
      >>> spec = PermutationSpec({"w1": (None, "h"), "w2": ("h", None)})
      >>> k1, k2 = jax.random.split(jax.random.key(0))
      >>> init = {"w1": jax.random.normal(k1, (3, 8)), "w2": jax.random.normal(k2, (8, 1))}
      >>> final = jax.tree.map(lambda x: 0.5 * x, init)
      >>> loss = lambda p, x: jnp.sum(jnp.tanh(x @ p["w1"]) @ p["w2"]) ** 2
      >>> batches = [jnp.ones((2, 3)) * i for i in range(4)]
      >>> out = transfer_trajectory([init, final], init, jax.grad(loss), batches,
      ...     spec, num_steps=4)
      >>> out.grad_calls
      8

    References:
      Chijiwa, `Transferring Learning Trajectories of Neural Networks
      <https://arxiv.org/abs/2305.14122>`_, ICLR 2024
    """
    if method not in _METHODS:
        raise ValueError(f"method must be one of {tuple(_METHODS)}, got {method!r}.")
    matching = MatchingOptions() if matching is None else matching
    if not isinstance(matching, MatchingOptions):
        raise TypeError(
            f"matching must be a MatchingOptions, got {type(matching).__name__}."
        )
    if not isinstance(spec, PermutationSpec):
        raise TypeError(f"spec must be a PermutationSpec, got {type(spec).__name__}.")
    if isinstance(source, Mapping) or not isinstance(source, Sequence):
        raise TypeError(
            "source must be a list of checkpoints [init, ..., final] (two for the "
            "straight line between init and final)."
        )
    ref_shapes = _check_params_only(spec, target_init, "target_init")
    for k, tree in enumerate(source):
        _check_same_structure(ref_shapes, tree, f"source[{k}]", spec)
    job = _Transfer(
        spec=spec,
        sizes=validate(spec, target_init),
        trajectory=source_trajectory(source, num_steps, schedule),
        target_init=target_init,
        grad_fn=grad_fn,
        batches=batches,
        target_trained=target_trained,
        ref_shapes=ref_shapes,
        matching=matching,
    )
    return _METHODS[method](job)


def evaluate_trajectory(
    params: Sequence[PyTree],
    eval_fn: Callable[..., float],
    *,
    batch_stats_fn: Callable[[PyTree], PyTree] | None = None,
) -> TrajectoryScores:
    r"""Scores every step of a transferred trajectory and picks the best one.

    .. math::
      t^\star = \arg\max_t\ \text{eval\_fn}(\theta_2^t)

    over the finite scores (the first on ties; step 0 when none is finite).
    With ``batch_stats_fn`` the statistics of each step are recomputed first
    (e.g. a BatchNorm recalibration on a few training batches, see
    :func:`~optax_wa.batchnorm.recalibrate_batch_stats`) and passed to
    ``eval_fn``.

    Args:
      params: :math:`\theta_2^0..\theta_2^T`, e.g. ``TransferResult.params``.
      eval_fn: ``eval_fn(params)`` (or ``eval_fn(params, batch_stats)`` with
        ``batch_stats_fn``) returning a score, higher is better (e.g.
        validation accuracy).
      batch_stats_fn: optional ``params -> batch_stats``.

    Returns:
      A :class:`TrajectoryScores`.

    Examples:
      >>> import jax.numpy as jnp
      >>> from optax_wa.transfer import evaluate_trajectory
      >>> steps = [jnp.array(0.0), jnp.array(3.0), jnp.array(1.0)]
      >>> evaluate_trajectory(steps, lambda p: -(p - 2.0) ** 2).best_step
      1
    """
    params = list(params)
    if not params:
        raise ValueError("evaluate_trajectory: params holds no step.")
    stats = None if batch_stats_fn is None else [batch_stats_fn(p) for p in params]
    if stats is None:
        scores = [float(eval_fn(p)) for p in params]
    else:
        scores = [float(eval_fn(p, s)) for p, s in zip(params, stats)]
    finite = [s if math.isfinite(s) else -math.inf for s in scores]
    return TrajectoryScores(scores, int(np.argmax(finite)), stats)
