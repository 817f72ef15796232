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

Selection is exact and ``O(k)``: the selected coordinates of a tensor of
``d`` values are the points of a Bernoulli process, generated from geometric
gaps ``G ~ Geometric(p)`` in a static number of slots, a bound ``K`` on
``Binomial(d, p)`` exceeded with probability below ``1e-9``. Item ``t`` (the
``t``-th selected coordinate of a tensor) draws its gap and its permutation
from Threefry-2x32 of the counter ``(t, tensor)`` under the step's key; when
the slots (or, sharded, the exchange buffers) do not suffice, a
``lax.while_loop`` processes the rest in further rounds with the very same
draws, so the selection is exactly "each coordinate independently with
probability ``p``" (up to float32 uniforms), never truncated. The common case
is one round, run straight-line.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import optax

from optax_wa import _numerics, members
from optax_wa._checks import key_name

PyTree = Any

_LAYER_PROBS = ("linear", "constant")
_MAX_LEAF_SIZE = 2**29
_TABLE_MAX = 8  # 8! / 2**32 < 1e-5


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
# Per-tensor probabilities.


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


def _check_prob(name: str, value) -> float:
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


def _resolve_layer_probs(layer_probs, depth_order):
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


def _check_layer_probs(layer_probs):
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
        _check_prob("every value of layer_probs", leaf)


def _check_depth_order(depth_order):
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
    shuffle_prob = _check_prob("shuffle_prob", shuffle_prob)
    _check_layer_probs(layer_probs)
    layer_probs = _resolve_layer_probs(layer_probs, depth_order)
    _check_depth_order(depth_order)
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
            _check_prob(
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
        probs = [_check_prob("every value of layer_probs", p) for p in given]
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


# ---------------------------------------------------------------------------
# The shuffle engine.


class _Job(NamedTuple):
    """One tensor to shuffle: which arrays move together, and how often."""

    leaf_id: int  # folds into the step key
    size: int  # values per member
    prob: float
    slots: int  # items drawn per round (static)
    arrays: tuple[int, ...]  # indices into the carried arrays
    bases: tuple[int | None, ...]  # read-only base per array (value = base + carry)


_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))


def _threefry2x32(key0, key1, x0, x1):
    """Threefry-2x32 (20 rounds), written out so XLA fuses it into one loop.

    Bit-identical to ``jax.extend.random.threefry_2x32``, whose CPU lowering
    is a rolled loop about four times slower on the item counts used here.
    """
    keys = (key0, key1, key0 ^ key1 ^ jnp.uint32(0x1BD11BDA))
    x0, x1 = x0 + keys[0], x1 + keys[1]
    for block in range(5):
        for r in _ROTATIONS[block % 2]:
            x0 = x0 + x1
            x1 = (x1 << jnp.uint32(r)) | (x1 >> jnp.uint32(32 - r))
            x1 = x0 ^ x1
        x0 = x0 + keys[(block + 1) % 3]
        x1 = x1 + keys[(block + 2) % 3] + jnp.uint32(block + 1)
    return x0, x1


def _cumsum(x, block: int = 64):
    """Inclusive cumulative sum of a 1-D array, in blocks (faster on XLA CPU)."""
    n = x.shape[0]
    rows = jnp.cumsum(jnp.pad(x, (0, (-n) % block)).reshape(-1, block), axis=1)
    totals = rows[:, -1]
    offsets = jnp.cumsum(totals) - totals
    return (rows + offsets[:, None]).reshape(-1)[:n]


