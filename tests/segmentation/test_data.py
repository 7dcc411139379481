"""Tests for adaptive_optax.segmentation.data: synthetic shapes, the nuclei, grey-matter,
3D-nuclei and white-matter crops, batching."""

from __future__ import annotations

import importlib.util
import sys

import numpy as np
import pytest

from adaptive_optax.segmentation import data as data_lib
from adaptive_optax.segmentation.data import (
    SegmentationData,
    batches,
    grey_matter_dataset,
    grey_matter_volume,
    load_dataset,
    nuclei_3d_dataset,
    nuclei_3d_volume,
    nuclei_dataset,
    nuclei_image,
    num_batches,
    synthetic_shapes,
    white_matter_dataset,
    white_matter_volume,
)

needs_stardist = pytest.mark.skipif(
    importlib.util.find_spec("stardist") is None
    or importlib.util.find_spec("tifffile") is None,
    reason="the nuclei data needs the [demo] extras (stardist, tifffile)",
)

needs_nilearn = pytest.mark.skipif(
    any(importlib.util.find_spec(name) is None for name in ("nilearn", "nibabel", "scipy")),
    reason="the grey-matter data needs the [demo] extras (nilearn, nibabel, scipy)",
)


def assert_well_formed(data: SegmentationData, n: int, size: int, max_instances: int):
    """Checks shapes, dtypes, ranges and the mask/instance invariants."""
    assert data.images.shape == (n, size, size, 1)
    assert data.masks.shape == (n, size, size, 1)
    assert data.instances.shape == (n, size, size)
    assert data.images.dtype == np.float32
    assert data.masks.dtype == np.float32
    assert data.instances.dtype == np.int32
    assert data.images.min() >= 0.0 and data.images.max() <= 1.0
    assert set(np.unique(data.masks)) <= {0.0, 1.0}
    np.testing.assert_array_equal(data.masks[..., 0] > 0, data.instances > 0)
    assert_consecutive(data.instances, max_instances)


def assert_consecutive(instances: np.ndarray, max_instances: int):
    """Every image's ids are exactly 1..K with K <= max_instances."""
    for labels in instances:
        ids = np.unique(labels[labels > 0])
        np.testing.assert_array_equal(ids, np.arange(1, ids.size + 1))
        assert ids.size <= max_instances


# --- synthetic shapes -------------------------------------------------------


def test_shapes_well_formed():
    data = synthetic_shapes(16, size=32, seed=3)
    assert_well_formed(data, 16, 32, 32)
    # Every image has at least one object and some background.
    assert (data.instances.max(axis=(1, 2)) >= 1).all()
    assert (data.masks.mean(axis=(1, 2, 3)) < 0.9).all()


def test_shapes_deterministic_by_seed():
    a = synthetic_shapes(8, seed=5)
    b = synthetic_shapes(8, seed=5)
    c = synthetic_shapes(8, seed=6)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(a.instances, c.instances)
    assert not np.array_equal(a.images, c.images)


def test_shapes_respect_max_instances():
    data = synthetic_shapes(32, size=64, seed=0, max_instances=3)
    assert_well_formed(data, 32, 64, 3)
    assert data.instances.max() == 3


def test_touching_shapes_get_distinct_ids():
    labels = synthetic_shapes(64, seed=0).instances
    # Horizontally adjacent foreground pixels with different ids: objects that
    # touch or overlap are still separate instances.
    left, right = labels[:, :, :-1], labels[:, :, 1:]
    touching = (left > 0) & (right > 0) & (left != right)
    assert touching.any()


@pytest.mark.parametrize("difficulty", [-0.1, 1.5, float("nan")])
def test_shapes_reject_bad_difficulty(difficulty):
    with pytest.raises(ValueError, match=r"difficulty.*\[0, 1\]"):
        synthetic_shapes(2, difficulty=difficulty)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"num_images": 0}, "num_images"),
        ({"num_images": 2, "size": 4}, "size"),
        ({"num_images": 2, "max_instances": 0}, "max_instances"),
    ],
)
def test_shapes_reject_bad_ints(kwargs, name):
    with pytest.raises(ValueError, match=name):
        synthetic_shapes(**kwargs)


