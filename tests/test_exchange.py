"""The exchange engine (``optax_wa._exchange``) against a dense reference.

The reference below is written from the engine's specification, not from
its code: tensors of the same kind (probability, dtypes, which arrays hold an
update on a base) are concatenated per member into one buffer (a job, whose
id is the index of its first tensor); item ``t`` of a job draws Threefry-2x32
(``jax.extend.random.threefry_2x32``, not the engine's unrolled copy) of the
counter ``(t, job_id)`` under the step's key; its gap is ``1 + floor(log U /
log(1 - p))``; the selected coordinates are the positions ``gap_0 + ... +
gap_t - 1`` below the buffer's size; the permutation of item ``t`` is row
``word mod M!`` of the lexicographic table of permutations (ranks of ``M``
words above 8 members, a shift of +-1 for the ring). It then applies the
permutations densely, to the whole buffer at once, with no slots, rounds or
exchange buffers. The engine must match it exactly in every mode: stacked,
stacked with the member axis split over an explicit mesh, named under
``jax.vmap`` and named under ``jax.shard_map`` (members vmapped inside), with
tiny static sizes forcing the continuation rounds.
"""

from __future__ import annotations

import itertools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from optax_wa import _exchange, _numerics

M = 8

# Explicit axes: jax.make_mesh's default in jax 0.10, not in jax 0.8.
EXPLICIT = (jax.sharding.AxisType.Explicit,)


# --- the dense reference ------------------------------------------------------


def _values(x):
    return int(np.prod(np.shape(x)[1:], dtype=np.int64))


def _kind(arrays, bases, prob):
    """One job per octave of ``p`` (``[2**(e-1), 2**e)``) and dtypes."""
    return int(np.frexp(prob)[1]), tuple(
        (np.dtype(a.dtype), None if b is None else np.dtype(b.dtype))
        for a, b in zip(arrays, bases)
    )


def _reference_jobs(specs, max_buffer=2**29):
    """``[(job_id, [tensor indices])]``: tensors of one kind, in order, a new
    job when the buffer would reach ``max_buffer`` values."""
    jobs, open_jobs = [], {}
    for i, (arrays, bases, prob) in enumerate(specs):
        size = _values(arrays[0])
        if prob == 0.0 or size == 0:
            continue
        kind = _kind(arrays, bases, prob)
        job = open_jobs.get(kind)
        if (
            job is None
            or sum(_values(specs[j][0][0]) for j in job) + size >= max_buffer
        ):
            job = open_jobs[kind] = []
            jobs.append(job)
        job.append(i)
    return [(job[0], job) for job in jobs]


def _reference_selection(keypair, job_id, prob, size, m, topology):
    """The selected positions of a buffer of ``size`` values and their
    permutations (``perms[f, i]``: the member whose value member ``i`` takes)."""
    ranks = topology == "full" and m > 8
    width = (m + 2) // 2 if ranks else 1
    items = np.arange(size + 1, dtype=np.uint32)  # at most size selected, +1 past
    words = []
    for lane in range(width):
        counter = np.stack([items, np.full_like(items, job_id * width + lane)])
        out = np.asarray(jax.extend.random.threefry_2x32(keypair, counter))
        words += [out[0], out[1]]
    if prob >= 1.0:
        gaps = np.ones(items.shape, np.int64)
    else:
        bits = (words[0] >> np.uint32(9)) | np.uint32(0x3F800000)
        uniform = np.float32(2.0) - bits.view(np.float32)  # (0, 1]
        log_keep = np.float32(np.log1p(-prob))
        skips = np.asarray(jnp.floor(jnp.log(uniform) / log_keep))
        gaps = np.minimum(np.minimum(skips, 2.0**30).astype(np.int64), size) + 1
    pos = np.cumsum(gaps) - 1
    count = int(np.searchsorted(pos, size))  # positions below size
    if topology == "ring":
        shift = np.where(words[1] >> np.uint32(31) == 1, 1, m - 1)
        perms = (np.arange(m)[None, :] + shift[:, None]) % m
    elif ranks:
        keys = np.stack(words[1 : m + 1], axis=1)
        perms = np.argsort(np.argsort(keys, axis=1, kind="stable"), axis=1)
    else:
        table = np.array(list(itertools.permutations(range(m))))
        perms = table[words[1] % np.uint32(len(table))]
    return pos[:count], perms[:count]


