r"""Per-step time, arithmetic and optimizer memory of TNT against first-order baselines.

Runs `model.fit` on synthetic data, side by side in one process, and prints ratios:

* MNIST autoencoder 784-1000-500-250-30-250-500-1000-784, batch 1000: TNT (T1=1, T2=20),
  TNT (T1=10, T2=100), Shampoo and KFAC (T1=1, T2=20, as the paper ran them) against Keras Adam;
* ResNet-32, batch 128: TNT (T1=10, T2=100) against Keras SGD with momentum 0.9;
* the models people also train, where per-operation overhead and untouched rows weigh more
  than arithmetic (TNT T1=1, T2=20 and T1=10, T2=100 against Adam): ``digits_autoencoder``
  (16 tensors, 7,900 parameters, batch 100) and ``digits_transformer`` (38 tensors, batch 100)
  of the registry, on scikit-learn's digits; ``embedding``: ``Embedding(50_000, 512)`` over 64
  tokens, mean pooling, ``Dense(10)``, batch 64, synthetic tokens (its gradient touches at most
  4,096 of the 50,000 rows: TNT's row-sparse step);
* ``autoencoder_2replicas`` (run it on its own): the autoencoder on two replicas, global batch
  1000: TNT (T1=1, T2=20) and KFAC (T1=1, T2=20), each with its preconditioner work split
  across the replicas and without, against Adam on the same two replicas. On TensorFlow under
  MirroredStrategy on two logical CPU devices (set up here); on JAX under
  ``keras.distribution.DataParallel`` on two devices, which JAX must be started with
  (``XLA_FLAGS=--xla_force_host_platform_device_count=2`` on a CPU).

Every step is timed by a callback. TNT is timed in its steady state (step counter >= T2, where
the inverses are refreshed every T2 steps) over a window of whole periods when it is affordable;
the reported mean is the schedule-weighted mean of the per-kind medians (refresh step,
statistics step, plain step), i.e. the mean step of a long run in which every step of a kind
takes its typical time (for a baseline, whose steps are all alike, that is its median). The
plain window mean is printed too. Baselines and TNT alternate in rounds to cancel drift. Usage::

    python -m benchmarks.step_time                       # both problems
    python -m benchmarks.step_time --problems=autoencoder --rounds=3
    python -m benchmarks.step_time --problems=digits_autoencoder,digits_transformer,embedding
    KERAS_BACKEND=jax python -m benchmarks.step_time --jit_compile   # Keras' JAX backend
    XLA_FLAGS=--xla_force_host_platform_device_count=2 KERAS_BACKEND=jax \
        python -m benchmarks.step_time --problems=autoencoder_2replicas --jit_compile

On JAX (which needs no TensorFlow here) the step is always compiled with ``--jit_compile``.
``--dtype_policy=mixed_bfloat16`` times mixed precision; ``--extra_baselines`` adds SGD-m to the
autoencoder and Adam to ResNet-32.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import re
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
from absl import app  # noqa: E402
from absl import flags  # noqa: E402

import keras_tnt  # noqa: E402
from keras_tnt import kronecker  # noqa: E402
from models import mnist_autoencoder  # noqa: E402
from models import registry  # noqa: E402
from models import resnet32  # noqa: E402
from models import runtime  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_list(
    "problems",
    ["autoencoder", "resnet32"],
    "Which benchmarks to run: autoencoder, resnet32, autoencoder_2replicas.",
)
flags.DEFINE_integer("rounds", 2, "Alternating rounds of every configuration.")
flags.DEFINE_integer("resnet_steps", 30, "Measured ResNet-32 steps per configuration and round.")
flags.DEFINE_boolean("jit_compile", False, "Compile the training step with XLA.")
flags.DEFINE_string("output", "", "Optional path of a JSON file with every measurement.")
flags.DEFINE_string("dtype_policy", "float32", "Keras dtype policy (e.g. mixed_bfloat16).")
flags.DEFINE_string(
    "only", "", "Time only the configurations whose label matches this regex (and the baseline)."
)
flags.DEFINE_boolean("extra_baselines", False, "Also time SGD-m (autoencoder) and Adam (ResNet).")

JAX = keras.backend.backend() == "jax"


class StepTimer(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.times = []

    def on_train_batch_begin(self, batch, logs=None):
        self._start = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        if JAX:  # dispatch is asynchronous: wait for the step's results
            import jax

            jax.block_until_ready(logs)
        self.times.append(time.perf_counter() - self._start)


# ----------------------------------------------------------------- arithmetic


def forward_macs(model) -> int:
    """Multiply-adds of one forward pass of one example (Dense and Conv2D layers)."""
    total = 0
    for layer in model.layers:
        if isinstance(layer, keras.layers.Dense):
            total += math.prod(layer.kernel.shape)
        elif isinstance(layer, keras.layers.Conv2D):
            _, h, w, _ = layer.output.shape
            total += math.prod(layer.kernel.shape) * h * w
    return total


def tnt_extra_macs(model, t1: int, t2: int) -> dict:
    """TNT's multiply-adds per step beyond forward + backward, amortised over the schedule."""
    contractions = precondition = inverses = 0.0
    for v in model.trainable_variables:
        modes = kronecker.tensor_modes(v.shape)
        size = math.prod(v.shape)
        if not modes:
            continue
        if len(modes) == 1:
            contractions += size * size
        else:
            contractions += sum(d * size for d in modes)
        precondition += sum(modes) * size if len(modes) > 1 else size * size
        # Cholesky (n^3/3) + two triangular solves against I (n^3/2 each).
        inverses += sum(4 / 3 * d**3 for d in modes)
    return {
        "contractions": contractions / t1,
        "precondition": precondition,
        "inverses": inverses / t2,
    }