def test_difficulty_keeps_geometry_and_lowers_contrast():
    contrasts, noise = [], []
    for difficulty in (0.0, 0.5, 1.0):
        data = synthetic_shapes(32, seed=1, difficulty=difficulty)
        np.testing.assert_array_equal(
            data.instances, synthetic_shapes(32, seed=1, difficulty=0.0).instances
        )
        fg = data.images[data.masks > 0]
        bg = data.images[data.masks == 0]
        contrasts.append(fg.mean() - bg.mean())
        # High-pass residual as a noise proxy.
        noise.append(np.abs(np.diff(data.images, axis=2)).mean())
    assert contrasts[0] > contrasts[1] > contrasts[2] > 0
    assert noise[0] < noise[1] < noise[2]


# --- nuclei -----------------------------------------------------------------


@needs_stardist
def test_nuclei_image_loads():
    image, instances = nuclei_image()
    assert image.shape == (512, 512) and image.dtype == np.float32
    assert instances.shape == (512, 512) and instances.dtype == np.int32
    assert image.min() == 0.0 and image.max() == 1.0
    ids = np.unique(instances[instances > 0])
    # 125 hand-labelled nuclei, ids not consecutive (they run up to 183).
    assert ids.size == 125
    assert ids.max() == 183
    # Nuclei are brighter than the background.
    assert image[instances > 0].mean() > 2 * image[instances == 0].mean()
    # Returned arrays are copies: mutating them does not poison the cache.
    image[:] = -1.0
    assert nuclei_image()[0].min() == 0.0


@needs_stardist
def test_nuclei_dataset_default_recipe():
    train, val = nuclei_dataset(num_train=32, seed=0)
    assert_well_formed(train, 32, 64, 32)
    assert_well_formed(val, 16, 64, 32)
    # Validation crops are the fixed tiling of the right quarter.
    image, instances = nuclei_image()
    tiles = [
        image[y : y + 64, x : x + 64] for y in range(0, 512, 64) for x in (384, 448)
    ]
    np.testing.assert_array_equal(val.images[..., 0], np.stack(tiles))
    # Relabelling keeps each crop's partition of the pixels.
    first = instances[0:64, 384:448]
    for new_id in np.unique(val.instances[0])[1:]:
        old_ids = np.unique(first[val.instances[0] == new_id])
        assert old_ids.size == 1


@pytest.mark.parametrize("make", [
    pytest.param(nuclei_dataset, id="nuclei", marks=needs_stardist),
    pytest.param(grey_matter_dataset, id="grey_matter", marks=needs_nilearn),
    pytest.param(nuclei_3d_dataset, id="nuclei_3d", marks=needs_stardist),
    pytest.param(white_matter_dataset, id="white_matter", marks=needs_nilearn),
])
def test_crop_datasets_are_deterministic_by_seed_with_a_seed_free_validation_set(make):
    a, val_a = make(num_train=8, seed=1)
    b, _ = make(num_train=8, seed=1)
    c, val_c = make(num_train=8, seed=2)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(a.images, c.images)
    for x, y in zip(val_a, val_c):  # the validation set does not depend on the seed
        np.testing.assert_array_equal(x, y)


