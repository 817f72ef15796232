"""Time per head-step of a Lookaround ensemble step, per way of mapping members.

Two models (``--model``):

* ``cnn`` (default): a small CNN (conv 3->32->64->128, 3x3, ReLU and 2x2
  max-pool after each, global mean pool, dense 128->10: 94,538 params);
  ``--pool reshape`` writes its max pools as a reshape and a max instead of
  ``lax.reduce_window`` (the same maxima and gradients, a faster gradient
  on XLA:CPU);
* ``resnet20``: a CIFAR ResNet-20 (3x3 stem conv to 16 channels, then 3
  stages of 3 BasicBlocks with 16/32/64 channels, the first block of stages 2
  and 3 with stride 2; 3x3 convs without bias, padded by 1 on each side as
  PyTorch pads (a stride-2 conv included); each conv followed by BatchNorm;
  where the shape changes, the shortcut is a 1x1 stride-2 conv + BatchNorm,
  as the BasicBlock of the released Lookaround code's ``models/resnet.py``
  (that repository has no ResNet-20 of its own); global mean pool, dense
  64->10: 272,474 params). ``--width`` sets the first stage's channels
  (16). BatchNorm runs in training mode on the batch statistics (biased
  variance, eps 1e-5) and keeps no running statistics, on both sides (JAX:
  a functional normalization; PyTorch: ``F.batch_norm(..., training=True)``
  without running buffers): the step depends only on params and batch.

32x32x3 inputs, batch 64 per member, 3 members,
``optax_wa.lookaround(inner, sync_period=5)`` with ``inner`` SGD with
learning rate 0.1 and momentum 0.9 (``optax.sgd(0.1, momentum=0.9)``; for
``resnet20`` with the released code's weight decay 5e-4 added to the
gradient first, ``optax.chain(optax.add_decayed_weights(5e-4), ...)``).
Contestants, timed side by side in one process over interleaved rounds of
``--steps`` ensemble steps (every other round in reverse order):

* ``map_members`` in each mode (``vmap``, ``sequential``), the members'
  gradients computed by :func:`optax_wa.members.map_members`;
* the same with the member axis split over 2 host devices (only when the
  process has 2 devices, ``XLA_FLAGS=--xla_force_host_platform_device_count=2``,
  and the member count is even);
* one JAX model with the inner optimizer alone (a head-step is one step);
* when ``torch`` is importable (not a dependency): a PyTorch loop in the
  released Lookaround's manner -- one model whose weights are swapped for
  each head in turn, a forward/backward and an SGD-momentum step (weight
  decay included) per head, the heads replaced by their average every
  ``sync_period`` steps (each head keeps its own momentum). The update uses
  ``torch._foreach_*`` ops (the released code loops over tensors: slower).

Prints the median ms per head-step, the median per-round ratio to the
PyTorch loop (or to the single JAX model without torch) with quartiles, and
the peak memory of each compiled JAX step (``memory_analysis()``: arguments
+ outputs + temporaries - aliased)::

    python benchmarks/ensemble_step.py [--model cnn|resnet20] [--members 3]
        [--batch 64] [--rounds 7] [--steps 5] [--smoke] [--check] [--profile]
        [--conv-layout nhwc|nchw] [--pool reduce_window|reshape]

``--smoke``: tiny settings (CNN channels 3->4->8->8, ResNet-20 width 4,
batch 8, 2 rounds), without torch.

``--check`` (needs torch): from the same params and batches, one ensemble
step in float32, and ``sync_period`` steps (the average included) in
float64, in each JAX mode and in the PyTorch loop; prints the largest
absolute difference of the params and exits 1 above 1e-4.

``--profile`` (needs torch for the PyTorch column): where one model's
head-step spends its time, JAX against PyTorch on one member's batch:
forward (loss), forward + backward (gradient), the optimizer update, and
every convolution of the model timed alone (forward, input gradient, weight
gradient; grouped by shape), the rest of forward + backward being the
gradient's time less the convolutions'. ``--conv-layout nchw`` times each
convolution alone in NCHW images and OIHW kernels instead (the models and
their rows stay NHWC, so "rest" is then not meaningful).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

if "--smoke" in sys.argv:
    # Compiling dominates a smoke run: skip LLVM's optimizations.
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0"
    ).strip()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import optax_wa  # noqa: E402
from optax_wa import members  # noqa: E402

CHANNELS = (32, 64, 128)
RESNET_WIDTH = 16
NUM_CLASSES = 10
LR, MOMENTUM, SYNC = 0.1, 0.9, 5
WEIGHT_DECAY = {"cnn": 0.0, "resnet20": 5e-4}
BN_EPS = 1e-5
CHECK_TOL = 1e-4

# (shape of x, shape of w, stride, padding) of every convolution traced while
# this is a list (``--profile``).
_CONV_LOG: list | None = None
_POOL_LOG: list | None = None  # input shapes of the max pools, the same way


# Dimension numbers of the models' convolutions, and of the alternative
# layout that ``--profile --conv-layout nchw`` times each convolution in.
LAYOUTS = {"nhwc": ("NHWC", "HWIO", "NHWC"), "nchw": ("NCHW", "OIHW", "NCHW")}


def _conv(x, w, stride, padding, layout="nhwc"):
    if _CONV_LOG is not None:
        _CONV_LOG.append((tuple(x.shape), tuple(w.shape), stride, padding))
    return jax.lax.conv_general_dilated(
        x, w, (stride, stride), padding, dimension_numbers=LAYOUTS[layout]
    )


# How the CNN's 2x2 max pools are written (``--pool``): "reduce_window", as
# Flax's ``nnx.max_pool`` writes them, or "reshape": the same maxima over a
# reshape, whose gradient XLA:CPU computes elementwise instead of with the
# much slower ``select_and_scatter`` (the same gradients: they differ only
# where a window holds tied maxima, after a ReLU only at 0, where no gradient
# flows back).
POOL = {"mode": "reduce_window"}


def _max_pool(x):
    """2x2 max pooling, stride 2, NHWC (``F.max_pool2d(x, 2)``)."""
    if _POOL_LOG is not None:
        _POOL_LOG.append(tuple(x.shape))
    if POOL["mode"] == "reshape":
        n, h, w, c = x.shape
        return x.reshape(n, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))
    return jax.lax.reduce_window(
        x, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID"
    )


def init_cnn(key, channels=CHANNELS):
    """He-normal conv kernels (HWIO), zero biases, a dense head."""
    params, c_in = {}, 3
    keys = jax.random.split(key, len(channels) + 1)
    for i, c in enumerate(channels):
        std = (2.0 / (9 * c_in)) ** 0.5
        params[f"conv{i}"] = {
            "w": std * jax.random.normal(keys[i], (3, 3, c_in, c)),
            "b": jnp.zeros((c,)),
        }
        c_in = c
    params["head"] = {
        "w": (1.0 / c_in) ** 0.5 * jax.random.normal(keys[-1], (c_in, NUM_CLASSES)),
        "b": jnp.zeros((NUM_CLASSES,)),
    }
    return params


def cnn_apply(params, x):
    """NHWC forward pass of the CNN."""
    for i in range(len(params) - 1):
        layer = params[f"conv{i}"]
        x = _max_pool(jax.nn.relu(_conv(x, layer["w"], 1, "SAME") + layer["b"]))
    return x.mean(axis=(1, 2)) @ params["head"]["w"] + params["head"]["b"]


def resnet20_blocks(width=RESNET_WIDTH):
    """(name, input channels, output channels, stride) of the 9 BasicBlocks."""
    blocks, c_in = [], width
    for stage, c in enumerate((width, 2 * width, 4 * width)):
        for block in range(3):
            stride = 2 if stage > 0 and block == 0 else 1
            blocks.append((f"stage{stage}_block{block}", c_in, c, stride))
            c_in = c
    return blocks


def init_resnet20(key, width=RESNET_WIDTH):
    """He-normal conv kernels (HWIO, no bias), BatchNorm scale 1 and bias 0."""
    keys = iter(jax.random.split(key, 64))

    def conv(k, c_in, c_out):
        std = (2.0 / (k * k * c_in)) ** 0.5
        return std * jax.random.normal(next(keys), (k, k, c_in, c_out))

    def bn(c):
        return {"scale": jnp.ones((c,)), "bias": jnp.zeros((c,))}

    params = {"stem": {"conv": conv(3, 3, width), "bn": bn(width)}}
    for name, c_in, c, stride in resnet20_blocks(width):
        block = {
            "conv1": conv(3, c_in, c),
            "bn1": bn(c),
            "conv2": conv(3, c, c),
            "bn2": bn(c),
        }
        if stride != 1 or c_in != c:
            block["short_conv"] = conv(1, c_in, c)
            block["short_bn"] = bn(c)
        params[name] = block
    c = 4 * width
    params["head"] = {
        "w": (1.0 / c) ** 0.5 * jax.random.normal(next(keys), (c, NUM_CLASSES)),
        "b": jnp.zeros((NUM_CLASSES,)),
    }
    return params


def batch_norm(x, p):
    """Training-mode BatchNorm over (N, H, W): the batch's mean and biased
    variance, no running statistics."""
    mean = x.mean(axis=(0, 1, 2))
    var = x.var(axis=(0, 1, 2))
    return (x - mean) * jax.lax.rsqrt(var + BN_EPS) * p["scale"] + p["bias"]


def resnet20_apply(params, x):
    """NHWC forward pass of the ResNet-20."""
    pad = ((1, 1), (1, 1))  # as PyTorch's padding=1, stride 2 included
    stem = params["stem"]
    x = jax.nn.relu(batch_norm(_conv(x, stem["conv"], 1, pad), stem["bn"]))
    width = stem["conv"].shape[-1]
    for name, _, _, stride in resnet20_blocks(width):
        p = params[name]
        out = jax.nn.relu(batch_norm(_conv(x, p["conv1"], stride, pad), p["bn1"]))
        out = batch_norm(_conv(out, p["conv2"], 1, pad), p["bn2"])
        if "short_conv" in p:
            x = batch_norm(_conv(x, p["short_conv"], stride, "VALID"), p["short_bn"])
        x = jax.nn.relu(out + x)
    return x.mean(axis=(1, 2)) @ params["head"]["w"] + params["head"]["b"]


APPLY = {"cnn": cnn_apply, "resnet20": resnet20_apply}


def make_loss(model):
    apply = APPLY[model]

    def loss_fn(params, x, y):
        logits = apply(params, x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    return loss_fn


def inner_optimizer(model):
    """SGD with momentum, after the released code's weight decay if any."""
    sgd = optax.sgd(LR, momentum=MOMENTUM)
    wd = WEIGHT_DECAY[model]
    return optax.chain(optax.add_decayed_weights(wd), sgd) if wd else sgd


