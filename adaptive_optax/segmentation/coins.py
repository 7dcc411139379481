"""The coins data set: 24 Greek coins on a dark, unevenly lit background.

``"coins"`` in :func:`adaptive_optax.segmentation.data.load_dataset`. The image
is the photograph that the ``scikit-image`` wheel bundles
(``skimage/data/coins.png``, ``uint8`` ``303x384`` greyscale: Greek coins
from Pompeii, from the Brooklyn Museum Collection, "no known copyright
restrictions", as ``skimage.data.coins`` says). Its masks are the coins found by scikit-image's own region-based
segmentation of that image (the gallery example "Comparing edge-based and
region-based segmentation"): a watershed of the Sobel gradient from markers at
the darkest (< 30, background) and brightest (> 150, coin) pixels, with the
holes filled. Instances are the 4-connected coins. The labels are an
algorithm's, not a person's, but the image is real: the light falls off to
the bottom and the right, so over the whole image one intensity threshold gets
Dice .907 against these masks. On the validation tiles (the right-hand coins)
the best threshold gets .965, so this is an easy set, as white_matter is: it
tests first that a converged run is not wrecked.

This is the **fourth confirmation set of issue 15**, built after every
earlier configuration had been measured. When it was added, nothing of plateau
escape had run on it. One ``constant`` Adam grid checked that it learns and
converges at the benchmark's budget (docs/benchmarks.md, "a fourth
confirmation set, coins"), and then the recipe was frozen; the rows of the
configurations chosen before it then ran once. It shares no image
with the other sets. Unlike them, it needs scikit-image itself (for
``sobel`` and ``watershed``), not only its files.

Recipe (:func:`coins_dataset`):

1. The image is scaled to ``[0, 1]`` (``/ 255``); nothing else, so the uneven
   light stays in.
2. Columns ``0 .. split - 1`` (``split = 384 * (1 - val_fraction)``, 269 by
   default) are the training region; columns from ``split + 16`` on are the
   validation region (the 16-column gap keeps the validation tiles off the
   pixels next to the training ones; the coins of the fifth column are cut by
   the split, so each side sees part of them).
3. Training crops are random windows of the training region, flipped and
   rotated at random, as the other crop sets are.
4. Validation crops tile the validation region without overlap: 27 crops of
   32 (9 rows x 3 columns), or 4 of 64, the same for every seed.

Example:
    >>> train, val = coins_dataset(crop_size=32, num_train=8)
    >>> train.images.shape, val.images.shape
    ((8, 32, 32, 1), (27, 32, 32, 1))
"""

from __future__ import annotations

import functools

import numpy as np

from adaptive_optax.segmentation import data as _data

__all__ = ["coins_dataset", "coins_image"]

_FILE = "coins.png"
_SHAPE = (303, 384)
_VAL_GAP = 16  # columns between the training and validation regions
# The markers of scikit-image's gallery example: sure background and sure coin.
_BACKGROUND_BELOW, _COIN_ABOVE = 30, 150


@functools.lru_cache(maxsize=1)
def _load_coins() -> tuple[np.ndarray, np.ndarray]:
    """Reads the bundled photograph and segments it, once per process."""
    try:
        from PIL import Image
        from scipy import ndimage
        from skimage.filters import sobel
        from skimage.segmentation import watershed
    except ImportError as err:
        raise ImportError(
            "the 'coins' data set needs scikit-image, Pillow and scipy; "
            f"{_data._INSTALL_HINT}") from err
    (path,) = _data._bundled_files("skimage", "coins", "data", (_FILE,))
    with Image.open(path) as handle:
        raw = np.asarray(handle)
    if raw.shape != _SHAPE or raw.dtype != np.uint8:
        raise RuntimeError(f"unexpected {_FILE}: shape {raw.shape}, dtype {raw.dtype}")
    image = raw.astype(np.float32) / 255.0
    # scikit-image's region-based segmentation of this image, as its gallery has it.
    markers = np.zeros(raw.shape, np.int32)
    markers[raw < _BACKGROUND_BELOW] = 1
    markers[raw > _COIN_ABOVE] = 2
    coins = ndimage.binary_fill_holes(watershed(sobel(image), markers) == 2)
    labels = _data._components(coins)
    for array in (image, labels):
        # Cached arrays are shared; freeze them so no caller can corrupt the cache.
        array.setflags(write=False)
    return image, labels


def coins_image() -> tuple[np.ndarray, np.ndarray]:
    """Loads scikit-image's coins photograph and its coin labels.

    The image is read with Pillow and scaled to ``[0, 1]``; the labels come from
    the watershed of the module docstring. Both are computed once per process and
    cached; the returned arrays are fresh copies.

    Returns:
        ``(image, labels)``: float32 ``[303, 384]`` in ``[0, 1]``, and int32
        ``[303, 384]`` with 0 for background and ``1..K`` for the coins in
        raster order.

    Raises:
        ImportError: if ``scikit-image``, ``Pillow`` or ``scipy`` is not installed.
        RuntimeError: if the bundled file cannot be found or read.

    Example:
        >>> image, labels = coins_image()
        >>> image.shape, int(labels.max())
        ((303, 384), 25)
    """
    image, labels = _load_coins()
    return image.copy(), labels.copy()


def coins_dataset(
    *,
    crop_size: int = 32,
    num_train: int = 256,
    seed: int = 0,
    val_fraction: float = 0.3,
    max_instances: int = 32,
    augment: bool = True,
) -> tuple[_data.SegmentationData, _data.SegmentationData]:
    """Cuts the coins photograph into training and validation crops (module docstring).

    Args:
        crop_size: height and width of every crop (>= 8; at most the
            validation region's width, 99 columns by default).
        num_train: number of training crops (>= 1).
        seed: seed for ``np.random.default_rng`` (windows and augmentation).
        val_fraction: fraction of the columns, on the right, held out for
            validation; in ``(0, 1)``, leaving room for a training crop and,
            past the 16-column gap, a validation crop.
        max_instances: cap on the instance ids per crop (>= 1); capped coins
            stay foreground.
        augment: randomly flip and rotate the training crops.

    Returns:
        ``(train, val)`` :class:`~adaptive_optax.segmentation.data.SegmentationData`.
        With the defaults: 256 training and 27 validation crops of 32x32.

    Raises:
        ValueError: for an invalid argument (the message names it), or a
            ``val_fraction`` and ``crop_size`` that leave no room for a crop.
        ImportError: if ``scikit-image``, ``Pillow`` or ``scipy`` is not installed.

    Example:
        >>> train, val = coins_dataset(num_train=4, seed=1)
        >>> train.instances.dtype, val.images.shape[0]
        (dtype('int32'), 27)
    """
    image, labels = _load_coins()
    return _data._column_split_crops(image, labels, crop_size=crop_size, num_train=num_train,
                                     seed=seed, val_fraction=val_fraction,
                                     max_instances=max_instances, augment=augment,
                                     gap=_VAL_GAP)
