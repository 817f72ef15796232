"""Weight averaging during training: Lookaround and PAPA.

Both wrap an inner optimizer that runs per member (see
:func:`optax_wa.members.per_member`) and, periodically, move the members
toward their mean after the inner step. Because they rewrite the parameters,
their update is ``new_params - params``: they must be the last element of an
``optax.chain``.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from optax_wa import members

_STATE_POLICIES = ("keep", "average", "reset")


class LookaroundState(NamedTuple):
    """State of :func:`lookaround`.

    Attributes:
      count: number of updates so far (int32 scalar; per member in named mode).
      inner_state: the inner optimizer's state, one per member (stacked mode:
        every leaf has a leading member axis).
    """

    count: jax.Array
    inner_state: optax.OptState


class PapaState(NamedTuple):
    """State of :func:`papa`.

    Attributes:
      count: number of updates so far (int32 scalar; per member in named mode).
      inner_state: the inner optimizer's state, one per member.
    """

    count: jax.Array
    inner_state: optax.OptState


def _check_period(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}.")
    return int(value)


def _require_params(name, params):
    if params is None:
        raise ValueError(
            f"{name} rewrites the parameters and needs `params` in update."
        )


def _is_concrete_number(x) -> bool:
    if isinstance(x, (int, float, np.number)):
        return True
    return isinstance(x, (np.ndarray, jax.Array)) and not isinstance(x, jax.core.Tracer)


def _cast_like(tree, like):
    return jax.tree.map(lambda x, y: x.astype(y.dtype), tree, like)


def _inexact(x) -> bool:
    return jnp.issubdtype(jnp.asarray(x).dtype, jnp.inexact)


def _sync_inner_state(policy, init_fn, inner_state, averaged_params, axis_name):
    """The inner state after a Lookaround sync, as ``state_policy`` says."""
    if policy == "keep":
        return inner_state
    if policy == "average":
        return jax.tree.map(
            lambda s: members.member_mean(s, axis_name) if _inexact(s) else s,
            inner_state,
        )
    fresh = init_fn(averaged_params)
    return jax.tree.map(
        lambda new, old: new if _inexact(old) else old, fresh, inner_state
    )


def _after(tree, token):
    """``tree`` with a data dependency on ``token`` (a scalar zero), values unchanged.

    ``x - 0`` keeps every value bit for bit (signed zeros and NaNs included);
    non-numeric leaves (PRNG keys, bools) pass through. The dependency makes
    XLA schedule the readers of ``tree`` after the producer of ``token``.
    """

    def one(x):
        dtype = getattr(x, "dtype", None)
        if dtype is None or not jnp.issubdtype(dtype, jnp.number):
            return x
        return x - token.astype(dtype)

    return jax.tree.map(one, tree)


def _wants_recompute(recompute, extra_args) -> bool:
    if recompute is not None:
        return bool(recompute)
    return not any(callable(v) for v in jax.tree.leaves(extra_args))


_CONTROL_FLOWS = ("cond", "select")


def _check_sync_options(recompute, control_flow):
    if control_flow not in _CONTROL_FLOWS:
        raise ValueError(
            f"control_flow must be one of {_CONTROL_FLOWS}, got {control_flow!r}."
        )
    if recompute is not None and not isinstance(recompute, bool):
        raise ValueError(f"recompute must be None, True or False, got {recompute!r}.")
    if recompute is not None and control_flow == "select":
        raise ValueError(
            "recompute chooses how the lax.cond branch gets the inner updates; "
            'it has no meaning with control_flow="select" (leave it None).'
        )
    return recompute


def _step_and_mean(
    per_member,
    updates,
    inner_state,
    params,
    extra_args,
    is_due,
    axis_name,
    *,
    period,
    control_flow,
    recompute,
):
    """The inner step and, when ``is_due``, the member mean of ``params + inner_updates``.

    Returns ``(inner_updates, inner_state, mean)``; ``mean`` is reduced
    (:func:`optax_wa.members.reduced_member_mean`, accumulation precision).
    With period 1 or ``control_flow="select"`` the mean is
    computed on every step, as one elementwise expression that XLA fuses with
    the inner update and the caller's selection (the member sum is unrolled),
    so no pass over the ensemble is added. Otherwise the mean sits under
    ``lax.cond`` so that off-sync steps do not pay for it and holds zeros when
    it was not due; the skipped branch only fills ``1/M`` of the ensemble's
    values with zeros. Two ways to feed the branch:

    * ``recompute`` (``None``: unless an extra argument is callable): the
      branch runs the inner update itself from the (unchanged) gradients,
      inner state and params, so nothing extra is
      materialized on off-sync steps and the inner update outside the branch
      fuses with the caller's ``apply_updates``; the inner optimizer runs twice
      on due steps. The inner update outside is ordered after the branch
      (:func:`_after`), so XLA updates a donated inner state in place.
    * otherwise the inner updates are computed once and handed to the branch,
      which materializes them on every step.
    """

    def added(a, b):
        acc = members._accumulation_dtype(a.dtype)
        return a.astype(acc) + b.astype(acc)

    def mean_of(p, u):
        return members.reduced_member_mean(jax.tree.map(added, p, u), axis_name)

    # Shapes of the reduced mean, read off the params (no extra trace).
    shapes = jax.tree.map(
        lambda p: jax.ShapeDtypeStruct(
            p.shape if axis_name is not None else p.shape[1:],
            members._accumulation_dtype(p.dtype),
        ),
        params,
    )

    def zeros(_):
        return jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), shapes)

    if period == 1 or control_flow == "select":
        inner_updates, inner_state = per_member.update(
            updates, inner_state, params, **extra_args
        )
        return inner_updates, inner_state, mean_of(params, inner_updates)

    if _wants_recompute(recompute, extra_args):
        # The token is made inside each branch: a value closed over from
        # outside would be hoisted out of the cond, losing the ordering.

        def due(ops):
            g, s, p = ops
            u, _ = per_member.update(g, s, p, **extra_args)
            return mean_of(p, u), jnp.zeros([], jnp.float32)

        def skip(ops):
            return zeros(ops), jnp.zeros([], jnp.float32)

        mean, token = jax.lax.cond(is_due, due, skip, (updates, inner_state, params))
        inner_updates, inner_state = per_member.update(
            updates, _after(inner_state, token), params, **extra_args
        )
        return inner_updates, inner_state, mean

    inner_updates, inner_state = per_member.update(
        updates, inner_state, params, **extra_args
    )
    mean = jax.lax.cond(
        is_due, lambda ops: mean_of(*ops), zeros, (params, inner_updates)
    )
    return inner_updates, inner_state, mean


def lookaround(
    inner: optax.GradientTransformation,
    *,
    sync_period: int = 5,
    axis_name: str | None = None,
    state_policy: str = "keep",
    recompute: bool | None = None,
    control_flow: str = "cond",
) -> optax.GradientTransformationExtraArgs:
    r"""Lookaround: members step independently, then are replaced by their average.

    Every member :math:`i` takes the inner optimizer's step on its own data
    (in the paper each member sees its own data augmentation). After every
    ``sync_period``-th update all members are replaced by the uniform average,
    which is the next common point:

    .. math::
      w_i^{t+1} = \begin{cases}
        \frac{1}{M}\sum_j \big(w_j^t + u_j^t\big) & (t + 1) \bmod k = 0 \\
        w_i^t + u_i^t & \text{otherwise,}
      \end{cases}

    where :math:`u_i^t` is the inner update of member :math:`i` and :math:`k`
    is ``sync_period``. By default off-sync steps do not compute the average
    (the sync is a ``lax.cond``; see ``recompute`` and ``control_flow``).

    The returned update is ``new_params - params``, so ``lookaround`` must be
    the last element of an ``optax.chain``. Extra keyword arguments of
    ``update`` go to every member's inner update unchanged.

    Args:
      inner: the per-member optimizer (e.g. ``optax.sgd(0.1, momentum=0.9)``).
      sync_period: number of updates between averages, ``>= 1``.
      axis_name: ``None`` (stacked mode: params carry a leading member axis)
        or the name of the mapped member axis (named mode).
      state_policy: what happens to the members' inner states at a sync:
        ``"keep"`` (default, as the released code: each member keeps its own
        momentum), ``"average"`` (floating-point state leaves are replaced by
        their member mean), ``"reset"`` (floating-point leaves are re-initialized
        with ``inner.init`` at the averaged params; integer leaves such as step
        counters are kept, so schedules continue).
      recompute: how the sync step gets the inner updates it averages.
        ``True``: the averaging branch runs the inner update itself, so
        off-sync steps materialize nothing extra (their inner update fuses
        with ``apply_updates``) and the inner optimizer runs twice on sync
        steps. ``False``: the inner update runs once and is handed to the
        branch, which materializes it on every step. ``None`` (default):
        ``True`` unless an extra argument of ``update`` is callable (such as
        the ``grad_fn`` of :func:`optax_wa.sharpness_aware`, whose update
        evaluates gradients and is too costly to run twice). Both give the
        same result up to float rounding. Only with ``control_flow="cond"``.
      control_flow: ``"cond"`` (default): the average is a ``lax.cond``
        branch that only sync steps run; it reads the ensemble once more on
        those steps. ``"select"``: no control flow; every step computes the
        member mean inside the same fused elementwise pass as the inner update
        (the member sum is unrolled up to 32 members) and keeps it on sync
        steps (``jnp.where``), so a sync step costs about what an off-sync
        step does and the inner update runs once. Pick
        ``"select"`` when ``update`` is timed on its own or the new params are
        written to a fresh buffer; when the step donates the params and
        applies the updates in place, XLA must stage the new params and copy
        them (the mean reads other members' params), which costs more than the
        branch. In named mode, and with the member axis split over devices,
        ``"select"`` runs the cross-member reduction (a collective) on every
        step. Both give the same result up to float rounding.

    Returns:
      A ``GradientTransformationExtraArgs`` with state :class:`LookaroundState`.

    Examples:
      >>> import jax.numpy as jnp, optax, optax_wa
      >>> params = {"w": jnp.array([[1.0], [3.0]])}          # 2 members
      >>> opt = optax_wa.lookaround(optax.sgd(1.0), sync_period=2)
      >>> state = opt.init(params)
      >>> grads = {"w": jnp.array([[1.0], [-1.0]])}
      >>> for _ in range(2):
      ...   updates, state = opt.update(grads, state, params)
      ...   params = optax.apply_updates(params, updates)
      >>> params["w"]                                        # (-1 + 5) / 2
      Array([[2.],
             [2.]], dtype=float32)

    References:
      Zhang et al., `Lookaround Optimizer: k steps around, 1 step average
      <https://arxiv.org/abs/2306.07684>`_, NeurIPS 2023.
    """
    sync_period = _check_period("sync_period", sync_period)
    recompute = _check_sync_options(recompute, control_flow)
    if state_policy not in _STATE_POLICIES:
        raise ValueError(
            f"state_policy must be one of {_STATE_POLICIES}, got {state_policy!r}."
        )
    inner = optax.with_extra_args_support(inner)
    per_member = members.per_member(inner, axis_name)

    def init_fn(params):
        return LookaroundState(
            count=jnp.zeros([], jnp.int32), inner_state=per_member.init(params)
        )

    def update_fn(updates, state, params=None, **extra_args):
        _require_params("lookaround", params)
        count = optax.safe_increment(state.count)
        is_sync = count % sync_period == 0
        inner_updates, inner_state, mean = _step_and_mean(
            per_member,
            updates,
            state.inner_state,
            params,
            extra_args,
            is_sync,
            axis_name,
            period=sync_period,
            control_flow=control_flow,
            recompute=recompute,
        )
        new_updates = jax.tree.map(
            lambda a, p, u: jnp.where(
                is_sync,
                members.broadcast_to_members(a, p, axis_name) - p.astype(a.dtype),
                u.astype(a.dtype),
            ).astype(u.dtype),
            mean,
            params,
            inner_updates,
        )
        if state_policy != "keep":
            averaged = jax.tree.map(
                lambda a, p: members.broadcast_to_members(a, p, axis_name).astype(
                    p.dtype
                ),
                mean,
                params,
            )
            resync = lambda s: _sync_inner_state(  # noqa: E731
                state_policy, per_member.init, s, averaged, axis_name
            )
            if sync_period == 1:
                inner_state = resync(inner_state)
            else:
                inner_state = jax.lax.cond(is_sync, resync, lambda s: s, inner_state)
        return new_updates, LookaroundState(count=count, inner_state=inner_state)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def papa(
    inner: optax.GradientTransformation,
    *,
    alpha: optax.ScalarOrSchedule = 0.99,
    period: int = 10,
    axis_name: str | None = None,
    recompute: bool | None = None,
    control_flow: str = "cond",
) -> optax.GradientTransformationExtraArgs:
    r"""PAPA: every ``period`` steps, pull each member toward the population mean.

    After the inner step of every ``period``-th update:

    .. math::
      w_i \leftarrow \alpha_t\, w_i + (1 - \alpha_t)\, \bar w, \qquad
      \bar w = \tfrac{1}{M}\textstyle\sum_j w_j .

    The inner optimizer states are untouched. ``alpha = 0`` replaces every
    member by the mean (PAPA-all with the same period). The released code
    scales :math:`1 - \alpha` by :math:`\eta_t / \eta_0`; pass
    ``alpha=papa_lr_scaled_alpha(0.99, lr_schedule)`` for that. BatchNorm
    buffers are not optimizer params: pull them with
    :func:`optax_wa.members.pull_to_mean` at the same steps.

    The returned update is ``new_params - params``, so ``papa`` must be the
    last element of an ``optax.chain``.

    Args:
      inner: the per-member optimizer.
      alpha: the weight kept on a member's own parameters, in ``[0, 1]``; a
        float or a schedule evaluated at the step index of the pull.
      period: number of updates between pulls, ``>= 1``.
      axis_name: ``None`` (stacked mode) or the mapped member axis name.
      recompute: how the pull step gets the inner updates it averages, as
        in :func:`lookaround`: ``True`` reruns the inner update inside the
        pull branch, ``False`` hands it the once-computed updates, ``None``
        (default) is ``True`` unless an extra argument is callable.
      control_flow: ``"cond"`` (default: the pull is a ``lax.cond`` branch)
        or ``"select"`` (the member mean is fused into every step's pass and
        kept on pull steps), as in :func:`lookaround`.

    Returns:
      A ``GradientTransformationExtraArgs`` with state :class:`PapaState`.

    Examples:
      >>> import jax.numpy as jnp, optax, optax_wa
      >>> params = {"w": jnp.array([[0.0], [4.0]])}
      >>> opt = optax_wa.papa(optax.sgd(0.0), alpha=0.75, period=1)
      >>> updates, _ = opt.update(params, opt.init(params), params)
      >>> optax.apply_updates(params, updates)["w"]     # 0.75 w + 0.25 * 2
      Array([[0.5],
             [3.5]], dtype=float32)

    References:
      Jolicoeur-Martineau et al., `Population Parameter Averaging (PAPA)
      <https://arxiv.org/abs/2304.03094>`_, TMLR 2024.
    """
    period = _check_period("period", period)
    recompute = _check_sync_options(recompute, control_flow)
    if not callable(alpha) and _is_concrete_number(alpha):
        value = np.asarray(alpha)
        if value.ndim != 0 or not 0.0 <= float(value) <= 1.0:
            raise ValueError(f"alpha must be a scalar in [0, 1], got {alpha!r}.")
    inner = optax.with_extra_args_support(inner)
    per_member = members.per_member(inner, axis_name)

    def init_fn(params):
        return PapaState(
            count=jnp.zeros([], jnp.int32), inner_state=per_member.init(params)
        )

    def update_fn(updates, state, params=None, **extra_args):
        _require_params("papa", params)
        alpha_t = alpha(state.count) if callable(alpha) else alpha
        count = optax.safe_increment(state.count)
        is_pull = count % period == 0
        inner_updates, inner_state, mean = _step_and_mean(
            per_member,
            updates,
            state.inner_state,
            params,
            extra_args,
            is_pull,
            axis_name,
            period=period,
            control_flow=control_flow,
            recompute=recompute,
        )

        def combine(a, p, u):
            acc = a.dtype
            new = p.astype(acc) + u.astype(acc)
            al = jnp.asarray(alpha_t, acc)
            pulled = al * new + (1 - al) * members.broadcast_to_members(a, p, axis_name)
            return jnp.where(is_pull, pulled - p.astype(acc), u.astype(acc)).astype(
                u.dtype
            )

        new_updates = jax.tree.map(combine, mean, params, inner_updates)
        return new_updates, PapaState(count=count, inner_state=inner_state)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def papa_lr_scaled_alpha(
    alpha: float, learning_rate: optax.ScalarOrSchedule
) -> optax.Schedule:
    r"""PAPA's released default: scale the pull by the learning-rate decay.

    .. math::
      \alpha_t = 1 - (1 - \alpha)\,\frac{\eta_t}{\eta_0}

    Args:
      alpha: the base weight in ``[0, 1]``.
      learning_rate: the inner optimizer's learning rate or schedule.

    Returns:
      A schedule to pass as ``papa(..., alpha=...)``.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha!r}.")
    if not callable(learning_rate):
        return lambda count: jnp.asarray(alpha, jnp.float32)
    lr0 = learning_rate(0)

    def schedule(count):
        return 1.0 - (1.0 - alpha) * learning_rate(count) / lr0

    return schedule