@pytest.fixture
def column_coded_image(monkeypatch):
    """Replaces the nuclei image by one whose pixel value is its column."""
    height, width = 256, 256
    columns = np.broadcast_to(np.arange(width, dtype=np.float32), (height, width))
    image = columns / (width - 1)
    # 4x4-pixel square instances on a checkerboard: many per crop.
    yy, xx = np.mgrid[0:height, 0:width]
    block = (yy // 4) * (width // 4) + xx // 4 + 1
    labels = np.where(((yy // 4) + (xx // 4)) % 2 == 0, block, 0).astype(np.int32)
    monkeypatch.setattr(data_lib, "_load_nuclei", lambda: (image, labels))
    return image, labels


def test_nuclei_train_and_val_columns_disjoint(column_coded_image):
    image, _ = column_coded_image
    width = image.shape[1]
    train, val = nuclei_dataset(crop_size=32, num_train=200, seed=0, max_instances=1000)
    split = 192  # 3/4 of 256 columns
    train_columns = np.rint(train.images * (width - 1))
    val_columns = np.rint(val.images * (width - 1))
    # Holds under flips/rot90 too: the values are the source columns.
    assert train_columns.max() <= split - 1
    assert val_columns.min() >= split
    # The random crops reach both ends of the training region.
    assert train_columns.min() < 8 and train_columns.max() > split - 8
    assert val.images.shape[0] == (256 // 32) * (64 // 32)


def test_nuclei_crops_relabel_and_cap(column_coded_image):
    train, val = nuclei_dataset(crop_size=32, num_train=16, seed=0, max_instances=5)
    for part in (train, val):
        assert_consecutive(part.instances, 5)
        assert part.instances.max() == 5
        # Capped instances lose their id but stay foreground in the mask.
        assert ((part.masks[..., 0] > 0) >= (part.instances > 0)).all()
        assert (part.masks[..., 0] > 0).sum() > (part.instances > 0).sum()
    uncapped, _ = nuclei_dataset(crop_size=32, num_train=16, seed=0, max_instances=1000)
    assert_well_formed(uncapped, 16, 32, 1000)


# Bad arguments of the loaders with a column split and a 16-column gap (textures,
# coins), each with what its error must say; a 128 crop fits neither's validation region.
BAD_COLUMN_SPLIT_ARGS = [
    ({"crop_size": 4}, "crop_size"),
    ({"crop_size": 128}, "crop_size=128 does not fit"),
    ({"val_fraction": 0.0}, "val_fraction"),
    ({"val_fraction": 0.99}, "val_fraction=0.99"),
    ({"num_train": 0}, "num_train"),
    ({"max_instances": 0}, "max_instances"),
    ({"seed": -1}, "seed"),
    ({"augment": "yes"}, "augment"),
]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"val_fraction": 0.0}, "val_fraction"),
        ({"val_fraction": 1.0}, "val_fraction"),
        ({"val_fraction": 0.01}, "crop_size"),
        ({"crop_size": 4}, "crop_size"),
        ({"num_train": 0}, "num_train"),
    ],
)
def test_nuclei_dataset_rejects_bad_args(column_coded_image, kwargs, message):
    with pytest.raises(ValueError, match=message):
        nuclei_dataset(**kwargs)


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"val_fraction": "a"}, TypeError, r"val_fraction must be a real number in \(0, 1\)"),
        ({"val_fraction": None}, TypeError, r"val_fraction must be a real number in \(0, 1\)"),
        ({"augment": "no"}, TypeError, r"augment must be True or False, got augment = 'no'"),
    ],
)
def test_nuclei_dataset_names_badly_typed_args(column_coded_image, kwargs, error, message):
    with pytest.raises(error, match=message):
        nuclei_dataset(**kwargs)


def test_load_dataset_names_size_for_nuclei(column_coded_image):
    with pytest.raises(ValueError, match=r"^size = 600 is not a valid crop size for 'nuclei'"):
        load_dataset("nuclei", size=600)


def test_missing_stardist_says_how_to_install(monkeypatch):
    monkeypatch.setattr(data_lib.importlib.util, "find_spec", lambda name: None)
    data_lib._load_nuclei.cache_clear()
    try:
        with pytest.raises(ImportError, match=r"pip install 'adaptive-optax\[demo\]'"):
            nuclei_image()
    finally:
        monkeypatch.undo()
        data_lib._load_nuclei.cache_clear()


# --- grey matter ------------------------------------------------------------