def _permutations(words, num_members, topology="full"):
    """Random permutations of ``num_members``, one per row of words.

    ``"full"``: uniform over all ``M!`` permutations. Up to ``_TABLE_MAX``
    members, one 32-bit word ``u`` per row picks row ``u mod M!`` of the table
    of all permutations: uniform up to a total-variation error below
    ``M! / 2**32`` (``1e-5`` at 8 members). Above, ``M`` words per row and
    their ranks (ties, of probability below ``M**2 / 2**33``, go to the lower
    index). ``"ring"``: member ``i`` takes the value of member ``i + s``
    (mod ``M``), ``s = +1`` or ``-1`` with probability 1/2 each (the top bit
    of the word).
    """
    if topology == "ring":
        shift = jnp.where(words[0] >> 31 == 1, 1, num_members - 1).astype(jnp.int32)
        lanes = jnp.arange(num_members, dtype=jnp.int32)
        return (lanes[None, :] + shift[:, None]) % num_members
    if num_members > _TABLE_MAX:
        keys = jnp.stack(words[:num_members], axis=1)
        return jnp.argsort(jnp.argsort(keys, axis=-1), axis=-1).astype(jnp.int32)
    table = _permutation_table(num_members)
    row = (words[0] % jnp.uint32(table.shape[0])).astype(jnp.int32)
    return jnp.asarray(table)[row].astype(jnp.int32)


@functools.cache
def _permutation_table(num_members: int) -> np.ndarray:
    return np.array(list(itertools.permutations(range(num_members))), np.int8)


class _Round(NamedTuple):
    """The items of one round, every tensor's segment concatenated."""

    pos: jax.Array  # (N,) selected positions, last + cumulative gaps
    num_valid: jax.Array  # (J,) items inside their tensor, a prefix of each segment
    perms: jax.Array  # (N, M) permutations


def _draw_round(keypair, starts, lasts, jobs, num_members, layout, topology):
    """Gaps, positions and permutations of every tensor's items of one round.

    Tensor ``j`` reads items ``starts[j] .. starts[j] + slots`` (one more than
    its slots: the last only tells whether items remain). Item ``t`` of the
    tensor with ``leaf_id`` hashes the counter ``(t, leaf_id * W + w)`` with
    Threefry-2x32 under the step's key pair, so its draws do not depend on
    the round that reads them: a round that stops early is continued with
    the very same draws.
    """
    seg, first, local = layout
    full = topology == "full" and num_members > _TABLE_MAX
    width = (num_members + 2) // 2 if full else 1
    leaf_ids = np.array([job.leaf_id for job in jobs], np.uint32)[seg]
    items = (starts[seg] + jnp.asarray(local, jnp.int32)).astype(jnp.uint32)
    words = []
    for lane in range(width):  # 2 words per lane: the gap, then permutation words
        words.extend(
            _threefry2x32(
                keypair[0], keypair[1], items, leaf_ids * np.uint32(width) + lane
            )
        )
    words = jax.lax.optimization_barrier(words)  # computed once, read twice

    probs = np.array([job.prob for job in jobs])[seg]
    sizes = np.array([job.size for job in jobs], np.int32)
    log_keep = np.log1p(-np.where(probs < 1.0, probs, 0.0))
    log_keep = np.where(probs < 1.0, log_keep, -1.0).astype(np.float32)
    mantissa = (words[0] >> 9) | jnp.uint32(0x3F800000)
    uniform = 2.0 - jax.lax.bitcast_convert_type(mantissa, jnp.float32)  # (0, 1]
    skips = jnp.where(probs >= 1.0, 0.0, jnp.floor(jnp.log(uniform) / log_keep))
    gaps = jnp.minimum(skips, sizes[seg].astype(np.float32)).astype(jnp.int32) + 1

    # Positions wrap around int32 only after the first one past the tensor
    # (gaps are at most size + 1 and size < 2**29): the valid items are the
    # segment's items before its first position >= size.
    total = _cumsum(gaps)
    before = jnp.concatenate([jnp.zeros((1,), jnp.int32), total])[first]
    pos = lasts[seg] + total - before[seg]
    outside = jnp.where(pos >= sizes[seg], local, np.iinfo(np.int32).max)
    num_valid = jax.ops.segment_min(
        outside, jnp.asarray(seg), num_segments=len(jobs), indices_are_sorted=True
    )
    return _Round(pos, num_valid, _permutations(words[1:], num_members, topology))


