"""The command line shared by the trainers' ``main.py`` (absl + ml_collections).

Example code, not library API. ``examples/{cifar,imagenet,slimclr}/main.py``
each call :func:`run` with their ``train.train_and_evaluate``.

With ``--distributed`` every process calls ``jax.distributed.initialize``
before anything touches a device: with no other flag (a TPU pod, a cluster
that JAX detects) the plain call; for a launch by hand, e.g. several
processes on one machine, ``--coordinator_address``, ``--num_processes`` and
``--process_id`` (or the environment variables ``JAX_COORDINATOR_ADDRESS``,
``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID``) are passed on. CPU processes
(``JAX_PLATFORMS=cpu``, or a launch by hand) exchange their collectives with
gloo.

A dataset that is not prepared prints one line naming the command that
prepares it and exits with status 2 (no traceback).

A run that stops on a non-finite loss or state (``FloatingPointError``, see
:class:`examples.trainer.loop.NonFiniteError`) exits with status 1 and its
message, which names the step, on stderr.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

from absl import app, flags, logging
from ml_collections import config_flags

from examples.trainer.data import DatasetNotPreparedError

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Directory for checkpoints and metrics.")
flags.DEFINE_bool(
    "distributed",
    False,
    "Call jax.distributed.initialize() first (TPU pods, multi-host GPU clusters, "
    "several local processes).",
)
flags.DEFINE_string(
    "coordinator_address",
    None,
    "With --distributed: host:port of process 0's coordinator "
    "(default: $JAX_COORDINATOR_ADDRESS, else detected by JAX).",
)
flags.DEFINE_integer(
    "num_processes",
    None,
    "With --distributed: the number of processes (default: $JAX_NUM_PROCESSES, "
    "else detected by JAX).",
)
flags.DEFINE_integer(
    "process_id",
    None,
    "With --distributed: this process's index (default: $JAX_PROCESS_ID, else "
    "detected by JAX).",
)
config_flags.DEFINE_config_file(
    "config", None, "Training configuration file.", lock_config=True
)
flags.mark_flags_as_required(["config", "workdir"])


def initialize_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
) -> None:
    """``jax.distributed.initialize`` with the arguments given here or in the environment.

    Arguments left ``None`` come from ``JAX_COORDINATOR_ADDRESS``,
    ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID``; those unset there too are
    left to JAX's cluster detection (the plain call on a TPU pod).
    """
    import jax

    env = os.environ
    coordinator_address = coordinator_address or env.get("JAX_COORDINATOR_ADDRESS")
    if num_processes is None and env.get("JAX_NUM_PROCESSES"):
        num_processes = int(env["JAX_NUM_PROCESSES"])
    if process_id is None and env.get("JAX_PROCESS_ID"):
        process_id = int(env["JAX_PROCESS_ID"])
    cpu = env.get("JAX_PLATFORMS", "").strip().lower() == "cpu"
    if cpu or coordinator_address is not None:
        # Cross-process collectives of the CPU backend (off by default).
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=coordinator_address,
        num_processes=num_processes,
        process_id=process_id,
    )


def run(train_and_evaluate: Callable) -> None:
    """Parses the flags and runs ``train_and_evaluate(config, workdir)`` (absl ``app.run``)."""

    def main(argv):
        if len(argv) > 1:
            raise app.UsageError("Too many command-line arguments.")
        import jax

        if not FLAGS["verbosity"].present:  # orbax logs every save at INFO
            logging.set_verbosity(logging.WARNING)
        if FLAGS.distributed:
            initialize_distributed(
                FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id
            )
        elif any(
            FLAGS[name].present
            for name in ("coordinator_address", "num_processes", "process_id")
        ):
            raise app.UsageError(
                "--coordinator_address, --num_processes and --process_id need "
                "--distributed."
            )
        logging.info(
            "process %d/%d, %d local devices of %d",
            jax.process_index(),
            jax.process_count(),
            jax.local_device_count(),
            jax.device_count(),
        )
        try:
            train_and_evaluate(FLAGS.config, FLAGS.workdir)
        except DatasetNotPreparedError as e:  # one line naming the command: exit 2
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
        except FloatingPointError as e:  # a non-finite loss or state: exit 1
            sys.exit(f"error: {e}")

    app.run(main)