@needs_nilearn
def test_grey_matter_volume_loads():
    image, mask = grey_matter_volume()
    # The brain's bounding box in the 1 mm MNI152 grid, as coronal slices.
    assert image.shape == mask.shape == (181, 155, 145)
    assert image.dtype == np.float32 and mask.dtype == bool
    assert image.min() == 0.0 and image.max() == 1.0
    brain = image > 0
    # Grey matter lies inside the skull-stripped brain and is 57 % of it.
    assert not (mask & ~brain).any()
    assert 0.55 < mask[brain].mean() < 0.60
    # Grey matter is darker than the brightest (white-matter) voxels and
    # brighter than the darkest (CSF) ones: a band, not a threshold.
    gm_mean = image[mask].mean()
    assert np.percentile(image[brain], 5) < gm_mean < np.percentile(image[brain], 95)
    # The recipe, from the raw files: the brain's bounding box (x 26..170,
    # y 27..207, z 0..154 of 197x233x189) as [y, z reversed, x].
    import nibabel

    root = data_lib._package_dir("nilearn", "grey_matter")
    t1, gm = (
        np.asanyarray(nibabel.load(f"{root}/datasets/data/{name}").dataobj)
        for name in (data_lib._MNI_T1_FILE, data_lib._MNI_GM_FILE)
    )
    box = (slice(26, 171), slice(27, 208), slice(0, 155))
    assert t1[box].sum() == t1.sum()
    np.testing.assert_array_equal(image, t1[box].transpose(1, 2, 0)[:, ::-1] / np.float32(255))
    np.testing.assert_array_equal(mask, gm[box].transpose(1, 2, 0)[:, ::-1] >= 128)
    # Returned arrays are copies: mutating them does not poison the cache.
    image[:] = -1.0
    mask[:] = False
    assert grey_matter_volume()[0].min() == 0.0
    assert grey_matter_volume()[1].any()


def assert_components(instances: np.ndarray):
    """Ids are 4-connected components: 4-neighbours in the mask share an id."""
    for axis in (1, 2):
        a = np.moveaxis(instances, axis, -1)[..., :-1]
        b = np.moveaxis(instances, axis, -1)[..., 1:]
        both = (a > 0) & (b > 0)
        np.testing.assert_array_equal(a[both], b[both])


@needs_nilearn
def test_grey_matter_dataset_default_recipe():
    train, val = grey_matter_dataset(num_train=64, seed=0)
    assert_well_formed(train, 64, 64, 32)
    assert_well_formed(val, 20, 64, 32)
    # Non-trivial masks over each set.
    for part in (train, val):
        assert 0.05 < part.masks.mean() < 0.95
    assert_components(train.instances)
    assert_components(val.instances)
    # Validation crops: every 8th slice from 8 past the split (136 of 181),
    # each tiled by a centred 2x2 grid of 64 (rows 13.., columns 8..).
    image, mask = grey_matter_volume()
    tiles = [
        (image[z, y : y + 64, x : x + 64], mask[z, y : y + 64, x : x + 64])
        for z in (144, 152, 160, 168, 176)
        for y in (13, 77)
        for x in (8, 72)
    ]
    np.testing.assert_array_equal(val.images[..., 0], np.stack([t[0] for t in tiles]))
    np.testing.assert_array_equal(val.masks[..., 0] > 0, np.stack([t[1] for t in tiles]))


@needs_nilearn
def test_load_grey_matter():
    train, val = load_dataset("grey_matter", num_train=8, size=32)
    assert_well_formed(train, 8, 32, 32)
    # 5 validation slices of 4x4 tiles of 32.
    assert_well_formed(val, 80, 32, 32)
    with pytest.raises(ValueError, match="num_val does not apply to 'grey_matter'"):
        load_dataset("grey_matter", num_val=4)


@needs_nilearn
def test_white_matter_volume_and_recipe():
    image, mask = white_matter_volume()
    # The grey-matter box, read as axial slices [z, y reversed, x].
    assert image.shape == mask.shape == (155, 181, 145)
    grey_image, _ = grey_matter_volume()
    np.testing.assert_array_equal(image, grey_image.transpose(1, 0, 2)[::-1, ::-1])
    import nibabel

    root = data_lib._package_dir("nilearn", "white_matter")
    wm = np.asanyarray(nibabel.load(f"{root}/datasets/data/{data_lib._MNI_WM_FILE}").dataobj)
    box = (slice(26, 171), slice(27, 208), slice(0, 155))
    np.testing.assert_array_equal(mask, wm[box].transpose(2, 1, 0)[:, ::-1] >= 128)
    brain = image > 0
    assert not (mask & ~brain).any()
    # White matter is the brightest tissue of a T1: brighter than most of the brain.
    assert image[mask].mean() > np.percentile(image[brain], 60)
    train, val = white_matter_dataset(num_train=64, seed=0)
    assert_well_formed(train, 64, 64, 32)
    assert_well_formed(val, 16, 64, 32)
    for part in (train, val):
        assert 0.05 < part.masks.mean() < 0.95
    # Validation: every 8th slice from 8 past the split (116 of 155), a
    # centred 2x2 grid of 64 (rows 26.., columns 8..).
    tiles = [image[z, y : y + 64, x : x + 64]
             for z in (124, 132, 140, 148) for y in (26, 90) for x in (8, 72)]
    np.testing.assert_array_equal(val.images[..., 0], np.stack(tiles))
    train, val = load_dataset("white_matter", num_train=8, size=32)
    assert_well_formed(val, 80, 32, 32)
    with pytest.raises(ValueError, match="num_val does not apply to 'white_matter'"):
        load_dataset("white_matter", num_val=4)


