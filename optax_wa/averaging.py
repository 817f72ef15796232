"""Weight averaging during training: Lookaround and PAPA.

Both wrap an inner optimizer that runs per member (see
:func:`optax_wa.members.per_member`) and, at the steps a sync schedule picks,
move the members toward their mean after the inner step. They are two faces of
one private core, :func:`_periodic_average`. Because they rewrite the
parameters, their update is ``new_params - params``: they must be the last
element of an ``optax.chain``.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from optax_wa import _flat, members
from optax_wa._checks import is_concrete_number, is_traced, require_floating
from optax_wa._numerics import accumulation_dtype

__all__ = [
    "AveragingState",
    "LookaroundState",
    "PapaState",
    "is_sync_step",
    "lookaround",
    "papa",
    "papa_lr_scaled_alpha",
    "sync_schedule",
    "sync_weight",
]

_STATE_POLICIES = ("keep", "average", "reset")
_COMBINES = ("pull", "pair_half")
_RATE_READINGS = ("next", "current")

SyncSchedule = int | Callable[[jax.Array], jax.Array]


class AveragingState(NamedTuple):
    """State of :func:`lookaround` and :func:`papa`.

    Attributes:
      count: number of updates so far (int32 scalar; per member in named mode).
        ``optax.tree_utils.tree_get(state, "count")`` is ambiguous when the
        inner optimizer also counts (Adam, schedules): read ``state.count``.
      inner_state: the inner optimizer's state, one per member (stacked mode:
        every leaf has a leading member axis).
    """

    count: jax.Array
    inner_state: optax.OptState


LookaroundState = AveragingState
PapaState = AveragingState


# --- the sync schedule --------------------------------------------------------


def _check_sync(name: str, sync) -> SyncSchedule:
    """An int >= 1 or a callable; a traced integer (``inject_hyperparams``) passes."""
    if callable(sync):
        return sync
    dtype = getattr(sync, "dtype", None)
    integral = isinstance(sync, (int, np.integer)) or (
        dtype is not None and jnp.issubdtype(dtype, jnp.integer)
    )
    if dtype is not None and jnp.issubdtype(dtype, jnp.bool_):
        raise ValueError(
            f"{name} is a boolean array: a sync schedule under "
            "optax.inject_hyperparams must be named in static_args "
            f"(static_args=({name!r},)), or it is evaluated as a hyperparameter."
        )
    if isinstance(sync, bool) or not integral or np.ndim(sync) != 0:
        raise ValueError(
            f"{name} must be an integer >= 1 or a schedule count -> bool, got {sync!r}."
        )
    if not is_traced(sync) and int(sync) < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {sync!r}.")
    return sync


def sync_schedule(
    period: int, *, steps_per_epoch: int | None = None
) -> Callable[[jax.Array], jax.Array]:
    r"""A sync schedule ``count -> bool`` for :func:`lookaround` and :func:`papa`.

    ``count`` is the number of updates done, the current one included (the
    first update has ``count = 1``). Without ``steps_per_epoch`` the schedule
    syncs after every ``period``-th update of the run (:math:`c \bmod k = 0`),
    which is what an integer period means. With ``steps_per_epoch`` it is the
    released PAPA loop's schedule: the batch index inside the epoch,
    :math:`i = (c - 1) \bmod E`, is reset every epoch and the sync follows
    updates with :math:`i \bmod k = 0`, i.e. the first update of every epoch
    and every ``period``-th one after it.

    Args:
      period: ``k >= 1``.
      steps_per_epoch: ``E >= 1``, or ``None`` for a period over the whole run.

    Returns:
      A schedule to pass as ``sync_period=`` / ``period=``, or to
      :func:`is_sync_step`.

    Examples:
      >>> import optax_wa
      >>> every = optax_wa.sync_schedule(3, steps_per_epoch=7)
      >>> [c for c in range(1, 15) if every(c)]
      [1, 4, 7, 8, 11, 14]
    """
    _check_sync("period", period)
    if steps_per_epoch is None:
        return lambda count: jnp.asarray(count) % period == 0
    _check_sync("steps_per_epoch", steps_per_epoch)
    return lambda count: (jnp.asarray(count) - 1) % steps_per_epoch % period == 0


def is_sync_step(sync: SyncSchedule, count: jax.typing.ArrayLike) -> jax.Array:
    """Whether the update that brought the update count to ``count`` syncs.

    The one definition :func:`lookaround` and :func:`papa` use: call it with
    ``state.count`` after an update (or any count of updates done) to do what
    the optimizer did at the same step, e.g. for BatchNorm statistics.

    Args:
      sync: an integer period (after every ``sync``-th update) or a schedule
        ``count -> bool`` such as :func:`sync_schedule`'s. A period below 1
        known only at run time (``inject_hyperparams``) never syncs.
      count: the number of updates done, the current one included.

    Returns:
      A boolean scalar array.
    """
    count = jnp.asarray(count)
    if callable(sync):
        return jnp.asarray(sync(count), bool)
    period = jnp.asarray(sync)
    return (period >= 1) & (count % jnp.maximum(period, 1) == 0)


def _alpha_at(alpha, count) -> jax.Array:
    """``alpha`` at the update that made the count ``count``, clipped to [0, 1]."""
    value = alpha(count - 1) if callable(alpha) else alpha
    return jnp.clip(jnp.asarray(value, jnp.float32), 0.0, 1.0)


def sync_weight(
    alpha: optax.ScalarOrSchedule, sync: SyncSchedule, count: jax.typing.ArrayLike
) -> jax.Array:
    r"""The weight each member keeps on its own state after update ``count``.

    ``alpha_t`` at a sync step (as :func:`papa` pulls:
    :math:`w_i \leftarrow \alpha_t w_i + (1-\alpha_t)\bar w`) and 1 elsewhere;
    ``alpha = 0`` is :func:`lookaround`'s replacement by the mean. Pass it to
    :func:`optax_wa.members.pull_to_mean` to treat BatchNorm statistics exactly
    as the optimizer treated the params at the same step.

    A schedule ``alpha`` is evaluated at ``count - 1``, the index optax
    schedules give the update (its first update is 0). The value is clipped to
    ``[0, 1]``: a weight outside it (a schedule or ``inject_hyperparams``
    value known only at run time) would extrapolate past the member or past
    the mean. A NaN weight stays NaN.

    Args:
      alpha: a float in ``[0, 1]`` or a schedule.
      sync: an integer period or a schedule ``count -> bool``
        (see :func:`is_sync_step`).
      count: the number of updates done, the current one included
        (``state.count`` after the update).

    Returns:
      A float32 scalar array.

    Examples:
      >>> import optax_wa
      >>> [float(optax_wa.sync_weight(0.75, 2, c)) for c in (1, 2)]
      [1.0, 0.75]
    """
    return jnp.where(is_sync_step(sync, count), _alpha_at(alpha, count), 1.0)


# --- the core -----------------------------------------------------------------


def _require_params(name, params):
    if params is None:
        raise ValueError(
            f"{name} rewrites the parameters and needs `params` in update."
        )


def _inexact(x) -> bool:
    return jnp.issubdtype(jnp.asarray(x).dtype, jnp.inexact)


def _sync_inner_state(policy, init_fn, inner_state, averaged_params, axis_name):
    """The inner state after a sync, as ``state_policy`` says."""
    if policy == "average":
        return jax.tree.map(
            lambda s: members.member_mean(s, axis_name) if _inexact(s) else s,
            inner_state,
        )
    fresh = init_fn(averaged_params)
    return jax.tree.map(
        lambda new, old: new if _inexact(old) else old, fresh, inner_state
    )


def _released_pairs(num: int, key: jax.Array) -> jax.Array:
    """PAPA-2's pairs as the released code draws them: ``(num, 2)`` indices.

    Two members: both become their average. More: the first ``num`` pairs of
    ``itertools.combinations(range(num), 2)`` in a random order, one per member.
    """
    if num == 1:
        return jnp.zeros((1, 2), jnp.int32)
    if num == 2:
        return jnp.array([[0, 1], [0, 1]], jnp.int32)
    table = jnp.array(list(itertools.combinations(range(num), 2))[:num], jnp.int32)
    return table[jax.random.permutation(key, num)]


# How the core computes a sync step, and why.
#
# Member i holds w_i; the inner optimizer proposes u_i; n_i = w_i + u_i is
# where the member would go. At a sync step the target is
#
#   pull:       t_i = a n_i + (1 - a) m,   m = (1/M) sum_j n_j
#               (Lookaround: t_i = m, the case a = 0; PAPA: a = alpha_t)
#   pair_half:  t_i = (n_{p_i} + n_{q_i}) / 2   (PAPA-2)
#
# and the returned update is t_i - w_i, so that the caller's
# optax.apply_updates lands on t_i. The pull keeps the mean,
# (1/M) sum_i t_i = a m + (1 - a) m = m, and shrinks every member's distance
# to it by a: t_i - m = a (n_i - m). After s syncs with no inner step in
# between the spread is a^s of what it was; a = 0 collapses it at once.
#
# Cost. The mean is a reduction over members (M reads per value in stacked
# mode, an all-reduce in named mode); a sync happens once every k steps. So
# the mean alone sits in a lax.cond branch: off-sync steps run the other
# branch, which writes zeros and reads nothing. In stacked mode the branch
# returns one model (the member axis reduced away), 1/M of the ensemble, so
# even the zeros are cheap. Everything that touches the whole ensemble, the
# weighted sum a n_i + (1 - a) m and the choice between t_i - w_i and u_i, is
# elementwise and stays outside the cond, where XLA fuses it with the inner
# update and with apply_updates into one pass; an output of a cond is a
# buffer of its own and fuses with nothing. The branch operands are (w, u),
# not n, so that an off-sync step does not pay for the sum n = w + u either.
# The sync flag and the weight a that the select and the weighted sum read
# are outputs of the cond too (True and a from the mean's branch, False and
# an unused 1 from the other): XLA copies the arithmetic of a scalar into
# every kernel that reads it, so a flag computed from the count outside the
# cond would put the schedule's arithmetic (the count's remainder, alpha's
# clip) into each tensor's kernel; read from the cond it is one parameter.
# On 600 tensors that is 4,800 fewer instructions to compile for Lookaround
# (benchmarks/README.md, WASH (b2) "Compile time").
# Inside the branch, the tensors of one pair of dtypes (w's, u's) are one flat
# buffer (optax_wa/_flat.py): one sum over members (one pmean in named mode,
# one gather for PAPA-2) for the whole model instead of one per tensor, and
# the off-sync branch writes one buffer of zeros. Outside, each tensor reads
# its part of the mean at an offset known at run time, so that its kernel is
# the same for every tensor of its shape: the compiled program grows with
# the number of distinct shapes, not of tensors. The concatenation is one
# more pass over w and u at a sync step only.
# PAPA-2's pairs are a gather of whole members, so that branch returns the
# whole ensemble; its zeros branch takes zeros_like of n, which keeps n's
# split of the member axis across devices (XLA drops the unused sum).
#
# Precision. n, m and t are formed in accumulation precision (float32 for
# bfloat16/float16 params): a mean summed in bfloat16 would round to 8
# significant bits at each of its M - 1 additions instead of once. The target
# is then rounded once to the params' dtype, and the update is returned in
# float32: t - w, both bfloat16, is exact in float32 whenever their exponents
# differ by at most 16 (the exact difference has at most 8 + 16 significant
# bits; float16: 11 + 13), so apply_updates, which adds in the wider dtype and
# casts back, gives exactly t. A bfloat16 update would round t - w a second
# time: after a Lookaround sync the members would differ in the last bit
# instead of being bitwise equal.


# The per-tensor helpers below are written in lax, not jnp: a jnp operator
# is a jitted function, traced again for every new shape, which for a model
# of hundreds of tensors is seconds of tracing per compile.


def _acc_dtype(p, u):
    """The dtype of ``n = w + u``: accumulation precision of both."""
    return jnp.promote_types(accumulation_dtype(p.dtype), accumulation_dtype(u.dtype))


def _moved(ops):
    """``n_i = w_i + u_i`` for every member, in accumulation precision."""

    def one(p, u):
        dtype = _acc_dtype(p, u)
        convert = jax.lax.convert_element_type
        return jax.lax.add(convert(p, dtype), convert(u, dtype))

    return jax.tree.map(one, *ops)


class _Buffers:
    """The leaves of ``(w, u)`` as flat buffers, one per pair of dtypes
    (``optax_wa/_flat.py``): the mean, or PAPA-2's pair means, is taken once
    per buffer, not once per tensor, and cut back into tensors outside the
    ``lax.cond``."""

    def __init__(self, ops, axis_name):
        self.stacked = axis_name is None
        self.w, self.treedef = jax.tree.flatten(ops[0])
        self.u = self.treedef.flatten_up_to(ops[1])
        self.sizes = [_flat.values_per_member(w, self.stacked) for w in self.w]
        groups: dict = {}
        for i, (w, u) in enumerate(zip(self.w, self.u)):
            groups.setdefault((w.dtype, u.dtype), []).append(i)
        self.groups = list(groups.values())

    def moved(self, w, u):
        """The buffers of ``n = w + u`` (``w``, ``u``: the flattened leaves)."""
        return [
            _moved(
                (
                    _flat.concat([w[i] for i in ids], self.stacked),
                    _flat.concat([u[i] for i in ids], self.stacked),
                )
            )
            for ids in self.groups
        ]

    def zero_means(self):
        """Zeros of the shape and dtype of each buffer's member mean."""
        return [
            jax.lax.full(
                (sum(self.sizes[i] for i in ids),),
                0,
                _acc_dtype(self.w[ids[0]], self.u[ids[0]]),
            )
            for ids in self.groups
        ]

    def cut(self, bufs, flag, member_axis):
        """The tree back out of ``bufs``: with the member axis or without it."""
        out = [None] * len(self.w)
        for ids, buf in zip(self.groups, bufs):
            sizes = [self.sizes[i] for i in ids]
            shapes = [
                self.w[i].shape
                if member_axis or not self.stacked
                else self.w[i].shape[1:]
                for i in ids
            ]
            (parts,) = _flat.cut([buf], _flat.offsets_of(sizes), sizes, [shapes], flag)
            for i, part in zip(ids, parts):
                out[i] = part
        return self.treedef.unflatten(out)


