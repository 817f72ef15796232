"""Slimmable layers and models: sub-networks equal standalone networks."""

from __future__ import annotations

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from optax_wa import slimmable as sl

WIDTHS = (1.0, 0.5)


def _rngs(seed=0):
    # The "rbg" generator compiles much faster than threefry on XLA CPU, which
    # matters for the many small parameter shapes built here.
    return nnx.Rngs(jax.random.key(seed, impl="rbg"))


def _normal(seed, shape):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


def _is_var(x):
    return isinstance(x, nnx.Variable)


def _randomize(model, seed):
    """Random params and random (valid) running statistics, in place."""
    rng = np.random.default_rng(seed)
    params = nnx.state(model, nnx.Param)
    leaves, treedef = jax.tree.flatten(params)
    leaves = [jnp.asarray(0.5 * rng.normal(size=x.shape), x.dtype) for x in leaves]
    nnx.update(model, jax.tree.unflatten(treedef, leaves))
    stats = nnx.state(model, nnx.BatchStat)
    leaves, treedef = jax.tree.flatten(stats)
    leaves = [jnp.asarray(rng.uniform(0.5, 1.5, size=x.shape), x.dtype) for x in leaves]
    nnx.update(model, jax.tree.unflatten(treedef, leaves))
    return model


def _copy_sub_network(wide, narrow, index):
    """Loads into ``narrow`` (trained only at width 1) the width-``index`` weights of ``wide``.

    Shared weights are prefix slices; the per-width variables of switchable
    layers (``norms``/``heads`` lists) come from entry ``index``.
    """

    def copy(w, n):
        if isinstance(n, dict):
            out = {}
            for key, sub in n.items():
                if key in ("norms", "heads"):
                    out[key] = {0: copy(w[key][index], sub[0])}
                else:
                    out[key] = copy(w[key], sub)
            return out
        return jnp.asarray(np.asarray(w)[tuple(slice(0, s) for s in np.shape(n))])

    state = nnx.state(narrow)
    pure = copy(nnx.state(wide).to_pure_dict(), state.to_pure_dict())
    nnx.replace_by_pure_dict(state, pure)
    nnx.update(narrow, state)


def test_slim_size_is_floor_of_scaled_channels():
    assert [sl.slim_size(64, w) for w in (1.0, 0.75, 0.5, 0.25)] == [64, 48, 32, 16]
    assert sl.slim_size(10, 0.7) == 7  # 10 * 0.7 = 7.000000000000001
    assert sl.slim_size(10, 0.29) == 2


@pytest.mark.parametrize("width", [0.0, 1.5, -0.5, True])
def test_slim_size_rejects_width_outside_unit_interval(width):
    with pytest.raises(ValueError, match="width"):
        sl.slim_size(8, width)


def test_slim_size_rejects_empty_prefix():
    with pytest.raises(ValueError, match="keeps no channel"):
        sl.slim_size(3, 0.25)


def test_switchable_layers_reject_duplicate_widths():
    with pytest.raises(ValueError, match="distinct"):
        sl.SwitchableBatchNorm(4, (1.0, 1.0), rngs=_rngs(0))


def test_slimmable_linear_rejects_wrong_input_size():
    layer = sl.SlimmableLinear(8, 4, rngs=_rngs(0))
    with pytest.raises(ValueError, match="expects 4 input features"):
        layer(jnp.ones((2, 8)), width=0.5)


def test_switchable_batch_norm_rejects_untrained_width():
    bn = sl.SwitchableBatchNorm(8, WIDTHS, rngs=_rngs(0))
    with pytest.raises(ValueError, match="calibrate_batch_norm"):
        bn(jnp.ones((2, 6)), width=0.75)