@pytest.fixture
def slice_coded_volume(monkeypatch):
    """Replaces the grey-matter volume by one whose value is the slice index."""
    depth, height, width = 100, 80, 72
    slices = np.arange(depth, dtype=np.float32)[:, None, None]
    image = np.broadcast_to(slices / (depth - 1), (depth, height, width))
    # 4x4 squares on a checkerboard: they touch only at corners, so each is
    # its own 4-connected component, many per crop.
    yy, xx = np.mgrid[0:height, 0:width]
    board = ((yy // 4) + (xx // 4)) % 2 == 0
    mask = np.broadcast_to(board, (depth, height, width))
    monkeypatch.setattr(data_lib, "_load_mni", lambda tissue: (image, mask))
    return image, mask


@pytest.mark.parametrize("make", [grey_matter_dataset, white_matter_dataset])
def test_mni_train_and_val_slices_disjoint(slice_coded_volume, make):
    image, _ = slice_coded_volume
    depth = image.shape[0]
    train, val = make(crop_size=32, num_train=300, seed=0, max_instances=1000)
    train_slices = np.unique(np.rint(train.images * (depth - 1)))
    val_slices = np.unique(np.rint(val.images * (depth - 1)))
    # Split at 75 of 100 slices; validation: every 8th slice from 83 on.
    assert train_slices.max() <= 74
    np.testing.assert_array_equal(val_slices, [83, 91, 99])
    # The random slices reach both ends of the training slab.
    assert train_slices.min() < 3 and train_slices.max() > 71
    # 80x72 slices hold a 2x2 grid of 32.
    assert val.images.shape[0] == 3 * 2 * 2
    assert_well_formed(train, 300, 32, 1000)
    assert_components(train.instances)
    # A 32x32 crop of 4x4 squares holds 32 whole (or 36-41 cut) squares.
    assert train.instances.max(axis=(1, 2)).min() >= 32


def test_grey_matter_crops_relabel_and_cap(slice_coded_volume):
    train, val = grey_matter_dataset(crop_size=32, num_train=16, seed=0, max_instances=5)
    for part in (train, val):
        assert_consecutive(part.instances, 5)
        assert part.instances.max() == 5
        # Capped components lose their id but stay foreground in the mask.
        assert ((part.masks[..., 0] > 0) >= (part.instances > 0)).all()
        assert (part.masks[..., 0] > 0).sum() > (part.instances > 0).sum()
        # The kept ones are whole squares (the largest), 16 pixels each.
        kept = np.bincount(part.instances[0].ravel())[1:]
        np.testing.assert_array_equal(kept, 16)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"val_fraction": 0.0}, "val_fraction"),
        ({"val_fraction": 1.0}, "val_fraction"),
        ({"val_fraction": 0.08}, r"val_fraction=0.08 leaves 92 training and 8 validation"),
        ({"val_fraction": 0.999}, r"leaves 0 training"),
        ({"crop_size": 4}, "crop_size"),
        ({"crop_size": 73}, r"crop_size=73 does not fit in a 80x72 slice"),
        ({"num_train": 0}, "num_train"),
    ],
)
def test_grey_matter_dataset_rejects_bad_args(slice_coded_volume, kwargs, message):
    with pytest.raises(ValueError, match=message):
        grey_matter_dataset(**kwargs)


def test_load_dataset_names_size_for_grey_matter(slice_coded_volume):
    message = r"^size = 100 is not a valid crop size for 'grey_matter'"
    with pytest.raises(ValueError, match=message):
        load_dataset("grey_matter", size=100)