def _take(x, idx, stacked):
    return x[:, idx] if stacked else x[idx]


def _put(x, idx, v, stacked):
    kwargs = dict(mode="drop", unique_indices=True, indices_are_sorted=True)
    return (x.at[:, idx] if stacked else x.at[idx]).set(v, **kwargs)


def _wire_dtype(dtype, quantize):
    """The dtype a value of ``dtype`` travels in: ``quantize`` for wider floats."""
    dtype = np.dtype(dtype)
    if quantize is None or not jnp.issubdtype(dtype, jnp.floating):
        return dtype
    quantize = np.dtype(quantize)
    return quantize if dtype.itemsize > quantize.itemsize else dtype


def _to_wire(x, dtype):
    """Casts to the wire dtype, rounding to nearest and saturating finite values
    at the wire dtype's largest value (a float16 wire never makes an inf)."""
    if x.dtype == dtype:
        return x
    big = float(jnp.finfo(dtype).max)
    return jnp.where(jnp.isfinite(x), jnp.clip(x, -big, big), x).astype(dtype)


class _Layout(NamedTuple):
    """Static bookkeeping of one shuffle: every tensor's items, concatenated.

    Tensor ``j`` reads ``slots[j] + 1`` items per round (the last only tells
    whether items remain); ``seg`` maps an item to its tensor, ``first[j]`` is
    the tensor's first item and ``local`` an item's index inside its tensor;
    ``exchanged`` lists the items that may move (``ex_first[j]`` the first of
    tensor ``j`` among them); ``capacity`` sizes the named exchange buffers.
    """

    slots: np.ndarray
    seg: np.ndarray
    first: np.ndarray
    local: np.ndarray
    exchanged: np.ndarray
    ex_first: np.ndarray
    capacity: int


def _layout(jobs, num_members) -> _Layout:
    slots = np.array([job.slots for job in jobs])
    counts = slots + 1
    seg = np.repeat(np.arange(len(jobs)), counts)
    first = np.concatenate([[0], np.cumsum(counts)[:-1]])
    local = np.arange(seg.size) - first[seg]
    exchanged = np.flatnonzero(local < slots[seg])
    ex_first = np.concatenate([[0], np.cumsum(slots)[:-1]])
    expected = sum(min(job.size * job.prob, job.slots) for job in jobs)
    capacity = _numerics.count_upper_bound(expected / num_members, int(slots.sum()))
    return _Layout(slots, seg, first, local, exchanged, ex_first, capacity)


def _gather(arrays, bases, jobs, pos, layout, stacked, quantize):
    """The values of the selected coordinates, one ``(..., K, C)`` block per
    wire dtype (``K`` items of every tensor concatenated, ``C`` columns: the
    arrays that move together), and where each array's column is.

    An array with a base holds an update; its value is ``base + array`` in
    the base's dtype, the new parameter.
    """
    columns: dict[str, list[list]] = {}
    where = []  # where[j][n]: (wire dtype name, column) of the job's n-th array
    for j, job in enumerate(jobs):
        span = pos[layout.first[j] : layout.first[j] + job.slots]
        idx = jnp.clip(span, 0, job.size - 1)
        where.append([])
        for a, b in zip(job.arrays, job.bases):
            value = _take(arrays[a], idx, stacked)
            if b is not None:
                # The select keeps XLA from contracting the inner update's
                # multiply and this add into one FMA: the value must be the
                # rounded update added to the parameter, as apply_updates does.
                value = jnp.where(jnp.isnan(value), jnp.nan, value)
                value = (_take(bases[b], idx, stacked) + value).astype(bases[b].dtype)
            wire = _wire_dtype(value.dtype, quantize)
            per_job = columns.setdefault(wire.name, [[] for _ in jobs])
            where[j].append((wire.name, len(per_job[j])))
            per_job[j].append(_to_wire(value, wire))
    values = {}
    for name, per_job in columns.items():
        width = max(len(cols) for cols in per_job)
        blocks = []
        for job, cols in zip(jobs, per_job):
            shape = (arrays[0].shape[0], job.slots) if stacked else (job.slots,)
            cols = cols + [jnp.zeros(shape, name)] * (width - len(cols))
            blocks.append(jnp.stack(cols, axis=-1))
        values[name] = jnp.concatenate(blocks, axis=1 if stacked else 0)
    return values, where


