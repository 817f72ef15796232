r"""The sharpness-aware step shared by the oracle and the optax wrappers.

Validation of the static options, then the ascent and descent of one step in
the notation of :func:`optax_wa.sharpness.sam_value_and_grad`: the
perturbation, the gradient at the perturbed params and the Stable SAM factor.
The public faces are in ``optax_wa.sharpness``, which re-exports
:class:`SamInfo`.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from optax_wa._checks import is_concrete_number, is_traced
from optax_wa._numerics import (
    NormFactors,
    global_norm,
    ratio_to_norm,
    safe_ratio,
    weighted_norm_factors,
)

__all__ = [
    "SamInfo",
    "as_varying",
    "check_bools",
    "check_real_floating",
    "make_options",
    "params_rewriting_state",
    "sharpness_step",
]

PyTree = Any

_PERTURBATIONS = ("sam", "usam")


class SamInfo(NamedTuple):
    """Diagnostics of one sharpness-aware gradient evaluation.

    All fields are float32 scalars (per member when vmapped over an ensemble).
    With ``adaptive=True`` the two norms are the weighted norms
    :math:`\\|T g\\|` and :math:`\\|T' g_{adv}\\|` (see
    :func:`optax_wa.sam_value_and_grad`). In data-parallel use with
    per-device ascent (``axis_name`` set, ``sync_ascent=False``) every field
    is the mean over devices of the per-device values.

    Attributes:
      gamma: the Stable SAM factor :math:`\\gamma = \\|g\\| / (\\|g_{adv}\\| +
        \\text{eps})`, capped at ``max_scale`` when given. Reported for every
        variant; it scales the descent gradient only when ``stable=True``.
      grad_norm: :math:`\\|g\\|`, the norm of the clean (ascent) gradient.
      adv_grad_norm: :math:`\\|g_{adv}\\|`, the norm of the perturbed gradient;
        ``inf`` where it lies beyond float32's range (``gamma`` is then
        still the finite ratio, computed without forming the norm).
      adv_loss: the loss at the perturbed params; ``None`` in the state of
        :func:`optax_wa.sharpness_aware`, whose ``grad_fn`` returns no loss.
    """

    gamma: jax.Array
    grad_norm: jax.Array
    adv_grad_norm: jax.Array
    adv_loss: jax.Array | None


# ----------------------------------------------------------------------------
# Validation of the static options.

_ADV_NORM_WEIGHTS = ("perturbed", "clean")
# Modules whose transformations rewrite params (averaging, shuffling members):
# they must wrap a sharpness-aware optimizer, never sit inside one.
_PARAMS_REWRITING_MODULES = ("optax_wa.averaging", "optax_wa.shuffling")


def _check_hyperparameter(name: str, value, *, positive=False, allow_schedule=False):
    """A number (or scalar array) >= 0 (> 0 with ``positive``); a traced one passes.

    Traced values (``optax.inject_hyperparams`` under ``jit``) cannot be checked
    here; ``sharpness_step`` clips them into the valid range instead.
    """
    if allow_schedule and callable(value):
        return
    if is_traced(value):
        if jnp.ndim(value) != 0:
            raise ValueError(f"{name} must be a scalar, got shape {jnp.shape(value)}.")
        return
    bound = "> 0" if positive else ">= 0"
    if not is_concrete_number(value):
        raise ValueError(f"{name} must be a finite number {bound}, got {value!r}.")
    array = np.asarray(value)
    ok = array.ndim == 0 and np.isfinite(array)
    ok = ok and (float(array) > 0.0 if positive else float(array) >= 0.0)
    if not ok:
        raise ValueError(f"{name} must be a finite scalar {bound}, got {value!r}.")


def check_bools(**flags) -> None:
    for name, value in flags.items():
        if not isinstance(value, (bool, np.bool_)):
            raise TypeError(f"{name} must be a bool, got {value!r}.")


class _Options(NamedTuple):
    """The static options of the oracle and the wrapper (validated)."""

    perturbation: str
    adaptive: bool
    adaptive_eta: float
    adaptive_mask: Any
    adv_norm_weight: str
    stable: bool
    max_scale: float | None
    eps: float
    axis_name: Any
    sync_ascent: bool


def make_options(*, rho, rho_may_be_schedule, **options) -> _Options:
    """Validates ``rho`` and the static options; raises naming the argument."""
    o = _Options(**options)
    check_bools(adaptive=o.adaptive, stable=o.stable, sync_ascent=o.sync_ascent)
    _check_hyperparameter("rho", rho, allow_schedule=rho_may_be_schedule)
    if o.perturbation not in _PERTURBATIONS:
        raise ValueError(
            f"perturbation must be one of {_PERTURBATIONS}, got {o.perturbation!r}."
        )
    if o.adv_norm_weight not in _ADV_NORM_WEIGHTS:
        raise ValueError(
            f"adv_norm_weight must be one of {_ADV_NORM_WEIGHTS}, "
            f"got {o.adv_norm_weight!r}."
        )
    _check_hyperparameter("adaptive_eta", o.adaptive_eta)
    if o.adaptive_mask is not None and not o.adaptive:
        raise ValueError("adaptive_mask is only used with adaptive=True (ASAM).")
    if o.max_scale is not None:
        _check_hyperparameter("max_scale", o.max_scale, positive=True)
    _check_hyperparameter("eps", o.eps)
    if o.sync_ascent and o.axis_name is None:
        raise ValueError(
            "sync_ascent=True averages the ascent gradient over a data-parallel "
            "axis and needs axis_name (the name of that axis)."
        )
    return o


def check_real_floating(name: str, leaves) -> None:
    """Raises ``TypeError`` unless every leaf has a real floating dtype."""
    for x in leaves:
        dtype = jnp.result_type(x)
        if jnp.issubdtype(dtype, jnp.complexfloating):
            raise TypeError(
                f"{name} has a complex leaf ({dtype}): sharpness-aware methods "
                "support real floating params only. Optimize the real and "
                "imaginary parts as two real params (e.g. with "
                "optax.contrib.split_real_and_imaginary around the optimizer)."
            )
        if not jnp.issubdtype(dtype, jnp.floating):
            raise TypeError(
                f"{name} has a leaf of dtype {dtype}: sharpness-aware methods "
                "need real floating params."
            )


def params_rewriting_state(state):
    """The name of a params-rewriting method's state inside ``state``, or None."""
    if type(state).__module__ in _PARAMS_REWRITING_MODULES:
        return type(state).__name__
    children = state.values() if isinstance(state, dict) else state
    if isinstance(state, (tuple, list, dict)):
        for child in children:
            found = params_rewriting_state(child)
            if found is not None:
                return found
    return None


