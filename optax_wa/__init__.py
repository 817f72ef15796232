"""optax_wa: weight averaging, sharpness-aware descent, slimmable networks and
weight-space symmetry as composable optax transformations."""

from optax_wa import comm, members, permutation, shuffling, slimmable, transfer
from optax_wa.averaging import (
    AveragingState,
    LookaroundState,
    PapaState,
    is_sync_step,
    lookaround,
    papa,
    papa_lr_scaled_alpha,
    sync_schedule,
    sync_weight,
)
from optax_wa.batchnorm import recalibrate_batch_stats, recalibrate_nnx_batch_stats
from optax_wa.permutation import (
    PermutationSpec,
    apply_permutation,
    gradient_matching,
    weight_matching,
)
from optax_wa.sharpness import (
    SamInfo,
    SharpnessAwareState,
    sam_value_and_grad,
    sharpness_aware,
    ssam,
)
from optax_wa.shuffling import WashState, wash, wash_layer_probs
from optax_wa.slimmable import freeze_until, slimclr_loss_weights
from optax_wa.transfer import TransferResult, transfer_params, transfer_trajectory

__version__ = "0.1.0"  # the one source of the version (pyproject reads it)

__all__ = [
    "AveragingState",
    "LookaroundState",
    "PapaState",
    "PermutationSpec",
    "SamInfo",
    "SharpnessAwareState",
    "TransferResult",
    "WashState",
    "apply_permutation",
    "comm",
    "freeze_until",
    "gradient_matching",
    "is_sync_step",
    "lookaround",
    "members",
    "papa",
    "papa_lr_scaled_alpha",
    "permutation",
    "recalibrate_batch_stats",
    "recalibrate_nnx_batch_stats",
    "sam_value_and_grad",
    "sharpness_aware",
    "shuffling",
    "slimclr_loss_weights",
    "slimmable",
    "ssam",
    "sync_schedule",
    "sync_weight",
    "transfer",
    "transfer_params",
    "transfer_trajectory",
    "wash",
    "wash_layer_probs",
    "weight_matching",
]
