"""Compile time of WASH's update against the bare vmapped inner optimizer.

Time to the first step, update alone: ``jax.jit(opt.update).lower(...)``
then ``.compile()`` (trace + lower, and XLA compile, timed apart) on a
stacked tree with ``--members`` members, SGD with momentum: ``--leaves``
small tensors (shapes cycling through a conv kernel, a dense kernel and a
bias), or with ``--resnet20`` ResNet-20's 61 parameter tensors. Each
optimizer is compiled once in a fresh ``jax.jit`` (no cache shared between
rows). Rows: the bare optimizer, WASH at ``p = 0.01`` (constant: every
tensor of a dtype is one flat buffer, one job), with the optimizer state
shuffled too, the least a per-tensor average adds (the member mean and
the choice between it and the inner update, no ``lax.cond``: a floor, not a
method), Lookaround and PAPA; ``--linear`` adds WASH with the linear
depth schedule, one depth per tensor (one job per octave of the
probabilities: that program grows with their range, not with the depth
count).

XLA:CPU compiles identical kernels once: on the default tree, whose leaves
have 3 shapes, the bare optimizer compiles 3 elementwise kernels whatever
the leaf count, while a cut out of a shared buffer at a constant,
leaf-specific offset is one kernel per leaf (WASH's cuts read their offset
at run time for this reason). ``--distinct-shapes``
gives every leaf its own shape (the last dimension grows with the index),
as in a real network, where the bare optimizer compiles a kernel per leaf
too.

Timing: one compile of a small tree first (the process's one-time costs),
then ``--rounds`` rounds (default 3) that compile every row in turn, every
other round in reverse order, each after ``jax.clear_caches()``; the table
shows each row's medians over the rounds and the ratio of its median total
to the bare optimizer's.

Run: ``python benchmarks/wash_compile.py [--leaves 600] [--members 4]
[--distinct-shapes] [--rounds 3]``,
``python benchmarks/wash_compile.py --resnet20 [--linear]``; ``--smoke``:
12 leaves, the same table.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

if "--smoke" in sys.argv:
    # Compiling dominates a smoke run: skip LLVM's optimizations.
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0"
    ).strip()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402
from averaging_speed import resnet20_shapes  # noqa: E402

import optax_wa  # noqa: E402
from optax_wa import members  # noqa: E402

SHAPES = ((3, 3, 8, 8), (32, 16), (16,))
BARE = "inner (vmapped sgd+momentum)"  # the row every ratio divides by


def tree(num_leaves, num_members, resnet20=False, distinct=False):
    if resnet20:
        shapes = resnet20_shapes()
        return {
            name: jnp.zeros((num_members, *shape)) for name, shape in shapes.items()
        }

    def shape(i):
        *lead, last = SHAPES[i % len(SHAPES)]
        return (*lead, last + i // len(SHAPES)) if distinct else (*lead, last)

    return {f"t{i:04d}": jnp.zeros((num_members, *shape(i))) for i in range(num_leaves)}


def mean_floor(inner):
    """Lookaround's arithmetic alone: the inner step, then at a sync step the
    member mean of ``w + u`` (a plain sum over the member axis, no
    ``lax.cond``, no float32 rounding care). Not a method: the least any
    per-tensor average adds to the inner optimizer's program."""
    per_member = members.per_member(inner)

    def init_fn(params):
        return per_member.init(params), jnp.zeros([], jnp.int32)

    def update_fn(updates, state, params):
        inner_state, count = state
        inner_updates, inner_state = per_member.update(updates, inner_state, params)
        sync = (count + 1) % 5 == 0

        def one(w, u):
            mean = (w + u).sum(0) / w.shape[0]
            return jnp.where(sync, mean - w, u)

        return jax.tree.map(one, params, inner_updates), (inner_state, count + 1)

    return optax.GradientTransformation(init_fn, update_fn)


def compile_time(opt, params):
    jax.clear_caches()
    state = opt.init(params)
    start = time.perf_counter()
    lowered = jax.jit(opt.update).lower(params, state, params)
    traced = time.perf_counter() - start
    start = time.perf_counter()
    compiled = lowered.compile()
    seconds = time.perf_counter() - start
    # Instructions of the optimized program, those inside fusions included.
    instructions = sum(" = " in line for line in compiled.as_text().splitlines())
    return traced, seconds, instructions


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--leaves", type=int, default=600)
    parser.add_argument("--members", type=int, default=4)
    parser.add_argument("--resnet20", action="store_true", help="ResNet-20 shapes")
    parser.add_argument("--linear", action="store_true", help="add linear WASH")
    parser.add_argument(
        "--distinct-shapes", action="store_true", help="no two leaves alike"
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--smoke", action="store_true", help="tiny settings")
    args = parser.parse_args()
    if args.smoke:
        args.leaves, args.rounds = 12, 1
    params = tree(args.leaves, args.members, args.resnet20, args.distinct_shapes)
    inner = optax.sgd(0.1, momentum=0.9)
    depth_order = [(name,) for name in params]  # one depth per tensor
    opts = {
        BARE: members.per_member(inner),
        "wash p=0.01": optax_wa.wash(inner, shuffle_prob=0.01),
        "wash p=0.01 +opt state": optax_wa.wash(
            inner, shuffle_prob=0.01, shuffle_opt_state=True
        ),
        "inner + member mean, no cond (floor)": mean_floor(inner),
        "lookaround (sync_period=5)": optax_wa.lookaround(inner, sync_period=5),
        "papa (period=10)": optax_wa.papa(inner, alpha=0.99, period=10),
    }
    if args.linear:
        opts["wash p=0.01 linear"] = optax_wa.wash(
            inner, shuffle_prob=0.01, depth_order=depth_order
        )
    print(
        f"{len(params)} leaves x {args.members} members; jax {jax.__version__}; "
        f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores; "
        f"median of {args.rounds} rounds"
    )
    compile_time(opts[BARE], tree(4, args.members))
    times = {name: [] for name in opts}
    for round_ in range(args.rounds):
        order = list(opts) if round_ % 2 == 0 else list(opts)[::-1]
        for name in order:
            times[name].append(compile_time(opts[name], params))
    print("| update | trace+lower s | compile s | total s | ratio | HLO instructions |")
    print("|---|---|---|---|---|---|")
    base = statistics.median(t + c for t, c, _ in times[BARE])
    for name, rows in times.items():
        traced = statistics.median(t for t, _, _ in rows)
        compiled = statistics.median(c for _, c, _ in rows)
        total = statistics.median(t + c for t, c, _ in rows)
        print(
            f"| {name} | {traced:.2f} | {compiled:.2f} | {total:.2f} "
            f"| {total / base:.1f} | {rows[0][2]:,} |",
            flush=True,
        )
    print(f"load average after: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
