"""Per-device memory and bytes moved per step at ViT-B/16 scale, by compilation.

Nothing is executed or allocated: one train step of an ensemble of ``M = 4``
ViT-B/16 members (86.6 M parameters each, 224 x 224 images, AdamW) is
lowered from ``jax.ShapeDtypeStruct`` inputs with shardings and compiled for
fake CPU meshes of 8 and 64 devices, ``("members", "data")`` = ``(4, D/4)``:
each member is data-parallel over its ``D/4`` devices, with ``--batch``
images per device. Every step is written in named mode (``jax.shard_map``
over the mesh, the member ``vmap``-ed inside) so that each collective is
one the method asks for. For every method the table gives, per device:

* memory from ``compiled.memory_analysis()``: arguments (params, optimizer
  state, batch), outputs (params and state are donated, so they alias the
  arguments) and temporaries (activations, gradients, buffers);
* bytes moved per step: the payload of the compiled collectives
  (``optax_wa.comm.collective_bytes``, per device).

Methods: one model data-parallel over all devices; 4 independent members
(AdamW per member, no averaging: the baseline of every ensemble row);
Lookaround (``sync_period=5``: the sync step, and amortized over the period);
PAPA (``alpha=0.99, period=10``: the pull step, and amortized); WASH at
``p = 0.01`` (constant per tensor), with and without shuffling the optimizer
state (the common path, and a step whose first round overflowed: one extra
round); SAM and Stable SAM per member, with the ascent per device or from
the all-device gradient (``sync_ascent``).

Run: ``python benchmarks/per_device_tables.py`` (both meshes, each in its
own process; tens of minutes of compiling on 2 cores);
``--smoke`` compiles a tiny ViT on the 8-device mesh for one method of
each family (independent members, Lookaround, WASH, Stable SAM), the same
table.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time

METHODS = (
    "dp_single",
    "independent",
    "lookaround",
    "papa",
    "wash",
    "wash_opt",
    "sam_per_device",
    "sam_synced",
    "ssam_per_device",
    "ssam_synced",
)
LABELS = {
    "dp_single": "1 model, data parallel over all devices",
    "independent": "4 independent members (baseline)",
    "lookaround": "Lookaround, sync_period=5",
    "papa": "PAPA, alpha=0.99, period=10",
    "wash": "WASH p=0.01",
    "wash_opt": "WASH p=0.01 + optimizer state",
    "sam_per_device": "SAM rho=0.05, per-device ascent",
    "sam_synced": "SAM rho=0.05, synced ascent",
    "ssam_per_device": "SSAM rho=0.05, per-device ascent",
    "ssam_synced": "SSAM rho=0.05, synced ascent",
}
SMOKE_METHODS = ("independent", "lookaround", "wash", "ssam_synced")
PERIODS = {"lookaround": 5, "papa": 10}
M = 4
VIT_B16 = dict(
    image=224, patch=16, width=768, depth=12, heads=12, mlp=3072, classes=1000
)
TINY = dict(image=32, patch=8, width=32, depth=1, heads=2, mlp=64, classes=10)


def vit(config):
    import flax.linen as nn
    import jax.numpy as jnp

    class Block(nn.Module):
        @nn.compact
        def __call__(self, x, _):
            width, heads = config["width"], config["heads"]
            h = nn.LayerNorm()(x)
            qkv = nn.Dense(3 * width)(h).reshape(*x.shape[:2], 3, heads, -1)
            q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
            logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(q.shape[-1])
            att = jnp.einsum("bhqk,bkhd->bqhd", nn.softmax(logits), v)
            x = x + nn.Dense(width)(att.reshape(x.shape))
            h = nn.LayerNorm()(x)
            h = nn.Dense(width)(nn.gelu(nn.Dense(config["mlp"])(h)))
            return x + h, None

    class ViT(nn.Module):
        @nn.compact
        def __call__(self, images):
            p, width = config["patch"], config["width"]
            x = nn.Conv(width, (p, p), strides=(p, p), padding="VALID")(images)
            x = x.reshape(x.shape[0], -1, width)
            cls = self.param("cls", nn.initializers.zeros, (1, 1, width))
            x = jnp.concatenate([jnp.broadcast_to(cls, (x.shape[0], 1, width)), x], 1)
            pos = self.param(
                "pos", nn.initializers.normal(0.02), (1, x.shape[1], width)
            )
            x = x + pos
            # The blocks as one scanned layer: same math, 12x smaller program.
            x, _ = nn.scan(
                Block,
                variable_axes={"params": 0},
                split_rngs={"params": True},
                length=config["depth"],
            )()(x, None)
            x = nn.LayerNorm()(x[:, 0])
            return nn.Dense(config["classes"])(x)

    return ViT()


def build(method, mesh, config, batch_per_device):
    """``(step, args)``: the jitted step and its ShapeDtypeStruct arguments."""
    import jax
    import jax.numpy as jnp
    import optax
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    import optax_wa

    model = vit(config)
    image = config["image"]
    members_size, data_size = mesh.shape["members"], mesh.shape["data"]
    named = ("members", "local")
    inner = optax.adamw(1e-3, weight_decay=0.05)
    sam = method.startswith(("sam", "ssam"))

    def loss_fn(params, x, y):
        logits = model.apply({"params": params}, x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    if method == "dp_single":
        opt = inner
    else:
        if method == "independent":
            opt = inner
        elif method == "lookaround":
            opt = optax_wa.lookaround(inner, sync_period=5, axis_name=named)
        elif method == "papa":
            opt = optax_wa.papa(inner, alpha=0.99, period=10, axis_name=named)
        elif method.startswith("wash"):
            opt = optax_wa.wash(
                inner,
                shuffle_prob=0.01,
                layer_probs="constant",
                shuffle_opt_state=method == "wash_opt",
                seed=0,
                axis_name=named,
            )
        elif sam:
            opt = optax_wa.sharpness_aware(
                inner,
                rho=0.05,
                stable=method.startswith("ssam"),
                axis_name="data",
                sync_ascent=method.endswith("synced"),
            )
        else:
            raise ValueError(method)

    def local_step(params, state, x, y):
        if sam:  # local gradients; the wrapper averages over "data"
            grads = jax.grad(loss_fn)(params, x, y)
            grad_fn = lambda p: jax.grad(loss_fn)(p, x, y)  # noqa: E731
            updates, state = opt.update(grads, state, params, grad_fn=grad_fn)
        else:
            # One all-reduce over the model's data-parallel devices.
            axes = ("members", "data") if method == "dp_single" else "data"
            grads = jax.lax.pmean(jax.grad(loss_fn)(params, x, y), axes)
            updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    one_params = jax.eval_shape(
        lambda: model.init(
            jax.random.key(0), jnp.zeros((1, image, image, 3), jnp.float32)
        )["params"]
    )
    one_state = jax.eval_shape(opt.init, one_params)
    if method == "dp_single":
        spec, data_spec = P(), P(("members", "data"))
        body = local_step
        global_batch = batch_per_device * members_size * data_size
        x_shape, y_shape = (global_batch, image, image, 3), (global_batch,)
        params_s, state_s = one_params, one_state
    else:
        spec, data_spec = P("members"), P("members", "data")
        body = jax.vmap(local_step, axis_name="local")
        per_member = batch_per_device * data_size
        x_shape = (M, per_member, image, image, 3)
        y_shape = (M, per_member)
        stack = lambda t: jax.tree.map(  # noqa: E731
            lambda s: jax.ShapeDtypeStruct((M, *s.shape), s.dtype), t
        )
        params_s, state_s = stack(one_params), stack(one_state)

    def placed(tree, spec):
        return jax.tree.map(
            lambda s: jax.ShapeDtypeStruct(
                s.shape, s.dtype, sharding=NamedSharding(mesh, spec)
            ),
            tree,
        )

    step = jax.jit(
        jax.shard_map(
            body,
            mesh=mesh,
            in_specs=(spec, spec, data_spec, data_spec),
            out_specs=(spec, spec),
            check_vma=False,
        ),
        donate_argnums=(0, 1),
    )
    args = (
        placed(params_s, spec),
        placed(state_s, spec),
        jax.ShapeDtypeStruct(
            x_shape, jnp.float32, sharding=NamedSharding(mesh, data_spec)
        ),
        jax.ShapeDtypeStruct(
            y_shape, jnp.int32, sharding=NamedSharding(mesh, data_spec)
        ),
    )
    num_params = sum(math.prod(s.shape) for s in jax.tree.leaves(one_params))
    return step, args, num_params


def worker(devices, config_name, batch_per_device, methods):
    """Compiles every method on a fake mesh of ``devices``; prints JSON lines."""
    import jax
    from jax.sharding import AxisType

    from optax_wa.comm import collective_bytes

    assert jax.device_count() == devices, jax.device_count()
    config = TINY if config_name == "tiny" else VIT_B16
    mesh = jax.make_mesh(
        (M, devices // M), ("members", "data"), axis_types=(AxisType.Explicit,) * 2
    )
    for method in methods:
        start = time.perf_counter()
        with jax.set_mesh(mesh):
            step, args, num_params = build(method, mesh, config, batch_per_device)
            compiled = step.lower(*args).compile()
        memory = compiled.memory_analysis()
        row = {
            "devices": devices,
            "method": method,
            "params": num_params,
            "arguments": memory.argument_size_in_bytes,
            "outputs": memory.output_size_in_bytes,
            "aliased": memory.alias_size_in_bytes,
            "temporaries": memory.temp_size_in_bytes,
            "bytes": collective_bytes(compiled),
            "bytes_common": collective_bytes(compiled, in_loops=False),
            "compile_s": time.perf_counter() - start,
        }
        print(json.dumps(row), flush=True)


def table(rows, unit="MiB"):
    """The markdown table of the workers' rows (memory and bytes in ``unit``).

    "amortized": bytes per step over many steps (Lookaround and PAPA: the
    baseline's bytes plus their extra sync bytes over the period; WASH: its
    common path, the extra round being that rare); "heaviest step": a sync
    step, or a WASH step with one extra round.
    """
    scale = {"KiB": 2**10, "MiB": 2**20}[unit]
    base = {r["devices"]: r["bytes"] for r in rows if r["method"] == "independent"}
    lines = [
        f"| devices | method | arguments {unit} | outputs {unit} (aliased) | "
        f"temporaries {unit} | amortized bytes/step {unit} | heaviest step {unit} "
        "| compile s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    fmt = lambda b: f"{b / scale:,.1f}"  # noqa: E731
    for r in rows:
        method, devices = r["method"], r["devices"]
        heaviest, amortized = r["bytes"], r["bytes_common"]
        if method in PERIODS and devices in base:
            amortized = base[devices] + (r["bytes"] - base[devices]) / PERIODS[method]
        lines.append(
            f"| {devices} | {LABELS[method]} | {fmt(r['arguments'])} | "
            f"{fmt(r['outputs'])} ({fmt(r['aliased'])}) | {fmt(r['temporaries'])} | "
            f"{fmt(amortized)} | {fmt(heaviest)} | {r['compile_s']:.0f} |"
        )
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--smoke", action="store_true", help="a tiny ViT, 8 devices, 4 methods"
    )
    parser.add_argument("--devices", type=int, nargs="+")
    parser.add_argument("--batch", type=int, default=8, help="images per device")
    parser.add_argument("--methods", nargs="+", choices=METHODS)
    parser.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.devices is None:
        args.devices = [8] if args.smoke else [8, 64]
    if args.methods is None:
        args.methods = list(SMOKE_METHODS if args.smoke else METHODS)
    config_name = "tiny" if args.smoke else "vit_b16"
    if args.worker:
        worker(args.worker, config_name, args.batch, args.methods)
        return

    # One worker process per mesh (each needs its own device count), at once.
    procs = []
    for devices in args.devices:
        env = dict(os.environ)
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
        if args.smoke:  # compiling is all a smoke run does: skip LLVM's passes
            env["XLA_FLAGS"] += " --xla_backend_optimization_level=0"
        env["JAX_PLATFORMS"] = "cpu"
        cmd = [sys.executable, __file__, "--worker", str(devices), "--batch"]
        cmd += [str(args.batch), "--methods", *args.methods]
        cmd += ["--smoke"] if args.smoke else []
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, text=True))
    rows = []
    for devices, proc in zip(args.devices, procs):
        out, _ = proc.communicate()
        if proc.returncode:
            raise SystemExit(f"worker for {devices} devices failed ({proc.returncode})")
        rows += [json.loads(line) for line in out.splitlines()]
    config = TINY if args.smoke else VIT_B16
    print(
        f"ViT ({config}) x {M} members, {rows[0]['params']:,} params per member, "
        f"float32, AdamW, {args.batch} images per device; per device:"
    )
    print(table(rows, "KiB" if args.smoke else "MiB"))


if __name__ == "__main__":
    main()
