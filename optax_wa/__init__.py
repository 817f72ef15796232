"""optax_wa: weight averaging, sharpness-aware descent, slimmable networks and
weight-space symmetry as composable optax transformations."""

from optax_wa import members
from optax_wa.averaging import (
    LookaroundState,
    PapaState,
    lookaround,
    papa,
    papa_lr_scaled_alpha,
)
from optax_wa.batchnorm import recalibrate_batch_stats, recalibrate_nnx_batch_stats

__version__ = "0.1.0"

__all__ = [
    "LookaroundState",
    "PapaState",
    "lookaround",
    "members",
    "papa",
    "papa_lr_scaled_alpha",
    "recalibrate_batch_stats",
    "recalibrate_nnx_batch_stats",
]
