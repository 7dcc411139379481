"""A small 2D U-Net in ``flax.nnx`` for binary/multi-class segmentation.

The network is the classic encoder/decoder with skip connections
(Ronneberger et al., 2015), sized for quick CPU demos: every level is two
3x3 convolutions, each followed by an optional normalisation and a ReLU; the
encoder halves the resolution with a 2x2 max-pool and doubles the width, the
decoder doubles the resolution with a 2x2 stride-2 transposed convolution,
concatenates the skip connection of the same level and halves the width. A
1x1 convolution maps to ``num_classes`` logits.

Mixed precision: ``dtype`` is the compute dtype of the convolutions and the
normalisations (their statistics are always computed in float32), while
``param_dtype`` is the storage dtype of the parameters. The logits are always
cast to float32 so that losses and metrics need no special casing.

BatchNorm follows nnx's standard mechanism: it is created in training mode
(batch statistics, running averages updated in place), ``model.eval()`` sets
``use_running_average=True`` on every BatchNorm and ``model.train()`` sets it
back (``nnx.view(model, use_running_average=True)`` gives an evaluation view
without touching ``model``). The running averages are ``nnx.BatchStat``
variables, not ``nnx.Param``, so an optimiser built with ``wrt=nnx.Param``
leaves them alone.

Example:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> model = UNet(depth=2, base_width=8, rngs=nnx.Rngs(0))
    >>> model(jnp.zeros((2, 32, 32, 1))).shape
    (2, 32, 32, 1)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jax.typing import DTypeLike

from adaptive_optax._validation import check_int

__all__ = ["NORMS", "UNet", "count_params", "group_count"]

NORMS: tuple[str | None, ...] = ("batch", "group", None)


def group_count(channels: int, max_groups: int = 8) -> int:
    """Number of GroupNorm groups for ``channels`` features.

    The largest divisor of ``channels`` that is at most
    ``min(max_groups, channels)``, so every group has the same size.

    Args:
        channels: number of features (>= 1).
        max_groups: upper bound on the number of groups (>= 1).

    Returns:
        The number of groups.

    Example:
        >>> group_count(16), group_count(12), group_count(10), group_count(3)
        (8, 6, 5, 3)
    """
    for groups in range(min(max_groups, channels), 0, -1):
        if channels % groups == 0:
            return groups
    return 1


class ConvBlock(nnx.Module):
    """Two (3x3 conv -> norm -> ReLU) layers at one resolution.

    Args:
        in_features: input channels.
        out_features: output channels of both convolutions.
        norm: ``"batch"``, ``"group"`` or ``None``.
        dtype: compute dtype.
        param_dtype: parameter dtype.
        rngs: random number generators for the initialisers.

    Example:
        >>> from flax import nnx
        >>> block = ConvBlock(1, 8, norm="group", rngs=nnx.Rngs(0))
        >>> block(jnp.zeros((1, 8, 8, 1))).shape
        (1, 8, 8, 8)
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        norm: str | None,
        dtype: DTypeLike = jnp.float32,
        param_dtype: DTypeLike = jnp.float32,
        rngs: nnx.Rngs,
    ) -> None:
        # A bias right before a normalisation is cancelled by its mean.
        use_bias = norm is None
        convs, norms = [], []
        for features_in in (in_features, out_features):
            convs.append(
                nnx.Conv(
                    features_in,
                    out_features,
                    kernel_size=(3, 3),
                    padding="SAME",
                    use_bias=use_bias,
                    dtype=dtype,
                    param_dtype=param_dtype,
                    rngs=rngs,
                )
            )
            if norm == "batch":
                norms.append(
                    nnx.BatchNorm(
                        out_features,
                        use_running_average=False,
                        # Short demo runs: let the running averages catch up
                        # within tens of steps rather than hundreds (0.99).
                        momentum=0.9,
                        dtype=dtype,
                        param_dtype=param_dtype,
                        rngs=rngs,
                    )
                )
            elif norm == "group":
                norms.append(
                    nnx.GroupNorm(
                        out_features,
                        num_groups=group_count(out_features),
                        dtype=dtype,
                        param_dtype=param_dtype,
                        rngs=rngs,
                    )
                )
        self.convs = nnx.List(convs)
        self.norms = nnx.List(norms)

    def __call__(self, x: jax.Array) -> jax.Array:
        """Applies the block to ``[B, H, W, C]`` features."""
        for i, conv in enumerate(self.convs):
            x = conv(x)
            if len(self.norms):
                x = self.norms[i](x)
            x = jax.nn.relu(x)
        return x


def _max_pool_2x2(x: jax.Array) -> jax.Array:
    """2x2 max-pool with stride 2 on ``[B, H, W, C]`` with even H and W."""
    b, h, w, c = x.shape
    # A reshape is exact here (H, W are even by construction) and cheaper to
    # differentiate than reduce_window.
    return x.reshape(b, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))