def test_missing_nilearn_says_how_to_install(monkeypatch):
    monkeypatch.setattr(data_lib.importlib.util, "find_spec", lambda name: None)
    data_lib._load_mni.cache_clear()
    try:
        with pytest.raises(ImportError, match=r"nilearn.*pip install 'adaptive-optax\[demo\]'"):
            grey_matter_volume()
    finally:
        monkeypatch.undo()
        data_lib._load_mni.cache_clear()


def test_missing_nibabel_says_how_to_install(monkeypatch):
    # A None entry in sys.modules makes `import nibabel` raise ImportError.
    monkeypatch.setitem(sys.modules, "nibabel", None)
    data_lib._load_mni.cache_clear()
    try:
        with pytest.raises(ImportError, match=r"nibabel.*pip install 'adaptive-optax\[demo\]'"):
            grey_matter_dataset(num_train=1)
    finally:
        monkeypatch.undo()
        data_lib._load_mni.cache_clear()


# --- 3D nuclei (the confirmation set of issue 15) ---------------------------


@needs_stardist
def test_nuclei_3d_volume_loads():
    image, instances = nuclei_3d_volume()
    assert image.shape == (31, 61, 57) and image.dtype == np.float32
    assert instances.shape == (31, 61, 57) and instances.dtype == np.int32
    assert image.min() == 0.0 and image.max() == 1.0
    ids = np.unique(instances[instances > 0])
    # 51 nuclei, ids not consecutive (they run up to 162); 38 % of the voxels.
    assert ids.size == 51
    assert ids.max() == 162
    assert 0.38 < (instances > 0).mean() < 0.39
    # Nuclei are brighter than the background.
    assert image[instances > 0].mean() > image[instances == 0].mean() + 0.1
    # The recipe, from the raw file: percentile normalisation over the volume.
    import tifffile

    root = data_lib._package_dir("stardist", "nuclei_3d")
    raw = tifffile.imread(f"{root}/data/images/img3d.tif").astype(np.float32)
    low, high = np.percentile(raw, [1.0, 99.8])
    np.testing.assert_allclose(image, np.clip((raw - low) / (high - low), 0, 1), atol=1e-6)
    # Returned arrays are copies: mutating them does not poison the cache.
    image[:] = -1.0
    instances[:] = 0
    assert nuclei_3d_volume()[0].min() == 0.0
    assert nuclei_3d_volume()[1].any()


@needs_stardist
def test_nuclei_3d_dataset_default_recipe():
    train, val = nuclei_3d_dataset(num_train=64, seed=0)
    assert_well_formed(train, 64, 32, 32)
    assert_well_formed(val, 32, 32, 32)
    # Non-trivial masks over each set and in (nearly) every crop.
    for part in (train, val):
        assert 0.2 < part.masks.mean() < 0.5
        assert (part.instances.max(axis=(1, 2)) >= 1).mean() > 0.9
    # Validation crops: the last 8 of 31 slices (z 23..30), each covered by
    # 2x2 overlapping tiles of 32 (rows 0 and 29, columns 0 and 25).
    image, instances = nuclei_3d_volume()
    tiles = [(z, slice(y, y + 32), slice(x, x + 32))
             for z in range(23, 31) for y in (0, 29) for x in (0, 25)]
    np.testing.assert_array_equal(val.images[..., 0], np.stack([image[t] for t in tiles]))
    np.testing.assert_array_equal(val.masks[..., 0] > 0,
                                  np.stack([instances[t] > 0 for t in tiles]))
    # Relabelling keeps each crop's partition of the pixels.
    first = instances[tiles[0]]
    for new_id in np.unique(val.instances[0])[1:]:
        assert np.unique(first[val.instances[0] == new_id]).size == 1


@needs_stardist
def test_load_nuclei_3d():
    train, val = load_dataset("nuclei_3d", num_train=8, size=32)
    assert_well_formed(train, 8, 32, 32)
    assert_well_formed(val, 32, 32, 32)
    # At 16: 4x4 tiles per slice (rows 0, 15, 30, 45; columns 0, 14, 27, 41).
    _, val = load_dataset("nuclei_3d", num_train=8, size=16)
    assert_well_formed(val, 8 * 4 * 4, 16, 32)
    with pytest.raises(ValueError, match="num_val does not apply to 'nuclei_3d'"):
        load_dataset("nuclei_3d", size=32, num_val=4)