def peak_bytes(compiled) -> int:
    m = compiled.memory_analysis()
    if m is None:
        return -1
    return (
        m.argument_size_in_bytes
        + m.output_size_in_bytes
        + m.temp_size_in_bytes
        - m.alias_size_in_bytes
    )


def ensemble_step(model, mode):
    """The Lookaround optimizer and one ensemble step (not jitted)."""
    opt = optax_wa.lookaround(inner_optimizer(model), sync_period=SYNC)
    grad = members.map_members(jax.grad(make_loss(model)), mode=mode)

    def step(params, state, x, y):
        grads = grad(params, x, y)
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    return opt, step


def jax_ensemble(model, mode, params, x, y, mesh=None):
    """A runner of Lookaround steps with members mapped by ``mode``.

    ``run(steps)`` takes ``steps`` ensemble steps; ``run.params()`` returns
    the current params.
    """
    opt, step = ensemble_step(model, mode)
    step = jax.jit(step, donate_argnums=(0, 1))
    params = jax.tree.map(jnp.copy, params)  # donated: each runner owns its copy
    if mesh is not None:
        with jax.set_mesh(mesh):
            params, x, y = members.shard_members((params, x, y), mesh)
            state = jax.jit(opt.init)(params)
            compiled = step.lower(params, state, x, y).compile()
    else:
        state = opt.init(params)
        compiled = step.lower(params, state, x, y).compile()
    carry = [params, state]

    def run(steps):
        p, s = carry
        for _ in range(steps):
            p, s = compiled(p, s, x, y)
        jax.block_until_ready(p)
        carry[:] = [p, s]

    run.params = lambda: carry[0]
    return run, peak_bytes(compiled)