def arithmetic(model, batch: int, t1: int, t2: int) -> dict:
    forward = forward_macs(model) * batch
    extra = tnt_extra_macs(model, t1, t2)
    baseline = 3 * forward  # forward + backward (activations and weights)
    tnt = baseline + 2 * forward / t1 + sum(extra.values())
    return {"baseline_macs": baseline, "tnt_macs": tnt, "ratio": tnt / baseline, **extra}


def optimizer_bytes(optimizer) -> int:
    return sum(math.prod(v.shape) * np.dtype(v.dtype).itemsize for v in optimizer.variables)


# -------------------------------------------------------------------- timing


PROBLEMS = (
    "autoencoder",
    "resnet32",
    "digits_autoencoder",
    "digits_transformer",
    "embedding",
    "autoencoder_2replicas",
)
# Registry problems timed at their own batch size, TNT against Adam.
SMALL = ("digits_autoencoder", "digits_transformer", "embedding")
VOCABULARY = 50_000


def _strategy(problem):
    """MirroredStrategy on two logical CPU devices for the 2-replica rows (JAX: a
    DataParallel distribution over the first two devices, set here), else None."""
    if problem != "autoencoder_2replicas":
        return None
    if JAX:
        import jax

        keras.distribution.set_distribution(
            keras.distribution.DataParallel(devices=jax.devices()[:2])
        )
        return None
    import tensorflow as tf

    devices = [d.name for d in tf.config.list_logical_devices("CPU")][:2]
    return tf.distribute.MirroredStrategy(
        devices, cross_device_ops=tf.distribute.ReductionToOneDevice()
    )


def _dataset(problem, batch):
    rng = np.random.default_rng(0)
    if problem in ("digits_autoencoder", "digits_transformer"):
        from sklearn.datasets import load_digits

        digits = load_digits()
        if problem == "digits_autoencoder":
            x = (digits.data[:batch] / 16.0).astype("float32")
            return _repeat(x, x)
        return _repeat(digits.data[:batch].astype("int32"), digits.target[:batch])
    if problem == "embedding":
        x = rng.integers(0, VOCABULARY, size=(batch, 64)).astype("int32")
        return _repeat(x, rng.integers(0, 10, size=batch))
    if problem.startswith("autoencoder"):
        # Real images at MNIST's size: scikit-learn's 8x8 digits, upsampled to 28x28.
        from sklearn.datasets import load_digits

        digits = (load_digits().images[:batch, :, :, None] / 16.0).astype("float32")
        x = keras.ops.convert_to_numpy(keras.ops.image.resize(digits, (28, 28)))
        x = np.clip(x.reshape(batch, 784), 0.0, 1.0).astype("float32")
        return _repeat(x, x)
    x = rng.normal(size=(batch, 32, 32, 3)).astype("float32")
    y = rng.integers(0, 10, size=batch)
    return _repeat(x, y)


def _repeat(x, y):
    """One batch, forever: a tf.data pipeline on TensorFlow, a PyDataset elsewhere."""
    if JAX:

        class Repeat(keras.utils.PyDataset):
            def __len__(self):
                return 10**6

            def __getitem__(self, index):
                return x, y

        return Repeat()
    import tensorflow as tf

    return tf.data.Dataset.from_tensors((x, y)).repeat()


