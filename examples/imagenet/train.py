"""ImageNet trainer: ``train_and_evaluate(config, workdir)``.

The loop, sharding, evaluation and checkpoints are in
:mod:`examples.trainer.loop`; this module plugs in the ViTs and the
ImageNet input pipeline.
"""

from __future__ import annotations

import ml_collections

from examples.imagenet import input_pipeline, models
from examples.trainer import data, loop


def create_task(config: ml_collections.ConfigDict) -> loop.Task:
    return loop.make_task(config, input_pipeline, models.create_model)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str):
    """Trains and evaluates; returns ``(final_state, final_eval_metrics)``.

    With ``config.mock_data`` the TFDS datasets are random mock records
    (:func:`examples.trainer.data.mock_data`): an offline run of any config.
    """
    with data.mock_data(config):
        return loop.train_and_evaluate(config, workdir, create_task(config))