def test_cnn1d_sub_network_equals_plain_flax_network():
    """Width 0.5 == nnx.Conv/BatchNorm/Linear built from the sliced weights.

    The stem reads both input channels at every width and the projection
    output (3) is shared; the plain network is built with Flax's own layers.
    """
    w, in_ch, channels, proj = 0.5, 2, (6, 8), 3
    model = sl.SlimmableCNN1D(
        in_ch, channels, WIDTHS, kernel_size=3, projection_dim=proj, rngs=_rngs(0)
    )
    _randomize(model, 1)
    c1, c2 = (sl.slim_size(c, w) for c in channels)
    rngs = _rngs(5)
    convs = [
        nnx.Conv(in_ch, c1, (3,), strides=1, padding="SAME", use_bias=False, rngs=rngs),
        nnx.Conv(c1, c2, (3,), strides=2, padding="SAME", use_bias=False, rngs=rngs),
    ]
    norms = [nnx.BatchNorm(c, momentum=0.9, rngs=rngs) for c in (c1, c2)]
    fc1, fc2 = nnx.Linear(c2, c2, rngs=rngs), nnx.Linear(c2, proj, rngs=rngs)
    sizes = [(in_ch, c1), (c1, c2)]
    for block, conv, norm, (ni, no) in zip(model.blocks, convs, norms, sizes):
        conv.kernel[...] = block.conv.kernel[:, :ni, :no]
        src = block.norm.norms[1]
        for name in ("scale", "bias", "mean", "var"):
            getattr(norm, name)[...] = getattr(src, name)[...]
    fc1.kernel[...] = model.head.fc1.kernel[:c2, :c2]
    fc1.bias[...] = model.head.fc1.bias[:c2]
    fc2.kernel[...] = model.head.fc2.kernel[:c2, :]
    fc2.bias[...] = model.head.fc2.bias[...]

    def plain(x, use_running_average):
        for conv, norm in zip(convs, norms):
            x = jax.nn.relu(norm(conv(x), use_running_average=use_running_average))
        h = x.mean(axis=1)
        return h, fc2(jax.nn.relu(fc1(h)))

    x = _normal(2, (5, 12, in_ch))
    want_h, want = plain(x, True)
    got_h = model.features(x, width=w, use_running_average=True)
    chex.assert_trees_all_close(got_h, want_h, atol=1e-5, rtol=1e-5)
    for ura in (True, False):
        want = plain(x, ura)[1]
        got = model(x, width=w, use_running_average=ura)
        chex.assert_trees_all_close(got, want, atol=1e-5, rtol=1e-5)
        assert got.shape == (5, proj)
    # The train-mode calls updated the running statistics in the same way.
    for block, norm in zip(model.blocks, norms):
        chex.assert_trees_all_close(
            block.norm.norms[1].mean[...], norm.mean[...], atol=1e-6
        )
        chex.assert_trees_all_close(
            block.norm.norms[1].var[...], norm.var[...], atol=1e-6
        )


def test_attention_sub_network_equals_flax_multi_head_attention():
    embed, heads, head_dim, w = 8, 4, 3, 0.5
    h = sl.slim_size(heads, w)
    attn = sl.SlimmableAttention(embed, heads, head_dim=head_dim, rngs=_rngs(0))
    _randomize(attn, 3)
    ref = nnx.MultiHeadAttention(
        h,
        embed,
        qkv_features=h * head_dim,
        out_features=embed,
        decode=False,
        rngs=_rngs(1),
    )
    for name in ("query", "key", "value"):
        getattr(ref, name).kernel[...] = getattr(attn, name)[:, :h]
        getattr(ref, name).bias[...] = getattr(attn, name + "_bias")[:h]
    ref.out.kernel[...] = attn.out[:h]
    ref.out.bias[...] = attn.out_bias[...]
    x = _normal(4, (2, 5, embed))
    chex.assert_trees_all_close(attn(x, width=w), ref(x), atol=1e-5, rtol=1e-5)


def _mlp(widths, scale=1.0):
    return sl.SlimmableMLP(
        5,
        (int(8 * scale), int(6 * scale)),
        widths,
        projection_dim=3,
        head_hidden=int(6 * scale),
        rngs=_rngs(0),
    )


def _cifar_resnet(widths, scale=1.0):
    return sl.SlimmableResNet(
        (1, 1),
        widths,
        num_filters=int(8 * scale),
        projection_dim=3,
        head_type="simclr",
        rngs=_rngs(0),
    )


def _imagenet_resnet(widths, scale=1.0):
    return sl.SlimmableResNet(
        (1, 1),
        widths,
        block="bottleneck",
        stem="imagenet",
        num_filters=int(4 * scale),
        projection_dim=3,
        rngs=_rngs(0),
    )


def _vit(widths, scale=1.0):
    return sl.SlimmableViT(
        8,
        4,
        8,
        2,
        int(4 * scale),
        int(16 * scale),
        widths,
        head_dim=2,
        projection_dim=3,
        head_hidden=int(8 * scale),
        rngs=_rngs(0),
    )


