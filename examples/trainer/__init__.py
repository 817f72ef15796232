"""The trainer package of the examples: one loop for the CIFAR and ImageNet trainers.

Example code, not library API: it is not installed with ``optax_wa`` (run
the examples from the repository root) and may change with any release.
It shows how the library's transformations fit a complete trainer: a mesh,
sharded state, a jitted step, evaluation of every member, the ensemble and
the weight average, checkpoints, metrics.

Modules:

* :mod:`examples.trainer.methods`: the method registry, the one place where
  a method name (``"lookaround+ssam"``) becomes its optax_wa construction;
  the CIFAR and ImageNet trainers and ``examples/compare.py`` build from it.
* :mod:`examples.trainer.loop`: mesh, model functions, train state and
  step, evaluation, the loop (:func:`examples.trainer.loop.train_and_evaluate`).
* :mod:`examples.trainer.checkpoints`: orbax checkpoints with the grain
  iterator state, falling back past unreadable ones.
* :mod:`examples.trainer.metrics`: ``metrics.jsonl`` and TensorBoard
  summaries (process 0 writes).
* :mod:`examples.trainer.data`: ``tfds.data_source`` + grain input, sharded
  over processes; mock data (``config.mock_data``); embedded digits.
* :mod:`examples.trainer.augment`: NumPy augmentation policies per member.
* :mod:`examples.trainer.models`: a Vision Transformer in Flax NNX.
* :mod:`examples.trainer.cli`: the command line of every ``main.py``.
"""