def jax_single(model, params, x, y):
    opt = inner_optimizer(model)
    loss_fn = make_loss(model)
    p0 = jax.tree.map(lambda a: jnp.copy(a[0]), params)

    def step(p, s, x, y):
        g = jax.grad(loss_fn)(p, x, y)
        u, s = opt.update(g, s, p)
        return optax.apply_updates(p, u), s

    state = opt.init(p0)
    compiled = (
        jax.jit(step, donate_argnums=(0, 1)).lower(p0, state, x[0], y[0]).compile()
    )
    carry = [p0, state]

    def run(steps):
        p, s = carry
        for _ in range(steps):
            p, s = compiled(p, s, x[0], y[0])
        jax.block_until_ready(p)
        carry[:] = [p, s]

    return run, peak_bytes(compiled)


# ---------------------------------------------------------------------------
# PyTorch twins. A param tree has the JAX tree's structure with torch tensors
# as leaves: conv kernels HWIO -> OIHW, dense (in, out) -> (out, in).


def to_torch_layout(a):
    import torch

    a = np.asarray(a)
    if a.ndim == 4:
        a = a.transpose(3, 2, 0, 1)
    elif a.ndim == 2:
        a = a.T
    return torch.tensor(np.ascontiguousarray(a))


def from_torch_layout(t):
    a = t.detach().numpy()
    if a.ndim == 4:
        a = a.transpose(2, 3, 1, 0)
    elif a.ndim == 2:
        a = a.T
    return np.ascontiguousarray(a)


