"""Checkpoints of a run: the train state and the grain iterator state, with orbax.

Example code, not library API. An orbax ``CheckpointManager`` in
``workdir/checkpoints`` saves the train state (any pytree of sharded arrays)
and the data iterator's position (``grain.checkpoint``, one file per
process). Restoring tries the newest checkpoint first and falls back past
unreadable ones, moving them to ``workdir/checkpoints_unreadable/``.
"""

from __future__ import annotations

from collections.abc import Callable

import grain
import jax
import orbax.checkpoint as ocp
from etils import epath

from examples.trainer.metrics import workdir_path


def checkpoint_manager(workdir: str, config) -> ocp.CheckpointManager:
    return ocp.CheckpointManager(
        workdir_path(workdir) / "checkpoints",
        item_names=("state", "data"),
        options=ocp.CheckpointManagerOptions(
            max_to_keep=config.max_checkpoints_to_keep, create=True
        ),
    )


def save_checkpoint(manager, state, train_iter) -> None:
    manager.save(
        int(state.step),
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=grain.checkpoint.CheckpointSave(train_iter),
        ),
    )


def restore_checkpoint(manager, state, train_iter, warn: Callable[[str], None] = print):
    """Restores the newest readable checkpoint into ``state``'s shardings (and ``train_iter``).

    Tries the steps from the latest down. A checkpoint that fails to restore
    (truncated array data, missing metadata, a garbled iterator state, ...)
    is reported through ``warn``, naming its directory and the error. Once an
    earlier one restores, the unreadable newer ones are moved to
    ``checkpoints_unreadable/`` next to the checkpoints (kept for inspection,
    and out of the way of the steps that will be saved again). With several
    processes the checkpoints must be on a file system they share, so that
    every process sees the same failures and falls back to the same step.

    Returns:
      The restored state, or ``None`` when there is no checkpoint.

    Raises:
      RuntimeError: when there are checkpoints and none restores (e.g. a
        config that changed the model): nothing is moved then.
    """
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state
    )
    steps = sorted(manager.all_steps(), reverse=True)
    unreadable, error = [], None
    for step in steps:
        try:
            restored = manager.restore(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract),
                    data=grain.checkpoint.CheckpointRestore(train_iter),
                ),
            )
        except Exception as e:  # any failure to read: fall back to an earlier step
            error = e
            message = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
            warn(
                f"warning: checkpoint {manager.directory / str(step)} cannot be "
                f"restored ({type(e).__name__}: {message}); trying an earlier one."
            )
            unreadable.append(step)
            continue
        if unreadable:
            _move_unreadable(manager, unreadable, warn)
        return restored.state
    if steps:
        raise RuntimeError(
            f"none of the checkpoints {steps} in {manager.directory} can be restored; "
            "the last error is chained above."
        ) from error
    return None


def _move_unreadable(manager, steps, warn) -> None:
    """Moves step directories to ``checkpoints_unreadable/`` (process 0) and reloads."""
    target_root = epath.Path(manager.directory).parent / "checkpoints_unreadable"
    if jax.process_index() == 0:
        target_root.mkdir(parents=True, exist_ok=True)
        for step in steps:
            target, n = target_root / str(step), 0
            while target.exists():
                n += 1
                target = target_root / f"{step}.{n}"
            (epath.Path(manager.directory) / str(step)).rename(target)
            warn(
                f"warning: moved the unreadable checkpoint of step {step} to {target}."
            )
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("move unreadable checkpoints")
    manager.reload()