def _write_back(arrays, bases, jobs, pos, done, shuffled, where, layout, stacked):
    """Writes the items that moved; the others wait for the next round.

    An array without a base takes the shuffled value. An update (array with a
    base) becomes ``shuffled - base``, computed in float32 or wider and
    rounded once to the update's dtype, so that ``base + update`` is the
    shuffled value up to the rounding of that difference and of the addition
    in ``optax.apply_updates`` (exact when the two are within a factor of 2).
    """
    arrays = list(arrays)
    for j, job in enumerate(jobs):
        slot = jnp.arange(job.slots, dtype=jnp.int32)
        span = pos[layout.first[j] : layout.first[j] + job.slots]
        idx = jnp.where(slot < done[j], span, job.size + slot)  # past the end: dropped
        for (a, b), (name, column) in zip(zip(job.arrays, job.bases), where[j]):
            block = jax.lax.slice_in_dim(
                shuffled[name],
                layout.ex_first[j],
                layout.ex_first[j] + job.slots,
                axis=1 if stacked else 0,
            )
            new = block[..., column]
            if b is not None:
                base = _take(bases[b], jnp.clip(span, 0, job.size - 1), stacked)
                acc = jnp.promote_types(base.dtype, jnp.float32)
                new = new.astype(acc) - base.astype(acc)
            arrays[a] = _put(arrays[a], idx, new.astype(arrays[a].dtype), stacked)
    return arrays


def _shuffle(
    arrays, bases, jobs, key, num_members, axis_name, topology="full", quantize=None
):
    """Runs the rounds; returns the carried arrays with the shuffle applied.

    ``arrays`` and ``bases`` hold flattened tensors, ``(M, d)`` in stacked
    mode and ``(d,)`` in named mode. An array with a base holds an update
    (see :func:`_write_back`); an array without a base is shuffled as is.
    Every round: draw the items (:func:`_draw_round`), gather their values
    (:func:`_gather`), permute them across members
    (:func:`optax_wa.members.permute_members`), write back what moved.
    """
    stacked = axis_name is None
    jobs = [job for job in jobs if job.prob > 0.0 and job.size > 0]
    if not jobs or num_members < 2:
        return arrays
    keypair = jax.random.bits(key, (2,), jnp.uint32)
    layout = _layout(jobs, num_members)
    counts = jnp.asarray(layout.slots + 1, jnp.int32)
    local = jnp.asarray(layout.local, jnp.int32)

    def one_round(carry):
        arrays, starts, lasts, _ = carry
        drawn = _draw_round(
            keypair,
            starts,
            lasts,
            jobs,
            num_members,
            (layout.seg, layout.first, layout.local),
            topology,
        )
        num_valid = jnp.minimum(drawn.num_valid, counts)
        valid = local < num_valid[layout.seg]
        values, where = _gather(
            arrays, bases, jobs, drawn.pos, layout, stacked, quantize
        )
        shuffled, num_done = members.permute_members(
            values,
            drawn.perms[layout.exchanged],
            axis_name=axis_name,
            valid=valid[layout.exchanged],
            capacity=layout.capacity,
        )
        done = jnp.clip(
            num_done - jnp.asarray(layout.ex_first, jnp.int32),
            0,
            jnp.minimum(num_valid, jnp.asarray(layout.slots, jnp.int32)),
        )
        arrays = _write_back(
            arrays, bases, jobs, drawn.pos, done, shuffled, where, layout, stacked
        )
        first_j = jnp.asarray(layout.first, jnp.int32)
        more = jnp.any(valid[first_j + done])
        last_done = drawn.pos[first_j + jnp.maximum(done - 1, 0)]
        lasts = jnp.where(done > 0, last_done, lasts)
        return tuple(arrays), starts + done, lasts, more

    # The first round runs straight-line (a scatter inside a loop body is not
    # done in place on XLA CPU); the loop continues only in the rare case where
    # the static slots or exchange buffers did not suffice.
    starts = jnp.zeros((len(jobs),), jnp.int32)
    lasts = jnp.full((len(jobs),), -1, jnp.int32)
    first_round = one_round((tuple(arrays), starts, lasts, jnp.asarray(True)))
    return list(jax.lax.while_loop(lambda c: c[3], one_round, first_round)[0])


