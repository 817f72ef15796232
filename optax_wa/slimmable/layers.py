"""Slimmable and switchable Flax NNX layers.

A *slimmable* layer owns one full-size weight; at width ``w`` it uses the
prefix block of the first :func:`slim_size` ``(C, w)`` channels on every sliced
side, so every sub-network shares its weights with all wider ones. A
*switchable* layer owns one independent sub-layer per width (normalization
statistics and affine parameters, or a linear probe head) and picks it by
width.

The width is a static call argument (a Python float): ``layer(x, width=0.5)``.
Under :func:`jax.jit` or :func:`flax.nnx.jit` each width compiles its own
program, exactly as each sub-network has its own shapes.

Variables carry metadata the rest of :mod:`optax_wa.slimmable` reads:

* shared, sliced parameters have ``slim_axes``: the axes cut to the prefix at
  smaller widths (:func:`optax_wa.slimmable.slim_axes_spec`);
* per-width parameters of switchable layers have ``switch_width``: the width
  that owns them (:func:`optax_wa.slimmable.sub_width_mask`).

References:
  Yu, Yang, Xu, Yang and Huang, `Slimmable Neural Networks
  <https://arxiv.org/abs/1812.08928>`_, ICLR 2019.

  Zhao, Wu, Zhu, Ji and Wang, `Slimmable Networks for Contrastive
  Self-supervised Learning <https://arxiv.org/abs/2209.15525>`_, IJCV 2024.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from optax_wa.batchnorm import recalibrate_batch_stats

Array = jax.Array
Initializer = Callable[..., Array]

default_kernel_init = nnx.initializers.lecun_normal()
zeros_init = nnx.initializers.zeros_init()
# He initialization for convolutions followed by ReLU (fan-out, as torchvision).
conv_init = nnx.initializers.variance_scaling(2.0, "fan_out", "normal")
ones_init = nnx.initializers.ones_init()

# Tolerates float error in ``features * width`` (e.g. ``10 * 0.7``).
_SIZE_TOLERANCE = 1e-6


def slim_size(features: int, width: float) -> int:
    """The number of channels a width uses: ``floor(features * width)``.

    Args:
      features: the full number of channels, ``>= 1``.
      width: a width multiplier in ``(0, 1]``.

    Returns:
      The prefix size, at least 1.

    Raises:
      ValueError: if ``width`` is outside ``(0, 1]`` or the prefix is empty.

    Examples:
      >>> from optax_wa.slimmable import slim_size
      >>> [slim_size(64, w) for w in (1.0, 0.75, 0.5, 0.25)]
      [64, 48, 32, 16]
    """
    if isinstance(width, bool) or not isinstance(width, (int, float)):
        raise ValueError(
            f"width must be a Python float in (0, 1] (a static argument), got {width!r}."
        )
    if not 0.0 < width <= 1.0:
        raise ValueError(f"width must be in (0, 1], got {width!r}.")
    if features < 1:
        raise ValueError(f"features must be >= 1, got {features!r}.")
    size = int(features * width + _SIZE_TOLERANCE)
    if size < 1:
        raise ValueError(
            f"width {width!r} keeps no channel of {features} (floor({features} * "
            f"{width}) = 0); use a larger width or more channels."
        )
    return size


def validate_widths(widths: Iterable[float], name: str = "widths") -> tuple[float, ...]:
    """Checks a list of widths: non-empty, distinct, each in ``(0, 1]``."""
    widths = tuple(widths)
    if not widths:
        raise ValueError(f"{name} must be a non-empty sequence of widths in (0, 1].")
    for w in widths:
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not 0.0 < w <= 1.0:
            raise ValueError(
                f"{name} must hold Python floats in (0, 1], got {widths!r}."
            )
    widths = tuple(float(w) for w in widths)
    if len(set(widths)) != len(widths):
        raise ValueError(f"{name} must be distinct, got {widths!r}.")
    return widths


def _slim_axes(*flags: tuple[int, bool]) -> tuple[int, ...]:
    return tuple(axis for axis, sliced in flags if sliced)


def _promote(dtype, *arrays):
    if dtype is None:
        dtype = jnp.result_type(*[a for a in arrays if a is not None])
    return [None if a is None else jnp.asarray(a, dtype) for a in arrays]


class _PrefixSliced(nnx.Module):
    """Shared by the slimmable layers: the prefix sizes used at a width."""

    def sizes(self, width: float) -> tuple[int, int]:
        """``(input, output)`` features (or channels) used at ``width``."""
        n_in = (
            slim_size(self.in_features, width) if self.slice_input else self.in_features
        )
        n_out = (
            slim_size(self.out_features, width)
            if self.slice_output
            else self.out_features
        )
        return n_in, n_out


class SlimmableLinear(_PrefixSliced):
    r"""A dense layer whose width-``w`` call uses the prefix block of its kernel.

    .. math::
      y = x\, W_{[:m, :n]} + b_{[:n]}, \qquad
      m = \lfloor w\, d_\text{in} \rfloor,\; n = \lfloor w\, d_\text{out} \rfloor

    with ``m = d_in`` when ``slice_input=False`` (a stem reading raw inputs)
    and ``n = d_out`` when ``slice_output=False`` (a shared output such as the
    projection dimension).

    Args:
      in_features: the full input dimension.
      out_features: the full output dimension.
      slice_input: whether the input side shrinks with the width.
      slice_output: whether the output side shrinks with the width.
      use_bias: whether to add a bias.
      kernel_init: initializer of the full ``(in, out)`` kernel.
      bias_init: initializer of the full bias.
      dtype: computation dtype (default: inferred from inputs and params).
      param_dtype: parameter dtype.
      rngs: the random generators.

    Examples:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> from optax_wa.slimmable import SlimmableLinear
      >>> layer = SlimmableLinear(8, 6, rngs=nnx.Rngs(0))
      >>> layer(jnp.ones((2, 4)), width=0.5).shape
      (2, 3)
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        slice_input: bool = True,
        slice_output: bool = True,
        use_bias: bool = True,
        kernel_init: Initializer = default_kernel_init,
        bias_init: Initializer = zeros_init,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        rngs: nnx.Rngs,
    ) -> None:
        self.in_features = in_features
        self.out_features = out_features
        self.slice_input = slice_input
        self.slice_output = slice_output
        self.use_bias = use_bias
        self.dtype = dtype
        self.kernel = nnx.Param(
            kernel_init(rngs.params(), (in_features, out_features), param_dtype),
            slim_axes=_slim_axes((0, slice_input), (1, slice_output)),
        )
        if use_bias:
            self.bias = nnx.Param(
                bias_init(rngs.params(), (out_features,), param_dtype),
                slim_axes=_slim_axes((0, slice_output)),
            )
        else:
            self.bias = nnx.data(None)

    def __call__(self, x: Array, width: float = 1.0) -> Array:
        n_in, n_out = self.sizes(width)
        if x.shape[-1] != n_in:
            raise ValueError(
                f"SlimmableLinear at width {width} expects {n_in} input features, "
                f"got an input of shape {x.shape}."
            )
        kernel = self.kernel[:n_in, :n_out]
        bias = self.bias[:n_out] if self.bias is not None else None
        x, kernel, bias = _promote(self.dtype, x, kernel, bias)
        y = x @ kernel
        if bias is not None:
            y = y + bias
        return y


