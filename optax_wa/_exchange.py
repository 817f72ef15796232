r"""The exchange engine behind WASH: select coordinates, permute them across members.

Input: tensors, each a group of arrays that move together (a parameter's
update and, for WASH+Opt, its optimizer-state leaves) and a probability
``p``. Output: the same arrays after every coordinate of every tensor was
selected independently with its tensor's ``p`` and, at a selected
coordinate, the ``M`` member values of every array of the group were
permuted by one random permutation, shared by every member and device.

**Jobs: one flat buffer per kind of tensor.** Tensors whose ``p`` lie in
one octave (``[2**(e-1), 2**e)``) and with the same arrays (dtypes, and
which arrays hold an update on a base) are concatenated, per member, into
one flat buffer per array: a *job*. A job is selected, gathered, exchanged
and written back once, so the rounds (twice in the program: straight-line
and in the loop) grow with the number of jobs, not of tensors: with a
constant ``p``, all float32 parameters are one job, with the linear depth
schedule one job per octave; what remains per tensor is cutting its arrays
out of the buffers (at offsets read at run time, so that tensors of one
shape share one compiled cut: :func:`from_buffers`). Selecting each
coordinate of the concatenation with probability ``p`` is selecting each
coordinate of each tensor with probability ``p``. The price is one copy of
the job's arrays into the flat buffer and one back per step.

**Thinning: one job for several probabilities.** A job draws at the largest
probability of its tensors, ``p``, and keeps a drawn item at a coordinate
of a tensor of probability ``p_l`` when an independent uniform is below
``p_l / p`` (:func:`thinning`): a coordinate is drawn with probability
``p`` and then kept with probability ``p_l / p``, independently of every
other, so it is selected with probability ``p_l``, independently, as if its
tensor were alone. Within an octave, at most twice as many items are drawn
as are kept. A job whose tensors share one ``p`` keeps every item (no
thinning draw).

**Selection in O(k): geometric gaps.** The selected coordinates of a buffer
of ``d`` values are a Bernoulli(``p``) process. Starting from position -1,
the gap to the next selected position is ``G`` with
``P(G > g) = (1 - p)^g`` (the next ``g`` coordinates are all skipped), i.e.
``G ~ Geometric(p)`` on ``{1, 2, ...}``, and successive gaps are independent.
By inversion, with ``U`` uniform on ``(0, 1]``,

.. math::
  G = 1 + \lfloor \log U / \log(1 - p) \rfloor, \qquad
  P(G > g) = P(U \le (1 - p)^g) = (1 - p)^g,

and ``G = 1`` at ``p = 1``. Position ``t`` is the sum of the first
``t + 1`` gaps, minus one; the selected coordinates are the positions below
``d``. A gap is capped at ``d + 1`` (any larger gap is past the end anyway),
so a position is at most ``2 d + 1 < 2**31`` up to the first one past the
end, and int32 sums are exact where they are read.

**Counter-based draws: a continued round reuses the same draws.** Item ``t``
of a job (its ``t``-th selected coordinate) takes its gap and its
permutation from Threefry-2x32 of the counter ``(t, job)`` under the step's
key. Its draws depend on nothing else: not on the round that reads it, nor
on the slot it lands in. Shapes under ``jit`` are static, so a round reads a
fixed number of items per job; when a round stops early (more selected
coordinates than slots, or an exchange buffer full), the next round starts
at the first item not done, from the position of the last one done, and
draws exactly the gaps and permutations one unbounded round would have. The
result is "each coordinate independently with probability ``p``", never
truncated, whatever the static sizes (tested with tiny sizes).

**Static sizes and their bound.** The number of selected coordinates of a
job is ``Binomial(d, p)``; a round reads ``K`` items, the Bernstein bound
(``_numerics.count_upper_bound``) that this count exceeds with probability
below ``1e-9``. In the named exchange, a member sends a selected value to a
given member with probability ``1/M`` per item (one entry of a uniform
permutation), independently over coordinates, so the values for one peer are
a sum of independent Bernoulli variables of mean ``sum_j min(d_j p_j, K_j)
/ M``: the capacity per pair of members is that sum's Bernstein bound at the
same tail. The first round runs straight-line; a ``lax.while_loop`` runs
further rounds only when a bound was exceeded.
"""

