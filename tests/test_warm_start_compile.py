"""``warm_start`` (and ``WarmStart``) compile their step as ``fit`` does: eagerly under
``compile(run_eagerly=True)``, with XLA only under ``jit_compile``; on both backends."""

import keras
import numpy as np
import pytest

import keras_tnt
from tests.conftest import BACKEND
from tests.conftest import BOTH_BACKENDS

pytestmark = BOTH_BACKENDS


class CountingModel(keras_tnt.FisherModel):
    """Counts the Python calls of the Fisher pass's draw: once per batch when the step runs
    eagerly, once per trace when it is compiled."""

    def sample_targets(self, y_pred, seed, first_example=0):
        self.__dict__["draws"] = self.__dict__.get("draws", 0) + 1
        return super().sample_targets(y_pred, seed, first_example)


class _Snapshot(keras.callbacks.Callback):
    def on_train_begin(self, logs=None):  # right after WarmStart's
        self.model.__dict__["warm_draws"] = self.model.__dict__.get("draws", 0)


def _warm_started(run_eagerly, jit_compile, callback=False):
    keras.utils.set_random_seed(0)
    inputs = keras.Input((5,), dtype="float64")
    h = keras.layers.Dense(4, activation="relu", dtype="float64")(inputs)
    outputs = keras.layers.Dense(3, dtype="float64")(h)
    model = CountingModel(inputs, outputs, fisher_seed=1)
    model.compile(
        optimizer=keras_tnt.TNT(learning_rate=1e-3),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        run_eagerly=run_eagerly,
        jit_compile=jit_compile,
    )
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((40, 5)), rng.integers(0, 3, 40)
    if callback:
        warm = keras_tnt.WarmStart((x, y), batch_size=10, verbose=0)
        model.fit(x, y, batch_size=40, epochs=1, verbose=0, callbacks=[warm, _Snapshot()])
        model.__dict__["draws"] = model.__dict__.pop("warm_draws")  # the warm start's only
    else:
        model.warm_start((x, y), batch_size=10, verbose=0)
    return model


def _statistics(model):
    return [np.array(h) for v in model.trainable_variables for h in model.optimizer.statistics(v)]


@pytest.mark.parametrize("callback", [False, True])
def test_run_eagerly_warm_start_runs_every_batch_in_python(float64, callback):
    eager = _warm_started(run_eagerly=True, jit_compile=False, callback=callback)
    # Compiled as by default: a tf.function on TensorFlow, jax.jit on JAX.
    compiled = _warm_started(run_eagerly=False, jit_compile=BACKEND == "jax", callback=callback)
    assert eager.optimizer.warm_start_batches == compiled.optimizer.warm_start_batches == 4
    # Eagerly, one draw per batch; compiled, one per trace (TensorFlow may trace twice).
    assert eager.draws == 4
    assert compiled.draws <= 2
    for a, b in zip(_statistics(eager), _statistics(compiled), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-15)


def test_jit_compile_setting_is_what_the_warm_start_compiles_with(float64):
    plain = _warm_started(run_eagerly=False, jit_compile=False)
    xla = _warm_started(run_eagerly=False, jit_compile=True)
    assert xla.jit_compile is True and plain.jit_compile is False
    step_plain, step_xla = plain._warm_start_function[1], xla._warm_start_function[1]
    if BACKEND == "jax":
        # Without jit_compile the JAX step is not jitted: its Python runs on every batch.
        assert plain.draws == 4
        assert xla.draws == 1
    else:
        assert step_plain._jit_compile is False
        assert step_xla._jit_compile is True
    for a, b in zip(_statistics(plain), _statistics(xla), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-14)
    # Switched after compile (as `fit` honours it): a new step, run eagerly.
    xla.run_eagerly = True
    draws = xla.draws
    xla.warm_start(np.zeros((20, 5)), batch_size=10, verbose=0)
    assert xla.draws == draws + 2
    del step_xla, step_plain


@pytest.mark.parametrize(
    "make", [lambda: keras_tnt.Shampoo(), lambda: keras_tnt.TNT(empirical_fisher=True)]
)
@pytest.mark.parametrize("callback", [False, True])
def test_an_empirical_fisher_warm_start_without_targets_is_a_clear_error(make, callback):
    """Shampoo and TNT-EF take their statistics from the loss at the true targets: inputs
    alone are refused with a message saying so, by warm_start and by the WarmStart callback,
    and no statistic is touched."""
    keras.utils.set_random_seed(0)
    inputs = keras.Input((5,))
    model = keras_tnt.FisherModel(inputs, keras.layers.Dense(3)(inputs), fisher_seed=1)
    model.compile(
        optimizer=make(), loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    )
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((20, 5)), rng.integers(0, 3, 20)
    with pytest.raises(ValueError, match=r"needs targets: pass batches of \(inputs, targets\)"):
        if callback:
            warm = keras_tnt.WarmStart(x, batch_size=10, verbose=0)
            model.fit(x, y, batch_size=20, epochs=1, verbose=0, callbacks=[warm])
        else:
            model.warm_start(x, batch_size=10, verbose=0)
    assert model.optimizer.warm_start_batches == 0
