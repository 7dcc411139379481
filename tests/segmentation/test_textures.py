"""Tests for adaptive_optax.segmentation.textures: the grass-on-gravel and brick-on-moon crops."""

from __future__ import annotations

import importlib.util
import os

import numpy as np
import pytest

from adaptive_optax.segmentation import data as data_lib
from adaptive_optax.segmentation import textures as textures_lib
from adaptive_optax.segmentation.data import load_dataset
from adaptive_optax.segmentation.textures import textures_dataset, textures_images

from test_data import BAD_COLUMN_SPLIT_ARGS, assert_components, assert_well_formed

needs_textures = pytest.mark.skipif(
    any(importlib.util.find_spec(name) is None for name in ("skimage", "PIL", "scipy")),
    reason="the textures data needs the [demo] extras (scikit-image, Pillow, scipy)",
)


def assert_validation_tiles(val, foreground, background):
    """Validation tiles show the foreground under the mask and the background elsewhere,
    at the same position of both photographs: 16 rows x 3 columns from column 400."""
    tiles = [(y, x) for y in range(0, 512, 32) for x in (400, 432, 464)]
    assert val.images.shape[0] == len(tiles)
    for k, (y, x) in enumerate(tiles):
        mask = val.masks[k, ..., 0] > 0
        window = (slice(y, y + 32), slice(x, x + 32))
        np.testing.assert_array_equal(val.images[k, ..., 0],
                                      np.where(mask, foreground[window], background[window]))


@needs_textures
@pytest.mark.parametrize("pair, files", [("grass_on_gravel", ("grass.png", "gravel.png")),
                                         ("brick_on_moon", ("brick.png", "moon.png"))])
def test_images_are_the_bundled_photographs_standardised(pair, files):
    assert textures_lib.TEXTURE_PAIRS[pair] == files
    foreground, background = textures_images(pair)
    from PIL import Image

    root = data_lib._package_dir("skimage", "textures")
    for image, name in zip((foreground, background), files):
        raw = np.asarray(Image.open(os.path.join(root, "data", name)), dtype=np.float64)
        assert image.shape == raw.shape == (512, 512) and image.dtype == np.float32
        if pair == "grass_on_gravel":  # nothing clipped: the same moments exactly
            assert abs(image.mean() - 0.5) < 1e-4 and abs(image.std() - 0.15) < 1e-4
        else:  # the moon's long tails clip (1.8 % of its pixels): spread 0.11 after the clip
            assert abs(image.mean() - 0.5) < 0.01 and 0.1 < image.std() <= 0.15 + 1e-4
        expected = 0.5 + 0.15 * (raw - raw.mean()) / raw.std()
        np.testing.assert_allclose(image, np.clip(expected, 0, 1), atol=1e-5)
    # The cache is frozen and the public copies are fresh.
    foreground[:] = 0.0
    assert textures_images(pair)[0].mean() > 0.4


@needs_textures
def test_default_recipe():
    train, val = textures_dataset(num_train=64, seed=0)
    assert_well_formed(train, 64, 32, 32)
    assert_well_formed(val, 48, 32, 32)
    assert_components(train.instances)
    assert_components(val.instances)
    for part in (train, val):
        fraction = part.masks.mean(axis=(1, 2, 3))
        assert fraction.min() >= 0.15 and fraction.max() <= 0.55  # 20-50 % by quantile
    assert_validation_tiles(val, *textures_images())
    # No intensity threshold beats predicting all foreground by much.
    x, m = val.images.ravel(), val.masks.ravel() > 0
    best = max(2 * (p & m).sum() / (p.sum() + m.sum())
               for t in np.linspace(0, 1, 51) for p in (x >= t, x < t))
    everything = 2 * m.sum() / (m.size + m.sum())
    assert best < everything + 0.03


@needs_textures
def test_deterministic_by_seed_with_a_seed_free_validation_set():
    a, val_a = textures_dataset(num_train=8, seed=1)
    b, _ = textures_dataset(num_train=8, seed=1)
    c, val_c = textures_dataset(num_train=8, seed=2)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(a.images, c.images)
    assert not np.array_equal(a.masks, c.masks)
    for x, y in zip(val_a, val_c):
        np.testing.assert_array_equal(x, y)
    # Augmentation is drawn either way, so it changes the crops' orientation only.
    plain, _ = textures_dataset(num_train=8, seed=1, augment=False)
    assert sorted(plain.masks.sum(axis=(1, 2, 3))) == sorted(a.masks.sum(axis=(1, 2, 3)))


