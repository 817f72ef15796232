"""Why Lookaround's update costs what it does: two designs that were not taken.

Times, side by side in one process (same harness and tree as
``averaging_speed.py``: ResNet-20 shapes, 4 members, SGD with momentum), the
bare per-member optimizer, the library's ``lookaround`` in both
``control_flow`` modes, a design that puts the whole update under the
``lax.cond`` (both branches run the inner update; the sync branch adds the
member mean), and the bare update next to a ``lax.cond`` that only returns a
scalar (the price of the control flow itself). Each is also run with a ``sync_period`` so large that no sync
happens, which isolates the off-sync cost. Prints the ratios and the number
of member-sized ``copy`` instructions in the compiled steps::

    python benchmarks/averaging_designs.py [--repeats 60]

The whole-update cond is checked against the library before it is timed.
"""

from __future__ import annotations

import argparse
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
from averaging_speed import (
    compare,
    compare_update_only,
    init_params,
    make_update_only_step,
    make_update_step,
    resnet20_shapes,
)

import optax_wa
from optax_wa import members


def _init(per_member):
    def init_fn(params):
        return optax_wa.LookaroundState(
            count=jnp.zeros([], jnp.int32), inner_state=per_member.init(params)
        )

    return init_fn


def lookaround_whole_update_cond(inner, sync_period):
    """Lookaround (``state_policy="keep"``) with the whole update in a cond."""
    per_member = members.per_member(inner)

    def update_fn(grads, state, params=None):
        count = optax.safe_increment(state.count)

        def plain(operands):
            return per_member.update(*operands)

        def synced(operands):
            updates, inner_state = per_member.update(*operands)
            mean = members.reduced_member_mean(
                jax.tree.map(jnp.add, operands[2], updates)
            )
            updates = jax.tree.map(lambda a, p: a[None] - p, mean, operands[2])
            return updates, inner_state

        updates, inner_state = jax.lax.cond(
            count % sync_period == 0,
            synced,
            plain,
            (grads, state.inner_state, params),
        )
        return updates, optax_wa.LookaroundState(count=count, inner_state=inner_state)

    return optax.GradientTransformationExtraArgs(_init(per_member), update_fn)


def inner_with_scalar_cond(inner, sync_period):
    """The bare per-member update plus a ``lax.cond`` that returns a scalar.

    The scalar (0 from both branches) is subtracted from the updates, so XLA
    keeps the cond; this prices the control flow alone.
    """
    per_member = members.per_member(inner)

    def update_fn(grads, state, params=None):
        count = optax.safe_increment(state.count)
        token = jax.lax.cond(
            count % sync_period == 0,
            lambda: jnp.zeros([], jnp.float32),
            lambda: jnp.zeros([], jnp.float32),
        )
        updates, inner_state = per_member.update(grads, state.inner_state, params)
        updates = jax.tree.map(lambda u: u - token, updates)
        return updates, optax_wa.LookaroundState(count=count, inner_state=inner_state)

    return optax.GradientTransformationExtraArgs(_init(per_member), update_fn)


def member_sized_copies(step, *args):
    hlo = step.lower(*args).compile().as_text()
    return len(re.findall(r"= f32\[4,\S* copy\(", hlo))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=60)
    args = parser.parse_args()
    m, k, never = 4, 10, 10**9
    shapes = resnet20_shapes()
    params = members.init_members(
        lambda key: init_params(key, shapes), jax.random.key(0), m
    )
    inner = optax.sgd(0.1, momentum=0.9)
    opts = {
        "inner (vmapped sgd+momentum)": members.per_member(inner),
        "inner + a cond returning a scalar": inner_with_scalar_cond(inner, 5),
        "lookaround, cond (default)": optax_wa.lookaround(inner, sync_period=5),
        "lookaround, cond, never syncing": optax_wa.lookaround(
            inner, sync_period=never
        ),
        'lookaround, "select"': optax_wa.lookaround(
            inner, sync_period=5, control_flow="select"
        ),
        'lookaround, "select", never syncing': optax_wa.lookaround(
            inner, sync_period=never, control_flow="select"
        ),
        "whole update under the cond": lookaround_whole_update_cond(inner, 5),
        "whole update under the cond, never syncing": lookaround_whole_update_cond(
            inner, never
        ),
    }
    grads = jax.tree.map(lambda x: 1e-3 * jnp.ones_like(x), params)

    # The design under study computes Lookaround: check it against the library.
    want, got = params, params
    ref, alt = opts["lookaround, cond (default)"], opts["whole update under the cond"]
    s_ref, s_alt = ref.init(params), alt.init(params)
    for t in range(7):
        g = jax.tree.map(lambda x, t=t: jnp.sin(x + t), grads)
        u, s_ref = ref.update(g, s_ref, want)
        want = optax.apply_updates(want, u)
        u, s_alt = alt.update(g, s_alt, got)
        got = optax.apply_updates(got, u)
    err = max(
        jax.tree.leaves(
            jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), want, got)
        )
    )
    assert err < 1e-5, err
    print(
        f"whole-update cond == library lookaround over 7 steps (max |diff| {err:.1e})"
    )

    update_only = compare_update_only(opts, grads, params, k, args.repeats)
    update_apply = compare(opts, grads, make_update_step, params, k, args.repeats)
    base = "inner (vmapped sgd+momentum)"
    print(
        "\nratio = median over interleaved rounds of the per-round ratio "
        "[25th, 75th percentile]; copies = member-sized copy instructions"
    )
    print("| design | update ratio | copies | update+apply ratio | copies |")
    print("|---|---|---|---|---|")
    for name, opt in opts.items():
        state = opt.init(params)
        cells = []
        for times, make, first in (
            (update_only, make_update_only_step, (params, grads)),
            (update_apply, make_update_step, params),
        ):
            r = np.percentile(times[name] / times[base], [50, 25, 75])
            copies = member_sized_copies(make(opt), first, state, grads)
            cells.append(f"{r[0]:.3f} [{r[1]:.3f}, {r[2]:.3f}] | {copies}")
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
