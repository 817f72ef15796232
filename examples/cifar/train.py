"""CIFAR trainer: ``train_and_evaluate(config, workdir)``.

The loop, sharding, evaluation and checkpoints are in
:mod:`examples.common.trainer`; this module plugs in the CIFAR models and
input pipeline.
"""

from __future__ import annotations

import ml_collections

from examples.cifar import input_pipeline, models
from examples.common import trainer


def create_task(config: ml_collections.ConfigDict) -> trainer.Task:
    return trainer.make_task(config, input_pipeline, models.create_model)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str):
    """Trains and evaluates; returns ``(final_state, final_eval_metrics)``."""
    return trainer.train_and_evaluate(config, workdir, create_task(config))