from __future__ import annotations

import functools
import itertools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from optax_wa import _flat, _numerics
from optax_wa._permute import permute_members

MAX_BUFFER = 2**29  # values per member of one job (int32 positions, see above)
_TABLE_MAX = 8  # 8! / 2**32 < 1e-5
_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))


class Tensor(NamedTuple):
    """One tensor to shuffle: its arrays move together.

    ``arrays`` are ``(M, ...)`` in stacked mode and ``(...)`` in named mode,
    all of the same number of values per member. ``bases[n]`` is ``None`` or
    a read-only array of the shape of ``arrays[n]``: then ``arrays[n]`` holds
    an update whose value is ``base + update`` (see :func:`_write_back`).
    """

    arrays: tuple[jax.Array, ...]
    bases: tuple[jax.Array | None, ...]
    prob: float


class _Job(NamedTuple):
    """Tensors concatenated into one flat buffer per array."""

    job_id: int  # folds into the counter: the index of the job's first tensor
    tensors: tuple[int, ...]
    offsets: tuple[int, ...]  # start of each tensor in the buffer
    sizes: tuple[int, ...]  # values per member of each tensor
    size: int  # values per member of the buffer
    probs: tuple[float, ...]  # each tensor's probability
    slots: int  # items drawn per round (static)

    @property
    def prob(self) -> float:
        """The drawing probability: the largest of the tensors'."""
        return max(self.probs)

    @property
    def thinned(self) -> bool:
        return any(p != self.prob for p in self.probs)

    @property
    def expected(self) -> float:
        """The expected number of selected coordinates (kept items)."""
        return float(sum(s * p for s, p in zip(self.sizes, self.probs)))


def _kind(tensor):
    """What tensors must share to be one job: the octave of ``p`` (``p`` in
    ``[2**(e-1), 2**e)`` for one ``e``) and every array's dtypes."""
    return int(np.frexp(tensor.prob)[1]), tuple(
        (np.dtype(a.dtype), None if b is None else np.dtype(b.dtype))
        for a, b in zip(tensor.arrays, tensor.bases)
    )


def plan_jobs(tensors, stacked) -> list[_Job]:
    """Groups the tensors into jobs (static): same kind, in tensor order, a
    new job when the buffer would reach ``MAX_BUFFER`` values per member.
    Tensors with ``p = 0`` or no values are left out."""
    open_jobs: dict = {}
    jobs = []
    for i, tensor in enumerate(tensors):
        size = _flat.values_per_member(tensor.arrays[0], stacked)
        if size >= MAX_BUFFER:
            raise ValueError(
                "wash: tensors above 2**29 values per member are not supported "
                f"({np.shape(tensor.arrays[0])})."
            )
        if tensor.prob == 0.0 or size == 0:
            continue
        kind = _kind(tensor)
        group = open_jobs.get(kind)
        if group is None or sum(s for _, s in group) + size >= MAX_BUFFER:
            group = open_jobs[kind] = []
            jobs.append(group)
        group.append((i, size))
    return [_make_job(tensors, group) for group in jobs]


def _make_job(tensors, group):
    ids = tuple(i for i, _ in group)
    sizes = tuple(s for _, s in group)
    offsets = _flat.offsets_of(sizes)
    probs = tuple(float(tensors[i].prob) for i in ids)
    size = sum(sizes)
    slots = max(_numerics.count_upper_bound(size * max(probs), size), 1)
    return _Job(ids[0], ids, offsets, sizes, size, probs, slots)


def to_buffers(tensors, jobs, stacked):
    """Each job's flat buffers: ``(buffers, bases)``, one entry per array."""
    bufs, bases = [], []
    for job in jobs:
        first = tensors[job.tensors[0]]
        bufs.append(
            tuple(
                _flat.concat([tensors[i].arrays[n] for i in job.tensors], stacked)
                for n in range(len(first.arrays))
            )
        )
        bases.append(
            tuple(
                None
                if b is None
                else _flat.concat([tensors[i].bases[n] for i in job.tensors], stacked)
                for n, b in enumerate(first.bases)
            )
        )
    return bufs, bases


