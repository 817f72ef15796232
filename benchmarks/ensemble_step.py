"""Time per head-step of a Lookaround ensemble step, per way of mapping members.

A small CNN (conv 3->32->64->128, 3x3, ReLU and 2x2 max-pool after each,
global mean pool, dense 128->10: 94,538 params), 32x32x3 inputs, batch 64
per member, 3 members, ``optax_wa.lookaround(optax.sgd(0.1, momentum=0.9),
sync_period=5)``. Contestants, timed side by side in one process over
interleaved rounds of ``--steps`` ensemble steps (every other round in
reverse order):

* ``map_members`` in each mode (``vmap``, ``sequential``), the members'
  gradients computed by :func:`optax_wa.members.map_members`;
* the same with the member axis split over 2 host devices (only when the
  process has 2 devices, ``XLA_FLAGS=--xla_force_host_platform_device_count=2``,
  and the member count is even);
* one JAX model with ``optax.sgd(0.1, momentum=0.9)`` (a head-step is one
  step);
* when ``torch`` is importable (not a dependency): a PyTorch loop in the
  released Lookaround's manner -- one model whose weights are swapped for
  each head in turn, a forward/backward and an SGD-momentum step per head,
  the heads replaced by their average every ``sync_period`` steps.

Prints the median ms per head-step, the median per-round ratio to the
PyTorch loop (or to the single JAX model without torch) with quartiles, and
the peak memory of each compiled JAX step (``memory_analysis()``: arguments
+ outputs + temporaries - aliased)::

    python benchmarks/ensemble_step.py [--members 3] [--rounds 7] [--steps 5] [--smoke]

``--smoke``: channels 3->4->8->8, batch 8, 2 rounds, without torch.
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
NUM_CLASSES = 10
LR, MOMENTUM, SYNC = 0.1, 0.9, 5


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
    for i in range(len(CHANNELS)):
        layer = params[f"conv{i}"]
        x = jax.lax.conv_general_dilated(
            x, layer["w"], (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
        )
        x = jax.nn.relu(x + layer["b"])
        x = jax.lax.reduce_window(
            x, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID"
        )
    return x.mean(axis=(1, 2)) @ params["head"]["w"] + params["head"]["b"]


def loss_fn(params, x, y):
    logits = cnn_apply(params, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


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


def jax_ensemble(mode, params, x, y, mesh=None):
    """A runner of ``--steps`` Lookaround steps with members mapped by ``mode``."""
    opt = optax_wa.lookaround(optax.sgd(LR, momentum=MOMENTUM), sync_period=SYNC)
    grad = members.map_members(jax.grad(loss_fn), mode=mode)

    def step(params, state, x, y):
        grads = grad(params, x, y)
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state

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

    return run, peak_bytes(compiled)


def jax_single(params, x, y):
    opt = optax.sgd(LR, momentum=MOMENTUM)
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


def torch_lookaround(params, x, y, threads):
    """The released Lookaround loop's logic in PyTorch: one model, heads cycled.

    Each head keeps its own weights and momentum; a head-step swaps the
    head's weights into the model, runs forward/backward on the head's batch
    and takes an SGD-momentum step; every ``SYNC`` steps all heads are set to
    their average.
    """
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(threads)

    def to_torch(a):
        return torch.tensor(np.asarray(a))

    num = x.shape[0]
    heads = []
    for m in range(num):
        tensors = []
        for i in range(len(CHANNELS)):
            w = params[f"conv{i}"]["w"][m]  # HWIO -> OIHW
            tensors += [
                to_torch(jnp.transpose(w, (3, 2, 0, 1))),
                to_torch(params[f"conv{i}"]["b"][m]),
            ]
        tensors += [
            to_torch(params["head"]["w"][m].T),
            to_torch(params["head"]["b"][m]),
        ]
        heads.append(tensors)
    model = [t.clone().requires_grad_(True) for t in heads[0]]
    bufs = [[torch.zeros_like(t) for t in h] for h in heads]
    xs = [to_torch(jnp.transpose(x[m], (0, 3, 1, 2))).contiguous() for m in range(num)]
    ys = [to_torch(y[m]).long() for m in range(num)]

    def forward(ws, inp):
        for i in range(len(CHANNELS)):
            inp = F.max_pool2d(
                F.relu(F.conv2d(inp, ws[2 * i], ws[2 * i + 1], padding=1)), 2
            )
        return F.linear(inp.mean(dim=(2, 3)), ws[-2], ws[-1])

    counter = [0]

    def run(steps):
        for _ in range(steps):
            for h in range(num):
                with torch.no_grad():
                    for p, w in zip(model, heads[h]):
                        p.data = w
                loss = F.cross_entropy(forward(model, xs[h]), ys[h])
                grads = torch.autograd.grad(loss, model)
                with torch.no_grad():
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

    return run


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--members", type=int, default=3)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=SYNC)
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--no-torch", action="store_true")
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args()
    if args.smoke:  # tiny CNN, JAX contestants only
        args.batch, args.rounds, args.steps, args.no_torch = 8, 2, SYNC, True
    channels = (4, 8, 8) if args.smoke else CHANNELS

    num = args.members
    key = jax.random.key(0)
    params = members.init_members(
        lambda k: init_cnn(k, channels), key, num, same_init=True
    )
    x = jax.random.normal(jax.random.key(1), (num, args.batch, 32, 32, 3))
    y = jax.random.randint(jax.random.key(2), (num, args.batch), 0, NUM_CLASSES)
    n_params = sum(a.size for a in jax.tree.leaves(params)) // num

    contestants, peaks = {}, {}
    for mode in ("vmap", "sequential"):
        contestants[mode], peaks[mode] = jax_ensemble(mode, params, x, y)
    if len(jax.devices()) >= 2 and num % 2 == 0:
        mesh = jax.make_mesh((2,), ("members",), devices=jax.devices()[:2])
        for mode in ("vmap", "sequential"):
            name = f"{mode}, 2 devices"
            contestants[name], peaks[name] = jax_ensemble(mode, params, x, y, mesh)
    contestants["single JAX model"], peaks["single JAX model"] = jax_single(
        params, x, y
    )
    heads = {name: num for name in contestants}
    heads["single JAX model"] = 1
    baseline = "single JAX model"
    if not args.no_torch:
        try:
            contestants["PyTorch Lookaround"] = torch_lookaround(
                params, x, y, args.threads
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
        f"{n_params} params per member, {num} members, batch {args.batch}, "
        f"{args.rounds} rounds x {args.steps} steps, jax {jax.__version__}, "
        f"{len(jax.devices())} devices, XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}, "
        f"load {load:.1f}"
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
