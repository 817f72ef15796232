"""Slimmable ResNets: CIFAR ResNet-18 and ImageNet ResNet-50 (basic and bottleneck blocks)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
from flax import nnx

from optax_wa.slimmable.layers import (
    SlimmableConv,
    SwitchableBatchNorm,
    conv_init,
    validate_widths,
    zeros_init,
)
from optax_wa.slimmable.models import SlimmableEncoder

Array = jax.Array

# Every 3x3 convolution of the ResNets pads one pixel on each side, as the
# released PyTorch models (``padding=1``) do. Flax's "SAME" would pad (0, 1)
# at stride 2 on even sizes, so the residual branch would read other pixels
# than the strided 1x1 shortcut.
_PAD3 = ((1, 1), (1, 1))


class BasicBlock(nnx.Module):
    """ResNet basic block (two 3x3 convolutions, padding 1) with switchable BN."""

    expansion = 1

    def __init__(
        self,
        in_features: int,
        features: int,
        stride: int | Sequence[int],
        widths: Sequence[float],
        *,
        rngs: nnx.Rngs,
    ) -> None:
        out = features * self.expansion
        conv = dict(use_bias=False, kernel_init=conv_init, rngs=rngs)
        self.conv1 = SlimmableConv(
            in_features, features, (3, 3), strides=stride, padding=_PAD3, **conv
        )
        self.bn1 = SwitchableBatchNorm(features, widths, rngs=rngs)
        self.conv2 = SlimmableConv(features, out, (3, 3), padding=_PAD3, **conv)
        self.bn2 = SwitchableBatchNorm(out, widths, scale_init=zeros_init, rngs=rngs)
        if stride != 1 or in_features != out:
            self.proj = SlimmableConv(
                in_features, out, (1, 1), strides=stride, padding=0, **conv
            )
            self.proj_bn = SwitchableBatchNorm(out, widths, rngs=rngs)
        else:
            self.proj = self.proj_bn = nnx.data(None)

    def __call__(
        self, x: Array, width: float, use_running_average: bool | None
    ) -> Array:
        y = jax.nn.relu(self.bn1(self.conv1(x, width), width, use_running_average))
        y = self.bn2(self.conv2(y, width), width, use_running_average)
        if self.proj is not None:
            x = self.proj_bn(self.proj(x, width), width, use_running_average)
        return jax.nn.relu(x + y)


class Bottleneck(nnx.Module):
    """ResNet bottleneck (1x1, 3x3 with the stride and padding 1, 1x1 x4), switchable BN."""

    expansion = 4

    def __init__(
        self,
        in_features: int,
        features: int,
        stride: int | Sequence[int],
        widths: Sequence[float],
        *,
        rngs: nnx.Rngs,
    ) -> None:
        out = features * self.expansion
        conv = dict(use_bias=False, kernel_init=conv_init, rngs=rngs)
        self.conv1 = SlimmableConv(in_features, features, (1, 1), padding=0, **conv)
        self.bn1 = SwitchableBatchNorm(features, widths, rngs=rngs)
        self.conv2 = SlimmableConv(
            features, features, (3, 3), strides=stride, padding=_PAD3, **conv
        )
        self.bn2 = SwitchableBatchNorm(features, widths, rngs=rngs)
        self.conv3 = SlimmableConv(features, out, (1, 1), padding=0, **conv)
        self.bn3 = SwitchableBatchNorm(out, widths, scale_init=zeros_init, rngs=rngs)
        if stride != 1 or in_features != out:
            self.proj = SlimmableConv(
                in_features, out, (1, 1), strides=stride, padding=0, **conv
            )
            self.proj_bn = SwitchableBatchNorm(out, widths, rngs=rngs)
        else:
            self.proj = self.proj_bn = nnx.data(None)

    def __call__(
        self, x: Array, width: float, use_running_average: bool | None
    ) -> Array:
        y = jax.nn.relu(self.bn1(self.conv1(x, width), width, use_running_average))
        y = jax.nn.relu(self.bn2(self.conv2(y, width), width, use_running_average))
        y = self.bn3(self.conv3(y, width), width, use_running_average)
        if self.proj is not None:
            x = self.proj_bn(self.proj(x, width), width, use_running_average)
        return jax.nn.relu(x + y)


_BLOCKS = {"basic": BasicBlock, "bottleneck": Bottleneck}


class SlimmableResNet(SlimmableEncoder):
    """A slimmable ResNet (CIFAR or ImageNet stem) with a projection head.

    Inputs are NHWC images; the stem reads all image channels at every width.
    The last BN of each residual branch starts with zero scale.

    Args:
      stage_sizes: the number of blocks per stage.
      widths: the widths the network is trained at.
      block: ``"basic"`` or ``"bottleneck"``.
      num_filters: the full number of filters of the first stage.
      stem: ``"cifar"`` (3x3 conv, stride 1, no pooling) or ``"imagenet"``
        (7x7 conv, stride 2, 3x3 max pooling).
      in_channels: image channels.
      projection_dim: the embedding size, or ``None`` for no head.
      head_hidden: hidden size of the head (default: the representation size).
      head_type: the projection head, ``"mocov2"``, ``"simclr"`` or
        ``"mocov3"`` (:class:`SlimmableProjectionHead`).
      rngs: the random generators.

    Examples:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> from optax_wa.slimmable import SlimmableResNet
      >>> model = SlimmableResNet((1, 1), (1.0, 0.5), num_filters=8,
      ...                         projection_dim=4, rngs=nnx.Rngs(0))
      >>> model.features(jnp.ones((2, 8, 8, 3)), width=0.5).shape
      (2, 8)
    """

    def __init__(
        self,
        stage_sizes: Sequence[int],
        widths: Sequence[float],
        *,
        block: str = "basic",
        num_filters: int = 64,
        stem: str = "cifar",
        in_channels: int = 3,
        projection_dim: int | None = 128,
        head_hidden: int | None = None,
        head_type: str = "mocov2",
        rngs: nnx.Rngs,
    ) -> None:
        if block not in _BLOCKS:
            raise ValueError(f"block must be one of {sorted(_BLOCKS)}, got {block!r}.")
        if stem not in ("cifar", "imagenet"):
            raise ValueError(f"stem must be 'cifar' or 'imagenet', got {stem!r}.")
        self.widths = validate_widths(widths)
        self.stem = stem
        block_cls = _BLOCKS[block]
        if stem == "cifar":
            self.conv_stem = SlimmableConv(
                in_channels,
                num_filters,
                (3, 3),
                padding=_PAD3,
                slice_input=False,
                use_bias=False,
                kernel_init=conv_init,
                rngs=rngs,
            )
        else:
            self.conv_stem = SlimmableConv(
                in_channels,
                num_filters,
                (7, 7),
                strides=2,
                padding=((3, 3), (3, 3)),
                slice_input=False,
                use_bias=False,
                kernel_init=conv_init,
                rngs=rngs,
            )
        self.bn_stem = SwitchableBatchNorm(num_filters, self.widths, rngs=rngs)
        blocks = []
        in_features = num_filters
        for stage, num_blocks in enumerate(stage_sizes):
            features = num_filters * 2**stage
            for i in range(num_blocks):
                stride = 2 if (stage > 0 and i == 0) else 1
                blocks.append(
                    block_cls(in_features, features, stride, self.widths, rngs=rngs)
                )
                in_features = features * block_cls.expansion
        self.blocks = nnx.List(blocks)
        self.num_features = in_features
        self.head = self._make_head(projection_dim, head_hidden, head_type, rngs)

    def features(
        self, x: Array, width: float = 1.0, use_running_average: bool | None = None
    ) -> Array:
        x = jax.nn.relu(
            self.bn_stem(self.conv_stem(x, width), width, use_running_average)
        )
        if self.stem == "imagenet":
            x = nnx.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        for block in self.blocks:
            x = block(x, width, use_running_average)
        return x.mean(axis=(1, 2))


def slimmable_resnet18_cifar(
    widths: Sequence[float],
    *,
    projection_dim: int | None = 128,
    rngs: nnx.Rngs,
    **kwargs: Any,
) -> SlimmableResNet:
    """ResNet-18 with the CIFAR stem (3x3 conv, no pooling), 512 features.

    Examples:
      >>> from flax import nnx
      >>> from optax_wa.slimmable import slimmable_resnet18_cifar
      >>> model = nnx.eval_shape(lambda: slimmable_resnet18_cifar(
      ...     (1.0, 0.25), rngs=nnx.Rngs(0)))
      >>> model.feature_dim(1.0), model.feature_dim(0.25)
      (512, 128)
    """
    return SlimmableResNet(
        (2, 2, 2, 2),
        widths,
        block="basic",
        stem="cifar",
        projection_dim=projection_dim,
        rngs=rngs,
        **kwargs,
    )


def slimmable_resnet50(
    widths: Sequence[float],
    *,
    projection_dim: int | None = 128,
    rngs: nnx.Rngs,
    **kwargs: Any,
) -> SlimmableResNet:
    """ResNet-50 with the ImageNet stem, 2048 features (SlimCLR's backbone).

    Examples:
      >>> from flax import nnx
      >>> from optax_wa.slimmable import slimmable_resnet50
      >>> model = nnx.eval_shape(lambda: slimmable_resnet50(
      ...     (1.0, 0.75, 0.5, 0.25), rngs=nnx.Rngs(0)))
      >>> [model.feature_dim(w) for w in model.widths]
      [2048, 1536, 1024, 512]
    """
    return SlimmableResNet(
        (3, 4, 6, 3),
        widths,
        block="bottleneck",
        stem="imagenet",
        projection_dim=projection_dim,
        rngs=rngs,
        **kwargs,
    )
