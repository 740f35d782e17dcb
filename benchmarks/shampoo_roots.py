r"""Shampoo's root refresh on the MNIST autoencoder's statistics, against the authors' loop.

Shampoo's refresh computes ``(H_i + εI)^{-1/(2k)}`` for every factor of every tensor (16 matrices
up to 1000 x 1000 on the MNIST autoencoder 784-1000-500-250-30-250-500-1000-784). This benchmark
takes real statistics (a warm start and 20 steps of Shampoo on digits upsampled to 28x28, batch
1000, ε = 3e-4 as the paper ran it) and times, side by side in one process:

* ``keras-tnt``: :func:`keras_tnt.kronecker.inverse_pth_root` for every factor in one compiled
  function (``tf.function`` / ``jax.jit``), as Shampoo's refresh step runs it;
* ``authors' loop``: a NumPy transcription of the authors' ``coupled_newton`` (the same coupled
  Newton iteration, float32, one factor after the other, a Python loop around BLAS products,
  stopping on ``max|M - I| <= 1e-6`` or error growth), which is what their PyTorch code does on a
  CPU.

Printed: per factor, its size, the iteration counts of both, and the relative difference of the
roots; then the median of ``--repeats`` timings of the whole refresh and their ratio. Usage::

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


def _compile(fn):
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        return tf.function(fn, autograph=False)
    if keras.backend.backend() == "jax":
        import jax

        return jax.jit(fn)
    return fn


def ours(statistics, damping):
    """A compiled function: every root and its iteration count, as the refresh computes them."""
    ps = [p for _, p in statistics]

    def roots(*hs):
        out = []
        for h, p in zip(hs, ps):
            root, _, iterations, _ = kronecker.inverse_pth_root(h, p, damping, return_info=True)
            out.append((root, iterations))
        return out

    return _compile(roots)


def _median_time(fn, repeats):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times)), times


def main(argv):
    runtime.quiet_tensorflow_logging(FLAGS["verbosity"].present)
    statistics = mnist_statistics(FLAGS.steps, FLAGS.damping)
    hs = [keras.ops.convert_to_tensor(h) for h, _ in statistics]
    compiled = ours(statistics, FLAGS.damping)

    def run_ours():
        return [(keras.ops.convert_to_numpy(r), int(i)) for r, i in compiled(*hs)]

    def run_authors():
        return [authors_coupled_newton(h, p, FLAGS.damping) for h, p in statistics]

    ours_out, authors_out = run_ours(), run_authors()  # warm-up (tracing, BLAS threads)
    print(f"{'factor':>8} {'p':>3} {'iters (ours)':>13} {'iters (authors)':>16} {'rel. diff':>10}")
    for (h, p), (r1, i1), (r2, i2) in zip(statistics, ours_out, authors_out):
        diff = np.linalg.norm(r1 - r2) / np.linalg.norm(r2)
        print(f"{h.shape[0]:>8} {p:>3} {i1:>13} {i2:>16} {diff:>10.2e}")
    results = {}
    for _ in range(FLAGS.repeats):  # alternate, to cancel drift
        for name, fn in (("keras-tnt", run_ours), ("authors' loop", run_authors)):
            results.setdefault(name, []).append(_median_time(fn, 1)[0])
    base = np.median(results["authors' loop"])
    for name, times in results.items():
        median = float(np.median(times))
        print(
            f"{name:>14}: median {median:.3f} s over {len(times)} refreshes "
            f"[{min(times):.3f}-{max(times):.3f}], ratio to the authors' loop {median / base:.2f}"
        )


if __name__ == "__main__":
    define_flags()
    app.run(main)
