"""The texture-mosaic data sets: one photograph on another, told apart by texture.

``"textures"`` and ``"bricks"`` in :func:`adaptive_optax.segmentation.data.load_dataset`.
Their images are real photographs that the ``scikit-image`` wheel bundles, all
``uint8`` ``512x512`` greyscale (``skimage/data/``; sources and licences as
``skimage.data`` states them):

* ``"textures"`` (pair ``"grass_on_gravel"``): ``grass.png`` on ``gravel.png``,
  both Creative Commons CC0 (grass from DeviantArt "Grass-01", gravel from
  CC0Textures "Gravel04");
* ``"bricks"`` (pair ``"brick_on_moon"``): ``brick.png`` (a brick wall, CC0,
  from CC0Textures "Bricks25") on ``moon.png`` (the lunar surface;
  ``skimage.data.moon`` names no source, and it ships under scikit-image's licence).

Their masks are random blobs, drawn independently of the images, so the task is
texture segmentation: each crop shows the foreground photograph where its mask
is on and the background one elsewhere. The two photographs are standardised
to the same mean (0.5) and spread (0.15). For grass and gravel no intensity
threshold then separates them (a model has to read the local texture: grass is
streaky and oriented, gravel grainy); brick and moon keep different intensity
distributions, and the best threshold gets Dice .77 on the bricks validation
tiles. The files are read with Pillow (a dependency of matplotlib, so of the
demo extras); scikit-image is never imported.

``"textures"`` is the **third confirmation set of issue 15**. It was added after
the recommendation (``lookahead-schedule-free``) had been chosen on shapes,
nuclei and grey_matter and confirmed twice on nuclei_3d and white_matter,
and its recipe was fixed once one constant-Adam grid had shown that it
learns and converges at the benchmark's budget, before any plateau-escape row
ran on it. It shares no image with the other sets.

``"bricks"`` is the **fifth confirmation set of issue 15**, added after the
lookahead preset's early trial and update-ratio limit had been chosen: the
same recipe (and the same mask stream, seed for seed) under two photographs
that no other set uses. One constant-Adam grid checked that it learns and
converges at the budget before any other row ran on it (docs/benchmarks.md,
"a fifth confirmation set, bricks").

Recipe (:func:`textures_dataset`):

1. Both textures are standardised, ``0.5 + 0.15 * (t - mean(t)) / std(t)``
   over the whole image, and clipped to ``[0, 1]`` (no pixel of grass or
   gravel reaches the clip; 0.1 % of brick's and 1.8 % of the moon's do: the
   moon's histogram is narrow with long tails, and its spread is 0.11 after
   the clip).
2. Columns ``0 .. split - 1`` (``split = 512 * (1 - val_fraction)``, 384 by
   default) are the training region of both textures; columns from
   ``split + 16`` on are the validation region (the 16-column gap keeps the
   validation tiles off the pixels next to the training ones).
3. A training crop takes a foreground window and a background window at
   independent random positions of the training region, a blob mask (below),
   and shows ``where(mask, foreground, background)``; crops are then flipped
   and rotated at random, as the other crop sets are.
4. A blob mask is white noise blurred with a Gaussian of ``crop_size / 8``
   pixels, thresholded at its own random quantile in ``[0.5, 0.8]``, so 20-50
   % of a crop is foreground. Instances are its 4-connected components.
5. Validation crops tile the validation region without overlap (the
   foreground and background tiles at the same position), with masks from a
   fixed stream: the same 48 crops of 32 (or 8 of 64) for every seed.

Example:
    >>> train, val = textures_dataset(crop_size=32, num_train=8)
    >>> train.images.shape, val.images.shape
    ((8, 32, 32, 1), (48, 32, 32, 1))
"""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping
from types import MappingProxyType

import numpy as np

from adaptive_optax._validation import check_int
from adaptive_optax.segmentation import data as _data

__all__ = ["TEXTURE_PAIRS", "textures_dataset", "textures_images"]

# Each pair: (foreground file, background file) of scikit-image's data folder. Read-only:
# the loaded images are cached by pair name.
TEXTURE_PAIRS: Mapping[str, tuple[str, str]] = MappingProxyType({
    "grass_on_gravel": ("grass.png", "gravel.png"),
    "brick_on_moon": ("brick.png", "moon.png"),
})
_MEAN, _SPREAD = 0.5, 0.15
_VAL_GAP = 16  # columns between the training and validation regions
_QUANTILES = (0.5, 0.8)  # the blob threshold's quantile: 20-50 % foreground
# The validation masks' stream: fixed, so every seed validates on the same crops.
_VAL_SEED = 20261202


def _check_pair(pair: str) -> str:
    if not isinstance(pair, str) or pair not in TEXTURE_PAIRS:
        raise ValueError(f"pair must be one of {sorted(TEXTURE_PAIRS)}, got {pair!r}")
    return pair


@functools.lru_cache(maxsize=len(TEXTURE_PAIRS))
def _load_textures(pair: str = "grass_on_gravel") -> tuple[np.ndarray, np.ndarray]:
    """Reads and standardises one pair of bundled textures once per process."""
    try:
        from PIL import Image
    except ImportError as err:
        raise ImportError(
            f"the texture data sets need Pillow to read their images; {_data._INSTALL_HINT}"
        ) from err
    paths = _data._bundled_files("skimage", "textures", "data", TEXTURE_PAIRS[pair])
    out = []
    for path in paths:
        with Image.open(path) as handle:
            raw = np.asarray(handle, dtype=np.float32)
        if raw.shape != (512, 512):
            raise RuntimeError(f"unexpected texture {os.path.basename(path)}: shape {raw.shape}")
        image = np.clip(_MEAN + _SPREAD * (raw - raw.mean()) / raw.std(), 0.0, 1.0)
        image = np.ascontiguousarray(image, dtype=np.float32)
        # Cached arrays are shared; freeze them so no caller can corrupt the cache.
        image.setflags(write=False)
        out.append(image)
    return out[0], out[1]