@pytest.fixture
def column_coded(monkeypatch):
    """Grass whose value is its column / 1000, gravel that plus 0.5."""
    columns = np.broadcast_to(np.arange(512, dtype=np.float32) / 1000.0, (512, 512))
    monkeypatch.setattr(textures_lib, "_load_textures",
                        lambda pair="grass_on_gravel": (columns, columns + 0.5))
    return columns


def test_training_and_validation_columns_are_disjoint(column_coded):
    train, val = textures_dataset(crop_size=32, num_train=300, seed=0, max_instances=1000)

    def columns(part, on):
        values = part.images[..., 0][(part.masks[..., 0] > 0) == on]
        return np.rint((values - (0.0 if on else 0.5)) * 1000.0)

    for on in (True, False):  # grass and gravel alike
        train_columns, val_columns = columns(train, on), columns(val, on)
        assert train_columns.max() <= 383 and val_columns.min() >= 400
        # The random windows reach both ends of the training region.
        assert train_columns.min() < 8 and train_columns.max() > 375
    # Grass and gravel windows are drawn independently, not at one position.
    plain, _ = textures_dataset(crop_size=32, num_train=50, seed=0, augment=False)
    on = plain.masks[..., 0] > 0
    grass_left = np.rint(np.where(on, plain.images[..., 0], 9.0).min(axis=(1, 2)) * 1000)
    gravel_left = np.rint((np.where(on, 9.0, plain.images[..., 0]).min(axis=(1, 2)) - 0.5) * 1000)
    assert (np.abs(grass_left - gravel_left) > 31).mean() > 0.5


def test_instances_are_capped_blobs_that_stay_foreground(column_coded):
    capped, _ = textures_dataset(crop_size=64, num_train=32, seed=3, max_instances=1)
    assert capped.instances.max() == 1
    assert ((capped.masks[..., 0] > 0) >= (capped.instances > 0)).all()
    assert (capped.masks[..., 0] > 0).sum() > (capped.instances > 0).sum()


@pytest.mark.parametrize("kwargs, message", BAD_COLUMN_SPLIT_ARGS)
def test_rejects_bad_args(column_coded, kwargs, message):
    with pytest.raises((TypeError, ValueError), match=message):
        textures_dataset(**kwargs)


@pytest.mark.parametrize("pair", ["grass", "", None, 3])
def test_rejects_an_unknown_pair_by_name(column_coded, pair):
    message = r"pair must be one of \['brick_on_moon', 'grass_on_gravel'\]"
    with pytest.raises(ValueError, match=message):
        textures_dataset(pair=pair)
    with pytest.raises(ValueError, match=message):
        textures_images(pair)


@needs_textures
@pytest.mark.parametrize("name", ["textures", "bricks"])
def test_load_dataset_texture_sets(name):
    assert name in data_lib.DATASET_NAMES
    train, val = load_dataset(name, num_train=8, size=32)
    assert_well_formed(train, 8, 32, 32)
    assert_well_formed(val, 48, 32, 32)
    _, val64 = load_dataset(name, num_train=8, size=64)
    assert val64.images.shape == (8, 64, 64, 1)
    with pytest.raises(ValueError, match=f"num_val does not apply to '{name}'"):
        load_dataset(name, num_val=4)
    with pytest.raises(ValueError, match=f"size = 200 is not a valid crop size for '{name}'"):
        load_dataset(name, size=200)


@needs_textures
def test_bricks_is_brick_on_moon_under_the_textures_masks():
    train, val = load_dataset("bricks", num_train=64, size=32)
    assert_components(train.instances)
    # The same masks as the grass-on-gravel set (one recipe, one mask stream),
    # under other photographs.
    grass_train, grass_val = load_dataset("textures", num_train=64, size=32)
    np.testing.assert_array_equal(train.masks, grass_train.masks)
    np.testing.assert_array_equal(val.masks, grass_val.masks)
    assert not np.array_equal(val.images, grass_val.images)
    assert_validation_tiles(val, *textures_images("brick_on_moon"))
