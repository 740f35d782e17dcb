"""Replays the authors' float64 TNT trajectory (../shared/golden) through FisherModel + TNT.

On both backends (TensorFlow's tf.function step and JAX's stateless jitted step). Every weight
tensor after every step is within MAX_RELATIVE_ERROR of the reference, relative to how far that
tensor has moved from its initial value (measured on CPU, TensorFlow and JAX: 5.6e-14). The
measured maximum is reported wherever the test runs: as the JUnit property
``max_relative_error``, on stdout (``pytest -s``), and appended as one line to the file named by
``KERAS_TNT_GOLDEN_REPORT`` if set (tools/gpu_check.sh puts it into its report), also when the
replay fails.
"""

import json
import os

import keras
import numpy as np

import keras_tnt
from tests.conftest import BACKEND
from tests.conftest import BOTH_BACKENDS
from tests.conftest import GOLDEN_DIR

pytestmark = BOTH_BACKENDS

GOLDEN = os.path.join(GOLDEN_DIR, "golden_tnt_classifier.npz")
MAX_RELATIVE_ERROR = 1e-12


def _device():
    if BACKEND == "jax":
        import jax

        return str(jax.devices()[0].device_kind)
    import tensorflow as tf

    return "GPU" if tf.config.list_logical_devices("GPU") else "CPU"


def _report(record_property, worst, steps, total):
    """The measured error, where tools/gpu_check.sh and a JUnit report can read it."""
    record_property("max_relative_error", float(worst))  # xdist sends plain floats only
    line = (
        f"golden replay ({BACKEND}, {_device()}): max relative error {worst:.2e} over "
        f"{steps} of {total} steps (bound {MAX_RELATIVE_ERROR:g})"
    )
    print(line)
    path = os.environ.get("KERAS_TNT_GOLDEN_REPORT")
    if path:
        with open(path, "a") as f:
            f.write(line + "\n")


class RecordedTargets(keras_tnt.FisherModel):
    """Draws nothing: returns the labels the reference implementation sampled.

    ``recorded`` is a non-trainable variable of the model, so the compiled step reads its
    current value on either backend (on JAX it is part of the step's state).
    """

    def sample_targets(self, y_pred, seed, first_example=0):
        return keras.ops.convert_to_tensor(self.recorded)


def _activation(name):
    """The layer activation; on JAX tanh as ``2 sigmoid(2z) - 1``: Keras 3.15's ``ops.tanh``
    returns float32 for a float64 input on JAX (``result_type("float64", float)`` is float32
    there), which alone puts 1.4e-7 into the forward pass."""
    if name == "linear":
        return None
    if name == "tanh" and BACKEND == "jax":
        return lambda z: 2.0 * keras.ops.sigmoid(2.0 * z) - 1.0
    return name


def test_replays_reference_trajectory(float64, record_property):
    g = np.load(GOLDEN, allow_pickle=False)
    cfg = json.loads(str(g["meta"][0]))["config"]
    widths = [int(w) for w in g["layer_widths"]]
    acts = [str(a) for a in g["layer_activations"]]

    inputs = keras.Input((widths[0],), dtype="float64")
    h = inputs
    for i, (w, a) in enumerate(zip(widths[1:], acts, strict=True)):
        h = keras.layers.Dense(w, activation=_activation(a), name=f"dense_{i}")(h)
    model = RecordedTargets(inputs, h)
    for i in range(len(widths) - 1):
        layer = model.get_layer(f"dense_{i}")
        layer.set_weights([g[f"init/dense_{i}/kernel"], g[f"init/dense_{i}/bias"]])
    model.recorded = keras.Variable(
        np.zeros(cfg["batch_size"], np.int64), dtype="int64", trainable=False
    )

    optimizer = keras_tnt.TNT(
        learning_rate=cfg["lr"],
        damping=cfg["eps"],
        momentum=cfg["momentum"],
        statistics_decay=cfg["stat_decay"],
        curvature_update_period=cfg["T1"],
        inverse_update_period=cfg["T2"],
        weight_decay=cfg["weight_decay"],
    )
    model.compile(
        optimizer=optimizer,
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    for j in range(cfg["warm_start_batches"]):
        model.recorded.assign(g[f"warm_yhat_{j}"])
        model.warm_start(g[f"warm_x_{j}"], batch_size=cfg["batch_size"], verbose=0)
    assert optimizer.warm_start_batches == cfg["warm_start_batches"]

    worst, steps = 0.0, 0
    try:
        for i in range(cfg["train_steps"]):
            assert np.allclose(g["step_alpha"][i], cfg["lr"])
            key = f"yhat_{i}"
            model.recorded.assign(
                g[key] if key in g.files else np.zeros(cfg["batch_size"], np.int64)
            )
            logs = model.train_on_batch(g[f"x_{i}"], g[f"t_{i}"], return_dict=True)
            for layer_index in range(len(widths) - 1):
                kernel, bias = model.get_layer(f"dense_{layer_index}").get_weights()
                for name, value in (("kernel", kernel), ("bias", bias)):
                    ref = g[f"step_{i}/dense_{layer_index}/{name}"]
                    init = g[f"init/dense_{layer_index}/{name}"]
                    err = np.max(np.abs(value - ref)) / np.max(np.abs(ref - init))
                    worst = max(worst, err)
            steps = i + 1
            np.testing.assert_allclose(logs["loss"], g["step_loss"][i], rtol=1e-12)
    finally:
        _report(record_property, worst, steps, cfg["train_steps"])
    assert optimizer.curvature_updates == cfg["warm_start_batches"] + int(
        g["step_stats_update"].sum()
    )
    assert optimizer.failed_inversions == 0
    assert worst <= MAX_RELATIVE_ERROR
