"""optax_wa: weight averaging, sharpness-aware descent, slimmable networks and
weight-space symmetry as composable optax transformations."""

from optax_wa import comm, members, permutation, shuffling, slimmable, transfer
from optax_wa.averaging import (
    LookaroundState,
    PapaState,
    lookaround,
    papa,
    papa_lr_scaled_alpha,
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
    "WashState",
    "comm",
    "shuffling",
    "wash",
    "wash_layer_probs",
    "LookaroundState",
    "PapaState",
    "lookaround",
    "members",
    "papa",
    "papa_lr_scaled_alpha",
    "recalibrate_batch_stats",
    "recalibrate_nnx_batch_stats",
    "permutation",
    "transfer",
    "PermutationSpec",
    "apply_permutation",
    "gradient_matching",
    "weight_matching",
    "TransferResult",
    "transfer_params",
    "transfer_trajectory",
    "SamInfo",
    "SharpnessAwareState",
    "sam_value_and_grad",
    "sharpness_aware",
    "ssam",
    "slimmable",
    "freeze_until",
    "slimclr_loss_weights",
]
