"""Across processes: 2 processes x 4 CPU devices equal 1 process x 8 devices.

The runs are subprocesses of ``tests/multiprocess_worker.py`` (each with its
own ``XLA_FLAGS``; this pytest process already holds 8 fake devices): two
processes joined by ``jax.distributed.initialize`` (gloo collectives on
localhost) and, as the reference, the same script as a single process with
8 devices. They run at once, bounded in time; a failed or hung run has its
process group killed. Both write the final params of every optimizer
(stacked and named mode) to ``.npz``, compared here.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

pytestmark = pytest.mark.multiprocess

WORKER = Path(__file__).with_name("multiprocess_worker.py")
TIMEOUT_S = 420  # generous: the 2-core test machines are often shared
TOL = 1e-6


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _kill(proc):
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()


def _launch(tmp_path: Path, num_processes: int, tag: str):
    """Starts the processes of one run; returns them with their log paths."""
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    out = tmp_path / f"{tag}.npz"
    procs = []
    for i in range(num_processes):
        log = tmp_path / f"{tag}-{i}.log"
        with open(log, "w") as handle:
            proc = subprocess.Popen(
                [sys.executable, str(WORKER), str(i), str(num_processes), str(port)]
                + [str(out)],
                stdout=handle,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,  # its own process group, killed as one
            )
        procs.append((proc, log))
    return out, procs


def _tail(log: Path) -> str:
    """The end of a process's output, without gloo's connection chatter."""
    lines = log.read_text(errors="replace").splitlines()
    return "\n".join(line for line in lines if "[Gloo]" not in line)[-4000:]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """``{"two": results of 2 processes, "one": results of 1 process}``."""
    tmp_path = tmp_path_factory.mktemp("multiprocess")
    launched = {
        "two": _launch(tmp_path, 2, "two"),
        "one": _launch(tmp_path, 1, "one"),
    }
    everything = [pl for _, procs in launched.values() for pl in procs]
    deadline = time.monotonic() + TIMEOUT_S
    try:
        for proc, log in everything:
            left = max(deadline - time.monotonic(), 0.1)
            try:
                code = proc.wait(timeout=left)
            except subprocess.TimeoutExpired:
                pytest.fail(f"{log.name}: no result after {TIMEOUT_S} s\n{_tail(log)}")
            if code != 0:
                pytest.fail(f"{log.name}: exit code {code}\n{_tail(log)}")
    finally:
        for proc, _ in everything:
            _kill(proc)
    return {tag: dict(np.load(out)) for tag, (out, _) in launched.items()}


def test_runs_span_the_expected_processes(runs):
    assert int(runs["two"]["meta/process_count"]) == 2
    assert int(runs["two"]["meta/local_device_count"]) == 4
    assert int(runs["one"]["meta/process_count"]) == 1
    assert int(runs["one"]["meta/local_device_count"]) == 8


def _names(runs):
    keys = sorted(k for k in runs["one"] if not k.startswith("meta/"))
    return sorted({k.rsplit("/", 1)[0] for k in keys})


EXPECTED = [
    f"{mode}/{name}"
    for mode, names in {
        "named": ["lookaround", "papa", "sam_per_device", "sam_synced", "wash"],
        "stacked": ["lookaround", "papa", "sam", "wash"],
    }.items()
    for name in names + ["wash_p0"]
]


def test_two_processes_equal_one_process(runs):
    assert _names(runs) == sorted(EXPECTED)
    assert sorted(runs["two"]) == sorted(runs["one"])
    worst = {}
    for run in EXPECTED:
        leaves = [k for k in runs["one"] if k.startswith(run + "/")]
        assert len(leaves) == 3
        worst[run] = max(
            float(np.max(np.abs(runs["two"][k] - runs["one"][k]))) for k in leaves
        )
    print("\nmax |2 processes - 1 process| over the final params:")
    for run, diff in worst.items():
        print(f"  {run:24s} {diff:.2e}")
    assert all(np.isfinite(v) for v in worst.values())
    assert max(worst.values()) <= TOL, worst


@pytest.mark.parametrize("tag", ["two", "one"])
@pytest.mark.parametrize("name", ["lookaround", "papa", "wash", "wash_p0"])
def test_named_mode_equals_stacked_mode(runs, tag, name):
    # Two code paths: the stacked step under an explicit mesh (collectives
    # placed by the partitioner) and shard_map with explicit pmean/all_to_all.
    for leaf in ("w1", "b1", "w2"):
        np.testing.assert_allclose(
            runs[tag][f"named/{name}/{leaf}"],
            runs[tag][f"stacked/{name}/{leaf}"],
            rtol=1e-5,
            atol=1e-6,
        )


def test_stacked_runs_equal_an_unsharded_run(runs):
    """The distributed stacked steps against the same steps on one device,
    without a mesh or any collective (imported from the worker script)."""
    sys.path.insert(0, str(WORKER.parent))
    try:
        import multiprocess_worker as worker
    finally:
        sys.path.remove(str(WORKER.parent))
    params0, xs, ys = worker.problem()
    device = jax.devices()[0]
    with jax.default_device(device):
        for name, opt in worker.optimizers(None, None).items():
            got = worker.run_stacked(None, name, opt, params0, xs, ys)
            for leaf, value in got.items():
                np.testing.assert_allclose(
                    runs["two"][f"stacked/{name}/{leaf}"], value, rtol=1e-5, atol=1e-6
                )


def test_the_compared_runs_differ_where_they_should(runs):
    # The shuffle moved values (so its shared decisions were exercised), and
    # the per-device ascent differs from the synced one.
    one = runs["one"]
    for mode in ("stacked", "named"):
        assert np.max(np.abs(one[f"{mode}/wash/w1"] - one[f"{mode}/wash_p0/w1"])) > 0.1
    assert (
        np.max(np.abs(one["named/sam_synced/w1"] - one["named/sam_per_device/w1"]))
        > 1e-4
    )
    # Members differ (a step that collapsed them would compare trivially).
    for run in EXPECTED:
        w1 = one[f"{run}/w1"]
        assert np.max(np.abs(w1 - w1[:1])) > 1e-3, run
