"""Slimmable encoders: MLP, 1-D CNN, CIFAR/ImageNet ResNets and a ViT.

Every model maps inputs to contrastive embeddings with
``model(x, width=w, use_running_average=...)`` and exposes the backbone
representation used by the linear probe with ``model.features(x, width=w,
...)``. Hidden channels shrink with the width; the raw input channels and the
projection dimension never do. ``model.feature_dim(w)`` is the size of the
width-``w`` representation and ``model.features_sliced`` tells a
:class:`~optax_wa.slimmable.SwitchableLinear` probe whether to slice its input.

The projection head is one of SlimCLR's released slimmable heads (hidden
units sliced, output shared): MoCo v2's ``Linear -> ReLU -> Linear`` by
default, SimCLR's ``Linear -> BN -> ReLU -> Linear -> BN`` with
``head_type="simclr"`` and MoCo v3's projector with ``head_type="mocov3"``
(:class:`SlimmableProjectionHead`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from optax_wa.slimmable.layers import (
    SlimmableConv,
    SlimmableLinear,
    SwitchableBatchNorm,
    SwitchableLayerNorm,
    slim_size,
    validate_widths,
    zeros_init,
)

Array = jax.Array

# He initialization for convolutions followed by ReLU (fan-out, as torchvision).
_conv_init = nnx.initializers.variance_scaling(2.0, "fan_out", "normal")

# Every 3x3 convolution of the ResNets pads one pixel on each side, as the
# released PyTorch models (``padding=1``) do. Flax's "SAME" would pad (0, 1)
# at stride 2 on even sizes, so the residual branch would read other pixels
# than the strided 1x1 shortcut.
_PAD3 = ((1, 1), (1, 1))


# The released SlimCLR heads: (first layer's bias, hidden BN, second layer's
# bias, output BN: None, "affine" or "plain" -- without scale and bias).
_HEADS = {
    "mocov2": (True, False, True, None),
    "simclr": (True, True, False, "affine"),
    "mocov3": (False, True, False, "plain"),
    "predictor": (False, True, False, None),
}


class SlimmableProjectionHead(nnx.Module):
    """Two-layer projection head: hidden units sliced, output dimension shared.

    The ``kind`` picks one of SlimCLR's released heads (``Linear -> [BN] ->
    ReLU -> Linear -> [BN]``; every BN is switchable, one per width, and the
    output BN normalizes the shared output dimension):

    ============= ========================================================
    ``mocov2``    ``Linear -> ReLU -> Linear`` (both with bias)
    ``simclr``    ``Linear -> BN -> ReLU -> Linear (no bias) -> BN``
    ``mocov3``    ``Linear -> BN -> ReLU -> Linear -> BN (no scale, no
                  bias)``, no biases (MoCo v3's projector)
    ``predictor`` ``Linear -> BN -> ReLU -> Linear``, no biases (MoCo v3's
                  predictor; build it with ``slice_input=False``)
    ============= ========================================================

    Args:
      in_features: the full representation size.
      hidden_features: the full hidden size.
      out_features: the embedding size (never sliced).
      widths: the widths of the network.
      slice_input: whether the representation shrinks with the width.
      kind: ``"mocov2"``, ``"simclr"``, ``"mocov3"`` or ``"predictor"``.
      rngs: the random generators.

    Examples:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> from optax_wa.slimmable import SlimmableProjectionHead
      >>> head = SlimmableProjectionHead(8, 8, 3, (1.0, 0.5), rngs=nnx.Rngs(0))
      >>> head(jnp.ones((2, 4)), width=0.5).shape
      (2, 3)
      >>> simclr = SlimmableProjectionHead(8, 8, 3, (1.0, 0.5), kind="simclr",
      ...                                  rngs=nnx.Rngs(0))
      >>> simclr.out_norm.widths
      (1.0, 0.5)

    References:
      Zhao, Wu, Zhu, Ji and Wang, `Slimmable Networks for Contrastive
      Self-supervised Learning <https://arxiv.org/abs/2209.15525>`_, IJCV 2024.
    """

    def __init__(
        self,
        in_features: int,
        hidden_features: int,
        out_features: int,
        widths: Sequence[float],
        *,
        slice_input: bool = True,
        kind: str = "mocov2",
        rngs: nnx.Rngs,
    ) -> None:
        if kind not in _HEADS:
            raise ValueError(f"kind must be one of {sorted(_HEADS)}, got {kind!r}.")
        self.kind = kind
        bias1, hidden_bn, bias2, out_bn = _HEADS[kind]
        self.fc1 = SlimmableLinear(
            in_features,
            hidden_features,
            slice_input=slice_input,
            use_bias=bias1,
            rngs=rngs,
        )
        self.norm = (
            SwitchableBatchNorm(hidden_features, widths, rngs=rngs)
            if hidden_bn
            else nnx.data(None)
        )
        self.fc2 = SlimmableLinear(
            hidden_features,
            out_features,
            slice_output=False,
            use_bias=bias2,
            rngs=rngs,
        )
        if out_bn is None:
            self.out_norm = nnx.data(None)
        else:
            affine = out_bn == "affine"
            self.out_norm = SwitchableBatchNorm(
                out_features,
                widths,
                sliced=False,
                use_scale=affine,
                use_bias=affine,
                rngs=rngs,
            )

    def __call__(
        self, x: Array, width: float = 1.0, use_running_average: bool | None = None
    ) -> Array:
        h = self.fc1(x, width)
        if self.norm is not None:
            h = self.norm(h, width, use_running_average)
        z = self.fc2(jax.nn.relu(h), width)
        if self.out_norm is not None:
            z = self.out_norm(z, width, use_running_average)
        return z


class _Encoder(nnx.Module):
    """Shared ``__call__``: features, then the projection head if any."""

    head: SlimmableProjectionHead | None
    widths: tuple[float, ...]
    num_features: int
    features_sliced: bool = True

    def feature_dim(self, width: float) -> int:
        """Size of the width-``width`` representation returned by ``features``."""
        return (
            slim_size(self.num_features, width)
            if self.features_sliced
            else self.num_features
        )

    def features(
        self, x: Array, width: float = 1.0, use_running_average: bool | None = None
    ) -> Array:
        raise NotImplementedError

    def __call__(
        self, x: Array, width: float = 1.0, use_running_average: bool | None = None
    ) -> Array:
        h = self.features(x, width, use_running_average)
        if self.head is None:
            return h
        return self.head(h, width, use_running_average)

    def _make_head(self, projection_dim, head_hidden, head_type, rngs):
        if projection_dim is None:
            return nnx.data(None)
        return SlimmableProjectionHead(
            self.num_features,
            head_hidden or self.num_features,
            projection_dim,
            self.widths,
            slice_input=self.features_sliced,
            kind=head_type,
            rngs=rngs,
        )


class _DenseBlock(nnx.Module):
    def __init__(self, in_features, out_features, widths, *, slice_input, rngs):
        self.linear = SlimmableLinear(
            in_features,
            out_features,
            slice_input=slice_input,
            use_bias=False,
            rngs=rngs,
        )
        self.norm = SwitchableBatchNorm(out_features, widths, rngs=rngs)

    def __call__(self, x, width, use_running_average):
        return jax.nn.relu(self.norm(self.linear(x, width), width, use_running_average))


class SlimmableMLP(_Encoder):
    """A slimmable MLP encoder: ``[Linear -> BN -> ReLU] * L`` and a projection head.

    The first layer reads all ``in_features`` at every width.

    Args:
      in_features: the input dimension (never sliced).
      hidden_features: the full sizes of the hidden layers; the last one is
        the representation size.
      widths: the widths the network is trained at.
      projection_dim: the embedding size, or ``None`` for no head.
      head_hidden: hidden size of the head (default: the representation size).
      head_type: the projection head, ``"mocov2"``, ``"simclr"`` or
        ``"mocov3"`` (:class:`SlimmableProjectionHead`).
      rngs: the random generators.

    Examples:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> from optax_wa.slimmable import SlimmableMLP
      >>> model = SlimmableMLP(10, (32, 32), (1.0, 0.5), projection_dim=8,
      ...                      rngs=nnx.Rngs(0))
      >>> model(jnp.ones((4, 10)), width=0.5).shape
      (4, 8)
      >>> model.features(jnp.ones((4, 10)), width=0.5).shape
      (4, 16)
    """

    def __init__(
        self,
        in_features: int,
        hidden_features: Sequence[int],
        widths: Sequence[float],
        *,
        projection_dim: int | None = 128,
        head_hidden: int | None = None,
        head_type: str = "mocov2",
        rngs: nnx.Rngs,
    ) -> None:
        self.widths = validate_widths(widths)
        sizes = (in_features, *hidden_features)
        self.blocks = nnx.List(
            [
                _DenseBlock(
                    sizes[i], sizes[i + 1], self.widths, slice_input=i > 0, rngs=rngs
                )
                for i in range(len(hidden_features))
            ]
        )
        self.num_features = sizes[-1]
        self.head = self._make_head(projection_dim, head_hidden, head_type, rngs)

    def features(
        self, x: Array, width: float = 1.0, use_running_average: bool | None = None
    ) -> Array:
        for block in self.blocks:
            x = block(x, width, use_running_average)
        return x


class _ConvBlock(nnx.Module):
    def __init__(
        self,
        in_features,
        out_features,
        kernel_size,
        stride,
        widths,
        *,
        slice_input,
        rngs,
    ):
        self.conv = SlimmableConv(
            in_features,
            out_features,
            kernel_size,
            strides=stride,
            slice_input=slice_input,
            use_bias=False,
            kernel_init=_conv_init,
            rngs=rngs,
        )
        self.norm = SwitchableBatchNorm(out_features, widths, rngs=rngs)

    def __call__(self, x, width, use_running_average):
        return jax.nn.relu(self.norm(self.conv(x, width), width, use_running_average))


class SlimmableCNN1D(_Encoder):
    """A slimmable 1-D CNN encoder (e.g. for MNIST-1D).

    ``[Conv1D -> BN -> ReLU] * L``, global average pooling, projection head.
    Inputs are ``(batch, length)`` (one channel) or ``(batch, length,
    channels)``; the stem reads all input channels at every width.

    Args:
      in_channels: input channels (never sliced).
      channels: full output channels of each convolution.
      widths: the widths the network is trained at.
      kernel_size: kernel size of every convolution.
      strides: stride of each convolution (default: 1 for the first, 2 after).
      projection_dim: the embedding size, or ``None`` for no head.
      head_hidden: hidden size of the head (default: the representation size).
      head_type: the projection head, ``"mocov2"``, ``"simclr"`` or
        ``"mocov3"`` (:class:`SlimmableProjectionHead`).
      rngs: the random generators.

    Examples:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> from optax_wa.slimmable import SlimmableCNN1D
      >>> model = SlimmableCNN1D(1, (8, 16), (1.0, 0.25), projection_dim=4,
      ...                        rngs=nnx.Rngs(0))
      >>> model.features(jnp.ones((2, 40)), width=0.25).shape
      (2, 4)
    """

    def __init__(
        self,
        in_channels: int,
        channels: Sequence[int],
        widths: Sequence[float],
        *,
        kernel_size: int = 5,
        strides: Sequence[int] | None = None,
        projection_dim: int | None = 128,
        head_hidden: int | None = None,
        head_type: str = "mocov2",
        rngs: nnx.Rngs,
    ) -> None:
        self.widths = validate_widths(widths)
        if strides is None:
            strides = (1,) + (2,) * (len(channels) - 1)
        if len(strides) != len(channels):
            raise ValueError(
                f"strides must have one entry per convolution ({len(channels)}), got {strides!r}."
            )
        self.in_channels = in_channels
        sizes = (in_channels, *channels)
        self.blocks = nnx.List(
            [
                _ConvBlock(
                    sizes[i],
                    sizes[i + 1],
                    kernel_size,
                    strides[i],
                    self.widths,
                    slice_input=i > 0,
                    rngs=rngs,
                )
                for i in range(len(channels))
            ]
        )
        self.num_features = sizes[-1]
        self.head = self._make_head(projection_dim, head_hidden, head_type, rngs)

    def features(
        self, x: Array, width: float = 1.0, use_running_average: bool | None = None
    ) -> Array:
        if x.ndim == 2:
            x = x[..., None]
        for block in self.blocks:
            x = block(x, width, use_running_average)
        return x.mean(axis=1)


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
        conv = dict(use_bias=False, kernel_init=_conv_init, rngs=rngs)
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
        conv = dict(use_bias=False, kernel_init=_conv_init, rngs=rngs)
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


class SlimmableResNet(_Encoder):
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
                kernel_init=_conv_init,
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
                kernel_init=_conv_init,
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


_qkv_init = nnx.initializers.lecun_normal(in_axis=0, out_axis=(1, 2))
_out_init = nnx.initializers.lecun_normal(in_axis=(0, 1), out_axis=2)


class SlimmableAttention(nnx.Module):
    r"""Multi-head self-attention whose width-``w`` call keeps the first heads.

    Query, key and value kernels have shape ``(embed, heads, head_dim)`` and
    the output kernel ``(heads, head_dim, embed)``; width ``w`` uses the first
    ``h = slim_size(heads, w)`` heads, so the embedding dimension (the
    residual stream) is shared by all widths:

    .. math::
      \operatorname{Attn}_w(x) = \sum_{i < h} \operatorname{softmax}\!\Big(
      \frac{q_i k_i^\top}{\sqrt{d}}\Big) v_i\, W^O_i + b^O .

    Args:
      embed_dim: the embedding dimension (shared).
      num_heads: the full number of heads.
      head_dim: per-head dimension (default ``embed_dim // num_heads``).
      rngs: the random generators.

    Examples:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> from optax_wa.slimmable import SlimmableAttention
      >>> attn = SlimmableAttention(8, 4, rngs=nnx.Rngs(0))
      >>> attn(jnp.ones((2, 5, 8)), width=0.5).shape
      (2, 5, 8)
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        *,
        head_dim: int | None = None,
        rngs: nnx.Rngs,
    ) -> None:
        head_dim = head_dim or embed_dim // num_heads
        self.num_heads = num_heads
        self.head_dim = head_dim
        shape = (embed_dim, num_heads, head_dim)
        for name in ("query", "key", "value"):
            setattr(
                self,
                name,
                nnx.Param(_qkv_init(rngs.params(), shape), slim_axes=(1,)),
            )
            setattr(
                self,
                name + "_bias",
                nnx.Param(jnp.zeros((num_heads, head_dim)), slim_axes=(0,)),
            )
        self.out = nnx.Param(
            _out_init(rngs.params(), (num_heads, head_dim, embed_dim)), slim_axes=(0,)
        )
        self.out_bias = nnx.Param(jnp.zeros((embed_dim,)))

    def __call__(self, x: Array, width: float = 1.0) -> Array:
        h = slim_size(self.num_heads, width)

        def project(kernel, bias):
            return jnp.einsum("...te,ehd->...thd", x, kernel[:, :h]) + bias[:h]

        q = project(self.query, self.query_bias)
        k = project(self.key, self.key_bias)
        v = project(self.value, self.value_bias)
        logits = jnp.einsum("...qhd,...khd->...hqk", q, k) / jnp.sqrt(
            jnp.asarray(self.head_dim, q.dtype)
        )
        weights = jax.nn.softmax(logits, axis=-1)
        o = jnp.einsum("...hqk,...khd->...qhd", weights, v)
        return jnp.einsum("...qhd,hde->...qe", o, self.out[:h]) + self.out_bias[...]


class _ViTBlock(nnx.Module):
    def __init__(self, embed_dim, num_heads, mlp_dim, widths, *, head_dim, rngs):
        self.ln1 = SwitchableLayerNorm(embed_dim, widths, sliced=False, rngs=rngs)
        self.attn = SlimmableAttention(
            embed_dim, num_heads, head_dim=head_dim, rngs=rngs
        )
        self.ln2 = SwitchableLayerNorm(embed_dim, widths, sliced=False, rngs=rngs)
        self.fc1 = SlimmableLinear(embed_dim, mlp_dim, slice_input=False, rngs=rngs)
        self.fc2 = SlimmableLinear(mlp_dim, embed_dim, slice_output=False, rngs=rngs)

    def __call__(self, x, width):
        x = x + self.attn(self.ln1(x, width), width)
        return x + self.fc2(jax.nn.gelu(self.fc1(self.ln2(x, width), width)), width)


class SlimmableViT(_Encoder):
    """A slimmable Vision Transformer (an extension beyond the SlimCLR paper).

    Width ``w`` keeps the first ``slim_size(num_heads, w)`` attention heads
    and ``slim_size(mlp_dim, w)`` MLP hidden units of every block; the patch
    embedding, the positional embedding, the class token and the embedding
    dimension are shared, and every width has its own LayerNorm parameters
    (:class:`SwitchableLayerNorm`). The representation is the final class
    token, of size ``embed_dim`` at every width (``features_sliced`` is False).

    Args:
      image_size: the (square) input size.
      patch_size: the (square) patch size.
      embed_dim: the embedding dimension.
      depth: the number of blocks.
      num_heads: the full number of heads.
      mlp_dim: the full MLP hidden size.
      widths: the widths the network is trained at.
      in_channels: image channels.
      head_dim: per-head dimension (default ``embed_dim // num_heads``).
      projection_dim: the embedding size of the head, or ``None``.
      head_hidden: hidden size of the head (default ``embed_dim``).
      head_type: the projection head, ``"mocov2"``, ``"simclr"`` or
        ``"mocov3"`` (:class:`SlimmableProjectionHead`).
      rngs: the random generators.

    Examples:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> from optax_wa.slimmable import SlimmableViT
      >>> vit = SlimmableViT(8, 4, 16, 1, 4, 32, (1.0, 0.5), projection_dim=8,
      ...                    rngs=nnx.Rngs(0))
      >>> vit(jnp.ones((2, 8, 8, 3)), width=0.5).shape
      (2, 8)
    """

    features_sliced = False

    def __init__(
        self,
        image_size: int,
        patch_size: int,
        embed_dim: int,
        depth: int,
        num_heads: int,
        mlp_dim: int,
        widths: Sequence[float],
        *,
        in_channels: int = 3,
        head_dim: int | None = None,
        projection_dim: int | None = 256,
        head_hidden: int | None = None,
        head_type: str = "mocov2",
        rngs: nnx.Rngs,
    ) -> None:
        if image_size % patch_size:
            raise ValueError(
                f"image_size ({image_size}) must be a multiple of patch_size ({patch_size})."
            )
        self.widths = validate_widths(widths)
        self.patch_embed = SlimmableConv(
            in_channels,
            embed_dim,
            (patch_size, patch_size),
            strides=patch_size,
            padding="VALID",
            slice_input=False,
            slice_output=False,
            rngs=rngs,
        )
        num_patches = (image_size // patch_size) ** 2
        self.cls_token = nnx.Param(jnp.zeros((1, 1, embed_dim)))
        self.pos_embedding = nnx.Param(
            0.02 * jax.random.normal(rngs.params(), (1, num_patches + 1, embed_dim))
        )
        self.blocks = nnx.List(
            [
                _ViTBlock(
                    embed_dim,
                    num_heads,
                    mlp_dim,
                    self.widths,
                    head_dim=head_dim,
                    rngs=rngs,
                )
                for _ in range(depth)
            ]
        )
        self.norm = SwitchableLayerNorm(embed_dim, self.widths, sliced=False, rngs=rngs)
        self.num_features = embed_dim
        self.head = self._make_head(projection_dim, head_hidden, head_type, rngs)

    def features(
        self, x: Array, width: float = 1.0, use_running_average: bool | None = None
    ) -> Array:
        del use_running_average  # no batch statistics in the backbone
        x = self.patch_embed(x, width)
        b = x.shape[0]
        x = x.reshape(b, -1, x.shape[-1])
        cls = jnp.broadcast_to(self.cls_token[...], (b, 1, x.shape[-1])).astype(x.dtype)
        x = jnp.concatenate([cls, x], axis=1) + self.pos_embedding[...]
        for block in self.blocks:
            x = block(x, width)
        return self.norm(x[:, 0], width)
