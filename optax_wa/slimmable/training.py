r"""SlimCLR training pieces: loss weights, slow start, freezing, diagnostics, EMA.

SlimCLR trains the widths ``[w_1 = 1 > w_2 > ... > w_W]`` of one slimmable
network with a single backward pass on

.. math::
  \mathcal{L} = \lambda_1 L_1 + \sum_{i \ge 2} \lambda_i
  \big((1 - a) L_i + a\, \mathrm{KD}_i\big)

where :math:`L_i` is the contrastive loss of width :math:`w_i`,
:math:`\mathrm{KD}_i` the online distillation from the full width and
:math:`\lambda` the loss weights (:func:`slimclr_loss_weights`). Slow start
trains only the full width (:math:`\lambda = (1, 0, \dots)`) before a switch
step; :func:`slow_start_schedule` returns these coefficients as a runtime
array so the switch needs no recompilation, and
:func:`weighted_value_and_grad` combines the per-width losses with one
:func:`jax.vjp`. :func:`freeze_until` keeps the parameters that only
sub-widths use (their switchable norms) exactly unchanged before the switch.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from optax_wa import members
from optax_wa._numerics import global_norm, safe_ratio
from optax_wa.slimmable.layers import slim_size, validate_widths
from optax_wa.slimmable.losses import l2_normalize

PyTree = Any

LOSS_WEIGHT_MODES = (0, 1, 2, 3, 5, 6, 7)


def _validate_decreasing(
    widths: Sequence[float], name: str = "widths"
) -> tuple[float, ...]:
    widths = validate_widths(widths, name)
    if any(a <= b for a, b in zip(widths, widths[1:])):
        raise ValueError(
            f"{name} must be strictly decreasing with the full width first, got {widths!r}."
        )
    return widths


def slimclr_loss_weights(widths: Sequence[float], mode: int = 5) -> tuple[float, ...]:
    r"""Per-width loss weights :math:`\lambda_i` of SlimCLR's reweighting.

    With :math:`S = \sum_i w_i`, :math:`n` widths and :math:`w_1` the largest:

    * ``0``: all 1 (naive joint training);
    * ``1``: :math:`w_i / S`;
    * ``2``: :math:`w_i`;
    * ``3``: :math:`n\, w_i / S`;
    * ``5`` (SlimCLR's choice): :math:`\lambda_1 = 1 + S - w_1`, others 1,
      so the full width weighs as much as all sub-widths together plus one:
      ``[2.5, 1, 1, 1]`` for ``[1, .75, .5, .25]``;
    * ``6``: :math:`\propto 1 + \sum_{j > i} w_j`, normalized to sum to
      :math:`n`;
    * ``7``: :math:`\lambda_1 = 1 + w_2` (the largest sub-width), others 1.

    Args:
      widths: distinct widths in ``(0, 1]``, any order.
      mode: one of ``0, 1, 2, 3, 5, 6, 7``.

    Returns:
      A tuple of floats, one per width, in the order of ``widths``.

    Examples:
      >>> from optax_wa.slimmable import slimclr_loss_weights
      >>> slimclr_loss_weights((1.0, 0.75, 0.5, 0.25), mode=5)
      (2.5, 1.0, 1.0, 1.0)

    References:
      Zhao, Wu, Zhu, Ji and Wang, `Slimmable Networks for Contrastive
      Self-supervised Learning <https://arxiv.org/abs/2209.15525>`_, IJCV 2024.
    """
    widths = validate_widths(widths)
    if mode not in LOSS_WEIGHT_MODES:
        raise ValueError(f"mode must be one of {LOSS_WEIGHT_MODES}, got {mode!r}.")
    n, total, top = len(widths), sum(widths), max(widths)
    if mode == 0:
        return tuple(1.0 for _ in widths)
    if mode == 1:
        return tuple(w / total for w in widths)
    if mode == 2:
        return tuple(float(w) for w in widths)
    if mode == 3:
        return tuple(n * w / total for w in widths)
    if mode == 5:
        return tuple(1.0 + total - top if w == top else 1.0 for w in widths)
    if mode == 6:
        ordered = sorted(widths, reverse=True)
        raw = {w: 1.0 + sum(ordered[i + 1 :]) for i, w in enumerate(ordered)}
        norm = sum(raw.values())
        return tuple(n * raw[w] / norm for w in widths)
    # mode == 7
    rest = [w for w in widths if w != top]
    lead = 1.0 + (max(rest) if rest else 0.0)
    return tuple(lead if w == top else 1.0 for w in widths)


def slow_start_schedule(
    widths: Sequence[float],
    switch_step: int,
    *,
    mode: int = 5,
    distill_weight: float = 0.5,
) -> Callable[[jax.Array], jax.Array]:
    r"""Loss coefficients of SlimCLR over training, as a runtime array.

    The returned schedule maps a step to a float32 vector of length ``2W``
    that multiplies the loss vector ``[L_1, ..., L_W, KD_1, ..., KD_W]``
    (``KD_1``, the full width's, is unused and always weighted 0):

    .. math::
      c(t) = \begin{cases}
      (1, 0, \dots, 0;\ 0, \dots, 0) & t < t_s \\
      (\lambda_1, (1-a)\lambda_2, \dots, (1-a)\lambda_W;\
       0, a\lambda_2, \dots, a\lambda_W) & t \ge t_s
      \end{cases}

    Selecting with ``jnp.where`` on the traced step keeps one compiled train
    step for the whole run. ``switch_step=0``, ``mode=0``,
    ``distill_weight=0`` gives naive joint training.

    Args:
      widths: strictly decreasing widths, the full width first.
      switch_step: :math:`t_s \ge 0`, the first step that trains all widths
        (half of training in SlimCLR).
      mode: the reweighting mode of :func:`slimclr_loss_weights`.
      distill_weight: :math:`a \in [0, 1]` (0.5 in SlimCLR).

    Returns:
      ``schedule(step) -> jax.Array`` of shape ``(2 * len(widths),)``.

    Examples:
      >>> from optax_wa.slimmable import slow_start_schedule
      >>> sched = slow_start_schedule((1.0, 0.5), switch_step=10)
      >>> sched(0).tolist(), sched(10).tolist()
      ([1.0, 0.0, 0.0, 0.0], [1.5, 0.5, 0.0, 0.5])
    """
    widths = _validate_decreasing(widths)
    if (
        isinstance(switch_step, bool)
        or not isinstance(switch_step, int)
        or switch_step < 0
    ):
        raise ValueError(f"switch_step must be an int >= 0, got {switch_step!r}.")
    if not 0.0 <= distill_weight <= 1.0:
        raise ValueError(f"distill_weight must be in [0, 1], got {distill_weight!r}.")
    lam = slimclr_loss_weights(widths, mode)
    n = len(widths)
    after = [lam[0]] + [(1.0 - distill_weight) * x for x in lam[1:]]
    after += [0.0] + [distill_weight * x for x in lam[1:]]
    before = [1.0] + [0.0] * (2 * n - 1)
    after_arr = jnp.asarray(after, jnp.float32)
    before_arr = jnp.asarray(before, jnp.float32)

    def schedule(step):
        return jnp.where(jnp.asarray(step) >= switch_step, after_arr, before_arr)

    return schedule


def weighted_value_and_grad(
    fun: Callable[..., Any], has_aux: bool = False
) -> Callable[..., tuple[Any, PyTree]]:
    r"""Gradient of a weighted sum of losses with one :func:`jax.vjp`.

    ``fun(params, *args)`` returns a vector of losses :math:`L \in
    \mathbb{R}^K` (and an auxiliary value if ``has_aux``). The returned
    function computes, for a runtime weight vector :math:`c`,

    .. math::
      \nabla_\theta \big(c^\top L(\theta)\big) = J_L(\theta)^\top c

    as one vector-Jacobian product with cotangent :math:`c`: one forward and
    one backward pass for all widths, every loss available for logging, and no
    recompilation when :math:`c` changes (e.g. at the slow-start switch).

    Args:
      fun: ``fun(params, *args, **kwargs) -> losses`` or ``(losses, aux)``,
        ``losses`` of shape ``(K,)``.
      has_aux: whether ``fun`` returns an auxiliary value.

    Returns:
      ``f(params, weights, *args, **kwargs) -> ((total, losses[, aux]),
      grads)`` with ``total = weights @ losses``.

    Examples:
      >>> import jax.numpy as jnp
      >>> from optax_wa.slimmable import weighted_value_and_grad
      >>> f = lambda p: jnp.stack([p ** 2, 3 * p])
      >>> (total, losses), g = weighted_value_and_grad(f)(2.0, jnp.array([1.0, 0.5]))
      >>> float(total), float(g)
      (7.0, 5.5)
    """

    def wrapped(params, weights, *args, **kwargs):
        def bound(p):
            return fun(p, *args, **kwargs)

        if has_aux:
            losses, vjp_fn, aux = jax.vjp(bound, params, has_aux=True)
        else:
            losses, vjp_fn = jax.vjp(bound, params)
        if jnp.ndim(losses) != 1:
            raise ValueError(
                f"weighted_value_and_grad: fun must return a vector of losses, got "
                f"shape {jnp.shape(losses)}."
            )
        weights = jnp.asarray(weights, jnp.result_type(losses))
        if weights.shape != losses.shape:
            raise ValueError(
                f"weighted_value_and_grad: weights {weights.shape} must match the "
                f"losses {losses.shape}."
            )
        (grads,) = vjp_fn(weights)
        total = jnp.dot(weights, losses)
        value = (total, losses, aux) if has_aux else (total, losses)
        return value, grads

    return wrapped


# ----------------------------------------------------------------------------
# Masks and specs read from the variables' metadata.


def _is_variable(x) -> bool:
    return isinstance(x, nnx.Variable)


def _metadata(variable: nnx.Variable) -> dict:
    return variable.get_metadata()


def sub_width_mask(model: nnx.Module, variables: Any = nnx.Param) -> PyTree:
    """Marks the variables that only sub-widths use.

    In a slimmable network every shared weight is used by the full width; the
    variables used *only* by narrower widths are the per-width parameters of
    switchable layers (:class:`SwitchableBatchNorm`,
    :class:`SwitchableLayerNorm`, :class:`SwitchableLinear`) that belong to a
    width below the largest. These are what slow start leaves untouched.

    Args:
      model: a module built from :mod:`optax_wa.slimmable` layers.
      variables: the filter of the variables to cover (default
        :class:`flax.nnx.Param`, matching ``nnx.Optimizer(..., wrt=nnx.Param)``).

    Returns:
      A pure :class:`flax.nnx.State` of Python bools with the structure of
      ``nnx.as_pure(nnx.state(model, variables))``.

    Examples:
      >>> from flax import nnx
      >>> from optax_wa.slimmable import SlimmableMLP, sub_width_mask
      >>> model = SlimmableMLP(4, (8,), (1.0, 0.5), projection_dim=None,
      ...                      rngs=nnx.Rngs(0))
      >>> mask = sub_width_mask(model)
      >>> mask["blocks"][0]["norm"]["norms"][1]["scale"]
      True
    """
    state = nnx.state(model, variables)
    owners = [
        _metadata(v)["switch_width"]
        for v in jax.tree.leaves(state, is_leaf=_is_variable)
        if "switch_width" in _metadata(v)
    ]
    top = max(owners) if owners else None

    def one(v):
        w = _metadata(v).get("switch_width")
        return w is not None and w < top

    return jax.tree.map(one, state, is_leaf=_is_variable)


@dataclasses.dataclass(frozen=True)
class SlicedAxes:
    """The axes of a shared parameter that shrink with the width (a pytree leaf)."""

    axes: tuple[int, ...] = ()


def slim_axes_spec(model: nnx.Module, variables: Any = nnx.Param) -> PyTree:
    """The sliced axes of every parameter, for :func:`slimmable_grad_stats`.

    Args:
      model: a module built from :mod:`optax_wa.slimmable` layers.
      variables: the filter of the variables to cover.

    Returns:
      A :class:`flax.nnx.State` of :class:`SlicedAxes` leaves (empty axes for
      parameters that are not sliced) with the structure of
      ``nnx.as_pure(nnx.state(model, variables))``.

    Examples:
      >>> from flax import nnx
      >>> from optax_wa.slimmable import SlimmableLinear, slim_axes_spec
      >>> layer = SlimmableLinear(4, 2, slice_input=False, rngs=nnx.Rngs(0))
      >>> slim_axes_spec(layer)["kernel"]
      SlicedAxes(axes=(1,))
    """
    state = nnx.state(model, variables)
    return jax.tree.map(
        lambda v: SlicedAxes(tuple(_metadata(v).get("slim_axes", ()))),
        state,
        is_leaf=_is_variable,
    )


# ----------------------------------------------------------------------------
# freeze_until


class FreezeUntilState(NamedTuple):
    """State of :func:`freeze_until`.

    Attributes:
      count: number of updates so far (int32).
      inner_state: state of the wrapped optimizer (``EmptyState`` if none).
    """

    count: jax.Array
    inner_state: Any


def _where_frozen(frozen, mask_leaf, held, new):
    if isinstance(mask_leaf, (bool, type(None))):
        if not mask_leaf:
            return new
        return jnp.where(frozen, held, new)
    return jnp.where(jnp.logical_and(frozen, mask_leaf), held, new)


def freeze_until(
    switch_step: int,
    mask: PyTree | Callable[[PyTree], PyTree],
    *,
    inner: optax.GradientTransformation | None = None,
) -> optax.GradientTransformationExtraArgs:
    r"""Holds the masked parameters exactly fixed until ``switch_step`` updates.

    .. math::
      u_t \leftarrow \begin{cases} 0 & \text{masked leaf and } t < t_s \\
      u_t & \text{otherwise} \end{cases}

    where :math:`t` counts the calls to ``update``. Zeroing the final update
    is what keeps a leaf bit-identical even with weight decay and momentum, so
    this transformation must see the *final* updates:

    * **end of a chain**: ``optax.chain(optimizer, freeze_until(t_s,
      mask))``. Before the switch the inner optimizer still updates its state
      for the masked leaves (a momentum trace accumulates their weight decay,
      Adam's moments see their zero gradients), which affects their first
      updates after the switch;
    * **wrapper**: ``freeze_until(t_s, mask, inner=optimizer)`` also holds the
      masked leaves' entries of the inner state (momenta, second moments; found
      with :func:`optax.tree_map_params`) at their initial values, so after the
      switch they start as if the optimizer had never seen them, like a
      PyTorch parameter without a gradient. Scalar state such as Adam's step
      count stays global.

    In SlimCLR the mask is :func:`sub_width_mask` (the switchable norms of the
    sub-widths) and ``switch_step`` the slow-start switch.

    Args:
      switch_step: :math:`t_s \ge 0`; the masked leaves move from update
        :math:`t_s` (0-based) on.
      mask: a pytree of bools with the structure of the params, or a callable
        ``params -> mask``; leaves may be Python bools (static) or boolean
        arrays.
      inner: optional optimizer to wrap (see above).

    Returns:
      An :class:`optax.GradientTransformationExtraArgs`; extra keyword
      arguments are passed to ``inner`` (and ignored when unused).

    Examples:
      >>> import jax.numpy as jnp, optax
      >>> from optax_wa.slimmable import freeze_until
      >>> params = {"shared": jnp.ones(2), "sub": jnp.ones(2)}
      >>> opt = freeze_until(1, {"shared": False, "sub": True},
      ...                    inner=optax.adamw(0.1, weight_decay=0.1))
      >>> state = opt.init(params)
      >>> updates, state = opt.update(params, state, params)
      >>> updates["sub"].tolist()
      [0.0, 0.0]

    References:
      Zhao, Wu, Zhu, Ji and Wang, `Slimmable Networks for Contrastive
      Self-supervised Learning <https://arxiv.org/abs/2209.15525>`_, IJCV 2024
      (slow start).
    """
    if (
        isinstance(switch_step, bool)
        or not isinstance(switch_step, int)
        or switch_step < 0
    ):
        raise ValueError(f"switch_step must be an int >= 0, got {switch_step!r}.")
    if inner is not None:
        inner = optax.with_extra_args_support(inner)

    def resolve(tree):
        return mask(tree) if callable(mask) else mask

    def init_fn(params):
        inner_state = inner.init(params) if inner is not None else optax.EmptyState()
        return FreezeUntilState(jnp.zeros([], jnp.int32), inner_state)

    def update_fn(updates, state, params=None, **extra_args):
        frozen = state.count < switch_step
        leaf_mask = resolve(params if params is not None else updates)
        if inner is not None:
            updates, new_inner = inner.update(
                updates, state.inner_state, params, **extra_args
            )
            state_mask = optax.tree_map_params(
                inner,
                lambda _, m: m,
                new_inner,
                leaf_mask,
                transform_non_params=lambda _: False,
            )
            new_inner = jax.tree.map(
                lambda m, old, new: _where_frozen(frozen, m, old, new),
                state_mask,
                state.inner_state,
                new_inner,
            )
        else:
            new_inner = state.inner_state
        updates = jax.tree.map(
            lambda m, u: _where_frozen(frozen, m, jnp.zeros_like(u), u),
            leaf_mask,
            updates,
        )
        count = optax.safe_int32_increment(state.count)
        return updates, FreezeUntilState(count, new_inner)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


# ----------------------------------------------------------------------------
# Gradient-imbalance diagnostics


class SlimmableGradStatsState(NamedTuple):
    """State of :func:`slimmable_grad_stats` (the last update's statistics).

    Attributes:
      ratios: ``{parameter path: ratio}`` for every sliced parameter, float32
        scalars (0 where the min-width block's gradient is exactly 0).
      mean_ratio: the mean of ``ratios`` over parameters.
    """

    ratios: dict[str, jax.Array]
    mean_ratio: jax.Array


def _sliced_leaves(spec, updates):
    spec_leaves = jax.tree_util.tree_flatten_with_path(
        spec, is_leaf=lambda x: isinstance(x, SlicedAxes)
    )[0]
    update_leaves = jax.tree.leaves(updates)
    if len(spec_leaves) != len(update_leaves):
        raise ValueError(
            f"slimmable_grad_stats: slim_axes has {len(spec_leaves)} leaves, the "
            f"updates {len(update_leaves)}; build it with slim_axes_spec(model)."
        )
    out = []
    for (path, axes), g in zip(spec_leaves, update_leaves):
        if not isinstance(axes, SlicedAxes):
            raise ValueError(
                f"slimmable_grad_stats: leaf {jax.tree_util.keystr(path)} of slim_axes "
                f"must be a SlicedAxes, got {axes!r}."
            )
        if axes.axes:
            out.append((jax.tree_util.keystr(path), axes.axes, g))
    return out


def _block_mask(shape, axes, width):
    mask = jnp.ones(shape, bool)
    for a in axes:
        iota = jax.lax.broadcasted_iota(jnp.int32, shape, a)
        mask = mask & (iota < slim_size(shape[a], width))
    return mask


def slimmable_grad_stats(
    slim_axes: PyTree, min_width: float
) -> optax.GradientTransformationExtraArgs:
    r"""Identity transformation recording SlimCLR's gradient-imbalance ratio.

    For every shared parameter with sliced axes, the gradient is split into
    the block the narrowest width uses (the prefix :math:`\theta_\text{min}`)
    and the rest of the full weight:

    .. math::
      r = \frac{\lVert \nabla_{\theta_\text{full} \setminus \theta_\text{min}}
      \rVert_2}{\lVert \nabla_{\theta_\text{min}} \rVert_2}

    computed in float32 with scaled norms (finite for every finite gradient,
    whatever its magnitude; 0 when the denominator is exactly 0). A ratio below 1
    means the few weights shared by all widths receive more gradient than the
    rest of the full network: the gradient-magnitude imbalance of naive joint
    training. Updates pass through unchanged.

    Args:
      slim_axes: a pytree with the structure of the params whose leaves are
        :class:`SlicedAxes` (:func:`slim_axes_spec` builds it from a model).
      min_width: the narrowest trained width, in ``(0, 1]``.

    Returns:
      An :class:`optax.GradientTransformationExtraArgs` whose state is a
      :class:`SlimmableGradStatsState`.

    Examples:
      >>> import jax.numpy as jnp
      >>> from optax_wa.slimmable import SlicedAxes, slimmable_grad_stats
      >>> stats = slimmable_grad_stats({"w": SlicedAxes((0,))}, min_width=0.5)
      >>> params = {"w": jnp.zeros(4)}
      >>> _, state = stats.update({"w": jnp.array([3.0, 4.0, 0.0, 5.0])},
      ...                         stats.init(params))
      >>> float(state.mean_ratio)
      1.0

    References:
      Zhao, Wu, Zhu, Ji and Wang, `Slimmable Networks for Contrastive
      Self-supervised Learning <https://arxiv.org/abs/2209.15525>`_, IJCV 2024.
    """
    min_width = validate_widths((min_width,), "min_width")[0]

    def init_fn(params):
        names = [name for name, _, _ in _sliced_leaves(slim_axes, params)]
        return SlimmableGradStatsState(
            {name: jnp.zeros([], jnp.float32) for name in names},
            jnp.zeros([], jnp.float32),
        )

    def update_fn(updates, state, params=None, **extra_args):
        del params, extra_args
        ratios = {}
        for name, axes, g in _sliced_leaves(slim_axes, updates):
            g = jnp.asarray(g, jnp.float32)
            block = _block_mask(g.shape, axes, min_width)
            # Scaled norms: no overflow, underflow or NaN gradient at any scale.
            inside = global_norm([jnp.where(block, g, 0.0)])
            outside = global_norm([jnp.where(block, 0.0, g)])
            ratios[name] = safe_ratio(outside, inside)
        mean = (
            sum(ratios.values()) / len(ratios) if ratios else jnp.zeros([], jnp.float32)
        )
        return updates, SlimmableGradStatsState(ratios, jnp.asarray(mean, jnp.float32))

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


# ----------------------------------------------------------------------------
# Momentum (key) encoder and queue


def update_key_encoder(
    key_params: PyTree, params: PyTree, momentum: jax.typing.ArrayLike
) -> PyTree:
    r"""MoCo's momentum update of the key encoder, on the library's averaging.

    .. math::
      \theta_k \leftarrow m\, \theta_k + (1 - m)\, \theta_q

    computed with :func:`optax_wa.members.interpolate` (float32 accumulation,
    each leaf back in its dtype).

    Args:
      key_params: the key (momentum) encoder's parameters.
      params: the query encoder's parameters (same structure).
      momentum: :math:`m \in [0, 1]` (0.999 in MoCo v2; may be traced, e.g.
        :func:`moco_momentum`).

    Returns:
      The new key parameters.

    Examples:
      >>> import jax.numpy as jnp
      >>> from optax_wa.slimmable import update_key_encoder
      >>> update_key_encoder({"w": jnp.array([1.0])}, {"w": jnp.array([3.0])}, 0.75)
      {'w': Array([1.5], dtype=float32)}
    """
    return members.interpolate(key_params, params, momentum)


def moco_momentum(
    step: jax.typing.ArrayLike, total_steps: int, base_momentum: float = 0.99
) -> jax.Array:
    r"""MoCo v3's cosine schedule of the key-encoder momentum.

    .. math::
      m_t = 1 - \tfrac{1}{2}\big(1 + \cos(\pi t / T)\big)(1 - m_0)

    rising from :math:`m_0` to 1.

    Examples:
      >>> from optax_wa.slimmable import moco_momentum
      >>> round(float(moco_momentum(50, 100, base_momentum=0.99)), 4)
      0.995
    """
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps!r}.")
    t = jnp.asarray(step, jnp.float32) / total_steps
    return 1.0 - 0.5 * (1.0 + jnp.cos(jnp.pi * t)) * (1.0 - base_momentum)


class MoCoQueue(NamedTuple):
    """MoCo's queue of negative keys.

    Attributes:
      keys: ``(K, D)`` L2-normalized keys.
      ptr: int32 position of the next write.
    """

    keys: jax.Array
    ptr: jax.Array


def init_queue(rng: jax.Array, size: int, dim: int) -> MoCoQueue:
    """A queue of ``size`` random unit keys of dimension ``dim``.

    Examples:
      >>> import jax
      >>> from optax_wa.slimmable import init_queue
      >>> init_queue(jax.random.key(0), 8, 4).keys.shape
      (8, 4)
    """
    if size < 1 or dim < 1:
        raise ValueError(f"size and dim must be >= 1, got size={size!r}, dim={dim!r}.")
    keys = l2_normalize(jax.random.normal(rng, (size, dim), jnp.float32))
    return MoCoQueue(keys, jnp.zeros([], jnp.int32))


def enqueue(queue: MoCoQueue, keys: jax.Array) -> MoCoQueue:
    """Replaces the oldest ``len(keys)`` entries with the normalized ``keys``.

    The queue size must be a multiple of the batch size (as in MoCo) and the
    keys must have the queue's feature size; both raise a ``ValueError``
    otherwise.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from optax_wa.slimmable import enqueue, init_queue
      >>> queue = enqueue(init_queue(jax.random.key(0), 4, 2), jnp.array([[3.0, 4.0]]))
      >>> queue.keys[0].tolist(), int(queue.ptr)
      ([0.6000000238418579, 0.800000011920929], 1)
    """
    if jnp.ndim(keys) != 2 or keys.shape[1] != queue.keys.shape[1]:
        raise ValueError(
            f"enqueue: keys must be (N, {queue.keys.shape[1]}) like the queue's "
            f"entries, got {jnp.shape(keys)}."
        )
    size, n = queue.keys.shape[0], keys.shape[0]
    if size % n:
        raise ValueError(
            f"the queue size ({size}) must be a multiple of the batch size ({n})."
        )
    new = jax.lax.stop_gradient(l2_normalize(keys)).astype(queue.keys.dtype)
    updated = jax.lax.dynamic_update_slice(queue.keys, new, (queue.ptr, jnp.int32(0)))
    return MoCoQueue(updated, ((queue.ptr + n) % size).astype(jnp.int32))