def _conv_dimension_numbers(num_spatial: int):
    spatial = "DHW"[-num_spatial:] if num_spatial <= 3 else None
    if spatial is None:
        raise ValueError(
            f"SlimmableConv supports 1 to 3 spatial dims, got {num_spatial}."
        )
    return ("N" + spatial + "C", spatial + "IO", "N" + spatial + "C")


class SlimmableConv(_PrefixSliced):
    """A convolution whose width-``w`` call uses the prefix channels of its kernel.

    Channels-last inputs ``(batch, *spatial, channels)`` with 1 to 3 spatial
    dimensions; the kernel has shape ``(*kernel_size, in, out)`` as in
    :class:`flax.nnx.Conv`. At width ``w`` the kernel used is
    ``kernel[..., :m, :n]`` with ``m, n`` as in :class:`SlimmableLinear`.

    Args:
      in_features: the full number of input channels.
      out_features: the full number of output channels.
      kernel_size: a tuple with one entry per spatial dimension (an int means
        a 1-D convolution).
      strides: an int or a tuple of strides.
      padding: ``"SAME"``, ``"VALID"``, an int, or a sequence of ``(low,
        high)`` pairs, as in :func:`jax.lax.conv_general_dilated`.
      slice_input: whether the input channels shrink with the width (False for
        a stem reading image channels).
      slice_output: whether the output channels shrink with the width.
      use_bias: whether to add a bias.
      kernel_init: initializer of the full kernel.
      bias_init: initializer of the full bias.
      dtype: computation dtype.
      param_dtype: parameter dtype.
      rngs: the random generators.

    Examples:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> from optax_wa.slimmable import SlimmableConv
      >>> conv = SlimmableConv(3, 16, (3, 3), slice_input=False, rngs=nnx.Rngs(0))
      >>> conv(jnp.ones((2, 8, 8, 3)), width=0.25).shape
      (2, 8, 8, 4)
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        kernel_size: int | Sequence[int],
        *,
        strides: int | Sequence[int] = 1,
        padding: str | int | Sequence[tuple[int, int]] = "SAME",
        slice_input: bool = True,
        slice_output: bool = True,
        use_bias: bool = True,
        kernel_init: Initializer = default_kernel_init,
        bias_init: Initializer = zeros_init,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        rngs: nnx.Rngs,
    ) -> None:
        if isinstance(kernel_size, int):
            kernel_size = (kernel_size,)
        kernel_size = tuple(kernel_size)
        if not 1 <= len(kernel_size) <= 3:
            raise ValueError(
                f"kernel_size must have 1 to 3 spatial entries, got {kernel_size!r}."
            )
        nd = len(kernel_size)
        self.strides = (strides,) * nd if isinstance(strides, int) else tuple(strides)
        if isinstance(padding, int):
            padding = ((padding, padding),) * nd
        elif not isinstance(padding, str):
            padding = tuple(tuple(p) for p in padding)
        self.padding = padding
        self.kernel_size = kernel_size
        self.in_features = in_features
        self.out_features = out_features
        self.slice_input = slice_input
        self.slice_output = slice_output
        self.use_bias = use_bias
        self.dtype = dtype
        self.kernel = nnx.Param(
            kernel_init(
                rngs.params(), kernel_size + (in_features, out_features), param_dtype
            ),
            slim_axes=_slim_axes((nd, slice_input), (nd + 1, slice_output)),
        )
        if use_bias:
            self.bias = nnx.Param(
                bias_init(rngs.params(), (out_features,), param_dtype),
                slim_axes=_slim_axes((0, slice_output)),
            )
        else:
            self.bias = nnx.data(None)

    def __call__(self, x: Array, width: float = 1.0) -> Array:
        n_in, n_out = self.sizes(width)
        nd = len(self.kernel_size)
        if x.ndim != nd + 2 or x.shape[-1] != n_in:
            raise ValueError(
                f"SlimmableConv at width {width} expects inputs (batch, {nd} spatial "
                f"dims, {n_in}), got shape {x.shape}."
            )
        kernel = self.kernel[..., :n_in, :n_out]
        bias = self.bias[:n_out] if self.bias is not None else None
        x, kernel, bias = _promote(self.dtype, x, kernel, bias)
        y = jax.lax.conv_general_dilated(
            x,
            kernel,
            window_strides=self.strides,
            padding=self.padding,
            dimension_numbers=_conv_dimension_numbers(nd),
        )
        if bias is not None:
            y = y + bias
        return y


class _Switchable(nnx.Module):
    """Shared width bookkeeping of the switchable layers."""

    widths: tuple[float, ...]

    def index(self, width: float) -> int:
        """The position of ``width`` in ``self.widths``."""
        try:
            return self.widths.index(float(width))
        except (ValueError, TypeError):
            raise ValueError(
                f"{type(self).__name__} has no entry for width {width!r}; it holds "
                f"{self.widths}. Add one with calibrate_batch_norm (normalization "
                "layers) or build the layer with that width."
            ) from None


class SwitchableBatchNorm(_Switchable):
    """Batch normalization with separate parameters and statistics per width.

    Width ``w`` normalizes its ``slim_size(num_features, w)`` channels with its
    own :class:`flax.nnx.BatchNorm` (own scale, bias, running mean and
    variance). Sub-networks see different feature distributions, so sharing
    statistics across widths would be wrong.

    Args:
      num_features: the full number of channels.
      widths: the widths the network is trained at.
      sliced: if False, every width normalizes all ``num_features`` channels
        (a layer after an unsliced output) but still owns separate variables.
      use_running_average: default mode (as in :class:`flax.nnx.BatchNorm`;
        may be overridden per call or with :func:`flax.nnx.view`).
      momentum: running-average decay.
      epsilon: added to the variance.
      use_scale: learn a per-channel scale.
      use_bias: learn a per-channel bias.
      scale_init: initializer of the scales (``zeros`` for a residual branch
        that starts as the identity).
      axis_name: the mapped axis over which batch statistics are averaged.
      dtype: computation dtype.
      param_dtype: parameter dtype.
      rngs: the random generators.

    Examples:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> from optax_wa.slimmable import SwitchableBatchNorm
      >>> bn = SwitchableBatchNorm(8, (1.0, 0.5), rngs=nnx.Rngs(0))
      >>> bn(jnp.ones((4, 4)), width=0.5).shape
      (4, 4)
    """

    def __init__(
        self,
        num_features: int,
        widths: Sequence[float],
        *,
        sliced: bool = True,
        use_running_average: bool | None = False,
        momentum: float = 0.9,
        epsilon: float = 1e-5,
        use_scale: bool = True,
        use_bias: bool = True,
        scale_init: Initializer = ones_init,
        axis_name: str | None = None,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        rngs: nnx.Rngs,
    ) -> None:
        self.widths = validate_widths(widths)
        self.num_features = num_features
        self.sliced = sliced
        # A tuple of pairs: static module attributes must be hashable.
        self._bn_kwargs = (
            ("use_running_average", use_running_average),
            ("momentum", momentum),
            ("epsilon", epsilon),
            ("use_scale", use_scale),
            ("use_bias", use_bias),
            ("axis_name", axis_name),
            ("dtype", dtype),
            ("param_dtype", param_dtype),
        )
        self.norms = nnx.List(
            [self._make_norm(w, scale_init=scale_init, rngs=rngs) for w in self.widths]
        )

    def features(self, width: float) -> int:
        """Channels normalized at ``width``."""
        return slim_size(self.num_features, width) if self.sliced else self.num_features

    def _make_norm(self, width: float, *, scale_init=ones_init, rngs) -> nnx.BatchNorm:
        meta = {"switch_width": float(width)}
        return nnx.BatchNorm(
            self.features(width),
            scale_init=scale_init,
            scale_metadata=meta,
            bias_metadata=meta,
            rngs=rngs,
            **dict(self._bn_kwargs),
        )

    def norm(self, width: float) -> nnx.BatchNorm:
        """The :class:`flax.nnx.BatchNorm` owned by ``width``."""
        return self.norms[self.index(width)]

    def add_width(self, width: float) -> nnx.BatchNorm:
        """Adds a normalization for a width outside the trained list.

        The new scale and bias are the prefix of those of the narrowest trained
        width that is at least as wide (the widest one if none is); the running
        statistics start at mean 0, variance 1 and must be calibrated
        (:func:`calibrate_batch_norm`).

        Returns:
          The new :class:`flax.nnx.BatchNorm`.
        """
        width = validate_widths((width,), "width")[0]
        if width in self.widths:
            raise ValueError(
                f"width {width} already has a normalization: {self.widths}."
            )
        wider = [w for w in self.widths if w >= width]
        source = self.norm(min(wider) if wider else max(self.widths))
        new = self._make_norm(width, rngs=nnx.Rngs(0))
        n = self.features(width)
        if new.scale is not None:
            new.scale[...] = source.scale[:n]
        if new.bias is not None:
            new.bias[...] = source.bias[:n]
        self.widths = self.widths + (width,)
        self.norms.append(new)
        return new

    def __call__(
        self, x: Array, width: float = 1.0, use_running_average: bool | None = None
    ) -> Array:
        norm = self.norm(width)
        if x.shape[-1] != norm.num_features:
            raise ValueError(
                f"SwitchableBatchNorm at width {width} expects {norm.num_features} "
                f"channels, got an input of shape {x.shape}."
            )
        return norm(x, use_running_average=use_running_average)


class SwitchableLayerNorm(_Switchable):
    """Layer normalization with separate scale and bias per width.

    Args:
      num_features: the full number of features.
      widths: the widths the network is trained at.
      sliced: if False every width normalizes all ``num_features`` features
        (e.g. the residual stream of :class:`SlimmableViT`, whose embedding
        dimension is shared) but still owns its parameters.
      epsilon: added to the variance.
      use_scale: learn a scale.
      use_bias: learn a bias.
      dtype: computation dtype.
      param_dtype: parameter dtype.
      rngs: the random generators.

    Examples:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> from optax_wa.slimmable import SwitchableLayerNorm
      >>> ln = SwitchableLayerNorm(8, (1.0, 0.5), rngs=nnx.Rngs(0))
      >>> ln(jnp.ones((2, 4)), width=0.5).shape
      (2, 4)
    """

    def __init__(
        self,
        num_features: int,
        widths: Sequence[float],
        *,
        sliced: bool = True,
        epsilon: float = 1e-6,
        use_scale: bool = True,
        use_bias: bool = True,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        rngs: nnx.Rngs,
    ) -> None:
        self.widths = validate_widths(widths)
        self.num_features = num_features
        self.sliced = sliced
        norms = []
        for w in self.widths:
            meta = {"switch_width": w}
            n = slim_size(num_features, w) if sliced else num_features
            norms.append(
                nnx.LayerNorm(
                    n,
                    epsilon=epsilon,
                    use_scale=use_scale,
                    use_bias=use_bias,
                    dtype=dtype,
                    param_dtype=param_dtype,
                    scale_metadata=meta,
                    bias_metadata=meta,
                    rngs=rngs,
                )
            )
        self.norms = nnx.List(norms)

    def __call__(self, x: Array, width: float = 1.0) -> Array:
        return self.norms[self.index(width)](x)


class SwitchableLinear(_Switchable):
    """One linear head per width (the switchable linear probe).

    Width ``w`` reads the ``slim_size(in_features, w)`` features of its
    sub-network (all ``in_features`` when ``slice_input=False``) and maps them
    to the shared ``out_features`` with its own kernel and bias.

    Args:
      in_features: the full input dimension.
      out_features: the output dimension (e.g. the number of classes).
      widths: the widths of the backbone.
      slice_input: whether the input dimension shrinks with the width.
      use_bias: whether to add a bias.
      kernel_init: initializer of each kernel.
      bias_init: initializer of each bias.
      dtype: computation dtype.
      param_dtype: parameter dtype.
      rngs: the random generators.

    Examples:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> from optax_wa.slimmable import SwitchableLinear
      >>> probe = SwitchableLinear(8, 10, (1.0, 0.5), rngs=nnx.Rngs(0))
      >>> probe(jnp.ones((2, 4)), width=0.5).shape
      (2, 10)
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        widths: Sequence[float],
        *,
        slice_input: bool = True,
        use_bias: bool = True,
        kernel_init: Initializer = default_kernel_init,
        bias_init: Initializer = zeros_init,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        rngs: nnx.Rngs,
    ) -> None:
        self.widths = validate_widths(widths)
        self.in_features = in_features
        self.out_features = out_features
        self.slice_input = slice_input
        heads = []
        for w in self.widths:
            meta = {"switch_width": w}
            n_in = slim_size(in_features, w) if slice_input else in_features
            heads.append(
                nnx.Linear(
                    n_in,
                    out_features,
                    use_bias=use_bias,
                    kernel_init=kernel_init,
                    bias_init=bias_init,
                    dtype=dtype,
                    param_dtype=param_dtype,
                    kernel_metadata=meta,
                    bias_metadata=meta,
                    rngs=rngs,
                )
            )
        self.heads = nnx.List(heads)

    def __call__(self, x: Array, width: float = 1.0) -> Array:
        return self.heads[self.index(width)](x)


