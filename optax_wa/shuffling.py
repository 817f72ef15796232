"""WASH: shuffling a random fraction of weights across ensemble members.

After every optimizer step, each scalar parameter (coordinate) is selected
independently with a per-tensor probability; the members' values of a
selected coordinate are permuted among the members by a uniformly random
permutation. Only the selected values move, so in a sharded ensemble a step
communicates ``O(p * d)`` values instead of the ``O(d)`` of an average.

Probability convention: ``p`` counts *selections*. A selected coordinate gets
a permutation drawn uniformly from all ``M!`` permutations, the identity
included, so a selected value stays with its member with probability ``1/M``
and the expected fraction of values that change member is ``p (M - 1) / M``.

This module is the optimizer: options, per-tensor probabilities, which
arrays move together. The selection and the exchange (exact ``O(k)``
selection from geometric gaps, counter-based draws, the rounds and their
static sizes, all tensors of a kind as one flat buffer) are the private
engine ``optax_wa._exchange``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from optax_wa import _depth, _exchange, members
from optax_wa._depth import execution_depth_order, wash_layer_probs

__all__ = [
    "WashState",
    "execution_depth_order",
    "shuffle_coordinates",
    "wash",
    "wash_layer_probs",
]

PyTree = Any

_TOPOLOGIES = ("full", "ring")
_PROB_COUNTS = ("selections", "moves")
_QUANTIZE = (None, "bfloat16", "float16")


class WashState(NamedTuple):
    """State of :func:`wash`.

    Attributes:
      count: number of updates so far (int32 scalar; per member in named mode,
        identical in every member).
      key: the PRNG key data of ``jax.random.PRNGKey(seed)``; step ``t`` uses
        ``fold_in(key, t)``, shared by every member and device.
      inner_state: the inner optimizer's state, one per member.
    """

    count: jax.Array
    key: jax.Array
    inner_state: optax.OptState


# ---------------------------------------------------------------------------
# The optimizer.


def wash(
    inner: optax.GradientTransformation,
    *,
    shuffle_prob: float = 0.01,
    interval: int = 1,
    topology: str = "full",
    prob_counts: str = "selections",
    quantize: str | None = None,
    layer_probs: str | Callable[..., float] | PyTree | None = None,
    depth_order: Sequence[str | Sequence[Any]] | Callable[..., Any] | None = None,
    shuffle_opt_state: bool = False,
    seed: int = 0,
    axis_name: str | tuple[str, ...] | None = None,
) -> optax.GradientTransformationExtraArgs:
    r"""WASH: after each step, shuffle a random fraction of weights across members.

    Every member takes the inner optimizer's step, then each coordinate
    :math:`c` of a tensor with probability :math:`p_l` is selected
    independently, and the members' new values of a selected coordinate are
    permuted by a random permutation :math:`\pi_c` of the :math:`M` members
    (``topology="full"``: uniform, identity allowed; ``"ring"``: a cyclic
    shift by :math:`\pm 1`, as in a ring of workers):

    .. math::
      w^{t+1}_{i,c} = \begin{cases}
        w^t_{\pi_c(i),c} + u^t_{\pi_c(i),c} & c \text{ selected,} \\
        w^t_{i,c} + u^t_{i,c} & \text{otherwise,}
      \end{cases}

    where :math:`u_i^t` is the inner update of member :math:`i`. The shuffle
    runs after update :math:`t` (0-based) when :math:`t \bmod` ``interval``
    :math:`= 0` (after the first update, then every ``interval``-th).

    The returned update at a shuffled coordinate is the new value minus the
    parameter, so ``optax.apply_updates`` returns the moved value up to two
    roundings (of that difference and of the addition): exactly when the two
    values are within a factor of 2, else within one ulp of the larger of
    the two in magnitude. Per coordinate the multiset of member values, hence
    the member mean, is unchanged up to that rounding. The random decisions
    use one key for all members and devices, ``fold_in(PRNGKey(seed),
    step)``; the member index is never folded in.

    Only the selected values move: ``O(k)`` work and, in the sharded and named
    backends, one ``all_to_all`` of about :math:`k` values per member and
    dtype, where :math:`k \approx \sum_l p_l d_l`; ``quantize="bfloat16"`` or
    ``"float16"`` sends float32 values in 16 bits (half the bytes). With the
    member axis split over an explicit mesh (``jax.make_mesh``'s default),
    stacked mode finds the mesh in the params' type and runs the exchange
    under ``jax.shard_map``.

    ``wash`` must be the last element of an ``optax.chain``. Extra keyword
    arguments of ``update`` go to every member's inner update unchanged. The
    final model is the uniform average of the members
    (:func:`optax_wa.members.average_members`, then recalibrate BatchNorm
    statistics).

    Args:
      inner: the per-member optimizer (e.g. ``optax.sgd(0.1, momentum=0.9)``).
      shuffle_prob: :math:`p`, in ``[0, 1]``; static (it sizes buffers): with
        ``optax.inject_hyperparams`` list it in ``static_args``.
      interval: shuffle after every ``interval``-th update (an integer >= 1;
        may be injected, a run-time value below 1 acts as 1).
      topology: ``"full"`` (uniform permutations) or ``"ring"`` (a selected
        value moves to the next or the previous member).
      prob_counts: ``"selections"`` (default: :math:`p` is the selection
        probability; a fraction :math:`p(M-1)/M` of the values changes
        member under ``"full"``) or ``"moves"`` (select with probability
        :math:`p / (1 - 1/M)`, so that a fraction :math:`p` moves under
        ``"full"``; the reference simulator's reading).
      quantize: ``None``, ``"bfloat16"`` or ``"float16"``: the selected
        values of wider float tensors are rounded to this dtype (to nearest;
        finite values saturate at its largest value) and travel in it.
      layer_probs: ``None`` (default: ``"constant"``, or ``"linear"`` when
        ``depth_order`` is given), ``"constant"``, ``"linear"`` (:math:`p_l =
        p(1 - l/(L-1))`: first layer :math:`p`, last layer 0), a callable
        ``(path, leaf) -> p`` or a pytree of floats (see
        :func:`wash_layer_probs`).
      depth_order: the depth of every tensor for the linear schedule: path
        prefixes from the first layer to the last (e.g. ``["conv_in",
        "block_0", "block_1", "head"]``) or a callable ``(path, leaf) ->
        depth`` (:func:`execution_depth_order` derives it from a forward
        pass). Giving it selects ``"linear"``.
      shuffle_opt_state: if True, the inner state's params-shaped leaves
        (momentum, Adam moments) are shuffled with the same coordinates and
        permutations as their parameter (WASH+Opt).
      seed: the integer seed of the shuffle (may be injected).
      axis_name: ``None`` (stacked mode: params carry a leading member axis)
        or the mapped member axis name (named mode; a tuple of names spans
        several mapped axes, e.g. ``("members", "local")`` for members vmapped
        inside ``jax.shard_map``).

    Returns:
      A ``GradientTransformationExtraArgs`` with state :class:`WashState`.

    Examples:
      >>> import jax, jax.numpy as jnp, optax, optax_wa
      >>> params = {"w": jnp.array([[0.0, 1.0, 2.0], [10.0, 11.0, 12.0]])}
      >>> opt = optax_wa.wash(optax.sgd(0.1), shuffle_prob=1.0)
      >>> state = opt.init(params)
      >>> updates, state = opt.update(jax.tree.map(jnp.zeros_like, params), state, params)
      >>> new = optax.apply_updates(params, updates)
      >>> bool((jnp.sort(new["w"], axis=0) == params["w"]).all())   # values only move
      True

    References:
      Fournier et al., `WASH: Train your Ensemble with Communication-Efficient
      Weight Shuffling, then Average <https://arxiv.org/abs/2405.17517>`_, 2024.
    """
    options = _checked_options(
        shuffle_prob=shuffle_prob,
        interval=interval,
        topology=topology,
        prob_counts=prob_counts,
        quantize=quantize,
        layer_probs=layer_probs,
        depth_order=depth_order,
        shuffle_opt_state=shuffle_opt_state,
        seed=seed,
        axis_name=axis_name,
    )
    raw_inner = optax.with_extra_args_support(inner)
    per_member = members.per_member(raw_inner, axis_name)

    def init_fn(params):
        return _init(options, raw_inner, per_member, params)

    def update_fn(updates, state, params=None, **extra_args):
        return _update(
            options, raw_inner, per_member, updates, state, params, extra_args
        )

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


class _Options(NamedTuple):
    """The checked options of :func:`wash`."""

    shuffle_prob: float
    interval: Any
    topology: str
    prob_counts: str
    quantize: str | None
    layer_probs: Any
    depth_order: Any
    shuffle_opt_state: bool
    seed: Any
    axis_name: Any


def _checked_options(**options) -> _Options:
    """Checks every option of :func:`wash` and resolves ``layer_probs``."""
    _check_interval(options["interval"])
    _check_choice("topology", options["topology"], _TOPOLOGIES)
    _check_choice("prob_counts", options["prob_counts"], _PROB_COUNTS)
    _check_choice("quantize", options["quantize"], _QUANTIZE)
    _depth.check_layer_probs(options["layer_probs"])
    _depth.check_depth_order(options["depth_order"])
    if not isinstance(options["shuffle_opt_state"], bool):
        raise ValueError(
            f"shuffle_opt_state must be a bool, got {options['shuffle_opt_state']!r}."
        )
    _check_seed(options["seed"])
    options["shuffle_prob"] = _depth.check_prob("shuffle_prob", options["shuffle_prob"])
    options["layer_probs"] = _depth.resolve_layer_probs(
        options["layer_probs"], options["depth_order"]
    )
    return _Options(**options)


def _probabilities(options, params, num_members) -> list[float]:
    """Every tensor's selection probability, in leaf order."""
    probs = wash_layer_probs(
        params,
        shuffle_prob=options.shuffle_prob,
        layer_probs=options.layer_probs,
        depth_order=options.depth_order,
        stacked=options.axis_name is None,
    )
    return _selection_probs(jax.tree.leaves(probs), num_members, options.prob_counts)


def _init(options, raw_inner, per_member, params) -> WashState:
    key = jax.random.PRNGKey(options.seed)
    if _is_placeholder(params):  # tree_map_params: the state's structure only
        inner_state = raw_inner.init(params)
    else:
        _probabilities(options, params, _init_member_count(params, options.axis_name))
        inner_state = per_member.init(params)
    return WashState(jnp.zeros([], jnp.int32), key, inner_state)


def _update(options, raw_inner, per_member, updates, state, params, extra_args):
    """Every member's inner step, then (when due) the shuffle."""
    if params is None:
        raise ValueError("wash rewrites the parameters and needs `params` in update.")
    inner_updates, inner_state = per_member.update(
        updates, state.inner_state, params, **extra_args
    )
    num_members = _member_count(params, options.axis_name)
    probs = _probabilities(options, params, num_members)
    if any(probs) and num_members >= 2:
        shuffle = functools.partial(
            _shuffle_step,
            options,
            raw_inner,
            params,
            probs,
            jax.random.fold_in(state.key, state.count),
            num_members,
        )
        inner_updates, inner_state = _when_due(
            options.interval, state.count, shuffle, inner_updates, inner_state
        )
    count = optax.safe_increment(state.count)
    return inner_updates, WashState(count, state.key, inner_state)


def _when_due(interval, count, fn, *operands):
    """``fn(*operands)`` after update ``count`` (0-based) when ``count`` is a
    multiple of ``interval``, else ``operands``: a ``lax.cond`` unless every
    update is due."""
    if isinstance(interval, (int, np.integer)) and interval == 1:
        return fn(*operands)
    due = count % jnp.maximum(interval, 1) == 0
    return jax.lax.cond(due, fn, lambda *ops: ops, *operands)


def _shuffle_step(
    options, raw_inner, params, probs, key, num_members, inner_updates, inner_state
):
    """One shuffle of the updates (and, for WASH+Opt, of the params-shaped
    inner state): returns ``(new updates, new inner state)``.

    Each parameter is one :class:`optax_wa._exchange.Tensor`: its update, on
    the parameter as base (the value that moves is ``param + update``), and
    its state leaves, moved as they are.
    """
    param_leaves, treedef = jax.tree.flatten(params)
    update_leaves = treedef.flatten_up_to(inner_updates)
    groups, rebuild = {}, None
    if options.shuffle_opt_state:
        groups, rebuild = _params_shaped_state(raw_inner, inner_state, params)
    tensors = []
    for i, (u, p, prob) in enumerate(zip(update_leaves, param_leaves, probs)):
        state_leaves = tuple(groups.get(i, ()))
        bases = (p,) + (None,) * len(state_leaves)
        tensors.append(_exchange.Tensor((u, *state_leaves), bases, prob))
    out = _exchange.exchange(
        tensors,
        key,
        num_members,
        options.axis_name,
        options.topology,
        options.quantize,
    )
    new_updates = jax.tree.unflatten(treedef, [arrays[0] for arrays in out])
    if options.shuffle_opt_state:
        inner_state = rebuild({i: list(arrays[1:]) for i, arrays in enumerate(out)})
    return new_updates, inner_state


# ---------------------------------------------------------------------------
# Option checks and member counts.


def _check_seed(seed):
    """An integer seed: a Python/NumPy integer or an integer scalar array (as
    ``optax.inject_hyperparams`` passes it; it may be traced)."""
    if isinstance(seed, (bool, np.bool_)):
        raise ValueError(f"seed must be an integer, got {seed!r}.")
    if isinstance(seed, (int, np.integer)):
        return
    if (
        isinstance(seed, (np.ndarray, jax.Array))
        and np.ndim(seed) == 0
        and jnp.issubdtype(seed.dtype, jnp.integer)
    ):
        return
    raise ValueError(f"seed must be an integer, got {seed!r}.")


def _check_interval(interval):
    """``interval``: a Python integer >= 1, or an integer scalar array (as
    ``optax.inject_hyperparams`` passes it; a run-time value below 1 acts as 1)."""
    if isinstance(interval, (bool, np.bool_)):
        raise ValueError(f"interval must be an integer >= 1, got {interval!r}.")
    if isinstance(interval, (int, np.integer)):
        if interval < 1:
            raise ValueError(f"interval must be an integer >= 1, got {interval!r}.")
        return
    if (
        isinstance(interval, (np.ndarray, jax.Array))
        and np.ndim(interval) == 0
        and jnp.issubdtype(interval.dtype, jnp.integer)
    ):
        if not isinstance(interval, jax.core.Tracer) and int(interval) < 1:
            raise ValueError(f"interval must be an integer >= 1, got {interval!r}.")
        return
    raise ValueError(f"interval must be an integer >= 1, got {interval!r}.")


def _check_choice(name, value, allowed):
    if not any(value is a or (isinstance(value, str) and value == a) for a in allowed):
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}.")


def _selection_probs(probs, num_members, prob_counts):
    """Per-tensor selection probabilities: ``p`` itself, or with
    ``prob_counts="moves"`` ``p / (1 - 1/M)`` (a selected value stays with
    its member with probability ``1/M`` under a uniform permutation)."""
    if prob_counts == "selections" or num_members < 2:
        return probs
    scale = num_members / (num_members - 1)
    out = [p * scale for p in probs]
    if max(out) > 1.0:
        raise ValueError(
            f"shuffle_prob: with prob_counts='moves' and {num_members} members the "
            f"selection probability p * M / (M - 1) = {max(out):g} exceeds 1; "
            f"use p <= {1 / scale:g}."
        )
    return out


def _is_placeholder(params) -> bool:
    """Whether ``params`` is the placeholder object with which
    ``optax.tree_utils.tree_map_params`` initializes to locate the
    params-shaped parts of a state (a pytree node without leaves)."""
    return not jax.tree.leaves(params) and type(params).__name__ == (
        "_ParamsPlaceholder"
    )


def _params_shaped_state(inner, inner_state, params):
    """Groups the inner state's params-shaped leaves by parameter leaf.

    Returns ``(groups, rebuild)``: ``groups[i]`` lists the state leaves that
    belong to parameter leaf ``i`` (same shape), and ``rebuild(new_groups)``
    puts replacements back into the state.
    """
    leaves, treedef = jax.tree.flatten(params)
    ids = jax.tree.unflatten(treedef, list(range(len(leaves))))
    groups: dict[int, list] = {i: [] for i in range(len(leaves))}

    def grab(leaf, i):
        if hasattr(leaf, "shape") and np.shape(leaf) == np.shape(leaves[i]):
            groups[i].append(leaf)
        return leaf

    try:
        optax.tree_utils.tree_map_params(inner, grab, inner_state, ids)
    except Exception as err:  # the inner init cannot run on a placeholder
        raise ValueError(
            "wash(shuffle_opt_state=True) could not locate the params-shaped "
            f"leaves of the inner optimizer's state: {err}"
        ) from err

    def rebuild(new_groups):
        queues = {i: iter(new_groups[i]) for i in new_groups}

        def put(leaf, i):
            if hasattr(leaf, "shape") and np.shape(leaf) == np.shape(leaves[i]):
                return next(queues[i])
            return leaf

        return optax.tree_utils.tree_map_params(inner, put, inner_state, ids)

    return groups, rebuild


def _init_member_count(tree, axis_name) -> int:
    """The number of members, or 0 when ``init`` runs outside the mapped axis."""
    if axis_name is None:
        return members.num_members(tree)
    try:
        return int(jax.lax.axis_size(axis_name))
    except NameError:
        return 0


def _member_count(tree, axis_name) -> int:
    if axis_name is None:
        return members.num_members(tree)
    return int(jax.lax.axis_size(axis_name))


def shuffle_coordinates(
    tree: PyTree,
    key: jax.Array,
    probs: float | PyTree,
    *,
    topology: str = "full",
    quantize: str | None = None,
    axis_name: str | tuple[str, ...] | None = None,
) -> PyTree:
    r"""Permutes a random subset of coordinates across members (WASH's shuffle).

    Every coordinate of a tensor with probability :math:`p` is selected
    independently with probability :math:`p`; the members' values of a
    selected coordinate :math:`c` are permuted by a random permutation
    :math:`\pi_c` (``topology="full"``: uniform, identity allowed;
    ``"ring"``: a cyclic shift by :math:`\pm 1`):

    .. math::
      w_{i, c} \leftarrow w_{\pi_c(i), c}.

    Values are moved, never recomputed: per coordinate the multiset of member
    values, hence the member mean, is unchanged exactly (unless ``quantize``
    rounds the selected values, see :func:`wash`). Every member and device
    must pass the same ``key``.

    Args:
      tree: a stacked ensemble (stacked mode) or one member (named mode).
      key: a PRNG key shared by every member.
      probs: a float in ``[0, 1]`` for every tensor, or a pytree of floats
        with the structure of ``tree`` (see :func:`wash_layer_probs`).
      topology: ``"full"`` or ``"ring"``, as in :func:`wash`.
      quantize: ``None``, ``"bfloat16"`` or ``"float16"``, as in :func:`wash`.
      axis_name: ``None`` (stacked mode) or the mapped member axis name(s).

    Returns:
      The shuffled tree.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from optax_wa.shuffling import shuffle_coordinates
      >>> tree = {"w": jnp.array([[0.0, 1.0, 2.0], [10.0, 11.0, 12.0]])}
      >>> out = shuffle_coordinates(tree, jax.random.key(0), 1.0)
      >>> jnp.sort(out["w"], axis=0)       # each column keeps its values
      Array([[ 0.,  1.,  2.],
             [10., 11., 12.]], dtype=float32)
    """
    _check_choice("topology", topology, _TOPOLOGIES)
    _check_choice("quantize", quantize, _QUANTIZE)
    leaves, treedef = jax.tree.flatten(tree)
    if isinstance(probs, (int, float, np.number)) and not isinstance(probs, bool):
        prob_list = [_depth.check_prob("probs", probs)] * len(leaves)
    else:
        prob_list = [
            _depth.check_prob("probs", p) for p in treedef.flatten_up_to(probs)
        ]
    num_members = _member_count(tree, axis_name)
    if jax.dtypes.issubdtype(jnp.asarray(key).dtype, jax.dtypes.prng_key):
        key = jax.random.key_data(key)
    tensors = [
        _exchange.Tensor((leaf,), (None,), p) for leaf, p in zip(leaves, prob_list)
    ]
    out = _exchange.exchange(tensors, key, num_members, axis_name, topology, quantize)
    return jax.tree.unflatten(treedef, [arrays[0] for arrays in out])