@pytest.fixture
def z_coded_volume(monkeypatch):
    """Replaces the 3D nuclei volume by one whose value is the slice index."""
    depth, height, width = 40, 50, 44
    slices = np.arange(depth, dtype=np.float32)[:, None, None]
    image = np.broadcast_to(slices / (depth - 1), (depth, height, width))
    # 4x4-pixel square instances on a checkerboard, ids unique per slice: many per crop.
    zz, yy, xx = np.mgrid[0:depth, 0:height, 0:width]
    block = (zz * (height // 4 + 1) + yy // 4) * (width // 4 + 1) + xx // 4 + 1
    labels = np.where(((yy // 4) + (xx // 4)) % 2 == 0, block, 0).astype(np.int32)
    monkeypatch.setattr(data_lib, "_load_nuclei_3d", lambda: (image, labels))
    return image, labels


def test_nuclei_3d_train_and_val_slices_disjoint_with_a_gap(z_coded_volume):
    image, _ = z_coded_volume
    depth = image.shape[0]
    train, val = nuclei_3d_dataset(crop_size=16, num_train=400, seed=0, max_instances=1000)
    train_slices = np.unique(np.rint(train.images * (depth - 1)))
    val_slices = np.unique(np.rint(val.images * (depth - 1)))
    # 10 of 40 slices held out (z 30..39), a gap of 4 (z 26..29), training z 0..25.
    np.testing.assert_array_equal(val_slices, np.arange(30, 40))
    assert train_slices.max() == 25 and train_slices.min() == 0
    assert val_slices.min() - train_slices.max() == data_lib._NUCLEI_3D_GAP + 1
    # 50x44 slices are covered by 4x3 tiles of 16.
    assert val.images.shape[0] == 10 * 4 * 3
    assert_well_formed(train, 400, 16, 1000)
    assert_well_formed(val, 120, 16, 1000)


def test_nuclei_3d_crops_relabel_and_cap(z_coded_volume):
    train, val = nuclei_3d_dataset(crop_size=16, num_train=16, seed=0, max_instances=5)
    for part in (train, val):
        assert_consecutive(part.instances, 5)
        assert part.instances.max() == 5
        # Capped instances lose their id but stay foreground in the mask.
        assert ((part.masks[..., 0] > 0) >= (part.instances > 0)).all()
        assert (part.masks[..., 0] > 0).sum() > (part.instances > 0).sum()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"val_fraction": 0.0}, "val_fraction"),
        ({"val_fraction": 1.0}, "val_fraction"),
        ({"val_fraction": 0.01}, r"val_fraction=0.01 leaves 36 training and 0 validation "
                                 r"slices of 40 \(with a gap of 4\)"),
        ({"val_fraction": 0.95}, r"leaves 0 training and 38 validation"),
        ({"crop_size": 4}, "crop_size"),
        ({"crop_size": 45}, r"crop_size=45 does not fit in a 50x44 slice"),
        ({"num_train": 0}, "num_train"),
    ],
)
def test_nuclei_3d_dataset_rejects_bad_args(z_coded_volume, kwargs, message):
    with pytest.raises(ValueError, match=message):
        nuclei_3d_dataset(**kwargs)


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"val_fraction": "a"}, TypeError, r"val_fraction must be a real number in \(0, 1\)"),
        ({"augment": "no"}, TypeError, r"augment must be True or False, got augment = 'no'"),
    ],
)
def test_nuclei_3d_dataset_names_badly_typed_args(z_coded_volume, kwargs, error, message):
    with pytest.raises(error, match=message):
        nuclei_3d_dataset(**kwargs)


def test_load_dataset_names_size_for_nuclei_3d(z_coded_volume):
    # load_dataset's default size (64) does not fit a slice: the error says so.
    message = r"^size = 64 is not a valid crop size for 'nuclei_3d'"
    with pytest.raises(ValueError, match=message):
        load_dataset("nuclei_3d")


def test_missing_stardist_says_how_to_install_for_nuclei_3d(monkeypatch):
    monkeypatch.setattr(data_lib.importlib.util, "find_spec", lambda name: None)
    data_lib._load_nuclei_3d.cache_clear()
    try:
        with pytest.raises(ImportError, match=r"stardist.*pip install 'adaptive-optax\[demo\]'"):
            nuclei_3d_volume()
    finally:
        monkeypatch.undo()
        data_lib._load_nuclei_3d.cache_clear()