def _reference_kept(keypair, job_id, pos, bounds, probs):
    """Thinning: item ``t``, at a position of tensor ``l``, stays selected when
    ``U < p_l / max(p)``, ``U`` the top 24 bits of Threefry of ``(t, job_id)``
    under the thinning key, over ``2**24``."""
    items = np.arange(pos.size, dtype=np.uint32)
    counter = np.stack([items, np.full_like(items, job_id)])
    word = np.asarray(jax.extend.random.threefry_2x32(keypair, counter))[0]
    uniform = (word >> np.uint32(8)).astype(np.float32) * np.float32(2.0**-24)
    tensor = np.searchsorted(bounds, pos, side="right") - 1
    ratios = (np.asarray(probs) / max(probs)).astype(np.float32)
    return uniform < ratios[tensor]


def _to_wire(x, quantize):
    if quantize is None or not np.issubdtype(x.dtype, np.floating):
        return x
    wire = np.dtype(quantize)
    if x.dtype.itemsize <= wire.itemsize:
        return x
    big = float(jnp.finfo(wire).max)
    return np.where(np.isfinite(x), np.clip(x, -big, big), x).astype(wire)


def _reference_array(flat, base, sel, perms, quantize):
    """The dense shuffle of one ``(M, D)`` buffer at the selected columns."""
    value = flat if base is None else (base + flat).astype(base.dtype)
    value = _to_wire(value, quantize)
    moved = value[perms.T, sel[None, :]]  # member i takes perms[f, i]'s value
    if base is not None:
        acc = np.promote_types(base.dtype, np.float32)
        moved = moved.astype(acc) - base[:, sel].astype(acc)
    out = flat.copy()
    out[:, sel] = moved.astype(flat.dtype)
    return out


def _concat(parts, m):
    return np.concatenate([np.asarray(x).reshape(m, -1) for x in parts], axis=1)


def reference(specs, key, m, topology="full", quantize=None, max_buffer=2**29):
    """``specs``: ``[(arrays, bases, prob)]`` of stacked NumPy arrays; returns
    every tensor's new arrays."""
    keypair = np.asarray(jax.random.bits(key, (2,), jnp.uint32))
    thin_keypair = np.asarray(
        jax.random.bits(jax.random.fold_in(key, 1), (2,), jnp.uint32)
    )
    out = [[np.array(a) for a in arrays] for arrays, _, _ in specs]
    for job_id, ids in _reference_jobs(specs, max_buffer):
        sizes = [_values(specs[i][0][0]) for i in ids]
        probs = [specs[i][2] for i in ids]
        sel, perms = _reference_selection(
            keypair, job_id, max(probs), sum(sizes), m, topology
        )
        bounds = np.cumsum([0, *sizes])
        kept = _reference_kept(thin_keypair, job_id, sel, bounds, probs)
        sel, perms = sel[kept], perms[kept]
        for n, base in enumerate(specs[job_id][1]):
            flat = _concat([specs[i][0][n] for i in ids], m)
            flat_base = (
                None if base is None else _concat([specs[i][1][n] for i in ids], m)
            )
            new = _reference_array(flat, flat_base, sel, perms, quantize)
            for i, lo, hi in zip(ids, bounds[:-1], bounds[1:]):
                out[i][n] = new[:, lo:hi].reshape(specs[i][0][n].shape)
    return out


# --- the engine in every mode ---------------------------------------------------