def _switchable_batch_norms(model: nnx.Module) -> list[SwitchableBatchNorm]:
    return [m for _, m in nnx.iter_modules(model) if isinstance(m, SwitchableBatchNorm)]


def calibrate_batch_norm(
    model: nnx.Module,
    width: float,
    batches: Iterable[Any],
    *,
    forward: Callable[[nnx.Module, Any], Any] | None = None,
) -> nnx.Module:
    r"""Sets the running statistics of one width from data (BN calibration).

    For a width outside the trained list, every :class:`SwitchableBatchNorm`
    of ``model`` first gains a normalization for it
    (:meth:`SwitchableBatchNorm.add_width`: the prefix of the scale and bias of
    the narrowest trained width at least as wide). For a trained width the
    existing statistics are replaced. The statistics are then the exact
    population moments over all ``batches``, each layer seeing the
    activations of the calibrated sub-network:

    .. math::
      \mu = \frac{\sum_b n_b \mu_b}{\sum_b n_b}, \qquad
      \sigma^2 = \frac{\sum_b n_b (\sigma_b^2 + \mu_b^2)}{\sum_b n_b} - \mu^2 .

    The averaging over batches is :func:`optax_wa.recalibrate_batch_stats`
    applied to the first and second moments. Weights and the statistics of
    other widths are left unchanged (the forward passes run on a functional
    copy).

    Args:
      model: a module holding :class:`SwitchableBatchNorm` layers; updated in
        place and returned.
      width: the width to calibrate, in ``(0, 1]``.
      batches: an iterable of inputs; ``n_b`` is the leading dimension of the
        first leaf of each batch.
      forward: ``forward(model, batch)`` running the network at ``width`` in
        training mode; default ``model(batch, width=width,
        use_running_average=False)``.

    Returns:
      ``model``.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from flax import nnx
      >>> from optax_wa.slimmable import SlimmableMLP, calibrate_batch_norm
      >>> model = SlimmableMLP(4, (8,), (1.0, 0.5), projection_dim=None,
      ...                      rngs=nnx.Rngs(0))
      >>> data = [jax.random.normal(jax.random.key(i), (16, 4)) for i in range(3)]
      >>> model = calibrate_batch_norm(model, 0.75, data)
      >>> model.blocks[0].norm.widths
      (1.0, 0.5, 0.75)
    """
    width = validate_widths((width,), "width")[0]
    layers = _switchable_batch_norms(model)
    if not layers:
        raise ValueError("calibrate_batch_norm: the model has no SwitchableBatchNorm.")
    for layer in layers:
        if width not in layer.widths:
            layer.add_width(width)
    if forward is None:

        def forward(m, batch):
            return m(batch, width=width, use_running_average=False)

    # With momentum 0 a training-mode call leaves exactly the batch moments in
    # the running statistics.
    saved = []
    for layer in layers:
        norm = layer.norm(width)
        saved.append(norm.momentum)
        norm.momentum = 0.0
    graphdef, state = nnx.split(model)
    for layer, momentum in zip(layers, saved):
        layer.norm(width).momentum = momentum

    def batch_moments(state, batch):
        copy = nnx.merge(graphdef, state)
        forward(copy, batch)
        return [
            (n.mean[...], n.var[...] + jnp.square(n.mean[...]))
            for n in (layer.norm(width) for layer in _switchable_batch_norms(copy))
        ]

    # Weighted averages of the first and second moments over the batches.
    moments = recalibrate_batch_stats(
        batch_moments,
        state,
        batches,
        weight_fn=lambda batch: jax.tree.leaves(batch)[0].shape[0],
    )
    for layer, (m1, m2) in zip(layers, moments):
        norm = layer.norm(width)
        norm.mean[...] = m1
        norm.var[...] = jnp.maximum(m2 - jnp.square(m1), 0.0)
    return model