def torch_cnn(ws, x):
    """NCHW forward pass of the CNN (same computation as :func:`cnn_apply`)."""
    import torch.nn.functional as F

    for i in range(len(ws) - 1):
        layer = ws[f"conv{i}"]
        x = F.max_pool2d(F.relu(F.conv2d(x, layer["w"], layer["b"], padding=1)), 2)
    return F.linear(x.mean(dim=(2, 3)), ws["head"]["w"], ws["head"]["b"])


def torch_resnet20(ws, x):
    """NCHW forward pass of the ResNet-20 (same computation as
    :func:`resnet20_apply`): BatchNorm on the batch's statistics, no running
    buffers."""
    import torch.nn.functional as F

    def bn(x, p):
        return F.batch_norm(
            x, None, None, p["scale"], p["bias"], training=True, eps=BN_EPS
        )

    x = F.relu(bn(F.conv2d(x, ws["stem"]["conv"], padding=1), ws["stem"]["bn"]))
    width = ws["stem"]["conv"].shape[0]
    for name, _, _, stride in resnet20_blocks(width):
        p = ws[name]
        out = F.relu(bn(F.conv2d(x, p["conv1"], stride=stride, padding=1), p["bn1"]))
        out = bn(F.conv2d(out, p["conv2"], padding=1), p["bn2"])
        if "short_conv" in p:
            x = bn(F.conv2d(x, p["short_conv"], stride=stride), p["short_bn"])
        x = F.relu(out + x)
    return F.linear(x.mean(dim=(2, 3)), ws["head"]["w"], ws["head"]["b"])


TORCH_APPLY = {"cnn": torch_cnn, "resnet20": torch_resnet20}


def torch_lookaround(model, params, x, y, threads):
    """The released Lookaround loop's logic in PyTorch: one model, heads cycled.

    Each head keeps its own weights and momentum; a head-step swaps the
    head's weights into the model, runs forward/backward on the head's batch
    and takes an SGD-momentum step (weight decay added to the gradient
    first, as ``torch.optim.SGD`` does); every ``SYNC`` steps all heads are
    set to their average. ``run.params()`` returns the heads stacked as a JAX
    tree.
    """
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(threads)
    forward = TORCH_APPLY[model]
    wd = WEIGHT_DECAY[model]
    leaves, treedef = jax.tree.flatten(params)
    num = x.shape[0]
    heads = [[to_torch_layout(leaf[m]) for leaf in leaves] for m in range(num)]
    weights = [t.clone().requires_grad_(True) for t in heads[0]]
    net = jax.tree.unflatten(treedef, weights)  # the model the heads swap into
    bufs = [[torch.zeros_like(t) for t in h] for h in heads]
    xs = [
        torch.tensor(np.asarray(x[m]).transpose(0, 3, 1, 2).copy()) for m in range(num)
    ]
    ys = [torch.tensor(np.asarray(y[m])).long() for m in range(num)]
    counter = [0]

    def run(steps):
        for _ in range(steps):
            for h in range(num):
                with torch.no_grad():
                    for p, w in zip(weights, heads[h]):
                        p.data = w
                loss = F.cross_entropy(forward(net, xs[h]), ys[h])
                grads = torch.autograd.grad(loss, weights)
                with torch.no_grad():
                    if wd:
                        grads = torch._foreach_add(grads, heads[h], alpha=wd)
                    torch._foreach_mul_(bufs[h], MOMENTUM)
                    torch._foreach_add_(bufs[h], grads)
                    torch._foreach_add_(heads[h], bufs[h], alpha=-LR)
            counter[0] += 1
            if counter[0] % SYNC == 0:
                with torch.no_grad():
                    for k in range(len(heads[0])):
                        mean = torch.stack([h[k] for h in heads]).mean(0)
                        for h in heads:
                            h[k].copy_(mean)

    def current():
        return jax.tree.unflatten(
            treedef,
            [
                np.stack([from_torch_layout(h[k]) for h in heads])
                for k in range(len(leaves))
            ],
        )

    run.params = current
    return run


