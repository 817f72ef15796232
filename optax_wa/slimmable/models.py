"""Slimmable encoders: the shared base and projection head, an MLP and a 1-D CNN.

The ResNets are in ``optax_wa.slimmable.resnet``, the ViT in
``optax_wa.slimmable.vit``.

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

import jax
from flax import nnx

from optax_wa.slimmable.layers import (
    SlimmableConv,
    SlimmableLinear,
    SwitchableBatchNorm,
    conv_init,
    slim_size,
    validate_widths,
)

Array = jax.Array


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


class SlimmableEncoder(nnx.Module):
    """Base of the slimmable encoders: ``__call__`` is ``features``, then the
    projection head if any. A subclass sets ``widths``, ``num_features``,
    ``head`` (see ``_make_head``) and defines ``features``."""

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


class SlimmableMLP(SlimmableEncoder):
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
            kernel_init=conv_init,
            rngs=rngs,
        )
        self.norm = SwitchableBatchNorm(out_features, widths, rngs=rngs)

    def __call__(self, x, width, use_running_average):
        return jax.nn.relu(self.norm(self.conv(x, width), width, use_running_average))


class SlimmableCNN1D(SlimmableEncoder):
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