# Every configuration trains on one repeated batch for a few hundred steps; a small learning rate
# keeps every run finite (the step time does not depend on it; skipped steps would).
LR = 1e-5


class Config:
    def __init__(self, label, make_optimizer, t1=None, t2=None):
        self.label = label
        self.make_optimizer = make_optimizer
        self.t1, self.t2 = t1, t2
        self.model = None
        self.times = []
        self.kinds = []


def _kind(t, t1, t2):
    if t1 is None:
        return "plain"
    period = t1 if t < t2 else t2
    if t % period == 0:
        return "refresh"
    return "statistics" if t % t1 == 0 else "plain"


def _build(problem, config, dataset):
    keras.utils.set_random_seed(0)
    strategy = _strategy(problem)
    with strategy.scope() if strategy else contextlib.nullcontext():
        if problem in ("digits_autoencoder", "digits_transformer"):
            model = registry.get(problem).build()
            loss = registry.get(problem).loss()
        elif problem == "embedding":
            tokens = keras.Input((64,), dtype="int32")
            x = keras.layers.Embedding(VOCABULARY, 512)(tokens)
            x = keras.layers.GlobalAveragePooling1D()(x)
            model = keras_tnt.FisherModel(tokens, keras.layers.Dense(10)(x))
            loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
        elif problem.startswith("autoencoder"):
            model = mnist_autoencoder()
            loss = keras_tnt.losses.SummedBinaryCrossentropy(from_logits=True)
        else:
            model = resnet32()
            loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
        model.compile(optimizer=config.make_optimizer(), loss=loss, jit_compile=FLAGS.jit_compile)
    if config.t1 is not None:
        model.warm_start(dataset, steps=5, verbose=0)
    # Trace and run a few steps; then jump TNT into its steady state (t >= T2).
    model.fit(dataset, steps_per_epoch=3, epochs=1, verbose=0, shuffle=False)
    if config.t2 is not None:
        model.optimizer.iterations.assign(config.t2 - 1)  # the untimed first step is t = T2 - 1
    config.model = model


def _check_finite(config):
    optimizer = config.model.optimizer
    skipped = getattr(optimizer, "skipped_updates", 0)
    if skipped:
        raise RuntimeError(
            f"{config.label}: {skipped} tensor updates had non-finite gradients; the timings of "
            "skipped steps are meaningless. Lower the learning rate."
        )


def _measure(config, dataset, steps):
    # The first step of every `fit` call carries its setup (iterator, callbacks): not timed.
    start = int(keras.ops.convert_to_numpy(config.model.optimizer.iterations.value)) + 1
    timer = StepTimer()
    config.model.fit(
        dataset, steps_per_epoch=steps + 1, epochs=1, verbose=0, shuffle=False, callbacks=[timer]
    )
    config.times += timer.times[1:]
    config.kinds += [_kind(start + k, config.t1, config.t2) for k in range(steps)]
    _check_finite(config)