# ---------------------------------------------------------------------------
# --check and --profile


def _max_diff(a, b) -> float:
    return max(
        float(np.max(np.abs(np.asarray(u) - v)))
        for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b))
    )


def check(model, params, x, y, threads) -> bool:
    """JAX modes against the PyTorch loop from the same params and batches.

    One ensemble step in float32; then ``SYNC`` steps (the average included)
    in float64, where rounding differences are too small for the training
    dynamics to amplify them into the comparison (in float32 they grow by
    orders of magnitude over a few steps of a narrow network).
    """
    ok = True
    for dtype, steps in ((jnp.float32, 1), (jnp.float64, SYNC)):
        jax.config.update("jax_enable_x64", dtype == jnp.float64)
        p, xd = jax.tree.map(lambda a, t=dtype: jnp.asarray(a, t), (params, x))
        runners = {
            mode: jax_ensemble(model, mode, p, xd, y)[0]
            for mode in ("vmap", "sequential")
        }
        runners["PyTorch"] = torch_lookaround(model, p, xd, y, threads)
        for run in runners.values():
            run(steps)
        ref = runners["PyTorch"].params()
        scale = max(float(np.max(np.abs(b))) for b in jax.tree.leaves(ref))
        for mode in ("vmap", "sequential"):
            diff = _max_diff(runners[mode].params(), ref)
            ok &= diff <= CHECK_TOL
            print(
                f"check {model}: {np.dtype(dtype).name}, after {steps} step(s), "
                f"{mode} vs PyTorch: max |diff| {diff:.2e} (params up to "
                f"{scale:.2f}; tolerance {CHECK_TOL:.0e})"
            )
    jax.config.update("jax_enable_x64", False)
    return ok


def _median_ms(fns, reps):
    """Median ms of each callable over ``reps`` interleaved calls (after one
    warm-up call each; every other round in reverse order)."""
    for fn in fns:
        fn()
    times = [[] for _ in fns]
    order = list(range(len(fns)))
    for r in range(reps):
        for i in order if r % 2 == 0 else order[::-1]:
            t0 = time.perf_counter()
            fns[i]()
            times[i].append((time.perf_counter() - t0) * 1e3)
    return [float(np.median(t)) for t in times]


def _jax_conv_pieces(stride, padding, layout="nhwc"):
    """A convolution's forward, input gradient and weight gradient."""

    def forward(a, w):
        return _conv(a, w, stride, padding, layout)

    def input_grad(a, w, g):
        return jax.vjp(lambda a: forward(a, w), a)[1](g)[0]

    def weight_grad(a, w, g):
        return jax.vjp(lambda w: forward(a, w), w)[1](g)[0]

    return forward, input_grad, weight_grad


def _torch_conv_pieces(ta, tw, tg, stride, pad):
    """The same three pieces in PyTorch (autograd's own backward kernel)."""
    import torch
    import torch.nn.functional as F

    def forward():
        with torch.no_grad():
            F.conv2d(ta, tw, stride=stride, padding=pad)

    def backward(mask):
        with torch.no_grad():
            torch.ops.aten.convolution_backward(
                tg, ta, tw, None, [stride] * 2, [pad] * 2, [1, 1], False, [0, 0], 1,
                mask,
            )  # fmt: skip

    return (
        forward,
        lambda: backward([True, False, False]),
        lambda: backward([False, True, False]),
    )


