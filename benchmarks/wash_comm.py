"""Communication of WASH against PAPA and a full all-reduce, from compiled HLO.

8 fake CPU devices, 8 members with ResNet-20's parameter shapes (0.27M
values per member), the member axis split over an explicit ``("members",)``
mesh. For every step compiled with ``jax.jit`` the collectives' payload is
read with :func:`optax_wa.comm.collective_bytes` (per device; the larger of
each collective's input and output buffers). Printed:

* the full all-reduce: ``psum`` of one member's parameters (the payload of
  averaging everything once);
* PAPA (``alpha=0.99, period=10``): its sync step, and amortized per step;
* WASH at ``p`` in {0, 0.001, 0.01, 0.1} (``layer_probs="constant"``, and the
  ``"linear"`` depth schedule in definition order), stacked mode: the common
  path (``in_loops=False``: the extra-round loop runs with probability below
  1e-6 per step) and the static size of that loop's exchange;
* WASH in named mode inside ``jax.shard_map`` (one member per device);
* WASH on a mesh with ``Auto`` axes, where the member axis is not visible in
  the types and XLA lowers the cross-member gather itself: the cost of not
  taking the sharded path.

* WASH at ``p = 0.01`` with the selected values exchanged in bfloat16 or
  float16 (``quantize``), and with the ring topology.

Run: ``python benchmarks/wash_comm.py`` (about a minute of compiling);
``--smoke``: ``p`` in {0, 0.01} only, the first 6 tensors, the same tables.
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

if "--smoke" in sys.argv:
    # Compiling dominates a smoke run: skip LLVM's optimizations.
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0"
    ).strip()

import jax  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from averaging_speed import init_params, resnet20_shapes  # noqa: E402
from jax.sharding import AxisType, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import optax_wa  # noqa: E402
from optax_wa import members  # noqa: E402
from optax_wa.comm import collective_bytes  # noqa: E402

M = 8
PROBS = (0.0, 0.001, 0.01, 0.1)


def compile_update(opt, params):
    state = jax.jit(opt.init)(params)
    return jax.jit(opt.update).lower(params, state, params).compile()


def named_update(opt, mesh, params):
    state = jax.jit(
        jax.shard_map(
            jax.vmap(opt.init, axis_name="local"),
            mesh=mesh,
            in_specs=P("members"),
            out_specs=P("members"),
            check_vma=False,
        )
    )(params)
    step = jax.shard_map(
        jax.vmap(opt.update, axis_name="local"),
        mesh=mesh,
        in_specs=P("members"),
        out_specs=P("members"),
        check_vma=False,
    )
    return jax.jit(step).lower(params, state, params).compile()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--smoke", action="store_true", help="tiny settings")
    args = parser.parse_args()
    probs = (0.0, 0.01) if args.smoke else PROBS
    shapes = resnet20_shapes()
    if args.smoke:
        shapes = dict(list(shapes.items())[:6])
    size = sum(int(np.prod(s)) for s in shapes.values())
    depth_order = [(name,) for name in shapes]  # definition order, input to output
    inner = optax.sgd(0.1, momentum=0.9)
    params0 = members.init_members(
        lambda k: init_params(k, shapes), jax.random.key(0), M
    )

    mesh = jax.make_mesh((M,), ("members",), axis_types=(AxisType.Explicit,))
    with jax.set_mesh(mesh):
        params = jax.device_put(params0, NamedSharding(mesh, P("members")))
        psum = jax.jit(
            jax.shard_map(
                lambda t: jax.tree.map(lambda x: jax.lax.psum(x, "members"), t),
                mesh=mesh,
                in_specs=P("members"),
                out_specs=P("members"),
            )
        )
        full = collective_bytes(psum.lower(params).compile())
        papa = collective_bytes(compile_update(optax_wa.papa(inner, period=10), params))

        print(
            f"devices: {jax.device_count()} x {jax.devices()[0].device_kind}; "
            f"{M} members x {size:,} values "
            f"(ResNet-20 shapes{', first 6' if args.smoke else ''}), float32"
        )
        print(
            "collective payload per device per step (bytes); ratio = / full all-reduce\n"
        )
        print(f"{'full all-reduce (psum of the params)':44s} {full:>11,d}  1.0000")
        print(f"{'PAPA period=10, sync step':44s} {papa:>11,d}  {papa / full:.4f}")
        print(
            f"{'PAPA period=10, amortized per step':44s} {papa / 10:>11,.0f}  "
            f"{papa / 10 / full:.4f}"
        )

        rows = []
        for layer_probs in ("constant", "linear"):
            for p in probs:
                opt = optax_wa.wash(
                    inner,
                    shuffle_prob=p,
                    layer_probs=layer_probs,
                    depth_order=depth_order if layer_probs == "linear" else None,
                )
                compiled = compile_update(opt, params)
                common = collective_bytes(compiled, in_loops=False)
                kinds = collective_bytes(compiled, by_kind=True, in_loops=False)
                loop = collective_bytes(compiled) - common
                rows.append((layer_probs, p, common, loop, kinds))
        print()
        print(
            f"{'WASH (stacked, explicit mesh)':30s} {'p':>6s} {'bytes/step':>11s} "
            f"{'ratio':>7s} {'bytes/(p*full)':>14s} {'extra-round loop':>16s}  kinds"
        )
        for layer_probs, p, common, loop, kinds in rows:
            scaled = f"{common / (p * full):14.3f}" if p else f"{'-':>14s}"
            used = {k: v for k, v in kinds.items() if v}
            print(
                f"{'  layer_probs=' + layer_probs:30s} {p:6g} {common:>11,d} "
                f"{common / full:7.4f} {scaled} {loop:>16,d}  {used}"
            )

        print()
        variants = {
            "float32 (default)": {},
            'quantize="bfloat16"': {"quantize": "bfloat16"},
            'quantize="float16"': {"quantize": "float16"},
            'topology="ring"': {"topology": "ring"},
        }
        base = None
        for label, kwargs in variants.items():
            opt = optax_wa.wash(inner, shuffle_prob=0.01, **kwargs)
            kinds = collective_bytes(
                compile_update(opt, params), by_kind=True, in_loops=False
            )
            total = sum(kinds.values())
            base = base or kinds["all-to-all"]
            print(
                f"WASH p=0.01 {label:22s} {total:>9,d} bytes/step "
                f"({total / full:.4f} of the all-reduce; all-to-all "
                f"{kinds['all-to-all'] / base:.3f} of float32's)"
            )

        print()
        for p in (0.0, 0.01):
            opt = optax_wa.wash(
                inner,
                shuffle_prob=p,
                axis_name=("members", "local"),
            )
            named = collective_bytes(named_update(opt, mesh, params), in_loops=False)
            print(
                f"WASH named mode in shard_map, p={p:g}: {named:,d} bytes "
                f"({named / full:.4f} of the all-reduce)"
            )

    auto = jax.make_mesh((M,), ("members",), axis_types=(AxisType.Auto,))
    with jax.set_mesh(auto):
        params = jax.device_put(params0, NamedSharding(auto, P("members")))
        opt = optax_wa.wash(inner, shuffle_prob=0.01)
        compiled = compile_update(opt, params)
        kinds = collective_bytes(compiled, by_kind=True, in_loops=False)
        total = sum(kinds.values())
        print(
            f"\nWASH p=0.01 on an Auto mesh (no sharded path; XLA's own "
            f"collectives): {total:,d} bytes ({total / full:.2f} of the all-reduce) "
            f"{ {k: v for k, v in kinds.items() if v} }"
        )


if __name__ == "__main__":
    main()