def _engine(specs, key, m, mode, topology="full", quantize=None):
    arrays = [tuple(jnp.asarray(a) for a in s[0]) for s in specs]
    bases = [tuple(None if b is None else jnp.asarray(b) for b in s[1]) for s in specs]
    probs = [s[2] for s in specs]

    def run(arrays, bases, axis_name):
        tensors = [_exchange.Tensor(a, b, p) for a, b, p in zip(arrays, bases, probs)]
        return _exchange.exchange(tensors, key, m, axis_name, topology, quantize)

    if mode == "stacked":
        return jax.jit(lambda a, b: run(a, b, None))(arrays, bases)
    if mode == "vmap":
        named = lambda a, b: run(a, b, "members")
        return jax.jit(jax.vmap(named, axis_name="members"))(arrays, bases)
    devices = 4 if m % 4 == 0 else 2
    mesh = jax.make_mesh((devices,), ("members",), axis_types=EXPLICIT)
    with jax.set_mesh(mesh):
        placed = jax.device_put((arrays, bases), NamedSharding(mesh, P("members")))
        if mode == "sharded":  # stacked, member axis split over an explicit mesh
            return jax.jit(lambda a, b: run(a, b, None))(*placed)
        named = lambda a, b: run(a, b, ("members", "local"))
        mapped = jax.shard_map(
            jax.vmap(named, axis_name="local"),
            mesh=mesh,
            in_specs=P("members"),
            out_specs=P("members"),
            check_vma=False,
        )
        return jax.jit(mapped)(*placed)


def _assert_equal(got, expected):
    assert len(got) == len(expected)
    for g_arrays, e_arrays in zip(got, expected):
        for g, e in zip(g_arrays, e_arrays):
            assert g.dtype == e.dtype and g.shape == e.shape
            np.testing.assert_array_equal(np.asarray(g), e)


def _specs(m=M, seed=0):
    """Tensors of several kinds, sizes 0, 1 and ones no block size divides:
    float32 values and updates on a base with a state column, bfloat16,
    float16, int32; probabilities 0, 1 and in between."""
    rng = np.random.default_rng(seed)

    def normal(*shape, dtype=np.float32):
        return rng.normal(size=(m, *shape)).astype(dtype)

    bf16 = jnp.bfloat16
    return [
        ((normal(6, 5),), (None,), 0.3),
        ((normal(1),), (None,), 0.3),  # the same job as the first
        ((normal(4, 4),), (None,), 0.0),  # untouched
        ((normal(7, 3),), (None,), 0.3),
        ((normal(65, dtype=bf16),), (None,), 0.3),
        ((normal(3, 3),), (None,), 1.0),
        ((normal(0),), (None,), 0.3),  # no values
        ((rng.integers(-99, 99, size=(m, 9)).astype(np.int32),), (None,), 0.5),
        ((normal(130, dtype=np.float16),), (None,), 0.05),
        # An update on its parameter, with a momentum moving along.
        ((0.1 * normal(13, 11), normal(13, 11)), (normal(13, 11), None), 0.3),
        ((0.1 * normal(5), normal(5)), (normal(5), None), 0.3),
        ((0.1 * normal(33, dtype=bf16),), (normal(33, dtype=bf16),), 0.2),
        # Probabilities of one octave share a job, drawn at the largest and
        # thinned: with the 0.3 tensors above.
        ((normal(9, 4),), (None,), 0.45),
        ((0.1 * normal(6, 2), normal(6, 2)), (normal(6, 2), None), 0.27),
    ]


_MODES = ["stacked", "sharded", "vmap", "shard_map"]


@pytest.mark.parametrize("mode", _MODES)
def test_engine_equals_the_dense_reference(mode):
    specs, key = _specs(), jax.random.PRNGKey(3)
    expected = reference(specs, key, M)
    assert any(not np.array_equal(e[0], s[0][0]) for e, s in zip(expected, specs))
    _assert_equal(_engine(specs, key, M, mode), expected)


