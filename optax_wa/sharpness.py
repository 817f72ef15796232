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
import optax

from optax_wa._sam_step import (
    SamInfo,
    as_varying,
    check_bools,
    check_real_floating,
    make_options,
    params_rewriting_state,
    sharpness_step,
)

__all__ = [
    "SamInfo",
    "SharpnessAwareState",
    "sam_value_and_grad",
    "sharpness_aware",
    "ssam",
]

PyTree = Any


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
# Public API.


def _refuse_params_rewriting(inner_state) -> None:
    """Raises ``ValueError`` when ``inner`` holds lookaround, papa or wash."""
    rewriting = params_rewriting_state(inner_state)
    if rewriting is not None:
        raise ValueError(
            f"the inner optimizer of sharpness_aware/ssam holds a {rewriting}: "
            "a method that rewrites params (lookaround, papa, wash) must wrap "
            "the sharpness-aware one, never sit inside it. Write "
            "lookaround(ssam(optax.sgd(...))), not ssam(lookaround(optax.sgd(...)))."
        )


def _require_update_args(grad_fn, params) -> None:
    """Raises ``ValueError`` naming ``grad_fn`` or ``params`` when one is missing."""
    if grad_fn is None:
        raise ValueError(
            "sharpness_aware needs the extra argument grad_fn: call "
            "update(grads, state, params, grad_fn=lambda p: jax.grad(loss)(p, batch))"
            " with the same batch as grads."
        )
    if params is None:
        raise ValueError("sharpness_aware needs params in update to perturb them.")


def _loss_with_aux(loss_fn, has_aux):
    """``loss_fn`` as ``(loss, aux)``; a clear error when ``has_aux`` is wrong."""

    def wrapped(*args):
        out = loss_fn(*args)
        is_pair = isinstance(out, (tuple, list)) and len(out) == 2
        if has_aux and not is_pair:
            raise ValueError(
                "has_aux=True: loss_fn must return a pair (loss, aux), got a "
                "single value; pass has_aux=False for a loss alone."
            )
        if not has_aux and isinstance(out, (tuple, list)):
            raise ValueError(
                f"loss_fn returned a {type(out).__name__} of {len(out)}: pass "
                "has_aux=True when it returns (loss, aux)."
            )
        return tuple(out) if has_aux else (out, None)

    return wrapped


def _grads_from_grad_fn(out, params, has_aux):
    """The gradient in ``grad_fn``'s output; a clear error when ``has_aux`` is wrong."""
    expected = jax.tree.structure(params)
    is_pair = isinstance(out, (tuple, list)) and len(out) == 2
    if has_aux:
        if is_pair and jax.tree.structure(out[0]) == expected:
            return out[0]
        raise ValueError(
            "has_aux=True: grad_fn must return (grads, aux) with grads shaped "
            f"like params ({expected}); got {jax.tree.structure(out)}."
        )
    if jax.tree.structure(out) == expected:
        return out
    hint = (
        " It looks like (grads, aux): pass has_aux=True."
        if is_pair and jax.tree.structure(out[0]) == expected
        else ""
    )
    raise ValueError(
        f"grad_fn must return grads shaped like params ({expected}); got "
        f"{jax.tree.structure(out)}.{hint}"
    )


