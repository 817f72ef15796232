"""Speed of lookaround and papa against the bare per-member optimizer.

Prints, side by side in one process:

* update ratio: the wrapper's ``update`` alone (jitted; state and the
  previous updates donated) over windows of 10 updates, which hold whole
  sync periods (lookaround: 5, papa: 10), divided by the vmapped inner
  optimizer's, on a stacked tree with ResNet-20's parameter shapes (0.27M values per member,
  4 members);
* update+apply ratio: the same with ``optax.apply_updates`` in the jitted
  step and the params donated (the inner optimizer's update then fuses into
  its apply, which writes the params in place);
* update+apply ratio with only the optimizer state donated (the new params
  go to a fresh buffer);
* full train-step ratio: the same with a ResNet-20-shaped forward and
  backward pass (CIFAR input, 32x32x3) in the step.

Rounds interleave the methods (same machine conditions; every other round
in reverse order); each ratio is the median over rounds of the per-round
ratio, with its quartiles::

    python benchmarks/averaging_speed.py [--members 4] [--batch 8] [--repeats 100] [--train-repeats 8]
    python benchmarks/averaging_speed.py --smoke     # tiny settings, same table

``--smoke``: 2 members, ResNet-8 shapes (one block per stage), 2 rounds.
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


def resnet20_shapes(blocks=3):
    """Parameter shapes of a CIFAR ResNet-20 (3 stages x ``blocks`` basic blocks).

    ``blocks=1`` gives a ResNet-8, for smoke runs.
    """
    shapes = {"stem/conv": (3, 3, 3, 16), "stem/bn_scale": (16,), "stem/bn_bias": (16,)}
    in_ch = 16
    for stage, ch in enumerate((16, 32, 64)):
        for block in range(blocks):
            prefix = f"s{stage}b{block}"
            shapes[f"{prefix}/conv1"] = (3, 3, in_ch, ch)
            shapes[f"{prefix}/conv2"] = (3, 3, ch, ch)
            for i in (1, 2):
                shapes[f"{prefix}/bn{i}_scale"] = (ch,)
                shapes[f"{prefix}/bn{i}_bias"] = (ch,)
            if in_ch != ch:
                shapes[f"{prefix}/proj"] = (1, 1, in_ch, ch)
            in_ch = ch
    shapes["head/w"] = (64, 10)
    shapes["head/b"] = (10,)
    return shapes


def init_params(key, shapes):
    keys = jax.random.split(key, len(shapes))
    params = {}
    for k, (name, shape) in zip(keys, shapes.items()):
        if name.endswith("_scale"):
            params[name] = jnp.ones(shape)
        elif name.endswith("_bias") or name == "head/b":
            params[name] = jnp.zeros(shape)
        else:
            fan_in = int(np.prod(shape[:-1]))
            params[name] = jax.random.normal(k, shape) * np.sqrt(2.0 / fan_in)
    return params


def _norm(x, scale, bias):
    mean = x.mean(axis=(0, 1, 2))
    var = x.var(axis=(0, 1, 2))
    return (x - mean) * jax.lax.rsqrt(var + 1e-5) * scale + bias


def _conv(x, w, stride=1):
    return jax.lax.conv_general_dilated(
        x, w, (stride, stride), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )


def resnet20_loss(params, images, labels):
    """ResNet forward pass (batch-statistics normalization) and loss.

    The depth is that of ``params`` (ResNet-20 from :func:`resnet20_shapes`).
    """
    h = jax.nn.relu(
        _norm(
            _conv(images, params["stem/conv"]),
            params["stem/bn_scale"],
            params["stem/bn_bias"],
        )
    )
    for stage in range(3):
        for block in range(sum(f"s{stage}b{b}/conv1" in params for b in range(3))):
            p = f"s{stage}b{block}"
            stride = 2 if (stage > 0 and block == 0) else 1
            out = _conv(h, params[f"{p}/conv1"], stride)
            out = jax.nn.relu(
                _norm(out, params[f"{p}/bn1_scale"], params[f"{p}/bn1_bias"])
            )
            out = _conv(out, params[f"{p}/conv2"])
            out = _norm(out, params[f"{p}/bn2_scale"], params[f"{p}/bn2_bias"])
            shortcut = (
                _conv(h, params[f"{p}/proj"], stride) if f"{p}/proj" in params else h
            )
            h = jax.nn.relu(out + shortcut)
    logits = h.mean(axis=(1, 2)) @ params["head/w"] + params["head/b"]
    return -jnp.mean(
        jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], 1)
    )


def make_update_step(opt):
    def step(params, state, grads):
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    return jax.jit(step, donate_argnums=(0, 1))


def make_fresh_params_step(opt):
    """Update and apply; only the state is donated, new params get a new buffer."""

    def step(params, state, grads):
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    return jax.jit(step, donate_argnums=(1,))


def make_update_only_step(opt):
    """The update alone; the carry is ``(params, last_updates)``, both donated,
    so the updates reuse one buffer as in a training loop."""

    def step(carry, state, grads):
        params, _ = carry
        updates, state = opt.update(grads, state, params)
        return (params, updates), state

    return jax.jit(step, donate_argnums=(0, 1))


def make_train_step(opt):
    grad = jax.vmap(jax.grad(resnet20_loss))

    def step(params, state, batch):
        images, labels = batch
        grads = grad(params, images, labels)
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    return jax.jit(step, donate_argnums=(0, 1))


def time_period(step, params, state, inputs, period):
    """Seconds for ``period`` consecutive steps (one full sync period)."""
    jax.block_until_ready((params, state))
    start = time.perf_counter()
    for _ in range(period):
        params, state = step(params, state, inputs)
    jax.block_until_ready(params)
    return time.perf_counter() - start, params, state


def compare(opts, inputs, make_step, params0, period, repeats, params_of=None):
    """Interleaved timings; ``params_of(carry)`` picks the params out of a carry."""
    runs = {}
    for name, opt in opts.items():
        params = jax.tree.map(jnp.copy, params0)
        state = opt.init(params_of(params) if params_of else params)
        step = make_step(opt)
        _, params, state = time_period(step, params, state, inputs, period)  # compile
        runs[name] = [step, params, state, []]
    for r in range(repeats):
        # Interleaved (same machine conditions), in reversed order every other
        # round, so a drift within a round favours no method.
        order = list(runs.values())
        for run in order if r % 2 == 0 else order[::-1]:
            seconds, run[1], run[2] = time_period(
                run[0], run[1], run[2], inputs, period
            )
            run[3].append(seconds / period)
    return {name: np.asarray(run[3]) for name, run in runs.items()}


def compare_update_only(opts, grads, params, period, repeats):
    """:func:`compare` for the update alone (carry: params and last updates)."""
    carry = (params, jax.tree.map(jnp.zeros_like, params))
    return compare(
        opts,
        grads,
        make_update_only_step,
        carry,
        period,
        repeats,
        params_of=lambda c: c[0],
    )


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--members", type=int, default=4)
    parser.add_argument("--batch", type=int, default=8, help="images per member")
    parser.add_argument("--repeats", type=int, default=100)
    parser.add_argument("--train-repeats", type=int, default=8)
    parser.add_argument(
        "--smoke", action="store_true", help="tiny settings (< 30 s), same table"
    )
    args = parser.parse_args()
    if args.smoke:
        args.members, args.batch, args.repeats, args.train_repeats = 2, 2, 2, 1
    blocks = 1 if args.smoke else 3
    # Default periods: lookaround syncs every 5 updates, papa pulls every 10;
    # timing windows of 10 updates hold whole periods of both.
    m, k = args.members, 10

    shapes = resnet20_shapes(blocks)
    params = members.init_members(
        lambda key: init_params(key, shapes), jax.random.key(0), m
    )
    size = sum(int(np.prod(s)) for s in shapes.values())
    inner = optax.sgd(0.1, momentum=0.9)
    opts = {
        "inner (vmapped sgd+momentum)": members.per_member(inner),
        "lookaround (sync_period=5)": optax_wa.lookaround(inner, sync_period=5),
        "papa (period=10)": optax_wa.papa(inner, alpha=0.99, period=10),
    }
    print(
        f"device: {jax.devices()[0].device_kind} x{jax.device_count()}; "
        f"{m} members x {size:,} values (ResNet-{6 * blocks + 2} shapes)"
    )

    grads = jax.tree.map(lambda x: 1e-3 * jnp.ones_like(x), params)
    update_only = compare_update_only(opts, grads, params, k, args.repeats)
    update = compare(opts, grads, make_update_step, params, k, args.repeats)
    fresh = compare(opts, grads, make_fresh_params_step, params, k, args.repeats)
    key = jax.random.key(1)
    batch = (
        jax.random.normal(key, (m, args.batch, 32, 32, 3)),
        jax.random.randint(key, (m, args.batch), 0, 10),
    )
    train = compare(opts, batch, make_train_step, params, k, args.train_repeats)

    base = "inner (vmapped sgd+momentum)"

    def ratio(times, name):
        """Median over rounds of the per-round ratio, with its quartiles."""
        paired = times[name] / times[base]
        return np.percentile(paired, [50, 25, 75])

    print(
        "\nratio = median over interleaved rounds of the per-round ratio "
        "[25th, 75th percentile]"
    )
    print(
        "| method | update ms | update ratio | update+apply ms | update+apply ratio "
        "| update+apply, new params buffer ms | ratio "
        "| train step ms | train-step ratio |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for name in opts:
        cells = []
        for times, digits in ((update_only, 3), (update, 3), (fresh, 3), (train, 1)):
            r = ratio(times, name)
            cells.append(
                f"{1e3 * np.median(times[name]):.{digits}f} | "
                f"{r[0]:.3f} [{r[1]:.3f}, {r[2]:.3f}]"
            )
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
