"""Tests of optax_wa.permutation: specs, builders, apply/invert/compose, matching."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from optax_wa import permutation as perm
from optax_wa.permutation import PermutationSpec

# --------------------------------------------------------------------------
# Small NNX models
# --------------------------------------------------------------------------


class MLP(nnx.Module):
    def __init__(self, sizes, *, rngs):
        self.layers = nnx.List(
            [nnx.Linear(a, b, rngs=rngs) for a, b in zip(sizes[:-1], sizes[1:])]
        )

    def __call__(self, x):
        for layer in self.layers[:-1]:
            x = jnp.tanh(layer(x))
        return self.layers[-1](x)


class CNN(nnx.Module):
    """Attributes sort as bn1, bn2, conv1, conv2, fc: not the forward order."""

    def __init__(self, *, rngs):
        self.conv1 = nnx.Conv(3, 8, (3, 3), rngs=rngs)
        self.bn1 = nnx.BatchNorm(8, rngs=rngs)
        self.conv2 = nnx.Conv(8, 12, (3, 3), rngs=rngs)
        self.bn2 = nnx.BatchNorm(12, rngs=rngs)
        self.fc = nnx.Linear(12, 5, rngs=rngs)

    def __call__(self, x):
        x = nnx.relu(self.bn1(self.conv1(x)))
        x = nnx.relu(self.bn2(self.conv2(x)))
        return self.fc(x.mean(axis=(1, 2)))


CNN_LAYERS = ("conv1", "bn1", "conv2", "bn2", "fc")


class Block(nnx.Module):
    def __init__(self, cin, cout, stride, *, rngs):
        self.conv1 = nnx.Conv(
            cin, cout, (3, 3), strides=stride, use_bias=False, rngs=rngs
        )
        self.bn1 = nnx.BatchNorm(cout, rngs=rngs)
        self.conv2 = nnx.Conv(cout, cout, (3, 3), use_bias=False, rngs=rngs)
        self.bn2 = nnx.BatchNorm(cout, rngs=rngs)
        self.has_shortcut = stride != 1 or cin != cout
        if self.has_shortcut:
            self.shortcut_conv = nnx.Conv(cin, cout, (1, 1), strides=stride, rngs=rngs)
            self.shortcut_bn = nnx.BatchNorm(cout, rngs=rngs)

    def __call__(self, x):
        y = nnx.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        s = self.shortcut_bn(self.shortcut_conv(x)) if self.has_shortcut else x
        return nnx.relu(y + s)


class ResNet(nnx.Module):
    def __init__(self, *, rngs):
        self.conv = nnx.Conv(3, 8, (3, 3), use_bias=False, rngs=rngs)
        self.bn = nnx.BatchNorm(8, rngs=rngs)
        self.stages = nnx.List(
            [
                nnx.List([Block(8, 8, 1, rngs=rngs)]),
                nnx.List([Block(8, 16, 2, rngs=rngs), Block(16, 16, 1, rngs=rngs)]),
            ]
        )
        self.fc = nnx.Linear(16, 5, rngs=rngs)

    def __call__(self, x):
        x = nnx.relu(self.bn(self.conv(x)))
        for stage in self.stages:
            for block in stage:
                x = block(x)
        return self.fc(x.mean(axis=(1, 2)))


def resnet_spec_of(model_or_tree):
    return perm.resnet_spec(
        model_or_tree,
        stem=("conv", "bn"),
        stages=("stages/0", "stages/1"),
        head=("fc",),
    )


class ViTBlock(nnx.Module):
    def __init__(self, dim, heads, hidden, *, rngs):
        self.norm1 = nnx.LayerNorm(dim, rngs=rngs)
        self.attention = nnx.MultiHeadAttention(
            num_heads=heads, in_features=dim, decode=False, rngs=rngs
        )
        self.norm2 = nnx.LayerNorm(dim, rngs=rngs)
        self.mlp_in = nnx.Linear(dim, hidden, rngs=rngs)
        self.mlp_out = nnx.Linear(hidden, dim, rngs=rngs)

    def __call__(self, x):
        x = x + self.attention(self.norm1(x))
        return x + self.mlp_out(nnx.gelu(self.mlp_in(self.norm2(x))))


class ViT(nnx.Module):
    def __init__(self, *, rngs):
        self.embed = nnx.Linear(6, 16, rngs=rngs)
        self.blocks = nnx.List([ViTBlock(16, 4, 24, rngs=rngs) for _ in range(2)])
        self.head = nnx.Linear(16, 3, rngs=rngs)

    def __call__(self, x):
        x = self.embed(x)
        for block in self.blocks:
            x = block(x)
        return self.head(x.mean(axis=1))


class FusedAttention(nnx.Module):
    """Self-attention with one fused QKV projection laid out as (3, heads, head_dim)."""

    def __init__(self, dim, num_heads, *, rngs):
        self.num_heads = num_heads
        self.qkv = nnx.Linear(dim, 3 * dim, rngs=rngs)
        self.out = nnx.Linear(dim, dim, rngs=rngs)

    def __call__(self, x):
        b, n, dim = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, dim // self.num_heads)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        w = jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", q, k), axis=-1)
        return self.out(jnp.einsum("bhqk,bkhd->bqhd", w, v).reshape(b, n, dim))


class FusedBlock(nnx.Module):
    def __init__(self, *, rngs):
        self.attention = FusedAttention(16, 4, rngs=rngs)
        self.mlp_in = nnx.Linear(16, 24, rngs=rngs)
        self.mlp_out = nnx.Linear(24, 16, rngs=rngs)

    def __call__(self, x):
        x = x + self.attention(x)
        return x + self.mlp_out(nnx.gelu(self.mlp_in(x)))


# --------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------


def full_state(model):
    return nnx.state(model, nnx.Any(nnx.Param, nnx.BatchStat)).to_pure_dict()


def with_state(model, pure):
    """A copy of ``model`` holding the Param/BatchStat values of ``pure``."""
    clone = nnx.clone(model)
    state = nnx.state(clone, nnx.Any(nnx.Param, nnx.BatchStat))
    nnx.replace_by_pure_dict(state, pure)
    nnx.update(clone, state)
    return clone


def build(make, seed):
    """``make()`` with random params and running statistics drawn by NumPy.

    Eager NNX initialisation compiles every initializer op per shape (seconds
    on CPU); an abstract model filled from NumPy costs nothing. Statistics are
    random so that eval mode depends on their permutation.
    """
    model = nnx.eval_shape(make)
    rng = np.random.default_rng(seed)

    def fill(path, x):
        name = path[-1].key
        if name == "kernel":
            value = rng.normal(size=x.shape) / np.sqrt(np.prod(x.shape) // x.shape[-1])
        elif name == "var":
            value = np.abs(rng.normal(size=x.shape)) + 0.5
        elif name == "scale":
            value = 1.0 + 0.1 * rng.normal(size=x.shape)
        else:  # bias, mean
            value = 0.1 * rng.normal(size=x.shape)
        return jnp.asarray(value, x.dtype)

    return with_state(model, jax.tree_util.tree_map_with_path(fill, full_state(model)))


def assert_moved(tree_a, tree_b):
    """The permutation really changed the tree (else equality is trivial)."""
    diffs = [
        float(jnp.max(jnp.abs(a - b)))
        for a, b in zip(jax.tree.leaves(tree_a), jax.tree.leaves(tree_b))
    ]
    assert max(diffs) > 1e-3


@nnx.jit
def call(model, x):
    """One compiled forward pass (cheaper than op-by-op eager dispatch)."""
    return model(x)


def check_same_function(model, spec, x, key, *, train=False):
    state = full_state(model)
    perms = perm.random_permutation(key, spec, state)
    permuted = perm.apply_permutation(spec, perms, state)
    assert_moved(state, permuted)
    other = with_state(model, permuted)
    if train:
        model.train()
        other.train()
    else:
        model.eval()
        other.eval()
    chex.assert_trees_all_close(call(other, x), call(model, x), atol=2e-5, rtol=2e-5)
    return model, other, perms


@pytest.fixture(scope="module")
def mlp():
    return build(lambda: MLP([5, 16, 12, 3], rngs=nnx.Rngs(0)), seed=0)


@pytest.fixture(scope="module")
def cnn():
    return build(lambda: CNN(rngs=nnx.Rngs(0)), seed=1)


@pytest.fixture(scope="module")
def resnet():
    return build(lambda: ResNet(rngs=nnx.Rngs(0)), seed=2)


@pytest.fixture(scope="module")
def vit():
    return build(lambda: ViT(rngs=nnx.Rngs(0)), seed=3)


@pytest.fixture(scope="module")
def fused():
    return build(lambda: FusedBlock(rngs=nnx.Rngs(0)), seed=4)


# --------------------------------------------------------------------------
# Builders: a permuted network computes the same function
# --------------------------------------------------------------------------


def test_mlp_spec_groups_and_same_function(mlp):
    model = mlp
    spec = perm.mlp_spec(model)
    assert spec.leaf_axes["layers/0/kernel"] == (None, "layers/0")
    assert spec.leaf_axes["layers/1/kernel"] == ("layers/0", "layers/1")
    assert spec.leaf_axes["layers/2/kernel"] == ("layers/1", None)
    assert spec.leaf_axes["layers/2/bias"] == (None,)
    x = jax.random.normal(jax.random.key(1), (7, 5))
    check_same_function(model, spec, x, jax.random.key(2))


def test_mlp_spec_negative_control(mlp):
    """Leaving one leaf unpermuted breaks the function: the check can fail."""
    model = mlp
    spec = perm.mlp_spec(model)
    broken = PermutationSpec({**spec.leaf_axes, "layers/1/kernel": (None, None)})
    state = full_state(model)
    perms = perm.random_permutation(jax.random.key(3), spec, state)
    x = jax.random.normal(jax.random.key(1), (7, 5))
    out = with_state(model, perm.apply_permutation(broken, perms, state))(x)
    assert float(jnp.max(jnp.abs(out - model(x)))) > 1e-3


@pytest.mark.parametrize("train", [False, True])
def test_conv_spec_with_batchnorm(cnn, train):
    model = cnn
    spec = perm.conv_spec(model, layers=CNN_LAYERS)
    assert spec.leaf_axes["conv2/kernel"] == (None, None, "conv1", "conv2")
    assert spec.leaf_axes["bn1/mean"] == ("conv1",)
    assert spec.leaf_axes["fc/kernel"] == ("conv2", None)
    assert spec.batch_stats == {"bn1/mean", "bn1/var", "bn2/mean", "bn2/var"}
    x = jax.random.normal(jax.random.key(1), (2, 6, 6, 3))
    check_same_function(model, spec, x, jax.random.key(2), train=train)


def test_resnet_spec_shares_one_group_per_stage(resnet):
    spec = resnet_spec_of(resnet)
    axes = spec.leaf_axes
    # Stem and every identity block of stage 0 write the same stream group.
    assert axes["conv/kernel"][-1] == "residual/0"
    assert axes["stages/0/0/conv2/kernel"][-2:] == ("stages/0/0/conv1", "residual/0")
    assert axes["stages/0/0/conv1/kernel"][-2:] == ("residual/0", "stages/0/0/conv1")
    # The projection block starts stage 1's stream; the next block shares it.
    assert axes["stages/1/0/shortcut_conv/kernel"][-2:] == ("residual/0", "residual/1")
    assert axes["stages/1/0/conv2/kernel"][-1] == "residual/1"
    assert axes["stages/1/1/conv2/kernel"][-1] == "residual/1"
    assert axes["stages/1/1/bn2/var"] == ("residual/1",)
    assert axes["fc/kernel"] == ("residual/1", None)
    assert sum(g.startswith("residual/") for g in spec.groups) == 2


@pytest.mark.parametrize("train", [False, True])
def test_resnet_same_function_incl_batch_stats(resnet, train):
    model = resnet
    spec = resnet_spec_of(model)
    x = jax.random.normal(jax.random.key(1), (2, 8, 8, 3))
    model, other, perms = check_same_function(
        model, spec, x, jax.random.key(2), train=train
    )
    if train:
        # The forward pass updated the running statistics: still permuted images.
        chex.assert_trees_all_close(
            nnx.state(other, nnx.BatchStat).to_pure_dict(),
            perm.apply_permutation(
                spec, perms, nnx.state(model, nnx.BatchStat).to_pure_dict()
            ),
            atol=2e-5,
            rtol=2e-5,
        )


@pytest.mark.parametrize("permute_head_dims", [False, True])
def test_vit_block_spec_same_function(vit, permute_head_dims):
    model = vit
    spec = perm.vit_block_spec(
        model, blocks="blocks", permute_head_dims=permute_head_dims
    )
    axes = spec.leaf_axes
    heads = "blocks/0/attention/heads"
    qk = "blocks/0/attention/qk_dims" if permute_head_dims else None
    v = "blocks/0/attention/v_dims" if permute_head_dims else None
    assert axes["blocks/0/attention/query/kernel"] == (None, heads, qk)
    assert axes["blocks/0/attention/key/bias"] == (heads, qk)
    assert axes["blocks/0/attention/value/kernel"] == (None, heads, v)
    assert axes["blocks/0/attention/out/kernel"] == (heads, v, None)
    assert axes["blocks/1/mlp_in/kernel"] == (None, "blocks/1/mlp_in")
    assert axes["blocks/1/mlp_out/kernel"] == ("blocks/1/mlp_in", None)
    assert axes["embed/kernel"] == (None, None)
    x = jax.random.normal(jax.random.key(1), (2, 5, 6))
    _, _, perms = check_same_function(model, spec, x, jax.random.key(4))
    assert not np.array_equal(perms[heads], np.arange(4))


@pytest.mark.parametrize("permute_head_dims", [False, True])
def test_vit_block_spec_fused_qkv_same_function(fused, permute_head_dims):
    model = fused
    spec = perm.vit_block_spec(model, permute_head_dims=permute_head_dims)
    dims = "attention/head_dims" if permute_head_dims else None
    qkv = perm.SubAxes((3, 4, 4), (None, "attention/heads", dims))
    assert spec.leaf_axes["attention/qkv/kernel"] == (None, qkv)
    assert spec.leaf_axes["attention/out/kernel"] == (
        perm.SubAxes((4, 4), ("attention/heads", dims)),
        None,
    )
    x = jax.random.normal(jax.random.key(1), (2, 5, 16))
    _, _, perms = check_same_function(model, spec, x, jax.random.key(4))
    assert not np.array_equal(perms["attention/heads"], np.arange(4))
    # From a plain tree the head count must be given.
    tree = full_state(model)
    assert (
        perm.vit_block_spec(tree, num_heads=4, permute_head_dims=permute_head_dims)
        == spec
    )
    with pytest.raises(ValueError, match="pass num_heads="):
        perm.vit_block_spec(tree)


def test_sub_axes_closed_form():
    """A (2, 3) view of a size-6 axis: permuting the size-3 sub-axis moves blocks."""
    spec = PermutationSpec({"w": (perm.SubAxes((2, 3), (None, "h")),)})
    out = perm.apply_permutation(
        spec, {"h": jnp.array([2, 0, 1])}, {"w": jnp.arange(6.0)}
    )
    np.testing.assert_array_equal(out["w"], [2.0, 0.0, 1.0, 5.0, 3.0, 4.0])
    assert spec.groups == {"h": (("w", 1),)}
    with pytest.raises(
        ValueError, match="leaf 'w' axis 0 has size 5 but its SubAxes shape"
    ):
        perm.validate(spec, {"w": jnp.zeros(5)})


def test_builders_accept_state_and_pure_dict(cnn):
    model = cnn
    from_model = perm.conv_spec(model, layers=CNN_LAYERS)
    from_state = perm.conv_spec(
        nnx.state(model, nnx.Any(nnx.Param, nnx.BatchStat)), layers=CNN_LAYERS
    )
    from_dict = perm.conv_spec(full_state(model), layers=CNN_LAYERS)
    assert from_model == from_state == from_dict
    # A params-only tree (nnx.split) is a sub-tree of the spec.
    _, params, _ = nnx.split(model, nnx.Param, ...)
    sizes = perm.validate(from_model, params.to_pure_dict())
    assert sizes == {"conv1": 8, "conv2": 12}


def test_spec_is_static_under_jit(mlp):
    model = mlp
    spec = perm.mlp_spec(model)
    state = full_state(model)
    perms = perm.random_permutation(jax.random.key(0), spec, state)
    jitted = jax.jit(perm.apply_permutation)(spec, perms, state)
    chex.assert_trees_all_equal(jitted, perm.apply_permutation(spec, perms, state))


# --------------------------------------------------------------------------
# invert / compose
# --------------------------------------------------------------------------


def test_invert_and_compose(mlp):
    model = mlp
    spec = perm.mlp_spec(model)
    state = full_state(model)
    p = perm.random_permutation(jax.random.key(1), spec, state)
    q = perm.random_permutation(jax.random.key(2), spec, state)
    ident = perm.identity_permutation(spec, state)
    chex.assert_trees_all_equal(perm.compose(perm.invert(p), p), ident)
    chex.assert_trees_all_equal(perm.compose(p, perm.invert(p)), ident)
    chex.assert_trees_all_equal(
        perm.apply_permutation(
            spec, perm.invert(p), perm.apply_permutation(spec, p, state)
        ),
        state,
    )
    # compose(o, i) applies i first, then o.
    chex.assert_trees_all_equal(
        perm.apply_permutation(spec, perm.compose(q, p), state),
        perm.apply_permutation(spec, q, perm.apply_permutation(spec, p, state)),
    )


def test_apply_permutation_closed_form():
    spec = PermutationSpec({"w": ("h", "o"), "b": ("o",)})
    tree = {"w": jnp.arange(6.0).reshape(2, 3), "b": jnp.array([1.0, 2.0, 3.0])}
    out = perm.apply_permutation(
        spec, {"h": jnp.array([1, 0]), "o": jnp.array([2, 0, 1])}, tree
    )
    chex.assert_trees_all_equal(
        out,
        {
            "w": jnp.array([[5.0, 3.0, 4.0], [2.0, 0.0, 1.0]]),
            "b": jnp.array([3.0, 1.0, 2.0]),
        },
    )


# --------------------------------------------------------------------------
# Matching
# --------------------------------------------------------------------------


def random_mlp_params(sizes, seed):
    """A pure-dict MLP with Gaussian kernels and biases (no NNX initialisation)."""
    rng = np.random.default_rng(seed)
    return {
        "layers": {
            i: {
                "kernel": jnp.asarray(rng.normal(size=(a, b)), jnp.float32),
                "bias": jnp.asarray(rng.normal(size=(b,)), jnp.float32),
            }
            for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:]))
        }
    }


@pytest.fixture(scope="module")
def deep_mlp():
    params = random_mlp_params([10, 24, 20, 16, 4], seed=0)
    return perm.mlp_spec(params), params


def test_weight_matching_recovers_planted_permutation(deep_mlp):
    spec, params = deep_mlp
    pi = perm.random_permutation(jax.random.key(11), spec, params)
    result = perm.weight_matching(
        spec, perm.apply_permutation(spec, pi, params), params
    )
    chex.assert_trees_all_equal(result.perms, pi)
    # At the optimum <a, pi(b)> = |a|^2.
    norm2 = sum(float(jnp.vdot(x, x)) for x in jax.tree.leaves(params))
    np.testing.assert_allclose(result.objectives[-1], norm2, rtol=1e-6)


def test_weight_matching_recovers_heads_through_sub_axes(fused):
    model = fused
    # Whole heads only: with head dims too, coordinate descent over the two
    # coupled groups of one leaf can stop at a local optimum.
    spec = perm.vit_block_spec(model)
    _, params, _ = nnx.split(model, nnx.Param, ...)
    params = params.to_pure_dict()
    pi = perm.random_permutation(jax.random.key(12), spec, params)
    found = perm.weight_matching(
        spec, perm.apply_permutation(spec, pi, params), params
    ).perms
    chex.assert_trees_all_equal(found, pi)


def test_weight_matching_objective_never_decreases(deep_mlp):
    spec, params = deep_mlp
    other = random_mlp_params([10, 24, 20, 16, 4], seed=3)
    other = jax.tree.map(lambda x, y: x + 0.7 * y, params, other)
    b = perm.apply_permutation(
        spec, perm.random_permutation(jax.random.key(4), spec, params), other
    )
    result = perm.weight_matching(spec, params, b, seed=5)
    objectives = np.asarray(result.objectives)
    assert result.num_sweeps >= 2 and len(objectives) == result.num_sweeps + 1
    assert np.all(np.diff(objectives) >= -1e-9 * np.abs(objectives[:-1]))
    assert objectives[-1] > objectives[0]
    # The returned objective is the inner product at the returned perms.
    np.testing.assert_allclose(
        objectives[-1],
        perm.matching_objective(spec, result.perms, [(params, b)]),
        rtol=1e-12,
    )
    # Same seed => same result; max_sweeps=1 stops after one sweep.
    again = perm.weight_matching(spec, params, b, seed=5)
    chex.assert_trees_all_equal(again.perms, result.perms)
    assert perm.weight_matching(spec, params, b, max_sweeps=1).num_sweeps == 1


def test_default_start_is_no_worse_than_identity_start(deep_mlp):
    """Without init_perms both starts run and the better objective is kept."""
    spec, params = deep_mlp
    b = random_mlp_params([10, 24, 20, 16, 4], seed=9)
    default = perm.weight_matching(spec, params, b)
    ident = perm.identity_permutation(spec, params)
    from_identity = perm.weight_matching(spec, params, b, init_perms=ident)
    assert default.objectives[-1] >= from_identity.objectives[-1]
    np.testing.assert_allclose(
        from_identity.objectives[0], perm.matching_objective(spec, ident, [(params, b)])
    )


def test_scipy_and_optax_solvers_reach_same_objective():
    # Equal hidden widths: the optax solver compiles once.
    params = random_mlp_params([10, 16, 16, 16, 4], seed=1)
    spec = perm.mlp_spec(params)
    b = random_mlp_params([10, 16, 16, 16, 4], seed=2)
    scipy_result = perm.weight_matching(spec, params, b, solver="scipy", seed=1)
    optax_result = perm.weight_matching(spec, params, b, solver="optax", seed=1)
    np.testing.assert_allclose(
        optax_result.objectives[-1], scipy_result.objectives[-1], rtol=1e-6
    )
    assert scipy_result.objectives[-1] > scipy_result.objectives[0]


def test_gradient_matching_sums_over_pairs():
    """Two pairs that disagree: the sum picks the permutation of the larger one."""
    spec = PermutationSpec({"w": (None, "h")})
    a = {"w": jnp.array([[1.0, 0.0], [0.0, 1.0]])}
    big = {"w": jnp.array([[0.0, 3.0], [3.0, 0.0]])}
    small = {"w": jnp.array([[1.0, 0.0], [0.0, 1.0]])}
    ident = {"h": jnp.arange(2)}
    for init in (None, ident):
        result = perm.gradient_matching(spec, [(a, big), (a, small)], init_perms=init)
        np.testing.assert_array_equal(result.perms["h"], [1, 0])
        # objective = <a, swap(big)> + <a, swap(small)> = 6 + 0
        np.testing.assert_allclose(result.objectives[-1], 6.0)
    # From the identity: <a, big> + <a, small> = 0 + 2.
    np.testing.assert_allclose(result.objectives, [2.0, 6.0, 6.0])


# --------------------------------------------------------------------------
# Bad input: one test per case
# --------------------------------------------------------------------------


def test_validate_rejects_leaf_missing_from_spec():
    spec = PermutationSpec({"a": (None, "h")})
    with pytest.raises(
        ValueError, match="leaf 'b' of the tree is not in the permutation spec"
    ):
        perm.validate(spec, {"a": jnp.zeros((2, 3)), "b": jnp.zeros(3)})


def test_validate_rejects_wrong_rank():
    spec = PermutationSpec({"a": (None, "h")})
    with pytest.raises(ValueError, match="leaf 'a' has 1 axes"):
        perm.validate(spec, {"a": jnp.zeros(3)})


def test_validate_rejects_inconsistent_group_size():
    spec = PermutationSpec({"a": (None, "h"), "b": ("h",)})
    with pytest.raises(
        ValueError,
        match="group 'h' has size 3 at leaf 'a' axis 1 but size 4 at leaf 'b' axis 0",
    ):
        perm.validate(spec, {"a": jnp.zeros((2, 3)), "b": jnp.zeros(4)})


def test_spec_rejects_group_twice_on_one_leaf():
    with pytest.raises(ValueError, match="leaf 'w' carries one group on two axes"):
        PermutationSpec({"w": ("h", "h")})


def test_spec_rejects_non_tuple_entry():
    with pytest.raises(TypeError, match="leaf 'w' needs a tuple"):
        PermutationSpec({"w": "h"})


def test_apply_rejects_missing_group():
    spec = PermutationSpec({"a": ("h",)})
    with pytest.raises(ValueError, match="perms has no entry for group 'h'"):
        perm.apply_permutation(spec, {}, {"a": jnp.zeros(3)})


def test_apply_rejects_non_permutation():
    spec = PermutationSpec({"a": ("h",)})
    with pytest.raises(ValueError, match=r"perms\['h'\] is not a permutation"):
        perm.apply_permutation(spec, {"h": jnp.array([0, 0, 1])}, {"a": jnp.zeros(3)})


def test_matching_rejects_bad_solver():
    spec = PermutationSpec({"a": ("h",)})
    with pytest.raises(ValueError, match="solver must be one of"):
        perm.weight_matching(
            spec, {"a": jnp.zeros(3)}, {"a": jnp.zeros(3)}, solver="lap"
        )


def test_matching_rejects_bad_max_sweeps():
    spec = PermutationSpec({"a": ("h",)})
    with pytest.raises(ValueError, match="max_sweeps must be an int >= 1"):
        perm.weight_matching(
            spec, {"a": jnp.zeros(3)}, {"a": jnp.zeros(3)}, max_sweeps=0
        )


@pytest.mark.parametrize("solver", ["scipy", "optax"])
@pytest.mark.parametrize("side", ["a", "b"])
def test_weight_matching_rejects_nan_naming_the_argument(solver, side):
    # The optax solver used to return a permutation with a NaN objective.
    spec = PermutationSpec({"w": (None, "h"), "v": ("h",)})
    rng = np.random.default_rng(0)
    trees = {
        k: {
            "w": jnp.asarray(rng.normal(size=(2, 3))),
            "v": jnp.asarray(rng.normal(size=3)),
        }
        for k in ("a", "b")
    }
    trees[side]["v"] = trees[side]["v"].at[1].set(jnp.nan)
    with pytest.raises(ValueError, match=rf"^{side} has a non-finite value .* 'v'"):
        perm.weight_matching(spec, trees["a"], trees["b"], solver=solver)


def test_gradient_matching_rejects_inf_naming_the_pair():
    spec = PermutationSpec({"w": ("h",)})
    good, bad = {"w": jnp.arange(3.0)}, {"w": jnp.array([0.0, jnp.inf, 1.0])}
    with pytest.raises(ValueError, match=r"pairs\[1\]\[1\] has a non-finite"):
        perm.gradient_matching(spec, [(good, good), (good, bad)], solver="optax")


def test_matching_under_jit_raises_type_error():
    # Matching runs on the host; traced input is refused with a clear message.
    spec = PermutationSpec({"w": ("h",)})
    x = {"w": jnp.arange(3.0)}
    with pytest.raises(TypeError, match="a is traced at leaf 'w'.*outside jax.jit"):
        jax.jit(lambda a: perm.weight_matching(spec, a, x).objectives[-1])(x)


def test_matching_options_checked_at_construction():
    assert perm.MatchingOptions() == perm.MatchingOptions("scipy", 100, 0)
    with pytest.raises(ValueError, match="solver must be one of"):
        perm.MatchingOptions(solver="lap")
    with pytest.raises(ValueError, match="max_sweeps must be an int >= 1"):
        perm.MatchingOptions(max_sweeps=0)
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="seed must be an int >= 0"):
            perm.MatchingOptions(seed=bad)


def test_validate_checks_perms_against_the_tree():
    spec = PermutationSpec({"a": ("h",), "b": ("k",)})
    tree = {"a": jnp.zeros(3)}
    assert perm.validate(spec, tree, {"h": jnp.array([2, 0, 1])}) == {"h": 3}
    with pytest.raises(ValueError, match=r"perms\['h'\] is not a permutation"):
        perm.validate(spec, tree, {"h": jnp.array([0, 0, 1])})
    with pytest.raises(ValueError, match="no entry for group 'h'"):
        perm.validate(spec, tree, {"k": jnp.arange(3)})


def test_named_leaves_paths_match_spec_paths():
    model = nnx.Sequential(
        nnx.Linear(3, 4, rngs=nnx.Rngs(0)), nnx.Linear(4, 2, rngs=nnx.Rngs(1))
    )
    state = nnx.state(model, nnx.Param)
    names = perm.named_leaves(state)
    assert list(names) == list(perm.named_leaves(state.to_pure_dict()))
    assert set(names) == set(perm.mlp_spec(model).leaf_axes)
    np.testing.assert_array_equal(
        names["layers/0/kernel"], model.layers[0].kernel.value
    )
    with pytest.raises(ValueError, match="share the path 'a/b'"):
        perm.named_leaves({"a/b": 1.0, "a": {"b": 2.0}})


def test_matching_rejects_mismatched_trees():
    spec = PermutationSpec({"a": ("h",), "b": (None,)})
    with pytest.raises(ValueError, match="differs from the first tree"):
        perm.weight_matching(
            spec, {"a": jnp.zeros(3)}, {"a": jnp.zeros(3), "b": jnp.zeros(2)}
        )


def test_builder_rejects_layers_out_of_order(cnn):
    with pytest.raises(
        ValueError, match="norm layer 'bn2' has 12 features but layer 'bn1' gives 8"
    ):
        perm.conv_spec(cnn)


def test_builder_rejects_flatten_before_dense():
    tree = {
        "conv": {"kernel": jnp.zeros((3, 3, 1, 4)), "bias": jnp.zeros(4)},
        "fc": {"kernel": jnp.zeros((64, 2)), "bias": jnp.zeros(2)},
    }
    with pytest.raises(
        ValueError, match="layer 'fc' takes 64 input features but layer 'conv' gives 4"
    ):
        perm.conv_spec(tree)


def test_resnet_rejects_identity_shortcut_with_width_change(resnet):
    model = resnet
    with pytest.raises(ValueError, match="identity shortcut needs equal widths"):
        perm.resnet_spec(
            model,
            stem=("conv", "bn"),
            stages=("stages/0", "stages/1"),
            head=("fc",),
            shortcut=("proj",),
        )


def test_resnet_rejects_unknown_block_layer(resnet):
    model = resnet
    with pytest.raises(ValueError, match="block 'stages/0/0' has no layer"):
        perm.resnet_spec(
            model,
            stem=("conv", "bn"),
            stages=("stages/0",),
            head=("fc",),
            block=("conv1", "norm1"),
        )


def test_vit_rejects_missing_attention(vit):
    model = vit
    with pytest.raises(ValueError, match="no module at 'blocks/0/attn'"):
        perm.vit_block_spec(model, blocks="blocks", attention="attn")


def test_mlp_spec_rejects_conv_layer(cnn):
    with pytest.raises(ValueError, match="layer 'conv1' is a conv layer"):
        perm.mlp_spec(cnn, layers=CNN_LAYERS)
