"""One process of a multi-process run, launched by ``tests/test_multiprocess.py``.

``python tests/multiprocess_worker.py PROCESS_ID NUM_PROCESSES PORT OUT.npz``

Every process joins JAX's distributed runtime (CPU, gloo collectives on
localhost) and sees its own ``8 / NUM_PROCESSES`` fake CPU devices; together
they form one global ``("members", "data")`` mesh of 4 x 2 devices. A few
train steps of an 8-member ensemble of small MLPs run for each optimizer, in
stacked mode (params ``(M, ...)`` split over ``"members"``, batches split over
``"members"`` and ``"data"``) and in named mode (``jax.shard_map`` over the
mesh, the two local members ``vmap``-ed inside). Process 0 writes the final
params, brought back with ``process_allgather``, to ``OUT.npz``. The same
script with ``NUM_PROCESSES=1`` is the single-process reference.
"""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path

NUM_DEVICES = 8
if __name__ == "__main__":
    # Before JAX is imported: this process's share of the 8 devices, and this
    # checkout's optax_wa (the script's own folder comes first on sys.path).
    os.environ["XLA_FLAGS"] = (
        f"--xla_force_host_platform_device_count={NUM_DEVICES // int(sys.argv[2])}"
    )
    os.environ["JAX_PLATFORMS"] = "cpu"
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402
from jax.sharding import AxisType, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import optax_wa  # noqa: E402

M, BATCH, FEATURES, HIDDEN, STEPS = 8, 16, 5, 6, 5  # last step: no sync
NAMED = ("members", "local")  # member axes in named mode: mesh axis, then vmap


def mlp_loss(params, x, y):
    hidden = jnp.tanh(x @ params["w1"] + params["b1"])
    return jnp.mean((hidden @ params["w2"] - y) ** 2)


def problem():
    """Non-integer params and data, identical in every process (NumPy seed)."""
    rng = np.random.default_rng(0)
    params = {
        "w1": rng.normal(size=(M, FEATURES, HIDDEN)).astype(np.float32),
        "b1": (0.1 * rng.normal(size=(M, HIDDEN))).astype(np.float32),
        "w2": rng.normal(size=(M, HIDDEN)).astype(np.float32),
    }
    # Per member and step: different inputs and targets, so members diverge
    # and the data shards differ.
    x = rng.normal(size=(STEPS, M, BATCH, FEATURES)).astype(np.float32)
    y = (
        rng.normal(size=(STEPS, M, BATCH)).astype(np.float32)
        + np.arange(BATCH, dtype=np.float32) / BATCH
    )
    return params, x, y


def global_array(value, mesh, spec):
    """A global array from the host copy every process holds; each process
    supplies only the shards of its own devices (``mesh=None``: one device)."""
    value = np.asarray(value)
    if mesh is None:
        return jnp.asarray(value)
    sharding = NamedSharding(mesh, spec)
    return jax.make_array_from_callback(value.shape, sharding, lambda i: value[i])


def to_host(tree, mesh):
    """Every process gets the whole of a global array as NumPy."""
    if mesh is None:
        return jax.tree.map(np.asarray, tree)
    return multihost_utils.process_allgather(tree, tiled=True)


def optimizers(axis_name, data_axis):
    """The ensemble optimizers, every argument explicit."""
    sam_inner = optax.sgd(0.05, momentum=0.9)
    opts = {
        "lookaround": optax_wa.lookaround(
            optax.sgd(0.1, momentum=0.9),
            sync_period=2,
            state_policy="keep",
            axis_name=axis_name,
        ),
        "papa": optax_wa.papa(
            optax.adam(0.05), alpha=0.8, period=2, axis_name=axis_name
        ),
        "wash": optax_wa.wash(
            optax.sgd(0.1, momentum=0.9),
            shuffle_prob=0.3,
            layer_probs="constant",
            shuffle_opt_state=True,
            seed=3,
            axis_name=axis_name,
        ),
        # p = 0: the same steps without the shuffle, to show it happened.
        "wash_p0": optax_wa.wash(
            optax.sgd(0.1, momentum=0.9),
            shuffle_prob=0.0,
            layer_probs="constant",
            seed=3,
            axis_name=axis_name,
        ),
    }
    # SAM inside Lookaround; in named mode data parallel over "data", the
    # ascent either per device or from the all-device gradient.
    ascents = (
        {"sam": False}
        if data_axis is None
        else {"sam_synced": True, "sam_per_device": False}
    )
    for name, sync in ascents.items():
        opts[name] = optax_wa.lookaround(
            optax_wa.sharpness_aware(
                sam_inner,
                rho=0.2,
                stable=True,
                axis_name=data_axis,
                sync_ascent=sync,
            ),
            sync_period=2,
            state_policy="keep",
            axis_name=axis_name,
        )
    return opts