def _pull_targets(ops, is_sync, weight, axis_name):
    """``(t, is_sync)``: ``t_i = a n_i + (1 - a) m`` (``weight=None``:
    ``t_i = m``), with zeros for ``m`` off-sync, where the caller's select
    discards ``t``; the flag and ``a`` come out of the cond (see above)."""
    bufs = _Buffers(ops, axis_name)

    def mean_of(w, u, weight):
        means = [members.reduced_member_mean(n, axis_name) for n in bufs.moved(w, u)]
        return means, True, weight

    def no_mean(w, u, weight):
        unused = None if weight is None else jnp.ones_like(weight)
        return bufs.zero_means(), False, unused

    means, is_sync, weight = jax.lax.cond(
        is_sync, mean_of, no_mean, bufs.w, bufs.u, weight
    )
    mean = bufs.cut(means, is_sync, member_axis=False)
    if weight is None:
        return jax.tree.map(
            lambda m, p: members.broadcast_to_members(m, p, axis_name), mean, ops[0]
        ), is_sync

    def target(n, m):
        m = members.broadcast_to_members(m, n, axis_name)
        a = jax.lax.convert_element_type(weight, n.dtype)
        b = jax.lax.sub(jax.lax.full((), 1, n.dtype), a)
        return jax.lax.add(jax.lax.mul(a, n), jax.lax.mul(b, m))

    return jax.tree.map(target, _moved(ops), mean), is_sync