# ----------------------------------------------------------------------------
# The shared ascent / descent step.


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


def as_varying(tree, axis_name):
    """Marks leaves as varying over ``axis_name`` so that their gradients stay local.

    Inside ``jax.shard_map`` (with ``check_vma``), the gradient with respect to
    a replicated (axis-invariant) input is summed over the axis by the
    transpose; differentiating at a varying copy keeps the device's own
    gradient, which the per-device ascent needs. Outside ``shard_map`` (pmap,
    ``vmap`` with an axis name) gradients are local already.
    """
    if axis_name is None:
        return tree
    names = _axis_names(axis_name)

    def one(x):
        vma = getattr(jax.typeof(x), "vma", frozenset())
        missing = tuple(n for n in names if n not in vma)
        if not missing:
            return x
        try:
            if hasattr(jax.lax, "pcast"):
                return jax.lax.pcast(x, missing, to="varying")
            return jax.lax.pvary(x, missing)  # older jax (0.8): the same marking
        except ValueError:  # not under shard_map: nothing to mark
            return x

    return jax.tree.map(one, tree)


# The step, in the notation of sam_value_and_grad.
#
# SAM: the worst loss in a ball of radius rho around w, to first order,
#   max_{|e| <= rho} L(w + e) ~ L(w) + max_{|e| <= rho} e.g,
# is reached at e = rho g / |g| (Cauchy-Schwarz: e.g <= |e| |g|, with
# equality when e is parallel to g). The descent gradient is the gradient
# there, g_adv = grad L(w + e), applied at the clean w; the dependence of e
# on w (a second-order term) is dropped, as in the paper.
# ASAM measures the ball in the per-coordinate scale T = |w| + eta, so that
# rescaling a layer does not change the radius: |T^-1 e| <= rho. With e = T v,
# |v| <= rho, e.g = v.(T g) is largest at v = rho T g / |T g|, hence
# e = rho T^2 g / |T g| (T = 1 gives SAM back).
# USAM drops the normalization: e = rho T^2 g.
# Stable SAM multiplies g_adv by gamma = |T g| / |T' g_adv|, so that the
# (weighted) descent norm equals the ascent one: where the loss is sharp,
# |g_adv| can be many times |g|, and the step stays no longer than a plain
# gradient step.
#
# Numerics: everything in float32 whatever the grads' dtype, cast back at
# the end; norms scaled (_numerics.global_norm), divisions safe at 0
# (_numerics.safe_ratio), so g = 0 gives e = 0, gamma = 0 and a zero
# descent, never 0/0. eps is added to the denominators as released.
# Data parallel: sync_ascent averages g and g_adv over the axis before use
# (full-batch SAM); otherwise each device perturbs with its own shard's g and
# only the descent gradients and diagnostics are averaged at the end.


def _weights(leaves, flags, eta):
    """``T = |w| + eta`` per adaptive leaf, in float32; ``None`` where ``T = 1``."""
    return [
        jnp.abs(p.astype(jnp.float32)) + eta if flag else None
        for p, flag in zip(leaves, flags)
    ]


def _weighted(leaves, scales):
    """``T g`` leafwise (``g`` itself where ``T = 1``)."""
    return [g if t is None else t * g for g, t in zip(leaves, scales)]


