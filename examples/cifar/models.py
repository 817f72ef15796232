"""CIFAR models in Flax NNX: ResNet-20/18, WideResNet-16-8 and a small-patch ViT.

Every model maps uint8-normalized images ``(B, H, W, 3)`` to float32 logits,
takes ``train`` (BatchNorm uses batch statistics when True, running
statistics when False) and holds no random state.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from examples.trainer import models as trainer_models
from examples.trainer.models import ViT


def _conv(cin, cout, kernel, stride, dtype, rngs):
    return nnx.Conv(
        cin,
        cout,
        (kernel, kernel),
        strides=(stride, stride),
        # PyTorch-style padding (k // 2 on each side) as in the reference
        # ResNet and WRN code: "SAME" pads (0, 1) at stride 2 on even sizes.
        padding=((kernel // 2, kernel // 2),) * 2,
        use_bias=False,
        kernel_init=nnx.initializers.variance_scaling(2.0, "fan_out", "normal"),
        dtype=dtype,
        rngs=rngs,
    )


def _norm(features, dtype, rngs):
    return nnx.BatchNorm(features, momentum=0.9, dtype=dtype, rngs=rngs)


class BasicBlock(nnx.Module):
    """Post-activation residual block: two 3x3 convolutions, projection shortcut."""

    def __init__(self, cin: int, cout: int, stride: int, *, dtype, rngs: nnx.Rngs):
        self.conv1 = _conv(cin, cout, 3, stride, dtype, rngs)
        self.bn1 = _norm(cout, dtype, rngs)
        self.conv2 = _conv(cout, cout, 3, 1, dtype, rngs)
        self.bn2 = _norm(cout, dtype, rngs)
        if stride != 1 or cin != cout:
            self.shortcut = _conv(cin, cout, 1, stride, dtype, rngs)
            self.shortcut_bn = _norm(cout, dtype, rngs)
        else:
            self.shortcut = self.shortcut_bn = None

    def __call__(self, x, train: bool):
        ura = not train
        y = jax.nn.relu(self.bn1(self.conv1(x), use_running_average=ura))
        y = self.bn2(self.conv2(y), use_running_average=ura)
        if self.shortcut is not None:
            x = self.shortcut_bn(self.shortcut(x), use_running_average=ura)
        return jax.nn.relu(x + y)


class ResNet(nnx.Module):
    """CIFAR ResNet: 3x3 stem, stages of basic blocks, global pool, linear head.

    ResNet-20 is ``stage_sizes=(3, 3, 3)``, ``widths=(16, 32, 64)``; the CIFAR
    ResNet-18 is ``(2, 2, 2, 2)``, ``(64, 128, 256, 512)``. The first stage keeps
    the resolution, every later one halves it.
    """

    def __init__(
        self,
        num_classes: int,
        *,
        stage_sizes: Sequence[int],
        widths: Sequence[int],
        dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        if len(stage_sizes) != len(widths):
            raise ValueError("stage_sizes and widths must have the same length.")
        self.stem = _conv(3, widths[0], 3, 1, dtype, rngs)
        self.stem_bn = _norm(widths[0], dtype, rngs)
        blocks, cin = [], widths[0]
        for stage, (size, width) in enumerate(zip(stage_sizes, widths)):
            for i in range(size):
                stride = 2 if stage > 0 and i == 0 else 1
                blocks.append(BasicBlock(cin, width, stride, dtype=dtype, rngs=rngs))
                cin = width
        self.blocks = nnx.List(blocks)
        self.head = nnx.Linear(cin, num_classes, dtype=dtype, rngs=rngs)
        self.dtype = dtype

    def __call__(self, x, *, train: bool = False):
        x = self.stem(x.astype(self.dtype))
        x = jax.nn.relu(self.stem_bn(x, use_running_average=not train))
        for block in self.blocks:
            x = block(x, train)
        return self.head(x.mean(axis=(1, 2))).astype(jnp.float32)


class WideBlock(nnx.Module):
    """Pre-activation wide residual block (BN-ReLU-conv twice)."""

    def __init__(self, cin: int, cout: int, stride: int, *, dtype, rngs: nnx.Rngs):
        self.bn1 = _norm(cin, dtype, rngs)
        self.conv1 = _conv(cin, cout, 3, stride, dtype, rngs)
        self.bn2 = _norm(cout, dtype, rngs)
        self.conv2 = _conv(cout, cout, 3, 1, dtype, rngs)
        needs_projection = stride != 1 or cin != cout
        self.shortcut = (
            _conv(cin, cout, 1, stride, dtype, rngs) if needs_projection else None
        )

    def __call__(self, x, train: bool):
        ura = not train
        y = jax.nn.relu(self.bn1(x, use_running_average=ura))
        shortcut = x if self.shortcut is None else self.shortcut(y)
        y = self.conv1(y)
        y = self.conv2(jax.nn.relu(self.bn2(y, use_running_average=ura)))
        return shortcut + y


class WideResNet(nnx.Module):
    """WideResNet-``depth``-``widen_factor`` (Zagoruyko & Komodakis, 2016).

    ``(depth - 4) / 6`` blocks per group, widths ``16k, 32k, 64k``.
    """

    def __init__(
        self,
        num_classes: int,
        *,
        depth: int = 16,
        widen_factor: int = 8,
        base_width: int = 16,
        dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        if (depth - 4) % 6:
            raise ValueError(f"WideResNet depth must be 6n + 4, got {depth}.")
        per_group = (depth - 4) // 6
        self.stem = _conv(3, base_width, 3, 1, dtype, rngs)
        blocks, cin = [], base_width
        for group in range(3):
            width = base_width * widen_factor * 2**group
            for i in range(per_group):
                stride = 2 if group > 0 and i == 0 else 1
                blocks.append(WideBlock(cin, width, stride, dtype=dtype, rngs=rngs))
                cin = width
        self.blocks = nnx.List(blocks)
        self.final_bn = _norm(cin, dtype, rngs)
        self.head = nnx.Linear(cin, num_classes, dtype=dtype, rngs=rngs)
        self.dtype = dtype

    def __call__(self, x, *, train: bool = False):
        x = self.stem(x.astype(self.dtype))
        for block in self.blocks:
            x = block(x, train)
        x = jax.nn.relu(self.final_bn(x, use_running_average=not train))
        return self.head(x.mean(axis=(1, 2))).astype(jnp.float32)


# Named architectures; a config may override any keyword (tiny test models).
ARCHITECTURES = {
    "resnet20": (ResNet, dict(stage_sizes=(3, 3, 3), widths=(16, 32, 64))),
    "resnet18": (ResNet, dict(stage_sizes=(2, 2, 2, 2), widths=(64, 128, 256, 512))),
    "wrn16_8": (WideResNet, dict(depth=16, widen_factor=8)),
    "vit": (
        ViT,
        dict(image_size=32, patch_size=4, dim=256, depth=6, num_heads=8, mlp_dim=512),
    ),
}


def create_model(config: ml_collections.ConfigDict, rngs: nnx.Rngs) -> nnx.Module:
    """Builds ``config.model.name`` with ``config.model.kwargs`` overrides."""
    return trainer_models.create_model(ARCHITECTURES, config, rngs)