def _pair_targets(ops, is_sync, pairs, axis_name):
    """``(t, is_sync)``: ``t_i = (n_{p_i} + n_{q_i}) / 2`` at a sync; zeros,
    split as ``n``, elsewhere."""
    bufs = _Buffers(ops, axis_name)
    mixed, is_sync = jax.lax.cond(
        is_sync,
        lambda w, u: (members.pair_mean(bufs.moved(w, u), pairs, axis_name), True),
        lambda w, u: (jax.tree.map(jnp.zeros_like, bufs.moved(w, u)), False),
        bufs.w,
        bufs.u,
    )
    return bufs.cut(mixed, is_sync, member_axis=True), is_sync


def _sync_or_inner_updates(is_sync, targets, params, inner_updates):
    """``round(t_i) - w_i`` at a sync, ``u_i`` elsewhere; float32 for bfloat16."""
    convert = jax.lax.convert_element_type

    def one(t, p, u):
        rounded = convert(convert(t, p.dtype), t.dtype)
        at_sync = jax.lax.sub(rounded, convert(p, t.dtype))
        return jax.lax.select(is_sync, at_sync, convert(u, t.dtype))

    return jax.tree.map(one, targets, params, inner_updates)


def _num_members(params, axis_name):
    if axis_name is None:
        return members.num_members(params)
    return jax.lax.psum(1, axis_name)


