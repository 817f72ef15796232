"""The CIFAR trainer as 2 processes on localhost against 1 process with 8 devices.

Each process is ``python -m examples.cifar.main --distributed`` with 4 CPU
devices (``--xla_force_host_platform_device_count=4``), gloo collectives and
``jax.distributed.initialize`` on a localhost coordinator; together they
form one ``("members", "data")`` mesh over 8 devices. Each reads its block of
every global batch, so the global batches are the single process's. The
2-process run stops after 2 steps (a joint checkpoint), both processes
restart and resume to step 4; the metrics and the final params match an
uninterrupted run in this (one) process over its 8 devices.

The processes run in their own process group, bounded in time; on a
failure or a timeout the whole group is killed.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import grain
import jax
import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # the examples are not part of the installed package
    sys.path.insert(0, str(ROOT))

from examples.cifar import train  # noqa: E402
from examples.cifar.configs import tiny  # noqa: E402
from examples.trainer import data  # noqa: E402

NUM_PROCESSES = 2
TIMEOUT_S = 300  # per launch of the processes

# Scalar config overrides shared by the 2-process runs (as flags) and the
# in-process reference. Lookaround's sync (step 3) comes after the resume;
# SAM adds an ascent step; a constant schedule is the same for 2 and 4 steps.
OVERRIDES = {
    "dataset": "digits",
    "method": "lookaround+sam",
    "lookaround.sync_period": 3,
    "optimizer.schedule": "constant",
    "batch_size": 16,
    "eval_batch_size": 16,
    "eval_every_steps": 2,
    "checkpoint_every_steps": 2,
    "recalibration_batches": 2,
}


def _config(steps: int):
    config = tiny.get_config()
    for name, value in {**OVERRIDES, "num_train_steps": steps}.items():
        *parents, leaf = name.split(".")
        node = config
        for parent in parents:
            node = node[parent]
        node[leaf] = value
    return config


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _kill_group(process: subprocess.Popen) -> None:
    """Stops a process group: SIGABRT first (faulthandler prints the Python stacks)."""
    for sig, grace in ((signal.SIGABRT, 10), (signal.SIGKILL, 0)):
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=grace)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=30)


def _launch(workdir, steps: int, logdir, cache_dir) -> list[str]:
    """Runs the trainer as ``NUM_PROCESSES`` processes; returns their outputs.

    Fails (after killing every process group) when a process exits non-zero,
    which leaves the others waiting in a collective, or when they outlast
    ``TIMEOUT_S``.
    """
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "XLA_"))}
    env.update(
        PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
        PYTHONFAULTHANDLER="1",
        JAX_PLATFORMS="cpu",
        XLA_FLAGS="--xla_force_host_platform_device_count=4",
        JAX_COMPILATION_CACHE_DIR=str(cache_dir),
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
        JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
    )
    flags = [
        f"--config.{k}={v}" for k, v in {**OVERRIDES, "num_train_steps": steps}.items()
    ]
    logs, processes = [], []
    try:
        for i in range(NUM_PROCESSES):
            log = pathlib.Path(logdir) / f"steps{steps}_process{i}.log"
            logs.append(log)
            with log.open("w") as out:
                processes.append(
                    subprocess.Popen(
                        [
                            sys.executable,
                            "-m",
                            "examples.cifar.main",
                            "--distributed",
                            f"--coordinator_address=127.0.0.1:{port}",
                            f"--num_processes={NUM_PROCESSES}",
                            f"--process_id={i}",
                            f"--workdir={workdir}",
                            "--config=examples/cifar/configs/tiny.py",
                            *flags,
                        ],
                        cwd=ROOT,
                        env=env,
                        stdout=out,
                        stderr=subprocess.STDOUT,
                        start_new_session=True,  # its own group, killed as one
                    )
                )
        deadline = time.monotonic() + TIMEOUT_S
        while any(p.poll() is None for p in processes):
            failed = [p for p in processes if p.poll() not in (None, 0)]
            if failed or time.monotonic() > deadline:
                break
            time.sleep(0.5)
    finally:
        for p in processes:
            _kill_group(p)
    outputs = [log.read_text() for log in logs]
    report = "".join(
        f"\n--- process {i}, exit status {p.returncode} (timeout {TIMEOUT_S} s):\n"
        + "\n".join(line for line in out.splitlines() if "[Gloo]" not in line)[-3000:]
        for i, (p, out) in enumerate(zip(processes, outputs))
    )
    assert all(p.returncode == 0 for p in processes), report
    return outputs


def _records(workdir) -> list[dict]:
    lines = (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines()
    return [
        {k: v for k, v in json.loads(line).items() if k != "train/steps_per_second"}
        for line in lines
    ]


def _checkpoint_params(workdir, step: int, like) -> list[np.ndarray]:
    """The params of a checkpoint, restored into the shardings of the state ``like``."""
    import orbax.checkpoint as ocp

    path = pathlib.Path(workdir) / "checkpoints" / str(step) / "state"
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), like
    )
    restored = ocp.StandardCheckpointer().restore(path, abstract)
    return [np.asarray(x) for x in jax.tree.leaves(jax.device_get(restored.params))]


def test_process_blocks_make_up_the_single_process_global_batch():
    """Process ``i``'s local batches, stacked in process order, are the 1-process batches."""
    source = data.digits_sources()[0]
    global_batch, shards = 12, 3
    views = data.MemberViews(
        [lambda image, rng: np.roll(image, rng.integers(-3, 4), axis=(0, 1))]
    )

    def loader(shard_index, shard_count):
        sampler = grain.samplers.IndexSampler(
            num_records=len(source), shuffle=True, num_epochs=None, seed=7
        )
        return iter(
            grain.DataLoader(
                data_source=source,
                sampler=data.ProcessBlockSampler(sampler, global_batch, shard_count),
                operations=[
                    views,
                    grain.transforms.Batch(global_batch // shard_count),
                ],
                shard_options=grain.sharding.ShardOptions(shard_index, shard_count),
            )
        )

    single = loader(0, 1)
    per_process = [loader(i, shards) for i in range(shards)]
    for _ in range(len(source) // global_batch + 3):  # past an epoch boundary
        expected = next(single)
        parts = [next(it) for it in per_process]
        for key in ("image", "label"):
            got = np.concatenate([part[key] for part in parts])
            np.testing.assert_array_equal(got, expected[key])
    with pytest.raises(ValueError, match="not divisible by the 5 processes"):
        data.ProcessBlockSampler(None, 12, 5)


def test_two_processes_resume_and_match_one_process_with_eight_devices(
    tmp_path, read_scalars
):
    assert jax.device_count() == 8 and jax.process_count() == 1
    workdir, cache = tmp_path / "two_processes", tmp_path / "cache"
    first = _launch(workdir, 2, tmp_path, cache)
    assert "resumed" not in first[0]
    saved = sorted(os.listdir(workdir / "checkpoints"))
    assert saved == ["2"]
    grain_states = sorted(os.listdir(workdir / "checkpoints" / "2" / "data"))
    assert "process_0-of-2.json" in grain_states
    assert "process_1-of-2.json" in grain_states
    resumed = _launch(workdir, 4, tmp_path, cache)  # both restart from step 2
    assert "resumed from step 2" in resumed[0]
    assert "resumed" not in resumed[1]  # only process 0 prints and writes metrics

    reference_dir = tmp_path / "one_process"
    state, _ = train.train_and_evaluate(_config(4), str(reference_dir))

    two, one = _records(workdir), _records(reference_dir)
    assert [r["step"] for r in two] == [r["step"] for r in one] == [1, 2, 3, 4]
    # Only process 0 writes TensorBoard: each step once over both launches.
    scalars = read_scalars(workdir / "tensorboard")
    assert [step for step, _ in scalars["train/loss"]] == [1, 2, 3, 4]
    worst = {}
    for a, b in zip(two, one):
        assert a.keys() == b.keys()
        for key in a:
            worst[key] = max(worst.get(key, 0.0), abs(a[key] - b[key]))
    print("\n2 processes vs 1 process, max |difference| over steps 1-4:")
    for key, value in sorted(worst.items()):
        print(f"  {key}: {value:.3g}")
    for a, b in zip(two, one):
        for key in a:
            np.testing.assert_allclose(
                a[key], b[key], rtol=1e-5, atol=1e-6, err_msg=key
            )

    two_params = _checkpoint_params(workdir, 4, state)
    one_params = [np.asarray(x) for x in jax.tree.leaves(jax.device_get(state.params))]
    assert len(two_params) == len(one_params) > 0
    diff = max(float(np.max(np.abs(a - b))) for a, b in zip(two_params, one_params))
    print(f"  final params: {diff:.3g}")
    for a, b in zip(two_params, one_params):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    # The run is not degenerate: the members moved apart and the loss changed.
    assert not np.allclose(two_params[0][0], two_params[0][1])
    assert two[0]["train/loss"] != two[-1]["train/loss"]


def test_process_flags_without_distributed_are_a_usage_error(tmp_path):
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "examples.cifar.main",
            f"--workdir={tmp_path}",
            "--config=examples/cifar/configs/tiny.py",
            "--process_id=1",
        ],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode != 0
    assert "need --distributed" in run.stderr
    assert not (tmp_path / "checkpoints").exists()
