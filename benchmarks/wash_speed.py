"""Speed of WASH against the bare per-member optimizer, one device.

Prints, side by side in one process (the harness of
``benchmarks/averaging_speed.py``: interleaved runs, median over repeats):

* update ratio: WASH's jitted ``update`` over the vmapped inner optimizer's
  (SGD, momentum 0.9), on a stacked tree with ResNet-20's parameter shapes
  (0.27M values per member, 4 members), at ``p`` in {0.001, 0.01, 0.1}
  (``layer_probs="constant"``: every tensor at ``p``, the most work), with
  the linear depth schedule at ``p = 0.01``, and with the optimizer state
  shuffled too; PAPA (period 10) for comparison;
* update+apply ratio: the same with ``optax.apply_updates`` in the jitted
  step and params and state donated. The inner optimizer's apply fuses into
  its update; WASH's update ends in scatters, so the apply is one more pass
  over the parameters;
* full train-step ratio: the same with a ResNet-20 forward and backward pass
  (CIFAR input, 32x32x3) in the step.

Targets at ``p = 0.01``: update ratio <= 1.5, train-step ratio <= 1.05.
Timings are medians over interleaved windows of 10 steps.

Run: ``python benchmarks/wash_speed.py [--members 4] [--batch 8] [--repeats 15]``;
``--smoke``: 2 members, ResNet-8 shapes, the inner optimizer and WASH at ``p = 0.01`` only,
one window of 2 steps, no train step (its columns print ``-``).
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")

if "--smoke" in sys.argv:
    # Compiling dominates a smoke run: skip LLVM's optimizations.
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0"
    ).strip()

import jax  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from averaging_speed import (  # noqa: E402
    compare,
    init_params,
    make_train_step,
    make_update_step,
    resnet20_shapes,
)

import optax_wa  # noqa: E402
from optax_wa import members  # noqa: E402

BASE = "inner (vmapped sgd+momentum)"


def make_update_only_step(opt):
    """The bare update, jitted; returns the updates so nothing is dead code."""
    update = jax.jit(opt.update)

    def step(params, state, grads):
        updates, new_state = update(grads, state, params)
        jax.block_until_ready(updates)
        return params, new_state

    return step


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--members", type=int, default=4)
    parser.add_argument("--batch", type=int, default=8, help="images per member")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--train-repeats", type=int, default=3)
    parser.add_argument("--smoke", action="store_true", help="tiny settings")
    args = parser.parse_args()
    m, window = args.members, 10
    if args.smoke:
        m, window, args.batch, args.repeats, args.train_repeats = 2, 2, 1, 1, 1

    blocks = 1 if args.smoke else 3  # smoke: ResNet-8 shapes
    shapes = resnet20_shapes(blocks)
    depth_order = [(name,) for name in shapes]  # definition order
    params = members.init_members(
        lambda key: init_params(key, shapes), jax.random.key(0), m
    )
    size = sum(int(np.prod(s)) for s in shapes.values())
    inner = optax.sgd(0.1, momentum=0.9)
    opts = {BASE: members.per_member(inner)}
    for p in (0.001, 0.01, 0.1):
        opts[f"wash p={p:g} constant"] = optax_wa.wash(
            inner, shuffle_prob=p, layer_probs="constant"
        )
    opts["wash p=0.01 bf16 exchange"] = optax_wa.wash(
        inner, shuffle_prob=0.01, quantize="bfloat16"
    )
    opts["wash p=0.01 linear"] = optax_wa.wash(
        inner, shuffle_prob=0.01, depth_order=depth_order
    )
    opts["wash p=0.01 constant +opt state"] = optax_wa.wash(
        inner, shuffle_prob=0.01, layer_probs="constant", shuffle_opt_state=True
    )
    opts["papa (period=10)"] = optax_wa.papa(inner, alpha=0.99, period=10)
    if args.smoke:
        opts = {name: opts[name] for name in (BASE, "wash p=0.01 constant")}
    print(
        f"device: {jax.devices()[0].device_kind} x{jax.device_count()}; "
        f"{m} members x {size:,} values (ResNet-{6 * blocks + 2} shapes); load average "
        f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores"
    )

    grads = jax.tree.map(lambda x: 1e-3 * np.ones_like(x), params)
    update = compare(opts, grads, make_update_only_step, params, window, args.repeats)
    applied = compare(opts, grads, make_update_step, params, window, args.repeats)
    train = {}
    if not args.smoke:
        key = jax.random.key(1)
        batch = (
            jax.random.normal(key, (m, args.batch, 32, 32, 3)),
            jax.random.randint(key, (m, args.batch), 0, 10),
        )
        train = compare(
            opts, batch, make_train_step, params, window, args.train_repeats
        )
    # Seconds per step: the median over the timing windows.
    update, applied, train = (
        {name: float(np.median(times)) for name, times in runs.items()}
        for runs in (update, applied, train)
    )

    print(
        "\n| method | update ms | update ratio | update+apply ms | update+apply ratio "
        "| train step ms | train-step ratio |"
    )
    print("|---|---|---|---|---|---|---|")
    for name in opts:
        print(
            f"| {name} | {1e3 * update[name]:.3f} | {update[name] / update[BASE]:.3f} | "
            f"{1e3 * applied[name]:.3f} | {applied[name] / applied[BASE]:.3f} | "
            + (
                f"{1e3 * train[name]:.1f} | {train[name] / train[BASE]:.3f} |"
                if train
                else "- | - |"
            )
        )
    print(f"\nload average after: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