def _leaf_size(leaf, stacked) -> int:
    shape = np.shape(leaf)[1:] if stacked else np.shape(leaf)
    size = int(np.prod(shape, dtype=np.int64))
    if size >= _MAX_LEAF_SIZE:
        raise ValueError(
            f"wash: tensors above 2**29 values per member are not supported ({shape})."
        )
    return size


def _flat(x, stacked):
    return x.reshape((x.shape[0], -1) if stacked else (-1,))


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
    stacked = axis_name is None
    leaves, treedef = jax.tree.flatten(tree)
    if isinstance(probs, (int, float, np.number)) and not isinstance(probs, bool):
        prob_list = [_check_prob("probs", probs)] * len(leaves)
    else:
        prob_list = [_check_prob("probs", p) for p in treedef.flatten_up_to(probs)]
    num_members = _member_count(tree, axis_name)
    if jax.dtypes.issubdtype(jnp.asarray(key).dtype, jax.dtypes.prng_key):
        key = jax.random.key_data(key)
    jobs = [
        _make_job(i, _leaf_size(leaf, stacked), p, [i], [None])
        for i, (leaf, p) in enumerate(zip(leaves, prob_list))
    ]
    flat = [_flat(leaf, stacked) for leaf in leaves]
    out = _shuffle(flat, [], jobs, key, num_members, axis_name, topology, quantize)
    return jax.tree.unflatten(
        treedef, [o.reshape(leaf.shape) for o, leaf in zip(out, leaves)]
    )


# ---------------------------------------------------------------------------
# The optimizer.


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


def _make_job(leaf_id, size, prob, arrays, bases):
    slots = max(_numerics.count_upper_bound(size * prob, size), 1)
    return _Job(leaf_id, size, prob, slots, tuple(arrays), tuple(bases))