def from_buffers(tensors, jobs, bufs, flag):
    """The tensors' arrays, the jobs' arrays cut out of their buffers at
    run-time offsets (:func:`optax_wa._flat.cut`; ``flag``: any run-time
    boolean), so that tensors of one shape share one compiled cut."""
    out = [list(t.arrays) for t in tensors]
    for job, job_bufs in zip(jobs, bufs):
        shapes = [
            [tensors[i].arrays[n].shape for i in job.tensors]
            for n in range(len(job_bufs))
        ]
        parts = _flat.cut(job_bufs, job.offsets, job.sizes, shapes, flag)
        for n, buf_parts in enumerate(parts):
            for i, part in zip(job.tensors, buf_parts):
                out[i][n] = part
    return [tuple(arrays) for arrays in out]


# ---------------------------------------------------------------------------
# Counter-based randomness.


def threefry2x32(key0, key1, x0, x1):
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


def cumsum(x, block: int = 64):
    """Inclusive cumulative sum of a 1-D array, in blocks (faster on XLA CPU):
    a cumsum within rows of ``block`` values, plus each row's offset, the
    exclusive cumsum of the row totals."""
    n = x.shape[0]
    rows = jnp.cumsum(jnp.pad(x, (0, (-n) % block)).reshape(-1, block), axis=1)
    totals = rows[:, -1]
    offsets = jnp.cumsum(totals) - totals
    return (rows + offsets[:, None]).reshape(-1)[:n]


def permutations(words, num_members, topology="full"):
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


def num_lanes(num_members, topology) -> int:
    """Threefry calls per item: each gives 2 words (the gap, then permutation
    words); ranks of ``M`` words above ``_TABLE_MAX`` members need more."""
    full = topology == "full" and num_members > _TABLE_MAX
    return (num_members + 2) // 2 if full else 1


def item_words(keypair, items, job_ids, num_members, topology):
    """The random words of items ``items`` of jobs ``job_ids``: Threefry of the
    counter ``(item, job_id * W + lane)`` for the ``W`` lanes."""
    width = num_lanes(num_members, topology)
    words = []
    for lane in range(width):
        words.extend(
            threefry2x32(
                keypair[0], keypair[1], items, job_ids * np.uint32(width) + lane
            )
        )
    return words


def geometric_gaps(word, probs, sizes):
    """``1 + floor(log U / log(1 - p))`` (1 at ``p = 1``), capped at
    ``size + 1``; ``U`` in ``(0, 1]`` from the word's top 23 bits. The cap
    is applied in int32 (a float32 size above ``2**24`` may round down)."""
    log_keep = np.log1p(-np.where(probs < 1.0, probs, 0.0))
    log_keep = np.where(probs < 1.0, log_keep, -1.0).astype(np.float32)
    mantissa = (word >> 9) | jnp.uint32(0x3F800000)
    uniform = 2.0 - jax.lax.bitcast_convert_type(mantissa, jnp.float32)  # (0, 1]
    skips = jnp.where(probs >= 1.0, 0.0, jnp.floor(jnp.log(uniform) / log_keep))
    skips = jnp.minimum(skips, np.float32(MAX_BUFFER)).astype(jnp.int32)
    return jnp.minimum(skips, np.asarray(sizes, np.int32)) + 1


# ---------------------------------------------------------------------------
# One round.


class _Layout(NamedTuple):
    """Static bookkeeping of one shuffle: every job's items, concatenated.

    Job ``j`` reads ``slots[j] + 1`` items per round (the last only tells
    whether items remain); ``seg`` maps an item to its job, ``first[j]`` is
    the job's first item and ``local`` an item's index inside its job;
    ``exchanged`` lists the items that may move (``ex_first[j]`` the first of
    job ``j`` among them); ``capacity`` sizes the named exchange buffers.
    """

    slots: np.ndarray
    seg: np.ndarray
    first: np.ndarray
    local: np.ndarray
    exchanged: np.ndarray
    ex_first: np.ndarray
    capacity: int