@pytest.mark.parametrize("mode", _MODES)
def test_continuation_rounds_equal_the_dense_reference(mode, monkeypatch):
    """Static slots and exchange buffers of 2 items force many rounds; the
    counter-based draws make their union the one unbounded round."""
    monkeypatch.setattr(_numerics, "count_upper_bound", lambda mean, limit, tail=0: 2)
    specs, key = _specs(seed=1), jax.random.PRNGKey(4)
    _assert_equal(_engine(specs, key, M, mode), reference(specs, key, M))


@pytest.mark.parametrize("mode", ["stacked", "vmap"])
@pytest.mark.parametrize(
    "topology, quantize", [("ring", None), ("full", "bfloat16"), ("full", "float16")]
)
def test_topologies_and_wires_equal_the_dense_reference(mode, topology, quantize):
    specs, key = _specs(seed=2), jax.random.PRNGKey(5)
    expected = reference(specs, key, M, topology, quantize)
    _assert_equal(_engine(specs, key, M, mode, topology, quantize), expected)


@pytest.mark.parametrize("mode", ["stacked", "vmap", "shard_map"])
def test_more_members_than_the_table_equal_the_dense_reference(mode):
    """10 members: permutations are the ranks of 10 words (5 Threefry lanes)."""
    specs, key = _specs(m=10, seed=3), jax.random.PRNGKey(6)
    _assert_equal(_engine(specs, key, 10, mode), reference(specs, key, 10))


def test_full_buffers_start_new_jobs(monkeypatch):
    """A job holds fewer than MAX_BUFFER values per member: with a bound of 64,
    the float32 tensors of one kind fill several jobs (new job ids, new draws)."""
    monkeypatch.setattr(_exchange, "MAX_BUFFER", 64)
    rng = np.random.default_rng(4)
    specs = [
        ((rng.normal(size=(M, n)).astype(np.float32),), (None,), 0.4)
        for n in (30, 30, 10, 50, 1)
    ]
    jobs = _exchange.plan_jobs(
        [_exchange.Tensor(s[0], s[1], s[2]) for s in specs], stacked=True
    )
    assert [job.tensors for job in jobs] == [(0, 1), (2, 3, 4)]
    key = jax.random.PRNGKey(7)
    expected = reference(specs, key, M, max_buffer=64)
    _assert_equal(_engine(specs, key, M, "stacked"), expected)
    _assert_equal(_engine(specs, key, M, "vmap"), expected)


def test_program_size_does_not_grow_with_the_tensor_count():
    """Tensors of one kind are one job: the traced program holds the same
    number of gathers and scatters for 3 tensors as for 60."""

    def counts(num_tensors):
        arrays = [jnp.ones((4, 3 + i % 5)) for i in range(num_tensors)]

        def run(arrays):
            tensors = [_exchange.Tensor((a,), (a,), 0.1) for a in arrays]
            return _exchange.exchange(tensors, jax.random.PRNGKey(0), 4, None)

        text = str(jax.make_jaxpr(run)(arrays))
        return text.count("gather["), text.count("scatter[")

    small, large = counts(3), counts(60)
    assert small == large and small[1] >= 2  # the straight-line round and the loop's


def _output_kernels(computations):
    """``(shape, body)`` of the kernel computing each output of a compiled
    program (``computations``: its ``hlo_computations``, names blanked out
    of the kernels' bodies)."""
    named = computations["ENTRY"][1]  # the entry, names kept
    root = re.search(r"ROOT \S+ = .*? tuple\((.*?)\)", named, re.S).group(1)
    kernels = []
    for name in re.findall(r"%([\w.-]+)", root):
        line = re.search(rf"%{re.escape(name)} = (\S+) .*", named)
        called = re.search(r"calls=%([\w.-]+)", line.group(0))
        body = computations[called.group(1)][1] if called else line.group(0)
        kernels.append((line.group(1), re.sub(r"%[\w.-]+", "%", body)))
    return kernels