def _perturbed(param_leaves, weighted_grads, scales, grad_norm, rho, eps, o):
    """``w + e`` in the params' dtypes: ``e = rho T (T g) / (|T g| + eps)`` (SAM)
    or ``rho T (T g)`` (USAM), formed in float32."""
    if o.perturbation == "sam":
        # T (T g / (|T g| + eps)): divide before the second weighting, so that
        # T^2 g is never formed (it overflows float32 long before e does).
        unit = [safe_ratio(d, grad_norm + eps) for d in weighted_grads]
        directions = _weighted(unit, scales)
    else:
        directions = _weighted(weighted_grads, scales)
    return [
        (p.astype(jnp.float32) + rho * d).astype(p.dtype)
        for p, d in zip(param_leaves, directions)
    ]


def _gradient_at(adv_grad_fn, adv_leaves, treedef, o):
    """``g_adv`` (float32 leaves) and the perturbed loss (or ``None``)."""
    adv_grads, adv_loss = adv_grad_fn(
        as_varying(treedef.unflatten(adv_leaves), o.axis_name)
    )
    adv_grad_leaves = [g.astype(jnp.float32) for g in treedef.flatten_up_to(adv_grads)]
    if adv_loss is not None:
        adv_loss = jnp.asarray(adv_loss, jnp.float32)
    if o.axis_name is not None and o.sync_ascent:
        adv_grad_leaves, adv_loss = jax.lax.pmean(
            (adv_grad_leaves, adv_loss), o.axis_name
        )
    return adv_grad_leaves, adv_loss


def _gamma(grad_norm, adv_norm: NormFactors, eps, max_scale):
    """``|T g| / (|T' g_adv| + eps)``, capped at ``max_scale`` (clipped at 0)."""
    gamma = ratio_to_norm(grad_norm, adv_norm, eps)
    if max_scale is not None:
        gamma = jnp.minimum(
            gamma, jnp.maximum(jnp.asarray(max_scale, jnp.float32), 0.0)
        )
    return gamma


def sharpness_step(params, grads, adv_grad_fn, rho, options: _Options):
    """Ascent from ``grads`` at ``params``, then the (stabilized) descent gradient.

    ``adv_grad_fn(adv_params) -> (adv_grads, adv_loss_or_None)`` evaluates the
    local gradient at the perturbed params. Returns ``(descent, info)``.

    Hyperparameters that arrive traced (``optax.inject_hyperparams`` under
    ``jit``) cannot be checked statically: ``rho``, ``eps``, ``adaptive_eta``
    and ``max_scale`` are clipped at 0 here, which leaves checked values as
    they are.
    """
    o = options
    param_leaves, treedef = jax.tree.flatten(params)
    check_real_floating("params", param_leaves)
    raw_grads = treedef.flatten_up_to(grads)
    check_real_floating("grads", raw_grads)
    grad_leaves = [g.astype(jnp.float32) for g in raw_grads]
    if o.axis_name is not None and o.sync_ascent:
        grad_leaves = jax.lax.pmean(grad_leaves, o.axis_name)
    flags = _adaptive_flags(params, o.adaptive, o.adaptive_mask)
    eta = jnp.maximum(jnp.asarray(o.adaptive_eta, jnp.float32), 0.0)
    eps = jnp.maximum(jnp.asarray(o.eps, jnp.float32), 0.0)
    rho = jnp.maximum(jnp.asarray(rho, jnp.float32), 0.0)

    scales = _weights(param_leaves, flags, eta)
    weighted_grads = _weighted(grad_leaves, scales)
    grad_norm = global_norm(weighted_grads)
    adv_leaves = _perturbed(
        param_leaves, weighted_grads, scales, grad_norm, rho, eps, o
    )
    adv_grad_leaves, adv_loss = _gradient_at(adv_grad_fn, adv_leaves, treedef, o)
    # ASAM's second norm: T' = |w + e| (+ eta) at the perturbed params, as the
    # released code takes it before restoring w; or T at the clean params.
    if o.adv_norm_weight == "perturbed":
        scales = _weights(adv_leaves, flags, eta)
    # T' g_adv is never formed: it can pass float32's range (USAM-adaptive at
    # large gradients) while gamma = |T g| / |T' g_adv| does not.
    adv_norm = weighted_norm_factors(adv_grad_leaves, scales)
    gamma = _gamma(grad_norm, adv_norm, eps, o.max_scale)
    descent_leaves = (
        [gamma * g for g in adv_grad_leaves] if o.stable else adv_grad_leaves
    )
    info = SamInfo(
        gamma=gamma,
        grad_norm=grad_norm,
        adv_grad_norm=adv_norm.value(),
        adv_loss=adv_loss,
    )
    if o.axis_name is not None and not o.sync_ascent:
        descent_leaves, info = jax.lax.pmean((descent_leaves, info), o.axis_name)
    descent = treedef.unflatten(
        [d.astype(g.dtype) for d, g in zip(descent_leaves, raw_grads)]
    )
    return descent, info