def _periodic_average(
    inner: optax.GradientTransformation,
    *,
    name: str,
    sync: SyncSchedule,
    alpha,
    axis_name,
    state_policy: str = "keep",
    combine: str = "pull",
    seed=0,
) -> optax.GradientTransformationExtraArgs:
    """The core of lookaround and papa: the inner step, then at sync steps

        new_i = alpha_t (w_i + u_i) + (1 - alpha_t) mean_j (w_j + u_j)

    (``combine="pull"``; ``alpha=None`` is the plain mean) or
    ``new_i = (new_{a_i} + new_{b_i}) / 2`` (``combine="pair_half"``). The
    comment above derives the steps and explains the ``lax.cond`` and the
    float32 update.
    """
    inner = optax.with_extra_args_support(inner)
    per_member = members.per_member(inner, axis_name)

    def init_fn(params):
        return AveragingState(
            count=jnp.zeros([], jnp.int32), inner_state=per_member.init(params)
        )

    def update_fn(updates, state, params=None, **extra_args):
        _require_params(name, params)
        require_floating(name, params)
        count = optax.safe_increment(state.count)
        is_sync = is_sync_step(sync, count)
        inner_updates, inner_state = per_member.update(
            updates, state.inner_state, params, **extra_args
        )
        ops = (params, inner_updates)
        if combine == "pull":
            weight = None if alpha is None else _alpha_at(alpha, count)
            targets, sync_now = _pull_targets(ops, is_sync, weight, axis_name)
        else:
            key = jax.random.fold_in(jax.random.key(seed), count)
            pairs = _released_pairs(_num_members(params, axis_name), key)
            targets, sync_now = _pair_targets(ops, is_sync, pairs, axis_name)
        new_updates = _sync_or_inner_updates(sync_now, targets, params, inner_updates)
        if state_policy != "keep":
            averaged = jax.tree.map(lambda t, p: t.astype(p.dtype), targets, params)
            inner_state = jax.lax.cond(
                is_sync,
                lambda s: _sync_inner_state(
                    state_policy, per_member.init, s, averaged, axis_name
                ),
                lambda s: s,
                inner_state,
            )
        return new_updates, AveragingState(count=count, inner_state=inner_state)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