def test_tensors_of_one_shape_share_one_compiled_cut(hlo_computations):
    """XLA:CPU compiles one kernel per distinct computation: the cuts out of
    the flat buffer start at run-time offsets, so that the outputs of one
    shape come from the same kernel (with constant offsets, one per tensor)."""
    shapes = [(3, 3, 2, 4), (5, 4), (6,)] * 3
    arrays = [
        jax.random.normal(jax.random.PRNGKey(i), (4, *s)) for i, s in enumerate(shapes)
    ]

    def run(arrays):
        tensors = [_exchange.Tensor((a, -a), (None, a), 0.3) for a in arrays]
        return _exchange.exchange(tensors, jax.random.PRNGKey(0), 4, None)

    kernels = _output_kernels(
        hlo_computations(jax.jit(run).lower(arrays).compile().as_text())
    )
    assert len(kernels) == 2 * len(shapes)
    distinct = {}
    for shape, body in kernels:
        distinct.setdefault(shape, set()).add(body)
    assert len(distinct) == 3 and all(
        "slice" in next(iter(b)) for b in distinct.values()
    )
    assert {shape: len(bodies) for shape, bodies in distinct.items()} == {
        shape: 1 for shape in distinct
    }


def test_threefry_matches_jax():
    key = jnp.array([0x12345678, 0x9ABCDEF0], jnp.uint32)
    count = jax.random.bits(jax.random.key(0), (2, 257), jnp.uint32)
    expected = jax.extend.random.threefry_2x32(key, count)
    got = _exchange.threefry2x32(key[0], key[1], count[0], count[1])
    np.testing.assert_array_equal(np.stack(got), np.asarray(expected))


def test_blocked_cumsum_equals_cumsum():
    x = jnp.asarray(np.random.default_rng(0).integers(0, 9, 200), jnp.int32)
    for n in (1, 63, 64, 65, 200):
        np.testing.assert_array_equal(_exchange.cumsum(x[:n]), np.cumsum(x[:n]))


def test_too_large_tensor_raises():
    big = jax.ShapeDtypeStruct((2, 2**29), jnp.float32)
    with pytest.raises(ValueError, match="2\\*\\*29"):
        _exchange.plan_jobs([_exchange.Tensor((big,), (None,), 0.1)], stacked=True)


def test_gaps_past_a_large_buffer_stay_past_it():
    """A gap is capped at size + 1 exactly, also where float32 rounds the size
    down (2**28 + 1 -> 2**28): a capped gap never lands inside the buffer."""
    size = 2**28 + 1
    words = jnp.arange(1, 1000, dtype=jnp.uint32) * jnp.uint32(4_000_007)
    gaps = _exchange.geometric_gaps(words, np.full(999, 1e-12), np.full(999, size))
    np.testing.assert_array_equal(gaps, size + 1)


def test_thinned_job_selects_each_tensor_at_its_own_probability():
    """Tensors of probabilities 0.3 and 0.45 (one octave) are one job, drawn
    at 0.45 and thinned: with 2 members a selected coordinate swaps with
    probability 1/2, so each tensor swaps a fraction p_l / 2 of its values
    (within 5 standard deviations over 200,000 values)."""
    n = 200_000
    arrays = [np.stack([np.zeros(n), np.ones(n)]).astype(np.float32)] * 2
    probs = (0.3, 0.45)
    tensors = [
        _exchange.Tensor((jnp.asarray(a),), (None,), p) for a, p in zip(arrays, probs)
    ]
    jobs = _exchange.plan_jobs(tensors, stacked=True)
    assert len(jobs) == 1 and jobs[0].thinned and jobs[0].prob == 0.45

    def run(arrays):
        tensors = [_exchange.Tensor((a,), (None,), p) for a, p in zip(arrays, probs)]
        return _exchange.exchange(tensors, jax.random.PRNGKey(5), 2, None)

    out = jax.jit(run)([jnp.asarray(a) for a in arrays])
    for (new,), p in zip(out, probs):
        swapped = float(np.mean(np.asarray(new)[0] == 1.0))
        sd = np.sqrt(p / 2 * (1 - p / 2) / n)
        assert abs(swapped - p / 2) < 5 * sd, (p, swapped)