def layout(jobs, num_members) -> _Layout:
    slots = np.array([job.slots for job in jobs])
    counts = slots + 1
    seg = np.repeat(np.arange(len(jobs)), counts)
    first = np.concatenate([[0], np.cumsum(counts)[:-1]])
    local = np.arange(seg.size) - first[seg]
    exchanged = np.flatnonzero(local < slots[seg])
    ex_first = np.concatenate([[0], np.cumsum(slots)[:-1]])
    expected = sum(min(job.expected, job.slots) for job in jobs)
    capacity = _numerics.count_upper_bound(expected / num_members, int(slots.sum()))
    return _Layout(slots, seg, first, local, exchanged, ex_first, capacity)


class Round(NamedTuple):
    """The items of one round, every job's segment concatenated."""

    pos: jax.Array  # (N,) selected positions, last + cumulative gaps
    num_valid: jax.Array  # (J,) items inside their buffer, a prefix of each segment
    perms: jax.Array  # (N, M) permutations
    keep: jax.Array | None  # (N,) kept by thinning; None: every item kept


def draw_round(keypairs, starts, lasts, jobs, num_members, lay, topology):
    """Gaps, positions, permutations and thinning of every job's items of
    one round.

    Job ``j`` reads items ``starts[j] .. starts[j] + slots`` and continues
    from position ``lasts[j]`` (-1 at first): the counter-based draws make
    this the continuation of one unbounded round (module docstring).
    """
    keypair, thin_keypair = keypairs
    job_ids = np.array([job.job_id for job in jobs], np.uint32)[lay.seg]
    items = (starts[lay.seg] + jnp.asarray(lay.local, jnp.int32)).astype(jnp.uint32)
    words = item_words(keypair, items, job_ids, num_members, topology)
    words = jax.lax.optimization_barrier(words)  # computed once, read twice
    sizes = np.array([job.size for job in jobs], np.int32)
    probs = np.array([job.prob for job in jobs])[lay.seg]
    gaps = geometric_gaps(words[0], probs, sizes[lay.seg])

    # int32 sums may wrap only after the first position past the buffer (see
    # the module docstring): the valid items are those before it.
    total = cumsum(gaps)
    before = jnp.concatenate([jnp.zeros((1,), jnp.int32), total])[lay.first]
    pos = lasts[lay.seg] + total - before[lay.seg]
    outside = jnp.where(pos >= sizes[lay.seg], lay.local, np.iinfo(np.int32).max)
    num_valid = jax.ops.segment_min(
        outside, jnp.asarray(lay.seg), num_segments=len(jobs), indices_are_sorted=True
    )
    perms = permutations(words[1:], num_members, topology)
    keep = thinning(thin_keypair, items, job_ids, pos, jobs, lay)
    return Round(pos, num_valid, perms, keep)


def thinning(keypair, items, job_ids, pos, jobs, lay):
    """Whether each item is kept: item ``t`` of a job, at a position of a
    tensor of probability ``p_l``, is kept when ``U < p_l / p`` (``p``: the
    job's drawing probability, the largest of its tensors'), ``U`` uniform
    on ``[0, 1)`` from the top 24 bits of Threefry of the counter
    ``(t, job_id)`` under the thinning key. ``None`` when no job mixes
    probabilities (every item kept)."""
    if not any(job.thinned for job in jobs):
        return None
    word = threefry2x32(keypair[0], keypair[1], items, job_ids)[0]
    uniform = (word >> 8).astype(jnp.float32) * np.float32(2.0**-24)
    keep = []
    for j, job in enumerate(jobs):
        span = slice(lay.first[j], lay.first[j] + job.slots + 1)
        if not job.thinned:
            keep.append(jnp.ones((job.slots + 1,), bool))
            continue
        starts = np.asarray(job.offsets, np.int32)
        tensor = jnp.searchsorted(starts, pos[span], "right", method="scan_unrolled")
        ratios = (np.asarray(job.probs) / job.prob).astype(np.float32)
        keep.append(uniform[span] < jnp.asarray(ratios)[tensor - 1])
    return jnp.concatenate(keep)


