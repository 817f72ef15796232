"""Metrics of a run: ``metrics.jsonl`` and TensorBoard summaries, written by process 0.

Example code, not library API. Every logged step becomes one JSON line
(``workdir/metrics.jsonl``) and, unless ``config.tensorboard`` is off, one
scalar summary per metric in ``workdir/tensorboard`` (event files written by
``tensorboardX``, which needs neither TensorFlow nor TensorBoard; view them
with ``tensorboard --logdir=workdir/tensorboard``). Only process 0 writes.
"""

from __future__ import annotations

import json
import os

import jax
from etils import epath


def workdir_path(workdir: str) -> epath.Path:
    """``workdir`` as a path: local paths made absolute, ``gs://`` kept."""
    return epath.Path(workdir if "://" in str(workdir) else os.path.abspath(workdir))


class MetricWriter:
    """Writes metrics (process 0 only) to ``workdir/metrics.jsonl`` and TensorBoard.

    ``metrics.jsonl`` holds one JSON object per logged step (the train and
    evaluation metrics of a step together), appended line by line, so the
    workdir must be on a file system with append. :meth:`resume` first drops
    the lines of steps after the one a run resumes from (they are logged
    again), so that every step appears once; the TensorBoard writer opened
    after it purges the summaries of those steps (``purge_step``).

    Args:
      workdir: the run's directory.
      tensorboard: also write TensorBoard scalars to ``workdir/tensorboard``
        (each metric under its own name, e.g. ``train/loss``,
        ``eval/ensemble/accuracy``). Without ``tensorboardX`` installed (it
        is in the ``examples`` extra) a warning is printed and only
        ``metrics.jsonl`` is written.
    """

    def __init__(self, workdir: str, tensorboard: bool = True):
        self.enabled = jax.process_index() == 0
        self.path = workdir_path(workdir) / "metrics.jsonl"
        self.tensorboard_dir = workdir_path(workdir) / "tensorboard"
        self._tensorboard = None
        self._purge_step = None
        self._use_tensorboard = tensorboard and self.enabled
        if self.enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        if self._use_tensorboard:
            try:
                import tensorboardX  # noqa: F401
            except ImportError:
                self._use_tensorboard = False
                self.print(
                    "warning: tensorboardX is not installed (pip install tensorboardX, "
                    "or set config.tensorboard=False); writing metrics.jsonl only."
                )

    def resume(self, step: int) -> None:
        """Keeps the lines of steps ``<= step`` (and drops a partly written last line)."""
        if not self.enabled:
            return
        self._purge_step = step + 1
        if not self.path.exists():
            return
        lines = self.path.read_text().splitlines()
        steps = [_line_step(line) for line in lines]
        kept = [line for line, s in zip(lines, steps) if s is not None and s <= step]
        if len(kept) != len(lines):
            self.path.write_text("".join(line + "\n" for line in kept))

    def write(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")
        if self._use_tensorboard:
            if self._tensorboard is None:
                from tensorboardX import SummaryWriter

                self._tensorboard = SummaryWriter(
                    str(self.tensorboard_dir), purge_step=self._purge_step
                )
            for name, value in metrics.items():
                self._tensorboard.add_scalar(name, value, step)
            self._tensorboard.flush()

    def print(self, message: str) -> None:
        if self.enabled:
            from tqdm import tqdm

            tqdm.write(message)  # above the progress bar, if there is one

    def close(self) -> None:
        if self._tensorboard is not None:
            self._tensorboard.close()
            self._tensorboard = None


def _line_step(line: str) -> int | None:
    """The step of a ``metrics.jsonl`` line; ``None`` for a partly written line."""
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return None
