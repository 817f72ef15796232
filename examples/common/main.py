"""The command line shared by the trainers' ``main.py`` (absl + ml_collections).

A run that stops on a non-finite loss or state (``FloatingPointError``, see
:class:`examples.common.trainer.NonFiniteError`) exits with status 1 and its
message, which names the step, on stderr.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

from absl import app, flags, logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Directory for checkpoints and metrics.")
flags.DEFINE_bool(
    "distributed",
    False,
    "Call jax.distributed.initialize() first (multi-host GPU clusters and TPU pods).",
)
config_flags.DEFINE_config_file(
    "config", None, "Training configuration file.", lock_config=True
)
flags.mark_flags_as_required(["config", "workdir"])


def run(train_and_evaluate: Callable) -> None:
    def main(argv):
        if len(argv) > 1:
            raise app.UsageError("Too many command-line arguments.")
        import jax

        if not FLAGS["verbosity"].present:  # orbax logs every save at INFO
            logging.set_verbosity(logging.WARNING)
        if FLAGS.distributed:
            jax.distributed.initialize()
        logging.info(
            "process %d/%d, %d local devices of %d",
            jax.process_index(),
            jax.process_count(),
            jax.local_device_count(),
            jax.device_count(),
        )
        try:
            train_and_evaluate(FLAGS.config, FLAGS.workdir)
        except FloatingPointError as e:  # a non-finite loss or state: exit 1
            sys.exit(f"error: {e}")

    app.run(main)
