"""Every benchmark script runs with ``--smoke`` and prints its table.

``--smoke`` is each script's tiny-settings mode (under 30 s on a 2-core CPU,
the same table shape as the real run). Each script runs in its own process,
as a user runs it (``python benchmarks/NAME.py --smoke``, without the test
suite's 8 fake devices), and must exit with status 0 and print the header of
its table. A new script needs an entry in ``TABLE_HEADERS``.
``ensemble_step.py``'s ResNet-20 step is traced in both modes, and only
where ``torch`` is importable (it is not a dependency) its JAX step and its
PyTorch loop are checked to compute the same params (``--check``).
"""

from __future__ import annotations

import importlib.util
import os
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPTS = sorted((ROOT / "benchmarks").glob("*.py"))
TIMEOUT_S = 120  # a smoke run takes < 30 s; the margin is for a loaded machine

# The header line of each script's table (a regular expression).
TABLE_HEADERS = {
    "averaging_speed": re.escape("| method | update ms | update ratio |"),
    "code_measures": r"code lines\s+complexity\s+function",
    "ensemble_step": re.escape("| contestant | ms per head-step | ratio to "),
    "per_device_tables": re.escape("| devices | method | arguments KiB |"),
    "sharpness_mnist1d": r"method \| lr=",
    "sharpness_quadratic": r"rho \|\s+GD \|",
    "sharpness_speed": re.escape("median step time"),
    "slimclr_mnist1d": re.escape("Linear-probe test accuracy (%)"),
    "wash_accuracy": re.escape("| init | method | members | logit ensemble |"),
    "wash_comm": re.escape("collective payload per device per step"),
    "wash_compile": re.escape("| update | trace+lower s | compile s | total s |"),
    "wash_overflow": r"bytes per device\s+bytes\s+/ all-reduce\s+kinds",
    "wash_speed": re.escape("| method | update ms | update ratio |"),
}


def _user_environment() -> dict[str, str]:
    """This process's environment without the suite's fake-device flag.

    ``PYTHONPATH`` puts the checkout first, so that the scripts import this
    copy of ``optax_wa``.
    """
    env = dict(os.environ)
    flags = env.get("XLA_FLAGS", "").replace(
        "--xla_force_host_platform_device_count=8", ""
    )
    env["XLA_FLAGS"] = flags.strip()
    env["PYTHONPATH"] = os.pathsep.join(
        [str(ROOT), *filter(None, [env.get("PYTHONPATH")])]
    )
    return env


def test_every_script_has_a_table_header():
    assert SCRIPTS, "no benchmark scripts found"
    missing = sorted({s.stem for s in SCRIPTS} - set(TABLE_HEADERS))
    assert not missing, f"add the table header of {missing} to TABLE_HEADERS"


def _run_script(
    script: pathlib.Path, *flags: str, timeout: int
) -> subprocess.CompletedProcess:
    """Runs ``python benchmarks/SCRIPT.py FLAGS`` as a user does; fails the test
    when it does not finish in ``timeout`` seconds."""
    try:
        return subprocess.run(
            [sys.executable, str(script), *flags],
            cwd=ROOT,
            env=_user_environment(),
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"{script.name} {' '.join(flags)} did not finish in {timeout} s")


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda s: s.stem)
def test_script_runs_with_smoke_and_prints_its_table(script):
    result = _run_script(script, "--smoke", timeout=TIMEOUT_S)
    tail = (result.stdout + result.stderr)[-3000:]
    assert result.returncode == 0, (
        f"{script.name} --smoke exited {result.returncode}:\n{tail}"
    )
    header = TABLE_HEADERS.get(script.stem)
    assert header is not None, f"add the table header of {script.stem} to TABLE_HEADERS"
    assert re.search(header, result.stdout), (
        f"{script.name} --smoke printed no table header /{header}/:\n{tail}"
    )


@pytest.mark.parametrize("mode", ["vmap", "sequential"])
def test_ensemble_step_resnet20_traces(mode):
    """The ResNet-20 ensemble step traces in both modes (shapes only: its
    ``--smoke`` run compiles for about 20 s of CPU; ``--check`` below runs it)."""
    import jax

    spec = importlib.util.spec_from_file_location(
        "ensemble_step", ROOT / "benchmarks" / "ensemble_step.py"
    )
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    opt, step = bench.ensemble_step("resnet20", mode)
    init = jax.vmap(lambda k: bench.init_resnet20(k, width=4))
    params = jax.eval_shape(init, jax.random.split(jax.random.key(0), 2))
    state = jax.eval_shape(opt.init, params)
    x = jax.ShapeDtypeStruct((2, 4, 32, 32, 3), jax.numpy.float32)
    y = jax.ShapeDtypeStruct((2, 4), jax.numpy.int32)
    new_params, _ = jax.eval_shape(step, params, state, x, y)
    assert jax.tree.structure(new_params) == jax.tree.structure(params)
    assert [a.shape for a in jax.tree.leaves(new_params)] == [
        a.shape for a in jax.tree.leaves(params)
    ]
    assert params["stage1_block0"]["short_conv"].shape == (2, 1, 1, 4, 8)


@pytest.mark.skipif(
    importlib.util.find_spec("torch") is None,
    reason="torch is not installed (not a dependency)",
)
@pytest.mark.parametrize("model", ["cnn", "resnet20"])
def test_ensemble_step_matches_pytorch(model):
    """The JAX Lookaround step (both modes) and the PyTorch loop it is timed
    against give the same params after one step and after a sync."""
    # Four compiles of the step (two modes, float32 and float64): about 1 min
    # of CPU for the ResNet-20.
    result = _run_script(
        ROOT / "benchmarks" / "ensemble_step.py",
        "--smoke",
        "--check",
        "--model",
        model,
        "--members",
        "2",
        timeout=300,
    )
    tail = (result.stdout + result.stderr)[-3000:]
    assert result.returncode == 0, tail
    assert result.stdout.count(f"check {model}:") == 4, tail