def sam_value_and_grad(
    loss_fn: Callable[..., Any],
    *,
    rho: float | jax.Array = 0.05,
    perturbation: str = "sam",
    adaptive: bool = False,
    adaptive_eta: float = 0.0,
    adaptive_mask: PyTree | Callable[[PyTree], PyTree] | None = None,
    adv_norm_weight: str = "perturbed",
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
        \rho\, T^2 g \,/\, (\|T g\| + \text{eps}) & \text{SAM / ASAM} \\
        \rho\, T^2 g & \text{USAM}
      \end{cases}
      \qquad T = \begin{cases} |w| + \eta & \text{ASAM} \\ 1 & \text{otherwise,}
      \end{cases}

    then :math:`g_{adv} = \nabla L(w + \epsilon)` on the same minibatch and the
    descent gradient, to be applied at the clean :math:`w`, is

    .. math::
      d = \begin{cases} \gamma\, g_{adv}, \quad
        \gamma = \|T g\| \,/\, (\|T' g_{adv}\| + \text{eps}) & \text{Stable SAM} \\
        g_{adv} & \text{otherwise,} \end{cases}
      \qquad T' = \begin{cases} |w + \epsilon| + \eta &
        \text{ASAM, } \texttt{adv\_norm\_weight="perturbed"} \\
        T & \text{otherwise.} \end{cases}

    This is the released Stable SAM code (``sam.py``, ``usam.py``): ASAM's
    :math:`T = |w|` (:math:`\eta = 0`) on every parameter, biases included,
    and the second norm weighted at the perturbed params, where the released
    code takes it before restoring :math:`w`. ``adaptive_eta=0.01`` is the
    ASAM paper's :math:`\eta`; ``adv_norm_weight="clean"`` weights both norms
    by :math:`T`, so that Stable ASAM keeps :math:`\|T d\| = \|T g\|`. Without
    ``adaptive``, :math:`T = T' = 1` and Stable SAM gives a descent gradient
    whose norm equals the ascent gradient's.

    Norms are global over all leaves of ``params``, computed in float32 with a
    scale (:math:`\|x\| = s\,\|x / s\|`, :math:`s = \max |x|`), so they
    neither overflow nor underflow for any finite gradient, and their
    derivative is finite at zero. Under :func:`jax.vmap` over an ensemble they
    are per member. All divisions are safe at zero: a zero gradient gives a
    zero perturbation, :math:`\gamma = 0` and a zero descent.

    Both passes see the same ``*args`` (same batch, same RNG key). The loss
    and ``aux`` (e.g. BatchNorm statistics, metrics) come from the clean pass;
    the perturbed pass's ``aux`` is discarded.

    Data parallel (inside ``shard_map``/``pmap`` with ``axis_name`` the data
    axis, every device holding a shard of the batch):

    * ``sync_ascent=False`` (default, "m-sharpness"): each device perturbs with
      its own shard's gradient, computes its own :math:`g_{adv}` and, for
      Stable SAM, its own :math:`\gamma`; the descent gradient is the mean over
      devices of the per-device descent gradients. SAM's authors found the
      per-shard ascent generalizes better and it needs no communication
      before the second pass.
    * ``sync_ascent=True``: :math:`g` and :math:`g_{adv}` are averaged over
      devices before use, so :math:`\epsilon`, :math:`\gamma` and the result
      equal single-device full-batch SAM. This reproduces the released Stable
      SAM code under PyTorch DDP, whose every backward pass averages the
      gradients over devices.

    In both cases the returned gradient and loss are averaged over the axis
    (identical on every device); ``aux`` is the device's own. ``info`` is the
    mean over devices of the per-device diagnostics (identical to the global
    ones with ``sync_ascent=True``).

    Weight decay belongs to the optimizer that receives the descent gradient
    (the released code's torch SGD), never to the loss's gradient before the
    ascent.

    Args:
      loss_fn: ``loss_fn(params, *args) -> loss`` (or ``(loss, aux)`` with
        ``has_aux=True``); differentiated with respect to ``params``, which
        must be real floating (complex params raise ``TypeError``).
      rho: the perturbation radius :math:`\rho \ge 0` (a float or a scalar
        array, e.g. a traced schedule value; a traced value is clipped at 0).
      perturbation: ``"sam"`` (normalized ascent, Foret et al.) or ``"usam"``
        (unnormalized, :math:`\epsilon = \rho T^2 g`).
      adaptive: ASAM: scale the ascent by :math:`T = |w| + \eta`.
      adaptive_eta: :math:`\eta \ge 0` of ASAM; default 0 as released.
      adaptive_mask: ASAM only. A pytree of bools with the structure of params
        (or a prefix of it), or a callable ``params -> mask``, selecting the
        leaves scaled by :math:`T`; unselected leaves get :math:`T = 1` and
        are still perturbed and counted in the norms. Default ``None``: every
        leaf is adaptive, as released.
      adv_norm_weight: ASAM only: the weight of :math:`g_{adv}` in the norm of
        :math:`\gamma`: ``"perturbed"`` (default, released) uses
        :math:`|w + \epsilon| + \eta`, ``"clean"`` uses :math:`T`.
      stable: Stable SAM: rescale the descent gradient by :math:`\gamma`.
      max_scale: optional cap on :math:`\gamma` (``1.0`` gives
        :math:`\min(1, \gamma)`, commented out in the released code); ``None``
        for no cap.
      eps: added to the norms in the denominators, ``>= 0`` (1e-12 as
        released).
      has_aux: whether ``loss_fn`` returns ``(loss, aux)``; a mismatch raises
        ``ValueError``.
      axis_name: the data-parallel axis name, or ``None`` on one device.
      sync_ascent: with ``axis_name``, use the all-device gradient for the
        ascent (see above).

    Returns:
      A function ``(params, *args) -> ((loss, aux), grads, info)``: the clean
      loss, the clean pass's ``aux`` (``None`` without ``has_aux``), the
      descent gradient (same structure and dtypes as ``params``' gradient) and
      a :class:`SamInfo`.

    Raises:
      ValueError: for a bad hyperparameter (naming it); TypeError: for a
        non-bool flag, and, at the first call, for complex or integer params.

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
    check_bools(has_aux=has_aux)
    options = make_options(
        rho=rho,
        rho_may_be_schedule=False,
        perturbation=perturbation,
        adaptive=adaptive,
        adaptive_eta=adaptive_eta,
        adaptive_mask=adaptive_mask,
        adv_norm_weight=adv_norm_weight,
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
    value_and_grad = jax.value_and_grad(_loss_with_aux(loss_fn, has_aux), has_aux=True)

    def oracle(params, *args):
        check_real_floating("params", jax.tree.leaves(params))
        (loss, aux), grads = value_and_grad(as_varying(params, axis_name), *args)

        def adv_grad_fn(adv_params):
            (adv_loss, _), adv_grads = value_and_grad(adv_params, *args)
            return adv_grads, adv_loss

        descent, info = sharpness_step(params, grads, adv_grad_fn, rho, options)
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
    adaptive_eta: float = 0.0,
    adaptive_mask: PyTree | Callable[[PyTree], PyTree] | None = None,
    adv_norm_weight: str = "perturbed",
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
      \epsilon = \rho_t\, T^2 g / (\|T g\| + \text{eps}) \ \text{(SAM; USAM:}\
      \rho_t T^2 g\text{)}, \quad g_{adv} = \nabla L(w + \epsilon), \quad
      u = \text{inner}(\gamma^{[\text{stable}]} g_{adv};\, w),

    with :math:`\gamma = \|T g\| / (\|T' g_{adv}\| + \text{eps})` and
    :math:`T, T'` as in :func:`sam_value_and_grad`. The wrapper never returns
    or stores perturbed params (no transparent mode).

    ``grad_fn(params) -> grads`` must compute the gradient on the *same*
    minibatch (and RNG key) as ``grads``; with ``has_aux=True`` it returns
    ``(grads, aux)`` and ``aux`` is discarded (aux such as BatchNorm statistics
    belongs to the clean pass, which the caller ran). A natural choice is
    ``grad_fn = lambda p: jax.grad(loss_fn)(p, batch)``. Other extra keyword
    arguments are passed to ``inner``.

    **Weight decay goes inside**, in ``inner``:
    ``sharpness_aware(optax.chain(optax.add_decayed_weights(wd), optax.sgd(lr)))``,
    as the released code's torch ``SGD(weight_decay=wd)`` does. In
    ``optax.chain(optax.add_decayed_weights(wd), sharpness_aware(optax.sgd(lr)))``
    the decay only enters ``grads``, the clean gradient that sets the ascent
    direction (and the numerator of :math:`\gamma`); the descent gradient comes
    from ``grad_fn``, which knows nothing of it, so no weight decay is ever
    applied. The wrapper cannot see what precedes it in a chain: this is
    documented, not detected.

    **Ensembles**: a method that rewrites params (:func:`optax_wa.lookaround`,
    :func:`optax_wa.papa`, :func:`optax_wa.wash`) wraps this one,
    ``lookaround(ssam(sgd))``; ``grad_fn`` is then called per member with that
    member's params, so norms are per member. The reverse order
    ``ssam(lookaround(sgd))`` raises ``ValueError`` at ``init``.

    With ``axis_name`` (data parallel), pass the device's *local* gradient as
    ``grads`` and a ``grad_fn`` returning local gradients: the wrapper
    averages over the axis as described in :func:`sam_value_and_grad`
    (``sync_ascent=True`` reproduces the released code under DDP), so
    ``inner`` sees the same averaged gradient on every device.

    Under ``optax.inject_hyperparams``, the numeric arguments (``rho``,
    ``adaptive_eta``, ``eps``, ``max_scale``) become state; a callable
    ``adaptive_mask`` must be named in ``static_args`` (otherwise it is taken
    for a schedule).

    Args:
      inner: the optimizer applied to the descent gradient (momentum, weight
        decay etc. come after the sharpness-aware step, as in the papers).
      rho: perturbation radius :math:`\rho \ge 0`, a float or a schedule of the
        update count (a traced value is clipped at 0).
      perturbation: ``"sam"`` or ``"usam"``.
      adaptive: ASAM scaling :math:`T = |w| + \eta`.
      adaptive_eta: :math:`\eta \ge 0`; default 0 as released, 0.01 in the
        ASAM paper.
      adaptive_mask: leaves scaled by :math:`T` (pytree of bools or callable;
        others get :math:`T = 1`); default ``None``: all leaves.
      adv_norm_weight: ASAM's weight in the norm of :math:`g_{adv}`:
        ``"perturbed"`` (default, released, :math:`|w + \epsilon| + \eta`) or
        ``"clean"`` (:math:`T`).
      stable: Stable SAM renormalization (see :func:`ssam`).
      max_scale: optional cap on :math:`\gamma`; ``None`` for no cap.
      eps: added to the norms in the denominators, ``>= 0``.
      has_aux: whether ``grad_fn`` returns ``(grads, aux)``; a mismatch raises
        ``ValueError`` at the first update.
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
      ValueError: for a bad hyperparameter; at ``init``, when ``inner``
        contains a params-rewriting method; in ``update``, when ``grad_fn``
        or ``params`` is missing or ``grad_fn``'s output does not match
        ``has_aux``. TypeError: for a non-bool flag; in ``update``, for
        complex or integer params.

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

      Kwon et al., `ASAM: Adaptive Sharpness-Aware Minimization for
      Scale-Invariant Learning of Deep Neural Networks
      <https://arxiv.org/abs/2102.11600>`_, ICML 2021.

      Tan et al., `Stabilizing Sharpness-Aware Minimization Through A Simple
      Renormalization Strategy <https://arxiv.org/abs/2401.07250>`_, JMLR 2025.
    """
    check_bools(has_aux=has_aux, record_info=record_info)
    options = make_options(
        rho=rho,
        rho_may_be_schedule=True,
        perturbation=perturbation,
        adaptive=adaptive,
        adaptive_eta=adaptive_eta,
        adaptive_mask=adaptive_mask,
        adv_norm_weight=adv_norm_weight,
        stable=stable,
        max_scale=max_scale,
        eps=eps,
        axis_name=axis_name,
        sync_ascent=sync_ascent,
    )
    inner = optax.with_extra_args_support(inner)

    def init_fn(params):
        inner_state = inner.init(params)
        _refuse_params_rewriting(inner_state)
        zero = jnp.zeros([], jnp.float32)
        info = SamInfo(gamma=zero, grad_norm=zero, adv_grad_norm=zero, adv_loss=None)
        return SharpnessAwareState(
            count=jnp.zeros([], jnp.int32),
            inner_state=inner_state,
            info=info if record_info else None,
        )

    def update_fn(updates, state, params=None, *, grad_fn=None, **extra_args):
        _require_update_args(grad_fn, params)
        rho_t = rho(state.count) if callable(rho) else rho

        def adv_grad_fn(adv_params):
            return _grads_from_grad_fn(grad_fn(adv_params), adv_params, has_aux), None

        descent, info = sharpness_step(params, updates, adv_grad_fn, rho_t, options)
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
    *,
    perturbation: str = "sam",
    adaptive: bool = False,
    adaptive_eta: float = 0.0,
    adaptive_mask: PyTree | Callable[[PyTree], PyTree] | None = None,
    adv_norm_weight: str = "perturbed",
    max_scale: float | None = None,
    eps: float = 1e-12,
    has_aux: bool = False,
    axis_name: str | None = None,
    sync_ascent: bool = False,
    record_info: bool = True,
) -> optax.GradientTransformationExtraArgs:
    r"""Stable SAM: :func:`sharpness_aware` with the descent gradient renormalized.

    .. math::
      d = \frac{\|T g\|}{\|T' g_{adv}\| + \text{eps}}\, g_{adv},
      \qquad \|d\| = \|g\| \ \text{(up to eps, without ASAM)},

    which keeps SAM's step no larger than the gradient step and widens the
    range of stable learning rates: on a quadratic with top eigenvalue
    :math:`\lambda`, USAM diverges above :math:`2/(\lambda(1+\rho\lambda))`
    while Stable USAM is stable up to the gradient-descent limit
    :math:`2/\lambda`. :math:`T = T' = 1` without ``adaptive``; with it, see
    :func:`sam_value_and_grad` (default: the released code's
    :math:`T = |w|`, :math:`T' = |w + \epsilon|`).

    Weight decay goes in ``inner`` (``ssam(optax.chain(
    optax.add_decayed_weights(wd), optax.sgd(lr)))``), never before ``ssam``
    in a chain, where it would only tilt the ascent (see
    :func:`sharpness_aware`). In an ensemble, ``lookaround(ssam(sgd))``.

    Args:
      inner: the optimizer applied to the descent gradient.
      rho: perturbation radius, a float or schedule.
      perturbation: ``"sam"`` (Stable SAM) or ``"usam"`` (Stable USAM).
      adaptive: Stable ASAM.
      adaptive_eta: ASAM's :math:`\eta` (default 0, released).
      adaptive_mask: leaves scaled by :math:`T`; default all.
      adv_norm_weight: ``"perturbed"`` (default, released) or ``"clean"``.
      max_scale: cap on :math:`\gamma` (``1.0`` for :math:`\min(1, \gamma)`).
      eps: added to the norms in the denominators.
      has_aux: whether ``grad_fn`` returns ``(grads, aux)``.
      axis_name: data-parallel axis name, or ``None``.
      sync_ascent: with ``axis_name``, perturb with the all-device gradient.
      record_info: keep the step's :class:`SamInfo` in the state.

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
    return sharpness_aware(
        inner,
        rho=rho,
        perturbation=perturbation,
        adaptive=adaptive,
        adaptive_eta=adaptive_eta,
        adaptive_mask=adaptive_mask,
        adv_norm_weight=adv_norm_weight,
        stable=True,
        max_scale=max_scale,
        eps=eps,
        has_aux=has_aux,
        axis_name=axis_name,
        sync_ascent=sync_ascent,
        record_info=record_info,
    )
