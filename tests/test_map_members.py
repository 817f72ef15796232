"""map_members: every mode gives vmap's numbers, under jit, grad and sharding."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_wa
from optax_wa import members
from optax_wa.comm import collective_bytes

MODES = ("vmap", "sequential", "auto")
M = 4

# Explicit axes: jax.make_mesh's default in jax 0.10, not in jax 0.8.
EXPLICIT = (jax.sharding.AxisType.Explicit,)


def _close(a, b, tol=1e-6):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=tol, atol=tol)


def _mlp_init(key):
    k1, k2 = jax.random.split(key)
    return {
        "w1": jax.random.normal(k1, (5, 7)) * 0.7,
        "b1": jnp.linspace(-0.3, 0.4, 7),
        "w2": jax.random.normal(k2, (7, 3)) * 0.5,
    }


def _mlp_loss(p, x, y):
    h = jnp.tanh(x @ p["w1"] + p["b1"])
    return optax.softmax_cross_entropy_with_integer_labels(h @ p["w2"], y).mean()


def _mlp_data(shared_batch=False):
    params = members.init_members(_mlp_init, jax.random.key(0), M)
    shape = (6, 5) if shared_batch else (M, 6, 5)
    x = jax.random.normal(jax.random.key(1), shape) * 1.3 + 0.2
    y = jax.random.randint(jax.random.key(2), shape[:-1], 0, 3)
    return params, x, y


def _per_member_loop(fn, params, x, y, shared_batch=False):
    """The reference: fn on each member, one at a time, outside any map."""
    outs = []
    for m in range(M):
        pm = jax.tree.map(lambda a, m=m: a[m], params)
        xm, ym = (x, y) if shared_batch else (x[m], y[m])
        outs.append(fn(pm, xm, ym))
    return jax.tree.map(lambda *o: jnp.stack(o), *outs)


@pytest.mark.parametrize("mode", MODES)
def test_mlp_value_and_grad_matches_per_member_loop(mode):
    params, x, y = _mlp_data()
    fn = jax.value_and_grad(_mlp_loss)
    got = jax.jit(members.map_members(fn, mode=mode))(params, x, y)
    _close(got, _per_member_loop(fn, params, x, y))
    # members differ, so a map that mixed or repeated members would fail
    assert float(jnp.std(got[0])) > 1e-3


@pytest.mark.parametrize("mode", MODES)
def test_shared_batch_in_axes_none(mode):
    params, x, y = _mlp_data(shared_batch=True)
    fn = jax.grad(_mlp_loss)
    got = jax.jit(members.map_members(fn, in_axes=(0, None, None), mode=mode))(
        params, x, y
    )
    _close(got, _per_member_loop(fn, params, x, y, shared_batch=True))
    _close(got, jax.vmap(fn, in_axes=(0, None, None))(params, x, y))


@pytest.mark.parametrize("mode", MODES)
def test_pytree_prefix_in_axes_and_nonzero_axis(mode):
    params, x, _ = _mlp_data()
    xt = jnp.swapaxes(x, 0, 1)  # members on axis 1

    def fn(p, inputs):
        return jnp.tanh(inputs["x"] @ p["w1"] + p["b1"]).sum(-1) * inputs["scale"]

    inputs = {"x": xt, "scale": jnp.float32(1.7)}
    axes = (0, {"x": 1, "scale": None})
    got = members.map_members(fn, in_axes=axes, mode=mode)(params, inputs)
    want = jax.vmap(fn, in_axes=axes)(params, inputs)
    assert got.shape == (M, 6)
    _close(got, want)


@pytest.mark.parametrize("mode", MODES)
def test_outputs_stacked_like_vmap_out_axes_0(mode):
    """An output independent of the mapped argument is repeated per member."""
    params, x, y = _mlp_data()

    def fn(p, x):
        return {"const": jnp.arange(3.0), "sum": p["w1"].sum() + x.sum()}

    got = members.map_members(fn, mode=mode)(params, x)
    want = jax.vmap(fn)(params, x)
    assert jax.tree.map(jnp.shape, got) == jax.tree.map(jnp.shape, want)
    assert got["const"].shape == (M, 3)
    _close(got, want)


@pytest.mark.parametrize("mode", MODES)
def test_grad_through_map(mode):
    """Differentiating through the mapped function (an outer grad)."""
    params, x, y = _mlp_data()

    def total(p):
        losses = members.map_members(_mlp_loss, mode=mode)(p, x, y)
        return (losses * jnp.arange(1.0, M + 1)).sum()

    got = jax.jit(jax.grad(total))(params)
    want = jax.vmap(jax.grad(_mlp_loss))(params, x, y)
    want = jax.tree.map(
        lambda g: g * jnp.arange(1.0, M + 1).reshape((M,) + (1,) * (g.ndim - 1)), want
    )
    _close(got, want)


class _BnCnn(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool):
        x = nn.Conv(4, (3, 3))(x)
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
        x = nn.relu(x)
        x = nn.Conv(6, (3, 3), strides=2)(x)
        return nn.Dense(3)(x.mean(axis=(1, 2)))


@pytest.mark.parametrize("mode", MODES)
def test_cnn_with_batchnorm_returns_new_stats(mode):
    model = _BnCnn()
    x = jax.random.normal(jax.random.key(3), (M, 5, 8, 8, 3)) * 2.0 + 0.5
    y = jax.random.randint(jax.random.key(4), (M, 5), 0, 3)
    variables = jax.vmap(lambda k: model.init(k, x[0], train=False))(
        jax.random.split(jax.random.key(5), M)
    )
    params, stats = variables["params"], variables["batch_stats"]

    def loss(p, s, x, y):
        logits, new = model.apply(
            {"params": p, "batch_stats": s}, x, train=True, mutable=["batch_stats"]
        )
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
        return ce, new["batch_stats"]

    fn = jax.value_and_grad(loss, has_aux=True)
    (l, new_stats), grads = jax.jit(members.map_members(fn, mode=mode))(
        params, stats, x, y
    )
    want = []
    for m in range(M):
        pick = lambda t, m=m: jax.tree.map(lambda a: a[m], t)
        want.append(fn(pick(params), pick(stats), x[m], y[m]))
    want = jax.tree.map(lambda *o: jnp.stack(o), *want)
    _close(((l, new_stats), grads), want)
    # the running mean moved from its init (zeros) toward each member's batch mean
    mean = new_stats["BatchNorm_0"]["mean"]
    assert mean.shape == (M, 4) and float(jnp.abs(mean).min()) > 1e-4


@pytest.mark.parametrize("mode", MODES)
def test_sam_oracle_inside_mapped_function(mode):
    params, x, y = _mlp_data()
    oracle = optax_wa.sam_value_and_grad(_mlp_loss, rho=0.3)
    got = jax.jit(members.map_members(oracle, mode=mode))(params, x, y)
    _close(got, _per_member_loop(oracle, params, x, y))
    # SAM's gradient is taken at the perturbed point: not the plain gradient
    plain = jax.vmap(jax.grad(_mlp_loss))(params, x, y)
    assert float(jnp.abs(got[1]["w1"] - plain["w1"]).max()) > 1e-4


@pytest.mark.parametrize("mode", MODES)
def test_sharded_member_axis_each_device_maps_its_own(mode):
    """8 devices, 2 members each: the same numbers, the member axis stays split
    and the compiled step moves nothing between devices."""
    n = 2 * jax.device_count()
    params = members.init_members(_mlp_init, jax.random.key(0), n)
    x = jax.random.normal(jax.random.key(1), (n, 6, 5))
    y = jax.random.randint(jax.random.key(2), (n, 6), 0, 3)
    fn = jax.grad(_mlp_loss)
    want = jax.vmap(fn)(params, x, y)
    mesh = jax.make_mesh((jax.device_count(),), ("members",), axis_types=EXPLICIT)
    with jax.set_mesh(mesh):
        ps, xs, ys = members.shard_members((params, x, y), mesh)
        step = jax.jit(members.map_members(fn, mode=mode))
        got = step(ps, xs, ys)
        assert jax.typeof(got["w1"]).sharding.spec[0] == "members"
        assert collective_bytes(step.lower(ps, xs, ys).compile()) == 0
        # the shared batch is given to every device, still without a gather of
        # the members
        shared = jax.jit(members.map_members(fn, in_axes=(0, None, None), mode=mode))
        got_shared = shared(ps, x[0], y[0])
    _close(got, want)
    _close(got_shared, jax.vmap(fn, in_axes=(0, None, None))(params, x[0], y[0]))


@pytest.mark.parametrize("mode", MODES)
def test_sharded_convolution(mode):
    """A convolution per member with the member axis split over an explicit
    mesh (a bare jax.vmap of it is refused by sharding in types)."""
    n = jax.device_count()
    x = jax.random.normal(jax.random.key(0), (n, 2, 6, 6, 3)) + 0.3
    k = jax.random.normal(jax.random.key(1), (n, 3, 3, 3, 4))

    def conv(x, k):
        dn = ("NHWC", "HWIO", "NHWC")
        return jax.lax.conv_general_dilated(x, k, (1, 1), "SAME", dimension_numbers=dn)

    fn = jax.grad(lambda k, x: jnp.tanh(conv(x, k)).sum())
    # one plain convolution per member: what each device runs for its member
    want = jnp.stack([fn(k[m], x[m]) for m in range(n)])
    mesh = jax.make_mesh((n,), ("members",), axis_types=EXPLICIT)
    with jax.set_mesh(mesh):
        ks, xs = members.shard_members((k, x), mesh)
        with pytest.raises(Exception, match="reshape"):
            jax.jit(jax.vmap(fn))(ks, xs)
        step = jax.jit(members.map_members(fn, mode=mode))
        got = step(ks, xs)
        assert collective_bytes(step.lower(ks, xs).compile()) == 0
    _close(got, want)


def test_plain_loop_over_sharded_axis_is_refused():
    """Why the sequential mode needs its shard_map: a bare scan over an
    explicitly split member axis does not compile."""
    n = jax.device_count()
    w = jnp.ones((n, 3))
    mesh = jax.make_mesh((n,), ("members",), axis_types=EXPLICIT)
    with jax.set_mesh(mesh):
        ws = members.shard_members(w, mesh)
        with pytest.raises(ValueError, match="replicated"):
            jax.jit(lambda w: jax.lax.map(jnp.sum, w))(ws)
        np.testing.assert_allclose(
            jax.jit(members.map_members(jnp.sum, mode="sequential"))(ws), 3.0
        )


def test_many_members_use_a_rolled_loop():
    """Above the unroll limit the loop is a while loop; numbers unchanged."""
    n = 40
    w = jax.random.normal(jax.random.key(0), (n, 3, 3))
    fn = lambda a: jnp.linalg.norm(a @ a)
    f = jax.jit(members.map_members(fn, mode="sequential"))
    _close(f(w), jax.vmap(fn)(w))
    assert "while" in f.lower(w).as_text()
    assert (
        "while"
        not in jax.jit(members.map_members(fn, mode="sequential"))
        .lower(w[:3])
        .as_text()
    )


def test_bad_mode_is_a_value_error_naming_it():
    with pytest.raises(ValueError, match="mode"):
        members.map_members(jnp.sum, mode="loop")


def test_bad_in_axes():
    w = jnp.ones((3, 2))
    with pytest.raises(ValueError, match="in_axes"):
        members.map_members(lambda a, b: a + b, in_axes=(0, 0, 0))(w, w)
    with pytest.raises(ValueError, match="number of members"):
        members.map_members(lambda a, b: a + b, mode="sequential")(w, jnp.ones((4, 2)))
    with pytest.raises(ValueError, match="maps no argument"):
        members.map_members(jnp.sum, in_axes=None, mode="sequential")(w)
    with pytest.raises(TypeError, match="in_axes"):
        members.map_members(jnp.sum, in_axes="0", mode="sequential")(w)