MODELS = {
    "mlp": (_mlp, (6, 5)),
    "resnet_cifar": (_cifar_resnet, (4, 8, 8, 3)),
    "resnet50_shape": (_imagenet_resnet, (4, 16, 16, 3)),
    "vit": (_vit, (3, 8, 8, 3)),
}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_sub_network_equals_narrow_network_with_sliced_weights(name):
    """Width 0.5 of the wide model == the half-size model loaded with the sliced weights."""
    build, shape = MODELS[name]
    wide = _randomize(build(WIDTHS), 7)
    narrow = build((1.0,), scale=0.5)
    _copy_sub_network(wide, narrow, index=1)
    x = _normal(8, shape)

    @nnx.jit(static_argnums=2)
    def outputs(model, x, width):
        # Eval mode (running statistics), features, then train mode (batch statistics).
        return (
            model(x, width=width, use_running_average=True),
            model.features(x, width=width, use_running_average=True),
            model(x, width=width, use_running_average=False),
        )

    got, want = outputs(wide, x, 0.5), outputs(narrow, x, 1.0)
    chex.assert_trees_all_close(got, want, atol=2e-5, rtol=2e-5)
    assert got[0].shape[-1] == 3  # the shared projection output


def test_width_loss_gradient_is_zero_outside_its_prefix_block():
    w = 0.5
    model = _randomize(_cifar_resnet(WIDTHS), 11)
    probe = sl.SwitchableLinear(model.num_features, 4, WIDTHS, rngs=_rngs(1))
    graphdef, params, rest = nnx.split((model, probe), nnx.Param, ...)
    x = _normal(12, (4, 8, 8, 3))

    def loss(params, rest):
        m, p = nnx.merge(graphdef, params, rest, copy=True)
        return jnp.sum(m(x, width=w) ** 2) + jnp.sum(
            p(m.features(x, width=w), width=w) ** 2
        )

    grads = jax.jit(jax.grad(loss))(params, rest)
    variables = nnx.state((model, probe), nnx.Param)
    checked = 0
    for var, g in zip(
        jax.tree.leaves(variables, is_leaf=_is_var), jax.tree.leaves(grads), strict=True
    ):
        meta = var.get_metadata()
        g = np.asarray(g)
        if "switch_width" in meta:
            if meta["switch_width"] != w:
                np.testing.assert_array_equal(g, 0.0)
            else:
                assert np.any(g != 0)
            continue
        block = tuple(
            slice(0, sl.slim_size(n, w))
            if a in meta.get("slim_axes", ())
            else slice(None)
            for a, n in enumerate(g.shape)
        )
        inside = np.zeros(g.shape, bool)
        inside[block] = True
        np.testing.assert_array_equal(g[~inside], 0.0)
        assert np.any(g[inside] != 0), var
        checked += 1
    assert checked == 9  # stem, 5 block convs, head fc1 kernel, fc2 kernel and bias


def test_train_call_changes_only_that_widths_statistics():
    widths = (1.0, 0.75, 0.5, 0.25)
    model = sl.SlimmableMLP(3, (8, 8), widths, projection_dim=None, rngs=_rngs(0))
    x = _normal(0, (6, 3))

    @nnx.jit(static_argnums=(2, 3))
    def call(model, x, width, use_running_average):
        model(x, width=width, use_running_average=use_running_average)

    for w in widths:
        before = nnx.clone(nnx.state(model, nnx.BatchStat))
        call(model, x, w, False)
        after = nnx.state(model, nnx.BatchStat)
        for layer_before, layer_after in zip(
            (b["norm"]["norms"] for b in before["blocks"].values()),
            (b["norm"]["norms"] for b in after["blocks"].values()),
        ):
            for i, v in enumerate(widths):
                for stat in ("mean", "var"):
                    old = np.asarray(layer_before[i][stat][...])
                    new = np.asarray(layer_after[i][stat][...])
                    if v == w:
                        assert np.any(old != new)
                    else:
                        np.testing.assert_array_equal(old, new)
    # An eval-mode call changes nothing.
    before = nnx.clone(nnx.state(model, nnx.BatchStat))
    call(model, x, 0.5, True)
    chex.assert_trees_all_equal(before, nnx.state(model, nnx.BatchStat))


