"""Tests for adaptive_optax.segmentation.coins: the coins photograph and its crops."""

from __future__ import annotations

import importlib.util
import os

import numpy as np
import pytest

from adaptive_optax.segmentation import coins as coins_lib
from adaptive_optax.segmentation import data as data_lib
from adaptive_optax.segmentation.coins import coins_dataset, coins_image
from adaptive_optax.segmentation.data import load_dataset

from test_data import BAD_COLUMN_SPLIT_ARGS, assert_components, assert_well_formed

needs_coins = pytest.mark.skipif(
    any(importlib.util.find_spec(name) is None for name in ("skimage", "PIL", "scipy")),
    reason="the coins data needs the [demo] extras (scikit-image, Pillow, scipy)",
)


@needs_coins
def test_image_is_the_bundled_photograph_and_labels_are_its_coins():
    from PIL import Image

    image, labels = coins_image()
    raw = np.asarray(Image.open(os.path.join(data_lib._package_dir("skimage", "coins"),
                                             "data", "coins.png")))
    assert image.shape == labels.shape == raw.shape == (303, 384)
    assert image.dtype == np.float32 and labels.dtype == np.int32
    np.testing.assert_array_equal(image, raw.astype(np.float32) / 255.0)
    # The gallery's segmentation: 24 coins and one speck; a third of the pixels.
    assert labels.max() == 25
    sizes = np.bincount(labels.ravel())[1:]
    assert (sizes > 1000).sum() == 24
    assert 0.3 < (labels > 0).mean() < 0.37
    # Its markers hold: the brightest pixels are coin, and the darkest background
    # but for the few inside a coin, which filling its holes made coin.
    assert (labels[raw > 150] > 0).all()
    assert (labels[raw < 30] == 0).mean() > 0.95
    # Coins are bright on average, and the light falls off: no threshold is perfect.
    on = labels > 0
    assert image[on].mean() > image[~on].mean() + 0.3
    best = max(2 * ((image >= t) & on).sum() / ((image >= t).sum() + on.sum())
               for t in np.linspace(0, 1, 101))
    assert 0.85 < best < 0.95
    # The cache is frozen and the public copies are fresh.
    image[:] = 0.0
    assert coins_image()[0].mean() > 0.2


@needs_coins
def test_default_recipe():
    train, val = coins_dataset(num_train=64, seed=0)
    assert_well_formed(train, 64, 32, 32)
    assert_well_formed(val, 27, 32, 32)
    assert_components(train.instances)
    assert_components(val.instances)
    # Validation tiles the columns from 269 + 16 = 285 on: 9 rows x 3 columns.
    image, labels = coins_image()
    tiles = [(y, x) for y in range(0, 272, 32) for x in (285, 317, 349)]
    assert len(tiles) == 27
    for k, (y, x) in enumerate(tiles):
        window = (slice(y, y + 32), slice(x, x + 32))
        np.testing.assert_array_equal(val.images[k, ..., 0], image[window])
        np.testing.assert_array_equal(val.masks[k, ..., 0], labels[window] > 0)
    assert 0.25 < val.masks.mean() < 0.5 and 0.25 < train.masks.mean() < 0.5
    _, val64 = coins_dataset(crop_size=64, num_train=4)
    assert val64.images.shape == (4, 64, 64, 1)


@needs_coins
def test_deterministic_by_seed_with_a_seed_free_validation_set():
    a, val_a = coins_dataset(num_train=8, seed=1)
    b, _ = coins_dataset(num_train=8, seed=1)
    c, val_c = coins_dataset(num_train=8, seed=2)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(a.images, c.images)
    for x, y in zip(val_a, val_c):
        np.testing.assert_array_equal(x, y)
    # Augmentation is drawn either way, so it changes the crops' orientation only.
    plain, _ = coins_dataset(num_train=8, seed=1, augment=False)
    assert sorted(plain.masks.sum(axis=(1, 2, 3))) == sorted(a.masks.sum(axis=(1, 2, 3)))


@pytest.fixture
def column_coded(monkeypatch):
    """An image whose value is its column / 1000, every pixel one coin."""
    columns = np.broadcast_to(np.arange(384, dtype=np.float32) / 1000.0, (303, 384))
    monkeypatch.setattr(coins_lib, "_load_coins",
                        lambda: (columns, np.ones((303, 384), np.int32)))
    return columns


def test_training_and_validation_columns_are_disjoint(column_coded):
    train, val = coins_dataset(crop_size=32, num_train=300, seed=0)
    train_columns = np.rint(train.images * 1000.0)
    val_columns = np.rint(val.images * 1000.0)
    assert train_columns.max() <= 268 and val_columns.min() >= 285
    # The random windows reach both ends of the training region.
    assert train_columns.min() < 8 and train_columns.max() > 260


def test_rows_of_the_tiling_are_cut_at_the_image_edge(column_coded):
    # 303 rows: tiles of 64 start at rows 0, 64, 128, 192 (not 256).
    _, val = coins_dataset(crop_size=64, num_train=1, val_fraction=0.3)
    assert val.images.shape[0] == 4


@pytest.mark.parametrize("kwargs, message", BAD_COLUMN_SPLIT_ARGS)
def test_rejects_bad_args(column_coded, kwargs, message):
    with pytest.raises((TypeError, ValueError), match=message):
        coins_dataset(**kwargs)


@needs_coins
def test_load_dataset_coins():
    assert "coins" in data_lib.DATASET_NAMES
    train, val = load_dataset("coins", num_train=8, size=32)
    assert_well_formed(train, 8, 32, 32)
    assert_well_formed(val, 27, 32, 32)
    with pytest.raises(ValueError, match="num_val does not apply to 'coins'"):
        load_dataset("coins", num_val=4)
    with pytest.raises(ValueError, match="size = 200 is not a valid crop size for 'coins'"):
        load_dataset("coins", size=200)