def _summary(config):
    times = np.array(config.times)
    kinds = np.array(config.kinds)
    out = {"median_s": float(np.median(times)), "window_mean_s": float(times.mean())}
    if config.t1 is None:
        out["mean_s"] = out["median_s"]  # one kind of step: the same model as for TNT below
        return out
    t1, t2 = config.t1, config.t2
    frac = {"refresh": 1 / t2, "statistics": (t2 // t1 - 1) / t2}
    frac["plain"] = 1 - frac["refresh"] - frac["statistics"]
    # Per-kind medians: a window holds only a few refresh steps, and one stall would swing a mean.
    means = {k: float(np.median(times[kinds == k])) for k in frac if np.any(kinds == k)}
    out.update({f"{k}_mean_s": v for k, v in means.items()})
    out["mean_s"] = sum(frac[k] * means.get(k, 0.0) for k in frac)
    return out


def run_problem(problem):
    batch = {"resnet32": 128, "embedding": 64}.get(problem, 1000)
    if problem in ("digits_autoencoder", "digits_transformer"):
        batch = registry.get(problem).batch_size
    dataset = _dataset(problem, batch)
    if problem in SMALL:
        base = Config("Adam", lambda: keras.optimizers.Adam(LR))
        tnts = [Config("TNT T1=1 T2=20", lambda: keras_tnt.TNT(LR, 0.1, 0.9, 0.9, 1, 20), 1, 20)]
        if problem == "embedding":  # steps of ~0.1-0.5 s: two T2 periods per round
            steps = {c.label: 40 for c in [base] + tnts}
        else:  # T1=10 adds the plain step (momentum and preconditioning only) to the kinds
            tnts.append(
                Config(
                    "TNT T1=10 T2=100", lambda: keras_tnt.TNT(LR, 0.1, 0.9, 0.9, 10, 100), 10, 100
                )
            )
            steps = {base.label: 400, tnts[0].label: 400, tnts[1].label: 800}
        extras = []
    elif problem == "autoencoder_2replicas":
        base = Config("Adam, 2 replicas", lambda: keras.optimizers.Adam(LR))
        tnts = [
            Config(
                f"TNT T1=1 T2=20, 2 replicas, {name}",
                lambda split=split: keras_tnt.TNT(
                    LR, 0.1, 0.9, 0.9, 1, 20, split_preconditioner=split
                ),
                1,
                20,
            )
            for name, split in (("split", True), ("not split", False))
        ] + [
            Config(
                f"KFAC T1=1 T2=20, 2 replicas, {name}",
                lambda split=split: keras_tnt.KFAC(
                    LR, 0.3, 0.9, 0.9, 1, 20, split_preconditioner=split
                ),
                1,
                20,
            )
            for name, split in (("split", True), ("not split", False))
        ]
        extras = []
        steps = {c.label: 60 for c in [base] + tnts}
    elif problem == "autoencoder":
        base = Config("Adam", lambda: keras.optimizers.Adam(LR))
        tnts = [
            Config("TNT T1=1 T2=20", lambda: keras_tnt.TNT(LR, 0.1, 0.9, 0.9, 1, 20), 1, 20),
            Config("TNT T1=10 T2=100", lambda: keras_tnt.TNT(LR, 0.1, 0.9, 0.9, 10, 100), 10, 100),
            # The paper's baseline as released for the autoencoders: statistics from the
            # ordinary gradient every step, coupled-Newton roots every T2 steps.
            Config(
                "Shampoo T1=1 T2=20",
                lambda: keras_tnt.Shampoo(
                    LR, 3e-4, 0.9, 0.9, 1, 20, refresh_at_inverse_period_only=True
                ),
                1,
                20,
            ),
            # The roots by the authors' coupled Newton iteration (the default on accelerators).
            Config(
                "Shampoo T1=1 T2=20, Newton roots",
                lambda: keras_tnt.Shampoo(
                    LR,
                    3e-4,
                    0.9,
                    0.9,
                    1,
                    20,
                    refresh_at_inverse_period_only=True,
                    root_method="newton",
                ),
                1,
                20,
            ),
            # KFAC with the paper's autoencoder schedule; its factors come from the layers'
            # inputs and pre-activation gradients of the sampled pass.
            Config("KFAC T1=1 T2=20", lambda: keras_tnt.KFAC(LR, 0.3, 0.9, 0.9, 1, 20), 1, 20),
        ]
        extras = [Config("SGD-m", lambda: keras.optimizers.SGD(LR, momentum=0.9))]
        steps = {c.label: 60 for c in [base] + tnts + extras}
        steps[tnts[1].label] = 100
    else:
        base = Config("SGD-m", lambda: keras.optimizers.SGD(LR, momentum=0.9))
        tnts = [
            Config("TNT T1=10 T2=100", lambda: keras_tnt.TNT(LR, 0.01, 0.9, 0.9, 10, 100), 10, 100)
        ]
        extras = [Config("Adam", lambda: keras.optimizers.Adam(LR))]
        steps = {c.label: FLAGS.resnet_steps for c in [base] + tnts + extras}
    if FLAGS.extra_baselines:
        tnts = tnts + extras
    if FLAGS.only:
        tnts = [c for c in tnts if re.search(FLAGS.only, c.label)]
    configs = [base] + tnts
    for c in configs:
        _build(problem, c, dataset)
    for _ in range(FLAGS.rounds):
        for c in configs:
            _measure(c, dataset, steps[c.label])
    results = {"problem": problem, "batch": batch, "configs": {}}
    b = _summary(base)
    base_bytes = optimizer_bytes(base.model.optimizer)
    print(f"\n== {problem}, batch {batch}, {FLAGS.rounds} rounds, jit_compile={FLAGS.jit_compile}")
    width = max(18, *(len(c.label) + 2 for c in configs))
    print(
        f"{'optimizer':<{width}}{'median ms':>10}{'mean ms':>9}{'median x':>10}{'mean x':>8}"
        f"{'MAC x':>7}{'state MB':>10}{'state x':>9}{'window mean ms':>16}"
    )
    print(
        f"{base.label:<{width}}{1e3 * b['median_s']:>10.1f}{1e3 * b['mean_s']:>9.1f}"
        f"{1.0:>10.2f}{1.0:>8.2f}{1.0:>7.2f}{base_bytes / 2**20:>10.1f}{1.0:>9.2f}"
        f"{1e3 * b['window_mean_s']:>16.1f}"
    )
    results["configs"][base.label] = {**b, "optimizer_bytes": base_bytes}
    for c in tnts:
        s = _summary(c)
        # The count models TNT (sampled backward pass, Cholesky inverses); Shampoo (no sampled
        # pass, iterative roots) and KFAC (per-layer factors) report measured times only.
        is_tnt = type(c.model.optimizer) is keras_tnt.TNT
        # The count covers Dense and Conv2D layers: not the embedding table or attention.
        counted = is_tnt and problem in (
            "autoencoder",
            "resnet32",
            "autoencoder_2replicas",
            "digits_autoencoder",
        )
        macs = arithmetic(c.model, batch, c.t1, c.t2) if counted else {"ratio": float("nan")}
        nbytes = optimizer_bytes(c.model.optimizer)
        print(
            f"{c.label:<{width}}{1e3 * s['median_s']:>10.1f}{1e3 * s['mean_s']:>9.1f}"
            f"{s['median_s'] / b['median_s']:>10.2f}{s['mean_s'] / b['mean_s']:>8.2f}"
            f"{macs['ratio']:>7.2f}{nbytes / 2**20:>10.1f}{nbytes / base_bytes:>9.2f}"
            f"{1e3 * s['window_mean_s']:>16.1f}"
        )
        kinds = {
            k[: -len("_mean_s")]: round(1e3 * v, 1)
            for k, v in s.items()
            if k.endswith("_mean_s") and k != "window_mean_s"
        }
        print(f"{'':<{width}}per kind, median ms: {kinds}")
        work = c.model.optimizer.replica_work() if is_tnt else []
        if work:
            print(f"{'':<{width}}work per replica: {work}")
        results["configs"][c.label] = {
            **s,
            "median_ratio": s["median_s"] / b["median_s"],
            "mean_ratio": s["mean_s"] / b["mean_s"],
            "arithmetic": macs,
            "optimizer_bytes": nbytes,
        }
    return results


def main(argv):
    del argv
    runtime.quiet_tensorflow_logging(FLAGS["verbosity"].present)
    unknown = set(FLAGS.problems) - set(PROBLEMS)
    if unknown:
        raise app.UsageError(f"--problems: unknown {sorted(unknown)}; use {', '.join(PROBLEMS)}")
    if "autoencoder_2replicas" in FLAGS.problems and JAX:
        import jax

        if len(jax.devices()) < 2:
            raise app.UsageError(
                "--problems=autoencoder_2replicas on JAX needs two devices: on a CPU start it "
                "with XLA_FLAGS=--xla_force_host_platform_device_count=2."
            )
    elif "autoencoder_2replicas" in FLAGS.problems:
        import tensorflow as tf

        # Before TensorFlow starts its runtime: two logical devices on the CPU.
        cpus = tf.config.list_physical_devices("CPU")
        tf.config.set_logical_device_configuration(
            cpus[0], [tf.config.LogicalDeviceConfiguration()] * 2
        )
    keras.config.set_dtype_policy(FLAGS.dtype_policy)
    if JAX:
        import jax

        framework, devices = f"JAX {jax.__version__}", [str(d) for d in jax.devices()]
    else:
        import tensorflow as tf

        framework = f"TensorFlow {tf.__version__}"
        devices = [d.name for d in tf.config.list_logical_devices()]
    print(
        f"{framework}, Keras {keras.__version__} ({keras.backend.backend()} backend), "
        f"{platform.processor() or ''} {os.cpu_count()} CPUs, devices: {devices}, "
        f"dtype policy {FLAGS.dtype_policy}"
    )
    results = [run_problem(p) for p in FLAGS.problems]
    if FLAGS.output:
        with open(FLAGS.output, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    app.run(main)
