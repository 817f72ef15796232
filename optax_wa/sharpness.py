r"""Sharpness-aware descent: SAM, USAM, ASAM and Stable SAM (SSAM).

Sharpness-aware methods change the *gradient oracle*: the descent gradient is
the gradient at an adversarially perturbed point :math:`w + \epsilon`, applied
at the clean point :math:`w`. The core of this module is a pure function,
:func:`sam_value_and_grad`, which turns a loss into that oracle. The optax
wrapper :func:`sharpness_aware` (and :func:`ssam`) runs the same ascent inside
``update`` from a ``grad_fn`` extra argument and hands the descent gradient to
any inner optax optimizer.

There is no "transparent" mode (one ``update`` call per pass): the params seen
by the training loop, by averaging methods and by BatchNorm statistics are
always the clean ones.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

PyTree = Any

_PERTURBATIONS = ("sam", "usam")


class SamInfo(NamedTuple):
    """Diagnostics of one sharpness-aware gradient evaluation.

    All fields are float32 scalars (per member when vmapped over an ensemble).
    With ``adaptive=True`` the two norms are the :math:`T_w`-weighted norms
    :math:`\\|T_w g\\|` and :math:`\\|T_w g_{adv}\\|`. In data-parallel use with
    per-device ascent (``axis_name`` set, ``sync_ascent=False``) every field
    is the mean over devices of the per-device values.

    Attributes:
      gamma: the Stable SAM factor :math:`\\gamma = \\|g\\| / (\\|g_{adv}\\| +
        \\text{eps})`, capped at ``max_scale`` when given. Reported for every
        variant; it scales the descent gradient only when ``stable=True``.
      grad_norm: :math:`\\|g\\|`, the norm of the clean (ascent) gradient.
      adv_grad_norm: :math:`\\|g_{adv}\\|`, the norm of the perturbed gradient.
      adv_loss: the loss at the perturbed params; ``None`` in the state of
        :func:`sharpness_aware`, whose ``grad_fn`` returns no loss.
    """

    gamma: jax.Array
    grad_norm: jax.Array
    adv_grad_norm: jax.Array
    adv_loss: jax.Array | None


class SharpnessAwareState(NamedTuple):
    """State of :func:`sharpness_aware` and :func:`ssam`.

    Attributes:
      count: number of updates so far (int32 scalar); the step at which a
        ``rho`` schedule is evaluated.
      inner_state: the inner optimizer's state.
      info: :class:`SamInfo` of the last update (zeros before the first one;
        ``adv_loss`` is ``None``); ``None`` with ``record_info=False``.
    """

    count: jax.Array
    inner_state: optax.OptState
    info: SamInfo | None


# ----------------------------------------------------------------------------
# Validation of the static options.


def _is_concrete_number(x) -> bool:
    if isinstance(x, bool):
        return False
    if isinstance(x, (int, float, np.number)):
        return True
    return isinstance(x, (np.ndarray, jax.Array)) and not isinstance(x, jax.core.Tracer)


def _check_nonnegative(name: str, value, allow_schedule: bool = False) -> None:
    if allow_schedule and callable(value):
        return
    if _is_concrete_number(value):
        array = np.asarray(value)
        if array.ndim != 0 or not np.isfinite(array) or float(array) < 0.0:
            raise ValueError(f"{name} must be a finite scalar >= 0, got {value!r}.")


class _Options(NamedTuple):
    """The static options of the oracle and the wrapper (validated)."""

    perturbation: str
    adaptive: bool
    adaptive_eta: float
    adaptive_mask: Any
    stable: bool
    max_scale: float | None
    eps: float
    axis_name: Any
    sync_ascent: bool


def _make_options(*, rho, rho_may_be_schedule, **options) -> _Options:
    """Validates ``rho`` and the static options; raises ``ValueError`` naming one."""
    o = _Options(**options)
    _check_nonnegative("rho", rho, allow_schedule=rho_may_be_schedule)
    if o.perturbation not in _PERTURBATIONS:
        raise ValueError(
            f"perturbation must be one of {_PERTURBATIONS}, got {o.perturbation!r}."
        )
    _check_nonnegative("adaptive_eta", o.adaptive_eta)
    if o.adaptive_mask is not None and not o.adaptive:
        raise ValueError("adaptive_mask is only used with adaptive=True (ASAM).")
    if o.max_scale is not None:
        if not _is_concrete_number(o.max_scale) or not float(o.max_scale) > 0.0:
            raise ValueError(
                f"max_scale must be None or a number > 0, got {o.max_scale!r}."
            )
    if not _is_concrete_number(o.eps) or not float(o.eps) >= 0.0:
        raise ValueError(f"eps must be a number >= 0, got {o.eps!r}.")
    if o.sync_ascent and o.axis_name is None:
        raise ValueError(
            "sync_ascent=True averages the ascent gradient over a data-parallel "
            "axis and needs axis_name (the name of that axis)."
        )
    return o


# ----------------------------------------------------------------------------
# The shared ascent / descent step.


def _global_norm(leaves) -> jax.Array:
    """Global L2 norm of a list of arrays, accumulated in float32."""
    total = jnp.zeros([], jnp.float32)
    for x in leaves:
        total = total + jnp.sum(jnp.square(x.astype(jnp.float32)))
    return jnp.sqrt(total)


def _safe_ratio(numerator, denominator):
    """``numerator / denominator``, and 0 where the denominator is 0."""
    positive = denominator > 0
    return jnp.where(positive, numerator / jnp.where(positive, denominator, 1.0), 0.0)


def _adaptive_flags(params, adaptive, adaptive_mask) -> list[bool]:
    """One static bool per params leaf: does ASAM scale this leaf by ``|w| + eta``."""
    num_leaves = len(jax.tree.leaves(params))
    if not adaptive:
        return [False] * num_leaves
    if adaptive_mask is None:
        return [True] * num_leaves
    mask = adaptive_mask(params) if callable(adaptive_mask) else adaptive_mask
    # The mask may be a prefix of the params tree: broadcast each flag.
    try:
        full = jax.tree.map(
            lambda flag, sub: jax.tree.map(lambda _: bool(flag), sub), mask, params
        )
    except ValueError as error:
        raise ValueError(
            "adaptive_mask must be a pytree of bools with the structure of params "
            f"(or a prefix of it): {error}"
        ) from None
    flags = jax.tree.leaves(full)
    if len(flags) != num_leaves:
        raise ValueError("adaptive_mask must give one bool per params leaf.")
    return flags


def _axis_names(axis_name) -> tuple:
    return tuple(axis_name) if isinstance(axis_name, (tuple, list)) else (axis_name,)


def _as_varying(tree, axis_name):
    """Marks leaves as varying over ``axis_name`` so that their gradients stay local.

    Inside ``jax.shard_map`` (with ``check_vma``), the gradient with respect to
    a replicated (axis-invariant) input is summed over the axis by the
    transpose; differentiating at a varying copy keeps the device's own
    gradient, which the per-device ascent needs. Outside ``shard_map`` (pmap,
    ``vmap`` with an axis name) gradients are local already.
    """
    pcast = getattr(jax.lax, "pcast", None)
    if axis_name is None or pcast is None:  # JAX without varying-axis types
        return tree
    names = _axis_names(axis_name)

    def one(x):
        vma = getattr(jax.typeof(x), "vma", frozenset())
        missing = tuple(n for n in names if n not in vma)
        if not missing:
            return x
        try:
            return pcast(x, missing, to="varying")
        except ValueError:  # not under shard_map: nothing to mark
            return x

    return jax.tree.map(one, tree)


def _sharpness_step(params, grads, adv_grad_fn, rho, options: _Options):
    """Ascent from ``grads`` at ``params``, then the (stabilized) descent gradient.

    ``adv_grad_fn(adv_params) -> (adv_grads, adv_loss_or_None)`` evaluates the
    local gradient at the perturbed params. Returns ``(descent, info)``.
    """
    (
        perturbation,
        adaptive,
        adaptive_eta,
        adaptive_mask,
        stable,
        max_scale,
        eps,
        axis_name,
        sync_ascent,
    ) = options
    param_leaves, treedef = jax.tree.flatten(params)
    grad_dtypes = [g.dtype for g in treedef.flatten_up_to(grads)]
    # Everything below is float32; the result is cast back to the grads' dtypes.
    grad_leaves = [g.astype(jnp.float32) for g in treedef.flatten_up_to(grads)]
    if axis_name is not None and sync_ascent:
        grad_leaves = jax.lax.pmean(grad_leaves, axis_name)
    flags = _adaptive_flags(params, adaptive, adaptive_mask)
    eta = jnp.asarray(adaptive_eta, jnp.float32)
    # T_w per leaf, or None where T_w = 1.
    scales = [
        jnp.abs(p.astype(jnp.float32)) + eta if flag else None
        for p, flag in zip(param_leaves, flags)
    ]

    def weighted(leaves):
        return [g if t is None else t * g for g, t in zip(leaves, scales)]

    weighted_grads = weighted(grad_leaves)
    grad_norm = _global_norm(weighted_grads)
    rho = jnp.asarray(rho, jnp.float32)
    if perturbation == "sam":
        coef = _safe_ratio(rho, grad_norm + eps)
    else:
        coef = rho
    # epsilon = coef * T_w^2 g = coef * T_w (T_w g), added to the params in float32.
    adv_leaves = [
        (p.astype(jnp.float32) + coef * (tg if t is None else t * tg)).astype(p.dtype)
        for p, tg, t in zip(param_leaves, weighted_grads, scales)
    ]
    adv_grads, adv_loss = adv_grad_fn(
        _as_varying(treedef.unflatten(adv_leaves), axis_name)
    )
    adv_grad_leaves = [g.astype(jnp.float32) for g in treedef.flatten_up_to(adv_grads)]
    if adv_loss is not None:
        adv_loss = jnp.asarray(adv_loss, jnp.float32)
    if axis_name is not None and sync_ascent:
        adv_grad_leaves, adv_loss = jax.lax.pmean(
            (adv_grad_leaves, adv_loss), axis_name
        )
    adv_grad_norm = _global_norm(weighted(adv_grad_leaves))
    gamma = _safe_ratio(grad_norm, adv_grad_norm + eps)
    if max_scale is not None:
        gamma = jnp.minimum(gamma, jnp.asarray(max_scale, jnp.float32))
    descent_leaves = [gamma * g for g in adv_grad_leaves] if stable else adv_grad_leaves
    info = SamInfo(
        gamma=gamma, grad_norm=grad_norm, adv_grad_norm=adv_grad_norm, adv_loss=adv_loss
    )
    if axis_name is not None and not sync_ascent:
        descent_leaves, info = jax.lax.pmean((descent_leaves, info), axis_name)
    descent = treedef.unflatten(
        [d.astype(dtype) for d, dtype in zip(descent_leaves, grad_dtypes)]
    )
    return descent, info


# ----------------------------------------------------------------------------
# Public API.


def sam_value_and_grad(
    loss_fn: Callable[..., Any],
    *,
    rho: float | jax.Array = 0.05,
    perturbation: str = "sam",
    adaptive: bool = False,
    adaptive_eta: float = 0.01,
    adaptive_mask: PyTree | Callable[[PyTree], PyTree] | None = None,
    stable: bool = False,
    max_scale: float | None = None,
    eps: float = 1e-12,
    has_aux: bool = False,
    axis_name: str | None = None,
    sync_ascent: bool = False,
) -> Callable[..., tuple[tuple[jax.Array, Any], PyTree, SamInfo]]:
    r"""The sharpness-aware gradient oracle of ``loss_fn``.

    With :math:`g = \nabla L(w)` on a minibatch, the ascent step is

    .. math::
      \epsilon = \begin{cases}
        \rho\, T_w^2 g \,/\, (\|T_w g\| + \text{eps}) & \text{SAM / ASAM} \\
        \rho\, T_w^2 g & \text{USAM}
      \end{cases}
      \qquad T_w = \begin{cases} |w| + \eta & \text{ASAM} \\ 1 & \text{otherwise,}
      \end{cases}

    then :math:`g_{adv} = \nabla L(w + \epsilon)` on the same minibatch and the
    descent gradient, to be applied at the clean :math:`w`, is

    .. math::
      d = \begin{cases} \gamma\, g_{adv}, \quad
        \gamma = \|T_w g\| \,/\, (\|T_w g_{adv}\| + \text{eps}) & \text{Stable SAM} \\
        g_{adv} & \text{otherwise.} \end{cases}

    Stable SAM (``stable=True``) therefore gives a descent gradient whose norm
    equals the ascent gradient's. Norms are global over all leaves of
    ``params`` and accumulated in float32; under :func:`jax.vmap` over an
    ensemble they are per member. All divisions are safe at zero: a zero
    gradient gives a zero perturbation, :math:`\gamma = 0` and a zero descent.

    Both passes see the same ``*args`` (same batch, same RNG key). The loss
    and ``aux`` (e.g. BatchNorm statistics, metrics) come from the clean pass;
    the perturbed pass's ``aux`` is discarded.

    Data parallel (inside ``shard_map``/``pmap`` with ``axis_name`` the data
    axis, every device holding a shard of the batch):

    * ``sync_ascent=False`` (default, "m-sharpness"): each device perturbs with
      its own shard's gradient, computes its own :math:`g_{adv}` and, for
      Stable SAM, its own :math:`\gamma`; the descent gradient is the mean over
      devices of the per-device descent gradients.
    * ``sync_ascent=True``: :math:`g` and :math:`g_{adv}` are averaged over
      devices before use, so :math:`\epsilon`, :math:`\gamma` and the result
      equal single-device full-batch SAM.

    In both cases the returned gradient and loss are averaged over the axis
    (identical on every device); ``aux`` is the device's own. ``info`` is the
    mean over devices of the per-device diagnostics (identical to the global
    ones with ``sync_ascent=True``).

    Args:
      loss_fn: ``loss_fn(params, *args) -> loss`` (or ``(loss, aux)`` with
        ``has_aux=True``); differentiated with respect to ``params``.
      rho: the perturbation radius :math:`\rho \ge 0` (a float or a scalar
        array, e.g. a traced schedule value).
      perturbation: ``"sam"`` (normalized ascent, Foret et al.) or ``"usam"``
        (unnormalized, :math:`\epsilon = \rho g`).
      adaptive: ASAM: scale the ascent by :math:`T_w = |w| + \eta`.
      adaptive_eta: :math:`\eta \ge 0` of ASAM.
      adaptive_mask: ASAM only. A pytree of bools with the structure of params
        (or a prefix of it), or a callable ``params -> mask``, selecting the
        leaves scaled by :math:`T_w`; unselected leaves (e.g. biases and norm
        parameters) get :math:`T_w = 1` and are still perturbed and counted in
        the norms. Default ``None``: every leaf is adaptive.
      stable: Stable SAM: rescale the descent gradient by :math:`\gamma`.
      max_scale: optional cap on :math:`\gamma` (``1.0`` gives
        :math:`\min(1, \gamma)`); ``None`` for no cap.
      eps: added to the norms in the denominators, ``>= 0``.
      has_aux: whether ``loss_fn`` returns ``(loss, aux)``.
      axis_name: the data-parallel axis name, or ``None`` on one device.
      sync_ascent: with ``axis_name``, use the all-device gradient for the
        ascent (see above).

    Returns:
      A function ``(params, *args) -> ((loss, aux), grads, info)``: the clean
      loss, the clean pass's ``aux`` (``None`` without ``has_aux``), the
      descent gradient (same structure and dtypes as ``params``' gradient) and
      a :class:`SamInfo`.

    Examples:
      >>> import jax.numpy as jnp, optax_wa
      >>> loss = lambda w: 0.5 * (w[0] ** 2 + 10.0 * w[1] ** 2)
      >>> oracle = optax_wa.sam_value_and_grad(loss, rho=0.1, stable=True)
      >>> (value, _), grads, info = oracle(jnp.array([1.0, 1.0]))
      >>> print(f"{value:.2f}", [f"{x:.4f}" for x in grads.tolist()], f"{info.gamma:.4f}")
      5.50 ['0.9193', '10.0077'] 0.9102

    References:
      Foret et al., `Sharpness-Aware Minimization for Efficiently Improving
      Generalization <https://arxiv.org/abs/2010.01412>`_, ICLR 2021.

      Kwon et al., `ASAM: Adaptive Sharpness-Aware Minimization for
      Scale-Invariant Learning of Deep Neural Networks
      <https://arxiv.org/abs/2102.11600>`_, ICML 2021.

      Tan et al., `Stabilizing Sharpness-Aware Minimization Through A Simple
      Renormalization Strategy <https://arxiv.org/abs/2401.07250>`_, JMLR 2025.
    """
    options = _make_options(
        rho=rho,
        rho_may_be_schedule=False,
        perturbation=perturbation,
        adaptive=adaptive,
        adaptive_eta=adaptive_eta,
        adaptive_mask=adaptive_mask,
        stable=stable,
        max_scale=max_scale,
        eps=eps,
        axis_name=axis_name,
        sync_ascent=sync_ascent,
    )
    if callable(rho):
        raise ValueError(
            "rho of sam_value_and_grad must be a number or scalar array; evaluate "
            "a schedule yourself or use sharpness_aware, which accepts one."
        )
    if has_aux:
        value_and_grad = jax.value_and_grad(loss_fn, has_aux=True)
    else:
        value_and_grad = jax.value_and_grad(
            lambda *a: (loss_fn(*a), None), has_aux=True
        )

    def oracle(params, *args):
        (loss, aux), grads = value_and_grad(_as_varying(params, axis_name), *args)

        def adv_grad_fn(adv_params):
            (adv_loss, _), adv_grads = value_and_grad(adv_params, *args)
            return adv_grads, adv_loss

        descent, info = _sharpness_step(params, grads, adv_grad_fn, rho, options)
        if axis_name is not None:
            loss = jax.lax.pmean(loss, axis_name)
        return (loss, aux), descent, info

    return oracle


def sharpness_aware(
    inner: optax.GradientTransformation,
    *,
    rho: optax.ScalarOrSchedule = 0.05,
    perturbation: str = "sam",
    adaptive: bool = False,
    adaptive_eta: float = 0.01,
    adaptive_mask: PyTree | Callable[[PyTree], PyTree] | None = None,
    stable: bool = False,
    max_scale: float | None = None,
    eps: float = 1e-12,
    has_aux: bool = False,
    axis_name: str | None = None,
    sync_ascent: bool = False,
    record_info: bool = True,
) -> optax.GradientTransformationExtraArgs:
    r"""Wraps an optimizer so that it descends along the sharpness-aware gradient.

    ``update(grads, state, params, *, grad_fn)`` takes the clean gradient
    :math:`g = \nabla L(w)` as ``grads``, perturbs the params as
    :func:`sam_value_and_grad` does, calls ``grad_fn`` once at the perturbed
    params and gives the descent gradient to ``inner`` at the clean params:

    .. math::
      \epsilon = \rho_t\, T_w^2 g / (\|T_w g\| + \text{eps}) \ \text{(SAM; USAM:}\
      \rho_t T_w^2 g\text{)}, \quad g_{adv} = \nabla L(w + \epsilon), \quad
      u = \text{inner}(\gamma^{[\text{stable}]} g_{adv};\, w),

    with :math:`\gamma = \|T_w g\| / (\|T_w g_{adv}\| + \text{eps})`. The
    wrapper never returns or stores perturbed params (no transparent mode).

    ``grad_fn(params) -> grads`` must compute the gradient on the *same*
    minibatch (and RNG key) as ``grads``; with ``has_aux=True`` it returns
    ``(grads, aux)`` and ``aux`` is discarded (aux such as BatchNorm statistics
    belongs to the clean pass, which the caller ran). A natural choice is
    ``grad_fn = lambda p: jax.grad(loss_fn)(p, batch)``. Other extra keyword
    arguments are passed to ``inner``. Inside an ensemble wrapper
    (:func:`optax_wa.lookaround`, :func:`optax_wa.papa`) ``grad_fn`` is called
    per member with that member's params, so norms are per member.

    With ``axis_name`` (data parallel), pass the device's *local* gradient as
    ``grads`` and a ``grad_fn`` returning local gradients: the wrapper
    averages over the axis as described in :func:`sam_value_and_grad`, so
    ``inner`` sees the same averaged gradient on every device.

    Args:
      inner: the optimizer applied to the descent gradient (momentum, weight
        decay etc. come after the sharpness-aware step, as in the papers).
      rho: perturbation radius :math:`\rho \ge 0`, a float or a schedule of the
        update count.
      perturbation: ``"sam"`` or ``"usam"``.
      adaptive: ASAM scaling :math:`T_w = |w| + \eta`.
      adaptive_eta: :math:`\eta \ge 0`.
      adaptive_mask: leaves scaled by :math:`T_w` (pytree of bools or callable;
        others get :math:`T_w = 1`); default ``None``: all leaves.
      stable: Stable SAM renormalization (see :func:`ssam`).
      max_scale: optional cap on :math:`\gamma`; ``None`` for no cap.
      eps: added to the norms in the denominators, ``>= 0``.
      has_aux: whether ``grad_fn`` returns ``(grads, aux)``.
      axis_name: data-parallel axis name, or ``None``.
      sync_ascent: with ``axis_name``, perturb with the all-device gradient.
      record_info: keep the step's :class:`SamInfo` in the state (default).
        ``False`` stores ``info=None``, so that XLA drops the diagnostics the
        update does not need (for plain SAM, the norm of :math:`g_{adv}`: one
        pass over the gradients per step).

    Returns:
      A ``GradientTransformationExtraArgs`` with state
      :class:`SharpnessAwareState`.

    Raises:
      ValueError: in ``update``, when ``grad_fn`` or ``params`` is missing.

    Examples:
      >>> import jax, jax.numpy as jnp, optax, optax_wa
      >>> loss = lambda w: 0.5 * (w[0] ** 2 + 10.0 * w[1] ** 2)
      >>> opt = optax_wa.sharpness_aware(optax.sgd(0.1), rho=0.1)
      >>> params = jnp.array([1.0, 1.0])
      >>> state = opt.init(params)
      >>> updates, state = opt.update(
      ...     jax.grad(loss)(params), state, params, grad_fn=jax.grad(loss))
      >>> print([f"{x:.4f}" for x in updates.tolist()], f"{state.info.grad_norm:.4f}")
      ['-0.1010', '-1.0995'] 10.0499

    References:
      Foret et al., `Sharpness-Aware Minimization for Efficiently Improving
      Generalization <https://arxiv.org/abs/2010.01412>`_, ICLR 2021.

      Tan et al., `Stabilizing Sharpness-Aware Minimization Through A Simple
      Renormalization Strategy <https://arxiv.org/abs/2401.07250>`_, JMLR 2025.
    """
    options = _make_options(
        rho=rho,
        rho_may_be_schedule=True,
        perturbation=perturbation,
        adaptive=adaptive,
        adaptive_eta=adaptive_eta,
        adaptive_mask=adaptive_mask,
        stable=stable,
        max_scale=max_scale,
        eps=eps,
        axis_name=axis_name,
        sync_ascent=sync_ascent,
    )
    inner = optax.with_extra_args_support(inner)

    def init_fn(params):
        zero = jnp.zeros([], jnp.float32)
        return SharpnessAwareState(
            count=jnp.zeros([], jnp.int32),
            inner_state=inner.init(params),
            info=(
                SamInfo(gamma=zero, grad_norm=zero, adv_grad_norm=zero, adv_loss=None)
                if record_info
                else None
            ),
        )

    def update_fn(updates, state, params=None, *, grad_fn=None, **extra_args):
        if grad_fn is None:
            raise ValueError(
                "sharpness_aware needs the extra argument grad_fn: call "
                "update(grads, state, params, grad_fn=lambda p: jax.grad(loss)(p, batch))"
                " with the same batch as grads."
            )
        if params is None:
            raise ValueError("sharpness_aware needs params in update to perturb them.")
        rho_t = rho(state.count) if callable(rho) else rho

        def adv_grad_fn(adv_params):
            out = grad_fn(adv_params)
            return (out[0] if has_aux else out), None

        descent, info = _sharpness_step(params, updates, adv_grad_fn, rho_t, options)
        new_updates, inner_state = inner.update(
            descent, state.inner_state, params, **extra_args
        )
        return new_updates, SharpnessAwareState(
            count=optax.safe_increment(state.count),
            inner_state=inner_state,
            info=info if record_info else None,
        )

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def ssam(
    inner: optax.GradientTransformation,
    rho: optax.ScalarOrSchedule = 0.05,
    **options,
) -> optax.GradientTransformationExtraArgs:
    r"""Stable SAM: :func:`sharpness_aware` with the descent gradient renormalized.

    .. math::
      d = \frac{\|g\|}{\|g_{adv}\| + \text{eps}}\, g_{adv},
      \qquad \|d\| = \|g\| \ \text{(up to eps)},

    which keeps SAM's step no larger than the gradient step and widens the
    range of stable learning rates: on a quadratic with top eigenvalue
    :math:`\lambda`, USAM diverges above :math:`2/(\lambda(1+\rho\lambda))`
    while Stable USAM is stable up to the gradient-descent limit
    :math:`2/\lambda`.

    Args:
      inner: the optimizer applied to the descent gradient.
      rho: perturbation radius, a float or schedule.
      **options: any other keyword of :func:`sharpness_aware`
        (``perturbation="usam"`` for Stable USAM, ``adaptive=True`` for Stable
        ASAM, ``max_scale=1.0`` for :math:`\min(1, \gamma)`, ...).

    Returns:
      A ``GradientTransformationExtraArgs`` with state
      :class:`SharpnessAwareState`; ``update`` needs ``grad_fn``.

    Examples:
      >>> import jax, jax.numpy as jnp, optax, optax_wa
      >>> loss = lambda w: 0.5 * (w[0] ** 2 + 10.0 * w[1] ** 2)
      >>> opt = optax_wa.ssam(optax.sgd(0.1), rho=0.1, perturbation="usam")
      >>> params = jnp.array([1.0, 1.0])
      >>> updates, state = opt.update(
      ...     jax.grad(loss)(params), opt.init(params), params,
      ...     grad_fn=jax.grad(loss))
      >>> print([f"{x:.4f}" for x in updates.tolist()], f"{state.info.gamma:.4f}")
      ['-0.0552', '-1.0035'] 0.5017

    References:
      Tan et al., `Stabilizing Sharpness-Aware Minimization Through A Simple
      Renormalization Strategy <https://arxiv.org/abs/2401.07250>`_, JMLR 2025.
    """
    if "stable" in options:
        raise ValueError(
            "ssam always has stable=True; use sharpness_aware for the rest."
        )
    return sharpness_aware(inner, rho=rho, stable=True, **options)