def test_all_widths_variables_exist_after_init():
    widths = (1.0, 0.75, 0.5, 0.25)
    model, probe = nnx.eval_shape(
        lambda: (
            sl.SlimmableCNN1D(1, (16, 32), widths, projection_dim=4, rngs=_rngs(0)),
            sl.SwitchableLinear(32, 10, widths, rngs=_rngs(0)),
        )
    )
    for block, channels in zip(model.blocks, (16, 32)):
        assert block.norm.widths == widths
        for norm, w in zip(block.norm.norms, widths):
            n = sl.slim_size(channels, w)
            for name in ("scale", "bias", "mean", "var"):
                assert getattr(norm, name).shape == (n,)
            assert norm.scale.get_metadata()["switch_width"] == w
    assert [h.kernel.shape for h in probe.heads] == [
        (32, 10),
        (24, 10),
        (16, 10),
        (8, 10),
    ]


def test_resnet50_has_torchvision_parameter_count():
    """Full-width weights + BN affine of ResNet-50 without fc: 23,508,032 (torchvision)."""
    model = nnx.eval_shape(
        lambda: sl.slimmable_resnet50((1.0, 0.5), projection_dim=None, rngs=_rngs(0))
    )
    full = 0
    for var in jax.tree.leaves(nnx.state(model, nnx.Param), is_leaf=_is_var):
        if var.get_metadata().get("switch_width", 1.0) == 1.0:
            full += math.prod(var.shape)
    assert full == 23_508_032
    assert model.num_features == 2048 and model.feature_dim(0.5) == 1024