def _take(x, idx, stacked):
    return x[:, idx] if stacked else x[idx]


def _put(x, idx, v, stacked, indices_are_sorted=True):
    kwargs = dict(
        mode="drop", unique_indices=True, indices_are_sorted=indices_are_sorted
    )
    return (x.at[:, idx] if stacked else x.at[idx]).set(v, **kwargs)


def wire_dtype(dtype, quantize):
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


def _gather(bufs, bases, jobs, pos, lay, stacked, quantize):
    """The values of the selected coordinates, one ``(..., K, C)`` block per
    wire dtype (``K`` items of every job concatenated, ``C`` columns: the
    arrays that move together), and where each array's column is.

    An array with a base holds an update; its value is ``base + array`` in
    the base's dtype, the new parameter.
    """
    columns: dict[str, list[list]] = {}
    where = []  # where[j][n]: (wire dtype name, column) of the job's n-th array
    for j, job in enumerate(jobs):
        idx = jnp.clip(pos[lay.first[j] : lay.first[j] + job.slots], 0, job.size - 1)
        where.append([])
        for buf, base in zip(bufs[j], bases[j]):
            value = _take(buf, idx, stacked)
            if base is not None:
                # The select keeps XLA from contracting the inner update's
                # multiply and this add into one FMA: the value must be the
                # rounded update added to the parameter, as apply_updates does.
                value = jnp.where(jnp.isnan(value), jnp.nan, value)
                value = (_take(base, idx, stacked) + value).astype(base.dtype)
            wire = wire_dtype(value.dtype, quantize)
            per_job = columns.setdefault(wire.name, [[] for _ in jobs])
            where[j].append((wire.name, len(per_job[j])))
            per_job[j].append(_to_wire(value, wire))
    values = {}
    for name, per_job in columns.items():
        width = max(len(cols) for cols in per_job)
        blocks = []
        for j, cols in enumerate(per_job):
            # Padding like the job's first column: same shape and sharding.
            pad = jnp.zeros_like(columns[where[j][0][0]][j][0], dtype=name)
            blocks.append(jnp.stack(cols + [pad] * (width - len(cols)), axis=-1))
        values[name] = jnp.concatenate(blocks, axis=1 if stacked else 0)
    return values, where


def _write_back(bufs, bases, jobs, drawn, done, shuffled, where, lay, stacked):
    """Writes the items that moved; the others wait for the next round, or
    (thinned out) stay as they are.

    An array without a base takes the shuffled value. An update (array with a
    base) becomes ``shuffled - base``, computed in float32 or wider and
    rounded once to the update's dtype, so that ``base + update`` is the
    shuffled value up to the rounding of that difference and of the addition
    in ``optax.apply_updates`` (exact when the two are within a factor of 2).
    """
    out = []
    for j, job in enumerate(jobs):
        slot = jnp.arange(job.slots, dtype=jnp.int32)
        span = drawn.pos[lay.first[j] : lay.first[j] + job.slots]
        moved = slot < done[j]
        if drawn.keep is not None:
            moved = moved & drawn.keep[lay.first[j] : lay.first[j] + job.slots]
        idx = jnp.where(moved, span, job.size + slot)  # past the end: dropped
        new_bufs = []
        for buf, base, (name, column) in zip(bufs[j], bases[j], where[j]):
            new = jax.lax.slice_in_dim(
                shuffled[name],
                lay.ex_first[j],
                lay.ex_first[j] + job.slots,
                axis=1 if stacked else 0,
            )[..., column]
            if base is not None:
                base = _take(base, jnp.clip(span, 0, job.size - 1), stacked)
                acc = jnp.promote_types(base.dtype, jnp.float32)
                new = new.astype(acc) - base.astype(acc)
            sorted_ = not job.thinned  # a thinned-out item drops in between
            new_bufs.append(_put(buf, idx, new.astype(buf.dtype), stacked, sorted_))
        out.append(tuple(new_bufs))
    return tuple(out)


