"""Per-tensor shuffle probabilities of WASH: the layer schedules and depth order.

``wash_layer_probs`` gives every tensor its probability: one constant ``p``,
or the linear schedule ``p_l = p (1 - l / (L - 1))`` over the network's
depths (first layer ``p``, last layer ``0``). A pytree's keys sort
alphabetically, not by depth, so the depths come from ``depth_order``: path
prefixes listed from the first layer to the last, or the order in which a
forward pass first reads each tensor (``execution_depth_order``).
Re-exported by ``optax_wa.shuffling``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.extend
import numpy as np

from optax_wa._checks import key_name

__all__ = [
    "check_depth_order",
    "check_layer_probs",
    "check_prob",
    "execution_depth_order",
    "resolve_layer_probs",
    "wash_layer_probs",
]

PyTree = Any

_LAYER_PROBS = ("linear", "constant")


def _path_parts(path) -> tuple[str, ...]:
    return tuple(key_name(entry) for entry in path)


def _entry_parts(entry) -> tuple[str, ...]:
    if isinstance(entry, str):
        return tuple(part for part in entry.split("/") if part)
    if isinstance(entry, (tuple, list)):
        return tuple(str(part) for part in entry)
    raise ValueError(
        "depth_order entries must be '/'-joined path strings such as "
        f"'layers_2/kernel' or tuples of keys, got {entry!r}."
    )


def check_prob(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.number)):
        if not (isinstance(value, (np.ndarray, jax.Array)) and np.ndim(value) == 0):
            raise ValueError(f"{name} must be a float in [0, 1], got {value!r}.")
        if isinstance(value, jax.core.Tracer):
            raise ValueError(
                f"{name} must be a concrete float in [0, 1] (it sets static buffer "
                "sizes); with optax.inject_hyperparams list it in static_args."
            )
    value = float(value)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value!r}.")
    return value


def resolve_layer_probs(layer_probs, depth_order):
    """``None`` means ``"linear"`` when a depth order is given, else ``"constant"``."""
    if layer_probs is None:
        return "constant" if depth_order is None else "linear"
    if depth_order is not None and not (
        isinstance(layer_probs, str) and layer_probs == "linear"
    ):
        raise ValueError(
            "depth_order is only used by layer_probs='linear' (or left to its "
            f"default None), got layer_probs={layer_probs!r}."
        )
    return layer_probs


def check_layer_probs(layer_probs):
    if layer_probs is None:
        return
    if isinstance(layer_probs, str):
        if layer_probs not in _LAYER_PROBS:
            raise ValueError(
                f"layer_probs must be one of {_LAYER_PROBS}, a callable "
                f"(path, leaf) -> p or a pytree of floats, got {layer_probs!r}."
            )
        return
    if callable(layer_probs):
        return
    leaves = jax.tree.leaves(layer_probs)
    if not leaves:
        raise ValueError(
            f"layer_probs must be one of {_LAYER_PROBS}, a callable or a "
            f"non-empty pytree of floats, got {layer_probs!r}."
        )
    for leaf in leaves:
        check_prob("every value of layer_probs", leaf)


def check_depth_order(depth_order):
    if depth_order is None or callable(depth_order):
        return
    if isinstance(depth_order, str) or not isinstance(depth_order, Sequence):
        raise ValueError(
            "depth_order must be None, a callable (path, leaf) -> depth, or a "
            f"sequence of path prefixes (first = shallowest), got {depth_order!r}."
        )
    if not depth_order:
        raise ValueError("depth_order must not be empty.")
    for entry in depth_order:
        _entry_parts(entry)


def _linear_depths(paths, structs, depth_order) -> tuple[list[int], int]:
    """Depth index of every leaf and the number of depths ``L``."""
    if depth_order is None:
        if len(paths) == 1:
            return [0], 1
        raise ValueError(
            "layer_probs='linear' needs depth_order=[...] (path prefixes from the "
            "first layer to the last) or a callable (path, leaf) -> depth: the "
            "order of a pytree's keys is alphabetical, not depth (layers_10 "
            "sorts before layers_2)."
        )
    if callable(depth_order):
        keys = [depth_order(path, struct) for path, struct in zip(paths, structs)]
        ranks = {key: i for i, key in enumerate(sorted(set(keys)))}
        return [ranks[key] for key in keys], len(ranks)
    entries = [_entry_parts(entry) for entry in depth_order]
    used = [False] * len(entries)
    depths = []
    for path in paths:
        parts = _path_parts(path)
        best = None
        for i, entry in enumerate(entries):
            if parts[: len(entry)] == entry and (
                best is None or len(entry) > len(entries[best])
            ):
                best = i
        if best is None:
            raise ValueError(
                f"depth_order: leaf {'/'.join(parts)} matches no entry of "
                f"depth_order (entries: {['/'.join(e) for e in entries]})."
            )
        used[best] = True
        depths.append(best)
    unused = ["/".join(e) for e, u in zip(entries, used) if not u]
    if unused:
        raise ValueError(f"depth_order: entries {unused} match no leaf of the params.")
    return depths, len(entries)


def wash_layer_probs(
    params: PyTree,
    *,
    shuffle_prob: float = 0.01,
    layer_probs: str | Callable[..., float] | PyTree | None = None,
    depth_order: Sequence[str | Sequence[Any]] | Callable[..., Any] | None = None,
    stacked: bool = True,
) -> PyTree:
    r"""The shuffle probability of every tensor, as :func:`wash` uses it.

    ``None`` (default): ``"linear"`` when ``depth_order`` is given, else
    ``"constant"``. ``"constant"``: every tensor gets ``shuffle_prob``. ``"linear"``: the
    tensor at depth :math:`l` of :math:`L` gets

    .. math::
      p_l = p \left(1 - \frac{l}{L - 1}\right),

    so the first layer gets ``p`` and the last ``0`` (a single depth gets
    ``p``). Depth comes from ``depth_order``, never from key order.
    A callable gets ``(path, leaf)`` with ``leaf`` a ``jax.ShapeDtypeStruct``
    of one member's tensor and returns ``p``; a pytree of floats (one
    member's structure) gives ``p`` per tensor. The last two ignore
    ``shuffle_prob``.

    Args:
      params: the params (stacked, or one member with ``stacked=False``).
      shuffle_prob: ``p``, in ``[0, 1]``.
      layer_probs: ``None``, ``"linear"``, ``"constant"``, a callable or a
        pytree.
      depth_order: for ``"linear"`` (given alone, it selects ``"linear"``):
        a sequence of path prefixes from the first
        layer to the last (``"layers_2"``, ``"params/Dense_0"`` or a tuple of
        keys; a leaf takes the longest matching prefix; every leaf must match
        one and every entry must match a leaf), or a callable
        ``(path, leaf) -> depth`` (any sortable value; equal values share a
        depth). Required for ``"linear"`` when there is more than one tensor.
      stacked: whether ``params`` carry a leading member axis.

    Returns:
      A pytree like ``params`` of Python floats.

    Examples:
      >>> import jax.numpy as jnp
      >>> from optax_wa.shuffling import wash_layer_probs
      >>> params = {f"layers_{i}": jnp.zeros((2, 3)) for i in (0, 1, 2, 10)}
      >>> order = ["layers_0", "layers_1", "layers_2", "layers_10"]
      >>> wash_layer_probs(params, shuffle_prob=0.3, depth_order=order)
      {'layers_0': 0.3, 'layers_1': 0.2, 'layers_10': 0.0, 'layers_2': 0.1}
    """
    shuffle_prob = check_prob("shuffle_prob", shuffle_prob)
    check_layer_probs(layer_probs)
    layer_probs = resolve_layer_probs(layer_probs, depth_order)
    check_depth_order(depth_order)
    flat, treedef = jax.tree_util.tree_flatten_with_path(params)
    if not flat:
        raise ValueError("wash_layer_probs: params have no leaves.")
    paths = [path for path, _ in flat]
    structs = [
        jax.ShapeDtypeStruct(
            np.shape(leaf)[1:] if stacked else np.shape(leaf), leaf.dtype
        )
        for _, leaf in flat
    ]
    if isinstance(layer_probs, str) and layer_probs == "constant":
        probs = [shuffle_prob] * len(flat)
    elif isinstance(layer_probs, str):
        depths, num_depths = _linear_depths(paths, structs, depth_order)
        scale = max(num_depths - 1, 1)
        probs = [round(shuffle_prob * (1.0 - d / scale), 15) for d in depths]
    elif callable(layer_probs):
        probs = [
            check_prob(
                f"layer_probs({jax.tree_util.keystr(path)})", layer_probs(path, s)
            )
            for path, s in zip(paths, structs)
        ]
    else:
        try:
            given = treedef.flatten_up_to(layer_probs)
        except (ValueError, TypeError) as err:
            raise ValueError(
                f"layer_probs: the pytree of floats must have the params' structure: {err}"
            ) from None
        probs = [check_prob("every value of layer_probs", p) for p in given]
    return jax.tree.unflatten(treedef, probs)


def _is_var(operand) -> bool:
    """Whether a jaxpr operand is a variable (a ``Literal`` is not hashable)."""
    return isinstance(operand, jax.extend.core.Var)


def _first_reads(jaxpr, names, clock, first):
    """Walks ``jaxpr`` in program order and records, for every variable in
    ``names`` (var -> leaf index), the clock tick of its first read. Calls
    whose body's inputs match the call's operands (``jit``, remat, custom
    derivatives, ``scan``; ``cond`` after its index) are entered, so a
    jitted model is seen layer by layer. Literal operands (constants such
    as the ``0.0`` of a ReLU) are no tensors and are skipped."""
    for eqn in jaxpr.eqns:
        operands = list(eqn.invars)
        entered = False
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                inner = getattr(sub, "jaxpr", sub)
                if not hasattr(inner, "eqns"):
                    continue
                ops = operands
                if len(inner.invars) == len(ops) - 1:  # cond: the index first
                    ops = ops[1:]
                if len(inner.invars) != len(ops):
                    continue
                sub_names = {
                    v: names[o]
                    for v, o in zip(inner.invars, ops)
                    if _is_var(o) and o in names
                }
                if sub_names:
                    _first_reads(inner, sub_names, clock, first)
                    entered = True
        if not entered:
            for var in operands:
                if _is_var(var) and var in names:
                    first.setdefault(names[var], clock[0])
        clock[0] += 1


def execution_depth_order(
    fn: Callable[..., Any], params: PyTree, *args: Any, **kwargs: Any
) -> Callable[[tuple[Any, ...], Any], int]:
    """The depth of every tensor from a forward pass: the order of first use.

    Traces ``fn(params, *args, **kwargs)`` (abstractly: any arrays or
    ``jax.ShapeDtypeStruct``) and ranks every params leaf by the first
    operation that reads it, entering ``jit``-ed and rematerialized calls,
    scans and conds. Tensors read first by the same operation share a depth;
    tensors the pass never reads come last. Pass the result as
    ``depth_order`` to :func:`wash` (it selects the linear schedule).

    Args:
      fn: the forward pass, ``fn(params, *args, **kwargs)``, of one member.
      params: one member's params (no member axis).
      *args: example inputs (arrays or ``jax.ShapeDtypeStruct``).
      **kwargs: further keyword inputs of ``fn``.

    Returns:
      A callable ``(path, leaf) -> depth`` (an int).

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from optax_wa.shuffling import execution_depth_order, wash_layer_probs
      >>> params = {"head": jnp.ones((3, 2)), "stem": jnp.ones((4, 3))}
      >>> forward = lambda p, x: jnp.tanh(x @ p["stem"]) @ p["head"]
      >>> order = execution_depth_order(forward, params, jnp.ones((1, 4)))
      >>> wash_layer_probs(params, shuffle_prob=0.1, depth_order=order, stacked=False)
      {'head': 0.0, 'stem': 0.1}
    """
    flat, treedef = jax.tree_util.tree_flatten_with_path(params)
    if not flat:
        raise ValueError("execution_depth_order: params have no leaves.")
    paths = [jax.tree_util.keystr(path) for path, _ in flat]
    structs = [jax.ShapeDtypeStruct(np.shape(x), x.dtype) for _, x in flat]

    def call(leaves, args, kwargs):
        return fn(jax.tree.unflatten(treedef, leaves), *args, **kwargs)

    jaxpr = jax.make_jaxpr(call)(structs, args, kwargs).jaxpr
    names = {var: i for i, var in enumerate(jaxpr.invars[: len(flat)])}
    first: dict[int, int] = {}
    clock = [0]
    _first_reads(jaxpr, names, clock, first)
    ticks = sorted({first.get(i, clock[0]) for i in range(len(flat))})
    rank = {paths[i]: ticks.index(first.get(i, clock[0])) for i in range(len(flat))}

    def depth(path, leaf):
        key = jax.tree_util.keystr(tuple(path))
        if key not in rank:
            raise ValueError(
                f"execution_depth_order: {key} is not a leaf of the traced params."
            )
        return rank[key]

    return depth