def test_calibrate_batch_norm_sets_population_statistics_for_new_width():
    model = _randomize(
        sl.SlimmableMLP(4, (8,), WIDTHS, projection_dim=None, rngs=_rngs(0)), 3
    )
    old_stats = nnx.clone(nnx.state(model, nnx.BatchStat))
    old_params = nnx.clone(nnx.state(model, nnx.Param))
    data = [_normal(i, (n, 4)) for i, n in enumerate((16, 8, 24))]
    sl.calibrate_batch_norm(model, 0.75, data)
    norm_layer = model.blocks[0].norm
    assert norm_layer.widths == (1.0, 0.5, 0.75)
    new = norm_layer.norm(0.75)
    # Population moments of the layer's input over all 48 rows.
    kernel = np.asarray(model.blocks[0].linear.kernel[...])[:, :6]
    h = np.concatenate([np.asarray(x) for x in data]) @ kernel
    np.testing.assert_allclose(new.mean[...], h.mean(0), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(new.var[...], h.var(0), rtol=1e-4, atol=1e-5)
    # Affine parameters: the prefix of the narrowest wider trained width (1.0).
    np.testing.assert_array_equal(new.scale[...], norm_layer.norms[0].scale[:6])
    np.testing.assert_array_equal(new.bias[...], norm_layer.norms[0].bias[:6])
    # Nothing else moved.
    for i in range(2):
        chex.assert_trees_all_equal(
            nnx.state(norm_layer.norms[i], nnx.BatchStat),
            old_stats["blocks"][0]["norm"]["norms"][i],
        )
    chex.assert_trees_all_equal(
        nnx.state(model.blocks[0].linear, nnx.Param), old_params["blocks"][0]["linear"]
    )
    # The calibrated width runs in eval mode.
    assert model(data[0], width=0.75, use_running_average=True).shape == (16, 6)


@pytest.mark.parametrize(
    "build, match",
    [
        (
            lambda: sl.SlimmableResNet((1,), WIDTHS, block="dense", rngs=_rngs()),
            "block",
        ),
        (lambda: sl.SlimmableResNet((1,), WIDTHS, stem="tiny", rngs=_rngs()), "stem"),
        (
            lambda: sl.SlimmableCNN1D(1, (4, 8), WIDTHS, strides=(1,), rngs=_rngs()),
            "strides",
        ),
        (
            lambda: sl.SlimmableViT(10, 4, 8, 1, 2, 8, WIDTHS, rngs=_rngs()),
            "patch_size",
        ),
        (lambda: sl.SlimmableConv(2, 4, (1, 1, 1, 1), rngs=_rngs()), "kernel_size"),
        (lambda: sl.SwitchableLinear(4, 2, (), rngs=_rngs()), "non-empty"),
    ],
    ids=[
        "resnet_block",
        "resnet_stem",
        "cnn_strides",
        "vit_patch",
        "conv_dims",
        "no_widths",
    ],
)
def test_builders_reject_bad_arguments(build, match):
    with pytest.raises(ValueError, match=match):
        build()


def test_add_width_rejects_a_trained_width():
    bn = sl.SwitchableBatchNorm(4, WIDTHS, rngs=_rngs())
    with pytest.raises(ValueError, match="already has"):
        bn.add_width(0.5)


def test_calibrate_batch_norm_rejects_model_without_switchable_norms():
    with pytest.raises(ValueError, match="no SwitchableBatchNorm"):
        sl.calibrate_batch_norm(
            sl.SlimmableLinear(2, 2, rngs=_rngs()), 0.5, [jnp.ones((2, 2))]
        )


# ----------------------------------------------------------------------------
# Stride-2 blocks against a NumPy re-implementation of the released PyTorch
# blocks (3x3 convolutions with padding=1, 1x1 shortcuts with padding=0).


def _np_conv(x, kernel, stride, pad):
    """NHWC x HWIO convolution with ``pad`` zeros on every side (PyTorch's ``padding``)."""
    x = np.pad(x, ((0, 0), (pad[0], pad[1]), (pad[0], pad[1]), (0, 0)))
    kh, kw = kernel.shape[:2]
    oh = (x.shape[1] - kh) // stride + 1
    ow = (x.shape[2] - kw) // stride + 1
    out = np.zeros((x.shape[0], oh, ow, kernel.shape[3]))
    for i in range(kh):
        for j in range(kw):
            patch = x[:, i : i + stride * oh : stride, j : j + stride * ow : stride]
            out += patch @ kernel[i, j]
    return out


def _np_bn(x, norm, eps=1e-5):
    """Eval-mode BatchNorm with the module's (randomized) statistics and affine."""
    a = lambda v: np.asarray(v[...], np.float64)  # noqa: E731
    return (x - a(norm.mean)) / np.sqrt(a(norm.var) + eps) * a(norm.scale) + a(
        norm.bias
    )


def _np_slim_conv(conv, x, width, stride, pad):
    n_in, n_out = conv.sizes(width)
    kernel = np.asarray(conv.kernel[...], np.float64)[..., :n_in, :n_out]
    return _np_conv(x, kernel, stride, pad)


def _np_block(block, x, width, bottleneck, pad):
    """The released BasicBlock / Bottleneck (torchvision v1.5) in NumPy, eval mode."""
    relu = lambda v: np.maximum(v, 0.0)  # noqa: E731

    def bn(norm, y):
        return _np_bn(y, norm.norm(width))

    if bottleneck:
        y = relu(bn(block.bn1, _np_slim_conv(block.conv1, x, width, 1, (0, 0))))
        y = relu(bn(block.bn2, _np_slim_conv(block.conv2, y, width, 2, pad)))
        y = bn(block.bn3, _np_slim_conv(block.conv3, y, width, 1, (0, 0)))
    else:
        y = relu(bn(block.bn1, _np_slim_conv(block.conv1, x, width, 2, pad)))
        y = bn(block.bn2, _np_slim_conv(block.conv2, y, width, 1, (1, 1)))
    shortcut = bn(block.proj_bn, _np_slim_conv(block.proj, x, width, 2, (0, 0)))
    return relu(shortcut + y)


@pytest.mark.parametrize("block_cls", [sl.resnet.BasicBlock, sl.resnet.Bottleneck])
@pytest.mark.parametrize("size", [8, 7])
def test_stride2_block_equals_released_padding(block_cls, size):
    """A stride-2 block == NumPy with padding (1, 1) (not Flax "SAME"'s (0, 1)).

    All BN scales are random (the zero-initialized last scale would hide the
    residual branch); even and odd input sizes, both widths.
    """
    bottleneck = block_cls is sl.resnet.Bottleneck
    block = _randomize(block_cls(8, 4, 2, WIDTHS, rngs=_rngs(0)), 3)
    for width in WIDTHS:
        c_in = sl.slim_size(8, width)
        x = np.asarray(_normal(size + int(10 * width), (2, size, size, c_in)))
        got = np.asarray(block(jnp.asarray(x), width, True))
        want = _np_block(block, x.astype(np.float64), width, bottleneck, (1, 1))
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
        if size % 2 == 0:
            # The test can tell the paddings apart: "SAME" would pad (0, 1) here.
            same = _np_block(block, x.astype(np.float64), width, bottleneck, (0, 1))
            assert np.max(np.abs(same - want)) > 0.1


def test_cifar_example_stride2_block_equals_released_padding():
    """The CIFAR example's ResNet/WRN blocks pad their 3x3 convolutions by 1 too."""
    pytest.importorskip("ml_collections")  # the examples extra
    from examples.cifar import models as cifar_models

    rng = np.random.default_rng(5)
    x = rng.normal(size=(2, 8, 8, 4))
    relu = lambda v: np.maximum(v, 0.0)  # noqa: E731
    a = lambda v: np.asarray(v[...], np.float64)  # noqa: E731

    block = _randomize(
        cifar_models.BasicBlock(4, 6, 2, dtype=jnp.float32, rngs=_rngs(1)), 4
    )
    got = np.asarray(block(jnp.asarray(x, jnp.float32), train=False))
    for pad, check in (((1, 1), True), ((0, 1), False)):
        y = relu(_np_bn(_np_conv(x, a(block.conv1.kernel), 2, pad), block.bn1))
        y = _np_bn(_np_conv(y, a(block.conv2.kernel), 1, (1, 1)), block.bn2)
        s = _np_bn(_np_conv(x, a(block.shortcut.kernel), 2, (0, 0)), block.shortcut_bn)
        want = relu(s + y)
        if check:
            np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
        else:
            assert np.max(np.abs(got - want)) > 0.1

    wide = _randomize(
        cifar_models.WideBlock(4, 6, 2, dtype=jnp.float32, rngs=_rngs(2)), 6
    )
    got = np.asarray(wide(jnp.asarray(x, jnp.float32), train=False))
    y = relu(_np_bn(x, wide.bn1))
    want = _np_conv(y, a(wide.shortcut.kernel), 2, (0, 0)) + _np_conv(
        relu(_np_bn(_np_conv(y, a(wide.conv1.kernel), 2, (1, 1)), wide.bn2)),
        a(wide.conv2.kernel),
        1,
        (1, 1),
    )
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------
# Projection heads as released.


def _np_bn_train(x, norm, eps=1e-5):
    """Train-mode BatchNorm: batch mean and biased variance, then the affine (if any)."""
    y = (x - x.mean(0)) / np.sqrt(x.var(0) + eps)
    if norm.scale is not None:
        y = y * np.asarray(norm.scale[...], np.float64)
    if norm.bias is not None:
        y = y + np.asarray(norm.bias[...], np.float64)
    return y


@pytest.mark.parametrize("kind", ["simclr", "mocov3", "predictor", "mocov2"])
def test_projection_head_equals_released_numpy_head(kind):
    """Train-mode head == NumPy ``Linear -> [BN] -> ReLU -> Linear -> [BN]`` per kind."""
    slice_input = kind != "predictor"
    head = _randomize(
        sl.SlimmableProjectionHead(
            8, 12, 5, WIDTHS, slice_input=slice_input, kind=kind, rngs=_rngs(0)
        ),
        11,
    )
    # The released layers: which biases and BNs exist.
    has = {
        "simclr": (True, True, False, "affine"),
        "mocov3": (False, True, False, "plain"),
        "predictor": (False, True, False, None),
        "mocov2": (True, False, True, None),
    }[kind]
    assert (head.fc1.bias is not None, head.norm is not None) == has[:2]
    assert (head.fc2.bias is not None) == has[2]
    if has[3] is None:
        assert head.out_norm is None
    else:
        assert head.out_norm.widths == WIDTHS
        assert (head.out_norm.norm(0.5).scale is not None) == (has[3] == "affine")
    a = lambda v: np.asarray(v[...], np.float64)  # noqa: E731
    for width in WIDTHS:
        n_in = sl.slim_size(8, width) if slice_input else 8
        n_hid = sl.slim_size(12, width)
        x = np.asarray(_normal(int(4 * width), (6, n_in)), np.float64)
        got = np.asarray(head(jnp.asarray(x, jnp.float32), width, False))
        h = x @ a(head.fc1.kernel)[:n_in, :n_hid]
        if has[0]:
            h = h + a(head.fc1.bias)[:n_hid]
        if has[1]:
            h = _np_bn_train(h, head.norm.norm(width))
        z = np.maximum(h, 0.0) @ a(head.fc2.kernel)[:n_hid]
        if has[2]:
            z = z + a(head.fc2.bias)
        if has[3] is not None:
            z = _np_bn_train(z, head.out_norm.norm(width))
        np.testing.assert_allclose(got, z, atol=2e-5, rtol=2e-5)
        if has[3] == "plain":
            # No affine: every output column is standardized over the batch.
            np.testing.assert_allclose(got.mean(0), 0.0, atol=1e-5)


def test_projection_head_rejects_unknown_kind():
    with pytest.raises(ValueError, match="kind"):
        sl.SlimmableProjectionHead(4, 4, 2, WIDTHS, kind="byol", rngs=_rngs(0))
