r"""Shampoo's root refresh on the MNIST autoencoder's statistics, against the authors' loop.

Shampoo's refresh computes ``(H_i + εI)^{-1/(2k)}`` for every factor of every tensor (16 matrices
up to 1000 x 1000 on the MNIST autoencoder 784-1000-500-250-30-250-500-1000-784). This benchmark
takes real statistics (a warm start and 20 steps of Shampoo on digits upsampled to 28x28, batch
1000, ε = 3e-4 as the paper ran it) and times, side by side in one process:

* ``keras-tnt newton`` / ``keras-tnt eigh``: every root in one compiled function
  (``tf.function`` / ``jax.jit``), as Shampoo's refresh step runs it with ``root_method="newton"``
  (:func:`keras_tnt.kronecker.inverse_pth_root`) or ``"eigh"``
  (:func:`keras_tnt.kronecker.inverse_pth_root_eigh`, the default on a CPU);
* ``authors' loop``: a NumPy transcription of the authors' ``coupled_newton`` (the same coupled
  Newton iteration, float32, one factor after the other, a Python loop around BLAS products,
  stopping on ``max|M - I| <= 1e-6`` or error growth), which is what their PyTorch code does on a
  CPU.

Printed: per factor, its size and each method's relative Frobenius error against the float64
root of NumPy's eigendecomposition (with Newton's iteration counts); then the median of
``--repeats`` timings of all roots and the ratio to the authors' loop. Usage::

    python -m benchmarks.shampoo_roots
"""

from __future__ import annotations

import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
from absl import app  # noqa: E402
from absl import flags  # noqa: E402

import keras_tnt  # noqa: E402
from benchmarks import figure1  # noqa: E402
from keras_tnt import kronecker  # noqa: E402
from models import mnist_autoencoder  # noqa: E402
from models import runtime  # noqa: E402

FLAGS = flags.FLAGS


def define_flags():
    flags.DEFINE_integer("repeats", 3, "Timed refreshes of each implementation.")
    flags.DEFINE_integer("steps", 20, "Shampoo steps before the statistics are taken.")
    flags.DEFINE_float("damping", 3e-4, "Shampoo's ε (the paper's MNIST autoencoder value).")


def mnist_statistics(steps: int, damping: float):
    """Every Shampoo statistic of the MNIST autoencoder after a warm start and ``steps`` steps,
    with its root's ``p``: ``[(H, p)]`` in build order."""
    from sklearn.datasets import load_digits

    keras.utils.set_random_seed(0)
    digits = (load_digits().images[:1000, :, :, None] / 16.0).astype("float32")
    x = keras.ops.convert_to_numpy(keras.ops.image.resize(digits, (28, 28)))
    x = np.clip(x.reshape(1000, 784), 0.0, 1.0).astype("float32")
    model = mnist_autoencoder()
    optimizer = keras_tnt.Shampoo(learning_rate=3e-4, damping=damping)
    model.compile(
        optimizer=optimizer, loss=keras_tnt.losses.SummedBinaryCrossentropy(from_logits=True)
    )

    class OneBatch(keras.utils.PyDataset):
        def __len__(self):
            return 1

        def __getitem__(self, index):
            return x, x

    model.warm_start(OneBatch(), verbose=0)
    model.fit(OneBatch(), epochs=steps, verbose=0, shuffle=False)
    out = []
    for variable in model.trainable_variables:
        statistics = optimizer.statistics(variable)
        p = 2 * len(statistics)
        out += [(keras.ops.convert_to_numpy(h), p) for h in statistics]
    return out