# --- the faces ----------------------------------------------------------------


def lookaround(
    inner: optax.GradientTransformation,
    *,
    sync_period: SyncSchedule = 5,
    axis_name: str | None = None,
    state_policy: str = "keep",
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
    is ``sync_period``. The average is a ``lax.cond`` branch: off-sync steps do
    not compute it.

    The returned update is ``new_params - params``, so ``lookaround`` must be
    the last element of an ``optax.chain``. Extra keyword arguments of
    ``update`` go to every member's inner update unchanged. For bfloat16 or
    float16 params the update is float32, so that ``optax.apply_updates``
    rounds the average once: after a sync the members are bitwise equal.

    Args:
      inner: the per-member optimizer (e.g. ``optax.sgd(0.1, momentum=0.9)``).
      sync_period: an integer ``k >= 1`` (sync after every ``k``-th update) or
        a schedule ``count -> bool`` (see :func:`sync_schedule`). An integer
        may come from ``optax.inject_hyperparams`` (a traced array; a value
        below 1 then never syncs).
      axis_name: ``None`` (stacked mode: params carry a leading member axis)
        or the name of the mapped member axis (named mode).
      state_policy: what happens to the members' inner states at a sync:
        ``"keep"`` (default, as the released code: each member keeps its own
        momentum), ``"average"`` (floating-point state leaves are replaced by
        their member mean), ``"reset"`` (floating-point leaves are re-initialized
        with ``inner.init`` at the averaged params; integer leaves such as step
        counters are kept, so schedules continue).

    Returns:
      A ``GradientTransformationExtraArgs`` with state :class:`AveragingState`
      (also named ``LookaroundState``).

    Raises:
      TypeError: at the first update, if a param leaf is not floating point.

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
    sync_period = _check_sync("sync_period", sync_period)
    if state_policy not in _STATE_POLICIES:
        raise ValueError(
            f"state_policy must be one of {_STATE_POLICIES}, got {state_policy!r}."
        )
    return _periodic_average(
        inner,
        name="lookaround",
        sync=sync_period,
        alpha=None,
        axis_name=axis_name,
        state_policy=state_policy,
    )


def papa(
    inner: optax.GradientTransformation,
    *,
    alpha: optax.ScalarOrSchedule = 0.99,
    period: SyncSchedule = 10,
    axis_name: str | None = None,
    combine: str = "pull",
    seed: int = 0,
) -> optax.GradientTransformationExtraArgs:
    r"""PAPA: at sync steps, pull each member toward the population mean.

    After the inner step of every sync step (``period``):

    .. math::
      w_i \leftarrow \alpha_t\, w_i + (1 - \alpha_t)\, \bar w, \qquad
      \bar w = \tfrac{1}{M}\textstyle\sum_j w_j .

    The inner optimizer states are untouched. The released code
    (SamsungSAILMontreal/PAPA, ``main.py``) pulls after the 1st, (k+1)-th,
    (2k+1)-th… update of every epoch, with
    :math:`\alpha_t = 1 - (\eta_{t+1}/\eta_{base})(1-\alpha)`; that recipe is

    .. code-block:: python

      papa(inner, alpha=papa_lr_scaled_alpha(0.99, lr_schedule, base_rate),
           period=sync_schedule(10, steps_per_epoch=steps_per_epoch))

    The variants of the paper, on an every-few-epochs schedule: PAPA-all is
    ``alpha=0`` (every member replaced by the average); PAPA-2 is
    ``combine="pair_half"`` (every member replaced by the 0.5/0.5 average of a
    random pair of members). BatchNorm buffers are not optimizer params: pull
    them with :func:`optax_wa.members.pull_to_mean` and
    :func:`sync_weight` (:func:`optax_wa.members.pair_mean` for PAPA-2).

    The returned update is ``new_params - params``, so ``papa`` must be the
    last element of an ``optax.chain``; for bfloat16 or float16 params it is
    float32, so that ``optax.apply_updates`` rounds the pulled value once.

    Args:
      inner: the per-member optimizer.
      alpha: the weight kept on a member's own parameters, in ``[0, 1]``; a
        float or a schedule, evaluated at the index of the update that pulls
        (optax's: the first update is 0). A value outside ``[0, 1]`` known
        only at run time (a schedule, ``inject_hyperparams``) is clipped to it.
        Ignored with ``combine="pair_half"``.
      period: the sync schedule: an integer ``k >= 1`` (after every ``k``-th
        update of the run) or a schedule ``count -> bool``
        (:func:`sync_schedule`; ``steps_per_epoch=`` gives the released one).
      axis_name: ``None`` (stacked mode) or the mapped member axis name.
      combine: ``"pull"`` (default, the formula above) or ``"pair_half"``
        (PAPA-2, as the released ``method_comb=pair_half`` draws its pairs: with
        ``M >= 3`` the first ``M`` pairs of ``combinations(range(M), 2)`` in a
        random order, one per member; with ``M = 2`` both become their
        average). The draw uses ``fold_in(key(seed), count)``, the same on
        every member and device. Named mode gathers the ensemble at a sync.
      seed: the seed of PAPA-2's pair draws.

    Returns:
      A ``GradientTransformationExtraArgs`` with state :class:`AveragingState`
      (also named ``PapaState``).

    Raises:
      TypeError: at the first update, if a param leaf is not floating point.

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
    period = _check_sync("period", period)
    if combine not in _COMBINES:
        raise ValueError(f"combine must be one of {_COMBINES}, got {combine!r}.")
    if not callable(alpha) and not is_traced(alpha):
        if (
            not is_concrete_number(alpha)
            or np.ndim(alpha) != 0
            or not 0.0 <= float(alpha) <= 1.0
        ):
            raise ValueError(f"alpha must be a scalar in [0, 1], got {alpha!r}.")
    return _periodic_average(
        inner,
        name="papa",
        sync=period,
        alpha=alpha,
        axis_name=axis_name,
        combine=combine,
        seed=seed,
    )


def papa_lr_scaled_alpha(
    alpha: float,
    learning_rate: optax.ScalarOrSchedule,
    base_rate: float,
    *,
    rate: str = "next",
) -> optax.Schedule:
    r"""PAPA's released ``lr_scaling='linear'``: a pull that shrinks with the rate.

    .. math::
      \alpha_t = 1 - \frac{\eta}{\eta_{base}}\,(1 - \alpha)

    The released loop steps the scheduler before the pull and reads the rate
    it then reports, that of the next update: :math:`\eta = \eta_{t+1}`
    (``rate="next"``, default). ``rate="current"`` reads the rate of the
    update that pulls, :math:`\eta_t`. :math:`\eta_{base}` is the configured
    base rate, never ``schedule(0)`` (0 with a warmup). The released code
    keeps the previous weight when :math:`\eta = \eta_{base}` exactly; the
    formula gives :math:`\alpha` there, which is the same unless a warmup
    reaches the base rate after earlier pulls.

    Args:
      alpha: the base weight in ``[0, 1]``.
      learning_rate: the inner optimizer's learning rate or schedule.
      base_rate: :math:`\eta_{base} > 0`, the configured (peak) rate.
      rate: ``"next"`` or ``"current"``.

    Returns:
      A schedule to pass as ``papa(..., alpha=...)`` (evaluated there at the
      index of the update that pulls).

    Examples:
      >>> import optax, optax_wa
      >>> lr = optax.linear_schedule(0.2, 0.0, 10)
      >>> alpha = optax_wa.papa_lr_scaled_alpha(0.9, lr, base_rate=0.2)
      >>> round(float(alpha(4)), 6)                 # 1 - (0.1 / 0.2) * 0.1
      0.95
    """
    if (
        not is_concrete_number(alpha)
        or np.ndim(alpha) != 0
        or not 0.0 <= float(alpha) <= 1.0
    ):
        raise ValueError(f"alpha must be a number in [0, 1], got {alpha!r}.")
    if (
        not is_concrete_number(base_rate)
        or np.ndim(base_rate) != 0
        or not np.isfinite(base_rate)
        or base_rate <= 0
    ):
        raise ValueError(f"base_rate must be a finite number > 0, got {base_rate!r}.")
    if rate not in _RATE_READINGS:
        raise ValueError(f"rate must be one of {_RATE_READINGS}, got {rate!r}.")
    shift = 1 if rate == "next" else 0
    schedule = learning_rate if callable(learning_rate) else lambda _: learning_rate

    def scaled(count):
        eta = jnp.asarray(schedule(count + shift), jnp.float32)
        return 1.0 - (eta / base_rate) * (1.0 - alpha)

    return scaled