class UNet(nnx.Module):
    """A 2D U-Net returning per-pixel float32 logits.

    Widths are ``base_width * 2**level`` for ``level = 0..depth``; ``depth`` is
    the number of 2x downsamplings, so input height and width must be
    divisible by ``2**depth`` (``depth=0`` is a plain two-convolution network).

    Args:
        in_channels: channels of the input image (>= 1).
        num_classes: output channels (>= 1); 1 for binary segmentation.
        depth: number of downsamplings (>= 0).
        base_width: channels at full resolution (>= 1).
        norm: ``"group"`` (GroupNorm with ``group_count(channels)`` groups),
            ``"batch"`` (BatchNorm, switched with ``model.train()`` /
            ``model.eval()``) or ``None``.
        dtype: compute dtype, e.g. ``jnp.bfloat16`` for mixed precision.
        param_dtype: parameter dtype.
        rngs: random number generators for the initialisers.

    Raises:
        ValueError: if an argument is out of range or ``norm`` is not one of
            ``"batch"``, ``"group"``, ``None``.
        TypeError: if an integer argument is not an int.

    Example:
        >>> import jax.numpy as jnp
        >>> from flax import nnx
        >>> model = UNet(1, 3, depth=1, base_width=4, norm=None, rngs=nnx.Rngs(0))
        >>> logits = model(jnp.ones((1, 16, 16, 1)))
        >>> logits.shape, logits.dtype
        ((1, 16, 16, 3), dtype('float32'))
    """

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 1,
        *,
        depth: int = 3,
        base_width: int = 16,
        norm: str | None = "group",
        dtype: DTypeLike = jnp.float32,
        param_dtype: DTypeLike = jnp.float32,
        rngs: nnx.Rngs,
    ) -> None:
        # Upper bounds keep absurd sizes from aborting XLA or running for minutes.
        check_int("in_channels", in_channels, 1, maximum=2**16)
        check_int("num_classes", num_classes, 1, maximum=2**16)
        check_int("depth", depth, 0, maximum=12)
        check_int("base_width", base_width, 1, maximum=2**16)
        if base_width * 2**depth > 2**16:
            raise ValueError(f"base_width * 2**depth must be <= {2**16} channels, got "
                             f"base_width = {base_width}, depth = {depth}.")
        if norm not in NORMS:
            raise ValueError(f"norm must be one of {list(NORMS)}, got {norm!r}")
        for name, value in (("dtype", dtype), ("param_dtype", param_dtype)):
            try:
                kind = jnp.dtype(value)
            except TypeError:
                kind = None
            if kind is None or not jnp.issubdtype(kind, jnp.floating):
                raise TypeError(f"{name} must be a floating dtype such as jnp.float32 or "
                                f"jnp.bfloat16, got {name} = {value!r}.")
        if not isinstance(rngs, nnx.Rngs):
            raise TypeError(f"rngs must be an nnx.Rngs, e.g. nnx.Rngs(0), got rngs = {rngs!r}.")
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.depth = depth
        self.norm = norm
        widths = [base_width * 2**level for level in range(depth + 1)]
        layer = dict(norm=norm, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

        down = []
        features = in_channels
        for level in range(depth):
            down.append(ConvBlock(features, widths[level], **layer))
            features = widths[level]
        self.down = nnx.List(down)
        self.bottom = ConvBlock(features, widths[depth], **layer)

        ups, up_blocks = [], []
        for level in reversed(range(depth)):
            ups.append(
                nnx.ConvTranspose(
                    widths[level + 1],
                    widths[level],
                    kernel_size=(2, 2),
                    strides=(2, 2),
                    padding="VALID",
                    dtype=dtype,
                    param_dtype=param_dtype,
                    rngs=rngs,
                )
            )
            # Input is the upsampled features concatenated with the skip.
            up_blocks.append(ConvBlock(2 * widths[level], widths[level], **layer))
        self.ups = nnx.List(ups)
        self.up_blocks = nnx.List(up_blocks)
        self.head = nnx.Conv(
            widths[0],
            num_classes,
            kernel_size=(1, 1),
            dtype=dtype,
            param_dtype=param_dtype,
            rngs=rngs,
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        """Computes logits for a batch of images.

        Args:
            x: ``[B, H, W, in_channels]`` with H and W divisible by
                ``2**depth``.

        Returns:
            float32 logits ``[B, H, W, num_classes]``.

        Raises:
            ValueError: if ``x`` is not 4-D, has the wrong number of channels
                or H/W is not divisible by ``2**depth`` (checked at trace time,
                since shapes are static).
        """
        if x.ndim != 4:
            raise ValueError(f"expected input [B, H, W, C], got shape {x.shape}")
        if x.shape[-1] != self.in_channels:
            raise ValueError(
                f"expected {self.in_channels} input channels, got shape {x.shape}"
            )
        factor = 2**self.depth
        height, width = x.shape[1], x.shape[2]
        if height % factor or width % factor:
            raise ValueError(
                f"input height and width must be divisible by 2**depth = {factor} "
                f"(depth={self.depth}), got H={height}, W={width}"
            )
        skips = []
        for block in self.down:
            x = block(x)
            skips.append(x)
            x = _max_pool_2x2(x)
        x = self.bottom(x)
        for up, block, skip in zip(self.ups, self.up_blocks, reversed(skips)):
            x = up(x)
            x = block(jnp.concatenate([skip, x.astype(skip.dtype)], axis=-1))
        # float32 logits keep losses and metrics in full precision under bf16.
        return self.head(x).astype(jnp.float32)


def count_params(model: nnx.Module) -> int:
    """Counts the trainable parameters (``nnx.Param``) of a module.

    BatchNorm running statistics (``nnx.BatchStat``) are not counted.

    Args:
        model: any nnx module.

    Returns:
        The total number of scalar parameters.

    Example:
        >>> from flax import nnx
        >>> count_params(nnx.Linear(3, 2, rngs=nnx.Rngs(0)))
        8
    """
    state = nnx.state(model, nnx.Param)
    return sum(int(leaf.size) for leaf in jax.tree.leaves(state))