def authors_coupled_newton(h, p, damping, iterations=100, tolerance=1e-6):
    """The authors' ``coupled_newton`` (utils_git/utils.py of their release), in NumPy float32:
    returns ``(root, iterations)``."""
    h = h.astype(np.float32)
    identity = np.eye(h.shape[0], dtype=np.float32)
    a = h + np.float32(damping) * identity
    z = np.float32((1 + p) / (2 * np.linalg.norm(a)))
    alpha = np.float32(-1.0 / p)
    m = a * z
    x = identity * np.float32(z ** (1.0 / p))
    x_prev = x
    error, run, i = float(np.max(np.abs(m - identity))), True, 0
    while i < iterations and error > tolerance and run:
        t = (1 - alpha) * identity + alpha * m
        power = np.linalg.matrix_power(t, p)
        new_m = power @ m
        x_prev, x = x, x @ t
        new_error = float(np.max(np.abs(new_m - identity)))
        run = new_error < error * 1.2
        m, error, i = new_m, new_error, i + 1
    return (x if run else x_prev), i


def ours(statistics, damping, method):
    """A compiled function: every root (and Newton's iteration counts), as the refresh computes
    them with ``root_method=method``."""
    ps = [p for _, p in statistics]

    def roots(*hs):
        out = []
        for h, p in zip(hs, ps):
            if method == "eigh":
                root, _ = kronecker.inverse_pth_root_eigh(h, p, damping)
                iterations = 0
            else:
                root, _, iterations, _ = kronecker.inverse_pth_root(h, p, damping, return_info=True)
            out.append((root, iterations))
        return out

    return figure1._compiled(roots)


def _median_time(fn, repeats):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times)), times


def exact_root(h, p, damping):
    """The float64 root from NumPy's eigendecomposition: the accuracy reference."""
    a = h.astype(np.float64) + damping * np.eye(len(h))
    values, vectors = np.linalg.eigh(a)
    return (vectors * np.maximum(values, damping) ** (-1.0 / p)) @ vectors.T


def main(argv):
    runtime.quiet_tensorflow_logging(FLAGS["verbosity"].present)
    statistics = mnist_statistics(FLAGS.steps, FLAGS.damping)
    hs = [keras.ops.convert_to_tensor(h) for h, _ in statistics]
    runs = {}
    for method in ("newton", "eigh"):
        compiled = ours(statistics, FLAGS.damping, method)
        runs[f"keras-tnt {method}"] = lambda c=compiled: [
            (keras.ops.convert_to_numpy(r), int(i)) for r, i in c(*hs)
        ]
    runs["authors' loop"] = lambda: [
        authors_coupled_newton(h, p, FLAGS.damping) for h, p in statistics
    ]
    outputs = {name: fn() for name, fn in runs.items()}  # warm-up: tracing, BLAS threads
    exact = [exact_root(h, p, FLAGS.damping) for h, p in statistics]
    print("relative Frobenius error against the float64 root, and Newton's iterations:")
    print(f"{'factor':>7} {'p':>2} " + " ".join(f"{name:>22}" for name in runs))
    errors = {name: [] for name in runs}
    for k, ((h, p), reference) in enumerate(zip(statistics, exact)):
        cells = []
        for name in runs:
            root, iterations = outputs[name][k]
            error = np.linalg.norm(root - reference) / np.linalg.norm(reference)
            errors[name].append(error)
            cells.append(f"{error:.1e}" + (f" ({iterations} it)" if iterations else ""))
        print(f"{h.shape[0]:>7} {p:>2} " + " ".join(f"{c:>22}" for c in cells))
    times = {name: [] for name in runs}
    for _ in range(FLAGS.repeats):  # alternate, to cancel drift
        for name, fn in runs.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    base = float(np.median(times["authors' loop"]))
    for name, values in times.items():
        median = float(np.median(values))
        print(
            f"{name:>16}: all {len(statistics)} roots in {median:.3f} s (median of "
            f"{len(values)}, [{min(values):.3f}-{max(values):.3f}]), ratio to the authors' loop "
            f"{median / base:.2f}; largest error {max(errors[name]):.1e}"
        )


if __name__ == "__main__":
    define_flags()
    app.run(main)