def test_missing_tifffile_says_how_to_install_for_nuclei_3d(monkeypatch):
    monkeypatch.setitem(sys.modules, "tifffile", None)
    data_lib._load_nuclei_3d.cache_clear()
    try:
        with pytest.raises(ImportError, match=r"tifffile.*pip install 'adaptive-optax\[demo\]'"):
            nuclei_3d_dataset(num_train=1)
    finally:
        monkeypatch.undo()
        data_lib._load_nuclei_3d.cache_clear()


# --- batching ---------------------------------------------------------------


def indexed_data(n: int) -> SegmentationData:
    """A data set whose example i is filled with the value i."""
    values = np.arange(n, dtype=np.float32)[:, None, None, None]
    images = np.broadcast_to(values, (n, 4, 4, 1)).copy()
    instances = images[..., 0].astype(np.int32)
    return SegmentationData(images, (instances > 0).astype(np.float32)[..., None], instances)


def test_batches_fixed_shape_and_each_index_at_most_once():
    data = indexed_data(23)
    assert num_batches(data, 5) == 4
    seen = []
    for batch in batches(data, 5, seed=0, epoch=0):
        assert batch.images.shape == (5, 4, 4, 1)
        assert batch.masks.shape == (5, 4, 4, 1)
        assert batch.instances.shape == (5, 4, 4)
        # All three fields are gathered with the same indices.
        np.testing.assert_array_equal(batch.images[..., 0], batch.instances)
        seen.extend(batch.images[:, 0, 0, 0].astype(int).tolist())
    assert len(seen) == 20 == len(set(seen))


def test_batches_deterministic_and_epochs_differ():
    data = indexed_data(64)

    def order(seed: int, epoch: int) -> list[int]:
        return [
            int(i)
            for b in batches(data, 8, seed=seed, epoch=epoch)
            for i in b.images[:, 0, 0, 0]
        ]

    assert order(0, 0) == order(0, 0)
    assert order(0, 0) != order(0, 1)
    assert order(0, 0) != order(1, 0)
    assert sorted(order(0, 3)) == list(range(64))


@pytest.mark.parametrize("batch_size", [0, 65])
def test_batches_reject_bad_batch_size(batch_size):
    data = indexed_data(64)
    with pytest.raises(ValueError, match="batch_size"):
        batches(data, batch_size, seed=0, epoch=0)
    with pytest.raises(ValueError, match="batch_size"):
        num_batches(data, batch_size)


def test_batches_reject_negative_epoch():
    with pytest.raises(ValueError, match="epoch"):
        batches(indexed_data(4), 2, seed=0, epoch=-1)


def test_batches_take_every_seed_the_loaders_take():
    # load_dataset and the demo accept seeds up to 2**63 - 1; so must batches.
    assert len(list(batches(indexed_data(4), 2, seed=2**63 - 1, epoch=0))) == 2
    with pytest.raises(ValueError, match="seed"):
        batches(indexed_data(4), 2, seed=2**63, epoch=0)


# --- load_dataset -----------------------------------------------------------


def test_load_shapes():
    train, val = load_dataset("shapes", seed=2, size=32, num_train=16, num_val=8)
    assert_well_formed(train, 16, 32, 32)
    assert_well_formed(val, 8, 32, 32)
    np.testing.assert_array_equal(
        train.images, synthetic_shapes(16, size=32, seed=2).images
    )
    # Validation images come from another stream, not the training ones.
    assert not np.array_equal(val.images, train.images[:8])


@needs_stardist
def test_load_nuclei():
    train, val = load_dataset("nuclei", num_train=8)
    assert train.images.shape == (8, 64, 64, 1)
    assert val.images.shape == (16, 64, 64, 1)
    with pytest.raises(ValueError, match="num_val"):
        load_dataset("nuclei", num_val=4)


def test_load_unknown_name_lists_choices():
    names = (r"\['bricks', 'coins', 'grey_matter', 'nuclei', 'nuclei_3d', 'shapes', 'textures', "
             r"'white_matter'\]")
    with pytest.raises(ValueError, match=names):
        load_dataset("mnist")