def run_stacked(mesh, name, opt, params0, xs, ys):
    """Stacked mode; ``mesh=None`` runs unsharded on one device."""
    sam = name.startswith("sam")

    def loss(p, x, y):
        return jnp.sum(jax.vmap(mlp_loss)(p, x, y))

    @jax.jit
    def step(params, state, x, y):
        if sam:
            # grad_fn is called per member (inside the ensemble's vmap) with
            # that member's params: the members share one batch, split over
            # "data".
            grad_fn = lambda p: jax.grad(mlp_loss)(p, x, y)  # noqa: E731
            grads = jax.vmap(grad_fn)(params)
            updates, state = opt.update(grads, state, params, grad_fn=grad_fn)
        else:
            grads = jax.grad(loss)(params, x, y)
            updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    with jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext():
        params = jax.tree.map(lambda v: global_array(v, mesh, P("members")), params0)
        state = jax.jit(opt.init)(params)
        for t in range(STEPS):
            if sam:  # member 0's batch, shared by all members
                x = global_array(xs[t, 0], mesh, P("data"))
                y = global_array(ys[t, 0], mesh, P("data"))
            else:
                x = global_array(xs[t], mesh, P("members", "data"))
                y = global_array(ys[t], mesh, P("members", "data"))
            params, state = step(params, state, x, y)
        return to_host(params, mesh)


def run_named(mesh, name, opt, params0, xs, ys):
    """Named mode: shard_map over the mesh, the local members vmapped."""
    sam = name.startswith("sam")

    def local_step(params, state, x, y):
        # One member (vmapped over the local members) on one data shard.
        grads = jax.grad(mlp_loss)(params, x, y)
        extra = {}
        if sam:  # the wrapper averages over "data" itself
            extra["grad_fn"] = lambda p: jax.grad(mlp_loss)(p, x, y)
        else:
            grads = jax.lax.pmean(grads, "data")
        updates, state = opt.update(grads, state, params, **extra)
        return optax.apply_updates(params, updates), state

    step = jax.jit(
        jax.shard_map(
            jax.vmap(local_step, axis_name="local"),
            mesh=mesh,
            in_specs=(
                P("members"),
                P("members"),
                P("members", "data"),
                P("members", "data"),
            ),
            out_specs=(P("members"), P("members")),
            check_vma=False,
        )
    )
    init = jax.jit(
        jax.shard_map(
            jax.vmap(opt.init, axis_name="local"),
            mesh=mesh,
            in_specs=P("members"),
            out_specs=P("members"),
            check_vma=False,
        )
    )
    with jax.set_mesh(mesh):
        params = jax.tree.map(lambda v: global_array(v, mesh, P("members")), params0)
        state = init(params)
        for t in range(STEPS):
            x = global_array(xs[t], mesh, P("members", "data"))
            y = global_array(ys[t], mesh, P("members", "data"))
            params, state = step(params, state, x, y)
        return to_host(params, mesh)


def main(process_id, num_processes, port, out):
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=f"127.0.0.1:{port}",
        num_processes=num_processes,
        process_id=process_id,
        initialization_timeout=60,
    )
    assert jax.process_count() == num_processes
    assert jax.device_count() == NUM_DEVICES
    mesh = jax.make_mesh(
        (4, 2), ("members", "data"), axis_types=(AxisType.Explicit,) * 2
    )
    params0, xs, ys = problem()
    results = {
        "meta/process_count": np.asarray(jax.process_count()),
        "meta/local_device_count": np.asarray(jax.local_device_count()),
    }
    for name, opt in optimizers(None, None).items():
        out_tree = run_stacked(mesh, name, opt, params0, xs, ys)
        results.update(
            {f"stacked/{name}/{k}": np.asarray(v) for k, v in out_tree.items()}
        )
    for name, opt in optimizers(NAMED, "data").items():
        out_tree = run_named(mesh, name, opt, params0, xs, ys)
        results.update(
            {f"named/{name}/{k}": np.asarray(v) for k, v in out_tree.items()}
        )
    if process_id == 0:
        np.savez(out, **results)
    multihost_utils.sync_global_devices("results written")
    jax.distributed.shutdown()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