class _Context(NamedTuple):
    """What every round reads: the static plan and the read-only operands."""

    jobs: list
    lay: _Layout
    bases: list
    keypairs: tuple[jax.Array, jax.Array]  # the draws' and the thinning's
    num_members: int
    axis_name: object
    topology: str
    quantize: object


def _one_round(ctx, carry):
    """Draws the items, gathers their values, permutes them across members
    (:func:`permute_members`), writes back what moved.
    Returns the carry ``(buffers, starts, lasts, more)`` of the next round."""
    bufs, starts, lasts, _ = carry
    lay, jobs, stacked = ctx.lay, ctx.jobs, ctx.axis_name is None
    drawn = draw_round(
        ctx.keypairs, starts, lasts, jobs, ctx.num_members, lay, ctx.topology
    )
    num_valid = jnp.minimum(drawn.num_valid, jnp.asarray(lay.slots + 1, jnp.int32))
    valid = jnp.asarray(lay.local, jnp.int32) < num_valid[lay.seg]
    values, where = _gather(
        bufs, ctx.bases, jobs, drawn.pos, lay, stacked, ctx.quantize
    )
    shuffled, num_done = permute_members(
        values,
        drawn.perms[lay.exchanged],
        axis_name=ctx.axis_name,
        valid=(valid if drawn.keep is None else valid & drawn.keep)[lay.exchanged],
        capacity=lay.capacity,
    )
    # Items done per job: those before the exchange's stop, within the slots.
    done = jnp.clip(
        num_done - jnp.asarray(lay.ex_first, jnp.int32),
        0,
        jnp.minimum(num_valid, jnp.asarray(lay.slots, jnp.int32)),
    )
    bufs = _write_back(
        bufs, ctx.bases, jobs, drawn, done, shuffled, where, lay, stacked
    )
    first = jnp.asarray(lay.first, jnp.int32)
    more = jnp.any(valid[first + done])
    lasts = jnp.where(done > 0, drawn.pos[first + jnp.maximum(done - 1, 0)], lasts)
    return bufs, starts + done, lasts, more


def step_keypairs(key):
    """The Threefry keys of one shuffle: the draws' (gaps and permutations),
    and the thinning's (from ``fold_in(key, 1)``)."""
    return (
        jax.random.bits(key, (2,), jnp.uint32),
        jax.random.bits(jax.random.fold_in(key, 1), (2,), jnp.uint32),
    )


def run_rounds(bufs, bases, jobs, key, num_members, axis_name, topology, quantize):
    """The jobs' buffers after the shuffle, rounds until every item is done,
    and the loop's stop flag (False, a run-time value: see
    :func:`from_buffers`).

    The first round runs straight-line (a scatter inside a loop body is not
    done in place on XLA CPU); the loop continues only in the rare case where
    the static slots or exchange buffers did not suffice.
    """
    lay = layout(jobs, num_members)
    ctx = _Context(
        jobs, lay, bases, step_keypairs(key), num_members, axis_name, topology, quantize
    )
    starts = jnp.zeros((len(jobs),), jnp.int32)
    lasts = jnp.full((len(jobs),), -1, jnp.int32)
    carry = _one_round(ctx, (tuple(bufs), starts, lasts, jnp.asarray(True)))
    step = functools.partial(_one_round, ctx)
    bufs, _, _, more = jax.lax.while_loop(lambda c: c[3], step, carry)
    return bufs, more


def exchange(
    tensors, key, num_members, axis_name, topology="full", quantize=None
) -> list[tuple[jax.Array, ...]]:
    """Shuffles ``tensors`` (a list of :class:`Tensor`): returns each
    tensor's arrays, shapes and dtypes unchanged.

    ``key``: PRNG key data shared by every member and device.
    ``axis_name``: ``None`` (stacked mode) or the mapped member axis name(s).
    """
    stacked = axis_name is None
    jobs = plan_jobs(tensors, stacked)
    if not jobs or num_members < 2:
        return [t.arrays for t in tensors]
    bufs, bases = to_buffers(tensors, jobs, stacked)
    bufs, stop_flag = run_rounds(
        bufs, bases, jobs, key, num_members, axis_name, topology, quantize
    )
    return from_buffers(tensors, jobs, bufs, stop_flag)
