"""Slimmable networks for contrastive self-supervised learning (SlimCLR).

One pretraining run yields a full network and weight-sharing sub-networks at
smaller widths. This subpackage holds the Flax NNX layers
(:class:`SlimmableLinear`, :class:`SlimmableConv`, switchable norms and the
switchable linear probe), model builders, contrastive losses with SlimCLR's
online distillation, and the training pieces: loss reweighting, the slow-start
schedule, :func:`freeze_until`, the gradient-imbalance diagnostic and MoCo's
momentum encoder and queue. See ``docs/slimclr.md``.

References:
  Zhao, Wu, Zhu, Ji and Wang, `Slimmable Networks for Contrastive
  Self-supervised Learning <https://arxiv.org/abs/2209.15525>`_, IJCV 2024.
"""

from optax_wa.slimmable.layers import (
    SlimmableConv,
    SlimmableLinear,
    SwitchableBatchNorm,
    SwitchableLayerNorm,
    SwitchableLinear,
    calibrate_batch_norm,
    slim_size,
)
from optax_wa.slimmable.losses import (
    contrastive_distillation,
    info_nce,
    l2_normalize,
    mocov3_loss,
    nt_xent,
)
from optax_wa.slimmable.models import (
    SlimmableCNN1D,
    SlimmableEncoder,
    SlimmableMLP,
    SlimmableProjectionHead,
)
from optax_wa.slimmable.resnet import (
    SlimmableResNet,
    slimmable_resnet18_cifar,
    slimmable_resnet50,
)
from optax_wa.slimmable.training import (
    FreezeUntilState,
    MoCoQueue,
    SlicedAxes,
    SlimmableGradStatsState,
    enqueue,
    freeze_until,
    init_queue,
    moco_momentum,
    slim_axes_spec,
    slimclr_loss_weights,
    slimmable_grad_stats,
    slow_start_schedule,
    sub_width_mask,
    update_key_encoder,
    weighted_value_and_grad,
)
from optax_wa.slimmable.vit import SlimmableAttention, SlimmableViT

__all__ = [
    "FreezeUntilState",
    "MoCoQueue",
    "SlicedAxes",
    "SlimmableAttention",
    "SlimmableCNN1D",
    "SlimmableConv",
    "SlimmableEncoder",
    "SlimmableGradStatsState",
    "SlimmableLinear",
    "SlimmableMLP",
    "SlimmableProjectionHead",
    "SlimmableResNet",
    "SlimmableViT",
    "SwitchableBatchNorm",
    "SwitchableLayerNorm",
    "SwitchableLinear",
    "calibrate_batch_norm",
    "contrastive_distillation",
    "enqueue",
    "freeze_until",
    "info_nce",
    "init_queue",
    "l2_normalize",
    "moco_momentum",
    "mocov3_loss",
    "nt_xent",
    "slim_axes_spec",
    "slim_size",
    "slimclr_loss_weights",
    "slimmable_grad_stats",
    "slimmable_resnet18_cifar",
    "slimmable_resnet50",
    "slow_start_schedule",
    "sub_width_mask",
    "update_key_encoder",
    "weighted_value_and_grad",
]