def profile(model, params, x, y, threads, reps, conv_layout="nhwc"):
    """Where one model's head-step spends its time, JAX against PyTorch.

    ``conv_layout="nchw"`` times each convolution alone in NCHW images and
    OIHW kernels instead (the whole-model rows stay NHWC)."""
    global _CONV_LOG, _POOL_LOG
    loss_fn = make_loss(model)
    opt = inner_optimizer(model)
    p0 = jax.tree.map(lambda a: a[0], params)
    x0, y0 = x[0], y[0]
    _CONV_LOG, _POOL_LOG = [], []
    jax.eval_shape(loss_fn, p0, x0, y0)
    (convs, _CONV_LOG), (pools, _POOL_LOG) = (_CONV_LOG, None), (_POOL_LOG, None)
    shapes = {}
    for spec in convs:
        shapes[spec] = shapes.get(spec, 0) + 1

    def jax_timer(fn, *args):
        compiled = jax.jit(fn).lower(*args).compile()
        return lambda: jax.block_until_ready(compiled(*args))

    state = opt.init(p0)
    grads = jax.grad(loss_fn)(p0, x0, y0)
    grad_compiled = jax.jit(jax.grad(loss_fn)).lower(p0, x0, y0).compile()
    cost = grad_compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    flops = float((cost or {}).get("flops", float("nan")))
    rows = {
        "forward (loss)": [jax_timer(loss_fn, p0, x0, y0)],
        "forward + backward (gradient)": [jax_timer(jax.grad(loss_fn), p0, x0, y0)],
        "optimizer update + apply": [
            jax_timer(
                lambda g, s, p: optax.apply_updates(p, opt.update(g, s, p)[0]),
                grads,
                state,
                p0,
            )
        ],
    }
    conv_rows, calls = {}, {}
    for (xs, ws, stride, padding), count in shapes.items():
        xa = jax.random.normal(jax.random.key(3), xs)
        wa = jax.random.normal(jax.random.key(4), ws)
        out = _conv(xa, wa, stride, padding)
        ga = jax.random.normal(jax.random.key(5), out.shape)
        if conv_layout == "nchw":
            xa, ga = xa.transpose(0, 3, 1, 2), ga.transpose(0, 3, 1, 2)
            wa = wa.transpose(3, 2, 0, 1)
        name = (
            f"{ws[0]}x{ws[1]} conv {ws[2]}->{ws[3]}, {xs[1]}x{xs[2]}, stride {stride}"
        )
        conv_rows[name] = (
            count,
            [
                jax_timer(f, *args)
                for f, args in zip(
                    _jax_conv_pieces(stride, padding, conv_layout),
                    ((xa, wa), (xa, wa, ga), (xa, wa, ga)),
                )
            ],
            (xs, ws, stride, padding, out.shape),
        )
        # The gradient needs no input gradient of the first conv (the images).
        first = (xs, ws, stride, padding) == convs[0]
        calls[name] = (count, count - first, count)

    # The max pools, forward and backward (the gradient w.r.t. their input).
    pool_inputs = [jax.random.normal(jax.random.key(6), shape) for shape in pools]
    pool_grads = [
        jax.random.normal(jax.random.key(7), _max_pool(a).shape) for a in pool_inputs
    ]
    pool_rows = {
        "forward": [jax_timer(lambda *xs: [_max_pool(a) for a in xs], *pool_inputs)],
        "backward": [
            jax_timer(
                lambda xs, gs: [jax.vjp(_max_pool, a)[1](g)[0] for a, g in zip(xs, gs)],
                pool_inputs,
                pool_grads,
            )
        ],
    }

    have_torch = True
    try:
        import torch
        import torch.nn.functional as F
    except ImportError:
        have_torch = False
    if have_torch:
        torch.set_num_threads(threads)
        forward = TORCH_APPLY[model]
        leaves, treedef = jax.tree.flatten(p0)
        weights = [to_torch_layout(a).requires_grad_(True) for a in leaves]
        net = jax.tree.unflatten(treedef, weights)
        tx = torch.tensor(np.asarray(x0).transpose(0, 3, 1, 2).copy())
        ty = torch.tensor(np.asarray(y0)).long()
        wd = WEIGHT_DECAY[model]
        bufs = [torch.zeros_like(w) for w in weights]
        tgrads = [torch.randn_like(w) for w in weights]

        def t_forward():
            with torch.no_grad():
                F.cross_entropy(forward(net, tx), ty)

        def t_grad():
            torch.autograd.grad(F.cross_entropy(forward(net, tx), ty), weights)

        def t_update():
            with torch.no_grad():
                g = torch._foreach_add(tgrads, weights, alpha=wd) if wd else tgrads
                torch._foreach_mul_(bufs, MOMENTUM)
                torch._foreach_add_(bufs, g)
                torch._foreach_add_(weights, bufs, alpha=-LR)

        for row, fn in zip(rows.values(), (t_forward, t_grad, t_update)):
            row.append(fn)
        for _, row, (xs, ws, stride, padding, oshape) in conv_rows.values():
            ta = torch.randn(xs[0], xs[3], xs[1], xs[2])
            tw = torch.randn(ws[3], ws[2], ws[0], ws[1])
            tg = torch.randn(oshape[0], oshape[3], oshape[1], oshape[2])
            pad = 0 if padding == "VALID" else 1
            row += _torch_conv_pieces(ta, tw, tg, stride, pad)
        tpool = [torch.randn(s[0], s[3], s[1], s[2], requires_grad=True) for s in pools]
        touts = [F.max_pool2d(a, 2) for a in tpool]
        tpool_grads = [torch.randn_like(o) for o in touts]

        def t_pool_forward():
            with torch.no_grad():
                for a in tpool:
                    F.max_pool2d(a, 2)

        def t_pool_backward():  # the backward alone, as XLA's select_and_scatter
            torch.autograd.grad(touts, tpool, tpool_grads, retain_graph=True)

        pool_rows["forward"].append(t_pool_forward)
        pool_rows["backward"].append(t_pool_backward)

    measured = {name: _median_ms(fns, reps) for name, fns in rows.items()}
    conv_ms = {
        name: [_median_ms(fns[k::3], reps) for k in range(3)]
        for name, (_, fns, _) in conv_rows.items()
    }
    sides = 2 if have_torch else 1
    totals = [[0.0] * sides for _ in range(3)]
    for name, counts in calls.items():
        for k in range(3):
            for s in range(sides):
                totals[k][s] += counts[k] * conv_ms[name][k][s]
    pool_ms = (
        {name: _median_ms(fns, reps) for name, fns in pool_rows.items()}
        if pools
        else {}
    )
    grad_ms = measured["forward + backward (gradient)"]
    rest = [
        grad_ms[s]
        - sum(totals[k][s] for k in range(3))
        - sum(ms[s] for ms in pool_ms.values())
        for s in range(sides)
    ]

    print(
        f"profile {model}: one model, batch {x0.shape[0]}, {reps} interleaved "
        f"repetitions, convolutions alone in {conv_layout.upper()}, median ms; "
        "XLA cost analysis of the gradient: "
        f"{flops / 1e9:.2f} GFLOP ({flops / 1e6 / grad_ms[0]:.1f} GFLOP/s in JAX)"
    )
    head = "| piece | JAX ms |" + (
        " PyTorch ms | JAX / PyTorch |" if have_torch else ""
    )
    print(head)
    print("|---" * (head.count("|") - 1) + "|")

    def line(name, vals):
        cells = " | ".join(f"{v:.2f}" for v in vals)
        ratio = f" | {vals[0] / vals[1]:.2f}" if have_torch else ""
        print(f"| {name} | {cells}{ratio} |")

    for name, vals in measured.items():
        line(name, vals)
    for k, what in enumerate(("forward", "input gradient", "weight gradient")):
        line(f"all {len(convs)} convolutions, {what}", totals[k])
    for what, vals in pool_ms.items():
        line(f"all {len(pools)} max pools, {what}", vals)
    line("rest of forward + backward", rest)
    for name, counts in calls.items():
        for k, what in enumerate(("fwd", "d input", "d weight")):
            if counts[k]:
                line(
                    f"{counts[k]} x {name}, {what}",
                    [counts[k] * v for v in conv_ms[name][k]],
                )


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=sorted(APPLY), default="cnn")
    parser.add_argument("--members", type=int, default=3)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--width", type=int, default=RESNET_WIDTH, help="ResNet-20")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=SYNC)
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--no-torch", action="store_true")
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--check", action="store_true")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument(
        "--pool",
        choices=("reduce_window", "reshape"),
        default="reduce_window",
        help="how the CNN's max pools are written (see POOL)",
    )
    parser.add_argument("--reps", type=int, default=20, help="--profile repetitions")
    parser.add_argument(
        "--conv-layout",
        choices=sorted(LAYOUTS),
        default="nhwc",
        help="--profile: the layout each convolution is timed alone in",
    )
    args = parser.parse_args()
    POOL["mode"] = args.pool
    if args.smoke:  # tiny models, JAX contestants only
        args.batch, args.rounds, args.steps, args.no_torch = 8, 2, SYNC, True
        args.width, args.reps = 4, 2
    channels = (4, 8, 8) if args.smoke else CHANNELS
    if args.model == "cnn":
        init = lambda k: init_cnn(k, channels)
    else:
        init = lambda k: init_resnet20(k, args.width)

    num = args.members
    key = jax.random.key(0)
    params = members.init_members(init, key, num, same_init=True)
    x = jax.random.normal(jax.random.key(1), (num, args.batch, 32, 32, 3))
    y = jax.random.randint(jax.random.key(2), (num, args.batch), 0, NUM_CLASSES)
    n_params = sum(a.size for a in jax.tree.leaves(params)) // num

    if args.check:
        ok = check(args.model, params, x, y, args.threads)
        sys.exit(0 if ok else 1)
    if args.profile:
        print(f"load before {os.getloadavg()[0]:.1f}")
        profile(args.model, params, x, y, args.threads, args.reps, args.conv_layout)
        print(f"load after {os.getloadavg()[0]:.1f}")
        return

    load_before = os.getloadavg()[0]
    contestants, peaks = {}, {}
    for mode in ("vmap", "sequential"):
        contestants[mode], peaks[mode] = jax_ensemble(args.model, mode, params, x, y)
    if len(jax.devices()) >= 2 and num % 2 == 0:
        mesh = jax.make_mesh((2,), ("members",), devices=jax.devices()[:2])
        for mode in ("vmap", "sequential"):
            name = f"{mode}, 2 devices"
            contestants[name], peaks[name] = jax_ensemble(
                args.model, mode, params, x, y, mesh
            )
    contestants["single JAX model"], peaks["single JAX model"] = jax_single(
        args.model, params, x, y
    )
    heads = {name: num for name in contestants}
    heads["single JAX model"] = 1
    baseline = "single JAX model"
    if not args.no_torch:
        try:
            contestants["PyTorch Lookaround"] = torch_lookaround(
                args.model, params, x, y, args.threads
            )
            heads["PyTorch Lookaround"] = num
            baseline = "PyTorch Lookaround"
        except ImportError:
            pass

    names = list(contestants)
    for name in names:  # warm up
        contestants[name](args.steps)
    times = {name: [] for name in names}
    for r in range(args.rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            t0 = time.perf_counter()
            contestants[name](args.steps)
            times[name].append(
                (time.perf_counter() - t0) * 1e3 / (args.steps * heads[name])
            )

    load = os.getloadavg()[0]
    print(
        f"{args.model}: {n_params} params per member, {num} members, batch "
        f"{args.batch}, {args.rounds} rounds x {args.steps} steps, "
        f"{'pools ' + args.pool + ', ' if args.model == 'cnn' else ''}jax "
        f"{jax.__version__}, {len(jax.devices())} devices, "
        f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}, "
        f"load {load_before:.1f} before, {load:.1f} after"
    )
    print(
        f"| contestant | ms per head-step | ratio to {baseline} [quartiles] | peak MiB |"
    )
    print("|---|---|---|---|")
    base = np.asarray(times[baseline])
    for name in names:
        t = np.asarray(times[name])
        q = np.percentile(t / base, [25, 50, 75])
        peak = f"{peaks[name] / 2**20:.1f}" if name in peaks else "-"
        print(
            f"| {name} | {np.median(t):.2f} | {q[1]:.2f} [{q[0]:.2f}, {q[2]:.2f}] "
            f"| {peak} |"
        )


if __name__ == "__main__":
    main()