def textures_images(pair: str = "grass_on_gravel") -> tuple[np.ndarray, np.ndarray]:
    """Loads a pair of the texture photographs that scikit-image ships, standardised.

    Each is ``0.5 + 0.15 * (t - mean) / std`` over the whole image, clipped to
    ``[0, 1]``. The files are read once per process and cached; the returned
    arrays are fresh copies. scikit-image itself is never imported.

    Args:
        pair: a key of :data:`TEXTURE_PAIRS`: ``"grass_on_gravel"`` (the
            ``"textures"`` set) or ``"brick_on_moon"`` (the ``"bricks"`` set).

    Returns:
        ``(foreground, background)``: float32 ``[512, 512]`` each, in ``[0, 1]``;
        for the default pair ``(grass, gravel)``.

    Raises:
        ValueError: for an unknown ``pair``.
        ImportError: if ``scikit-image`` or ``Pillow`` is not installed.
        RuntimeError: if the bundled files cannot be found or read.

    Example:
        >>> grass, gravel = textures_images()
        >>> grass.shape, round(float(grass.mean()), 2), round(float(gravel.std()), 2)
        ((512, 512), 0.5, 0.15)
    """
    foreground, background = _load_textures(_check_pair(pair))
    return foreground.copy(), background.copy()


def _blob_masks(rng: np.random.Generator, count: int, crop_size: int) -> np.ndarray:
    """``count`` bool ``[crop_size, crop_size]`` blob masks (recipe step 4)."""
    noise = rng.standard_normal((count, crop_size, crop_size)).astype(np.float32)
    blurred = _data._gaussian_blur(noise, crop_size / 8.0)
    quantiles = rng.uniform(*_QUANTILES, size=count)
    levels = np.array([np.quantile(b, q) for b, q in zip(blurred, quantiles)], np.float32)
    return blurred > levels[:, None, None]


def textures_dataset(
    *,
    pair: str = "grass_on_gravel",
    crop_size: int = 32,
    num_train: int = 256,
    seed: int = 0,
    val_fraction: float = 0.25,
    max_instances: int = 32,
    augment: bool = True,
) -> tuple[_data.SegmentationData, _data.SegmentationData]:
    """Composes texture-on-texture training and validation crops (see the module docstring).

    Args:
        pair: a key of :data:`TEXTURE_PAIRS`, the foreground and background
            photographs: ``"grass_on_gravel"`` (``load_dataset("textures")``)
            or ``"brick_on_moon"`` (``load_dataset("bricks")``).
        crop_size: height and width of every crop (>= 8; at most the
            validation region's width, 112 columns by default).
        num_train: number of training crops (>= 1).
        seed: seed for ``np.random.default_rng`` (windows, masks, augmentation).
        val_fraction: fraction of the columns, on the right, held out for
            validation; in ``(0, 1)``, leaving room for a training crop and,
            past the 16-column gap, a validation crop.
        max_instances: cap on the instance ids per crop (>= 1); capped blobs
            stay foreground.
        augment: randomly flip and rotate the training crops.

    Returns:
        ``(train, val)`` :class:`~adaptive_optax.segmentation.data.SegmentationData`.
        With the defaults: 256 training and 48 validation crops of 32x32.

    Raises:
        ValueError: for an invalid argument (the message names it), or a
            ``val_fraction`` and ``crop_size`` that leave no room for a crop.
        ImportError: if ``scikit-image``, ``Pillow`` or ``scipy`` is not installed.

    Example:
        >>> train, val = textures_dataset(num_train=4, seed=1)
        >>> float(train.masks.mean()) > 0.1, val.instances.dtype
        (True, dtype('int32'))
    """
    crop_size, num_train, max_instances, val_fraction, augment = _data._check_crop_options(
        crop_size, num_train, max_instances, val_fraction, augment)
    seed = check_int("seed", seed, 0, maximum=2**63 - 1)
    foreground, background = _load_textures(_check_pair(pair))
    height, width = foreground.shape
    split, val_start = _data._column_regions(crop_size, height, width, val_fraction, _VAL_GAP)

    rng = np.random.default_rng(seed)
    corners = rng.integers(0, [height - crop_size + 1, split - crop_size + 1],
                           size=(num_train, 2, 2))  # [crop, (fg, bg), (y, x)]
    masks = _blob_masks(rng, num_train, crop_size)
    composed = np.stack([
        np.where(mask, foreground[g[0]:g[0] + crop_size, g[1]:g[1] + crop_size],
                 background[v[0]:v[0] + crop_size, v[1]:v[1] + crop_size])
        for (g, v), mask in zip(corners, masks)])
    # Each "window" is one composed crop; the helper draws and applies the augmentation.
    train_images, train_masks = _data._training_crops(
        composed, masks, list(range(num_train)), rng, augment)

    tiles = _data._column_tiles(height, width, crop_size, val_start)
    val_masks = _blob_masks(np.random.default_rng(_VAL_SEED), len(tiles), crop_size)
    val_images = [np.where(mask, foreground[t], background[t])
                  for t, mask in zip(tiles, val_masks)]
    return (
        _data._stack(train_images, [_data._components(m) for m in train_masks], max_instances),
        _data._stack(val_images, [_data._components(m) for m in val_masks], max_instances),
    )