_TOPOLOGIES = ("full", "ring")
_PROB_COUNTS = ("selections", "moves")
_QUANTIZE = (None, "bfloat16", "float16")


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
    dtype, where :math:`k \approx \sum_l p_l d_l` (see
    :func:`optax_wa.members.permute_members`); ``quantize="bfloat16"`` or
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
    shuffle_prob = _check_prob("shuffle_prob", shuffle_prob)
    _check_interval(interval)
    _check_choice("topology", topology, _TOPOLOGIES)
    _check_choice("prob_counts", prob_counts, _PROB_COUNTS)
    _check_choice("quantize", quantize, _QUANTIZE)
    _check_layer_probs(layer_probs)
    _check_depth_order(depth_order)
    layer_probs = _resolve_layer_probs(layer_probs, depth_order)
    if not isinstance(shuffle_opt_state, bool):
        raise ValueError(
            f"shuffle_opt_state must be a bool, got {shuffle_opt_state!r}."
        )
    _check_seed(seed)
    raw_inner = optax.with_extra_args_support(inner)
    per_member = members.per_member(raw_inner, axis_name)
    stacked = axis_name is None

    def probabilities(params, num_members):
        probs = wash_layer_probs(
            params,
            shuffle_prob=shuffle_prob,
            layer_probs=layer_probs,
            depth_order=depth_order,
            stacked=stacked,
        )
        return _selection_probs(jax.tree.leaves(probs), num_members, prob_counts)

    def init_fn(params):
        key = jax.random.PRNGKey(seed)
        if _is_placeholder(params):  # tree_map_params: the state's structure only
            inner_state = raw_inner.init(params)
        else:
            probabilities(params, _init_member_count(params, axis_name))
            inner_state = per_member.init(params)
        return WashState(jnp.zeros([], jnp.int32), key, inner_state)

    def update_fn(updates, state, params=None, **extra_args):
        if params is None:
            raise ValueError(
                "wash rewrites the parameters and needs `params` in update."
            )
        inner_updates, inner_state = per_member.update(
            updates, state.inner_state, params, **extra_args
        )
        count = optax.safe_increment(state.count)
        num_members = _member_count(params, axis_name)
        probs = probabilities(params, num_members)
        if not any(probs) or num_members < 2:
            return inner_updates, WashState(count, state.key, inner_state)

        def shuffled(inner_updates, inner_state):
            return _shuffle_step(
                raw_inner,
                inner_updates,
                inner_state,
                params,
                probs,
                jax.random.fold_in(state.key, state.count),
                num_members,
                axis_name,
                shuffle_opt_state=shuffle_opt_state,
                topology=topology,
                quantize=quantize,
            )

        if isinstance(interval, (int, np.integer)) and interval == 1:
            new_updates, inner_state = shuffled(inner_updates, inner_state)
        else:
            due = state.count % jnp.maximum(interval, 1) == 0
            new_updates, inner_state = jax.lax.cond(
                due, shuffled, lambda u, s: (u, s), inner_updates, inner_state
            )
        return new_updates, WashState(count, state.key, inner_state)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _shuffle_step(
    raw_inner,
    inner_updates,
    inner_state,
    params,
    probs,
    key,
    num_members,
    axis_name,
    *,
    shuffle_opt_state,
    topology,
    quantize,
):
    """One shuffle of the updates (and, for WASH+Opt, of the params-shaped
    inner state): returns ``(new updates, new inner state)``."""
    stacked = axis_name is None
    param_leaves, treedef = jax.tree.flatten(params)
    update_leaves = treedef.flatten_up_to(inner_updates)
    arrays = [_flat(u, stacked) for u in update_leaves]
    bases = [_flat(p, stacked) for p in param_leaves]
    groups, rebuild = {}, None
    if shuffle_opt_state:
        groups, rebuild = _params_shaped_state(raw_inner, inner_state, params)
    jobs, state_slots = [], {}
    for i, (leaf, prob) in enumerate(zip(param_leaves, probs)):
        if prob == 0.0:
            continue
        job_arrays, job_bases = [i], [i]
        for s in groups.get(i, []):
            state_slots.setdefault(i, []).append(len(arrays))
            job_arrays.append(len(arrays))
            job_bases.append(None)
            arrays.append(_flat(s, stacked))
        jobs.append(
            _make_job(i, _leaf_size(leaf, stacked), prob, job_arrays, job_bases)
        )

    out = _shuffle(arrays, bases, jobs, key, num_members, axis_name, topology, quantize)
    new_updates = jax.tree.unflatten(
        treedef, [o.reshape(u.shape) for o, u in zip(out, update_leaves)]
    )
    if shuffle_opt_state:
        new_groups = {
            i: [out[a].reshape(s.shape) for a, s in zip(state_slots[i], groups[i])]
            if i in state_slots
            else groups[i]
            for i in groups
        }
        inner_state = rebuild(new_groups)
    return new_updates, inner_state
