"""FisherModel + TNT end to end: save/load, XLA, MirroredStrategy, mixed precision, errors."""

import os

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_tnt
from tests.conftest import mirrored
from tests.conftest import replica_values


def _data(n=64, d=8, classes=5, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d))
    y = rng.integers(0, classes, size=n)
    return x, y


def _classifier(d=8, classes=5, seed=3, model_cls=keras_tnt.FisherModel, fisher_seed=11):
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((d,))
    h = keras.layers.Dense(6, activation="tanh")(inputs)
    outputs = keras.layers.Dense(classes)(h)
    return model_cls(inputs, outputs, fisher_seed=fisher_seed)


def _compile(model, jit_compile=False, **tnt_kwargs):
    tnt_kwargs.setdefault("learning_rate", 0.0625)
    tnt_kwargs.setdefault("curvature_update_period", 2)
    tnt_kwargs.setdefault("inverse_update_period", 4)
    model.compile(
        optimizer=keras_tnt.TNT(**tnt_kwargs),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        jit_compile=jit_compile,
    )
    return model


def _optimizer_state(model):
    return [np.array(v) for v in model.optimizer.variables]


def test_save_load_restores_every_slot_and_the_next_step(tmp_path):
    x, y = _data()
    model = _compile(_classifier(), weight_decay=0.25)
    model.warm_start(x, batch_size=16, verbose=0)
    model.fit(x, y, batch_size=16, epochs=2, verbose=0, shuffle=False)  # 8 steps
    path = os.path.join(tmp_path, "run.keras")
    model.save(path)
    restored = keras.models.load_model(path)
    assert isinstance(restored, keras_tnt.FisherModel)
    assert isinstance(restored.optimizer, keras_tnt.TNT)
    assert restored.fisher_seed == model.fisher_seed
    assert restored.optimizer.get_config() == model.optimizer.get_config()
    before = _optimizer_state(model)
    after = _optimizer_state(restored)
    assert len(before) == len(after)
    for a, b in zip(before, after, strict=True):
        np.testing.assert_array_equal(a, b)
    # The next step is identical (same sampled labels: the seed and counter were restored).
    # Step 8 is due for statistics (T1 = 2) and refreshes nothing (T2 = 4 -> every 4).
    xb, yb = x[:16], y[:16]
    model.train_on_batch(xb, yb)
    restored.train_on_batch(xb, yb)
    for a, b in zip(model.get_weights(), restored.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(_optimizer_state(model), _optimizer_state(restored), strict=True):
        np.testing.assert_array_equal(a, b)


def test_load_refuses_partial_optimizer_state():
    model = _compile(_classifier())
    model.optimizer.build(model.trainable_variables)
    store = {str(i): np.array(v) for i, v in enumerate(model.optimizer.variables[:-1])}
    with pytest.raises(ValueError, match="saved state has"):
        model.optimizer.load_own_variables(store)


@pytest.mark.parametrize("model_cls", [keras_tnt.FisherModel, "argmax"])
def test_xla_step_matches_graph_step(float64, model_cls):
    model_cls = ArgmaxTargets if model_cls == "argmax" else model_cls
    x, y = _data(n=48)
    runs = []
    init = None
    for jit in (False, True):
        model = _compile(_classifier(model_cls=model_cls), jit_compile=jit, weight_decay=0.25)
        # Keras drops jit_compile=True (with a warning only) where it cannot compile the model.
        assert model.jit_compile is jit
        if init is None:
            init = model.get_weights()
        model.set_weights(init)
        model.warm_start(x, batch_size=16, verbose=0)
        model.fit(x, y, batch_size=16, epochs=3, verbose=0, shuffle=False)
        runs.append((model.get_weights(), _optimizer_state(model)))
    for a, b in zip(runs[0][0] + runs[0][1], runs[1][0] + runs[1][1], strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12)


class ArgmaxTargets(keras_tnt.FisherModel):
    """Deterministic "draws" so that one device and two replicas see the same targets."""

    def sample_targets(self, y_pred, seed, first_example=0):
        return tf.argmax(y_pred, axis=-1)


def test_mirrored_replicas_identical_and_equal_to_one_device():
    x, y = _data(n=64)
    results = []
    for strategy in (None, mirrored()):
        scope = strategy.scope() if strategy else tf.distribute.get_strategy().scope()
        with scope:
            model = _compile(_classifier(model_cls=ArgmaxTargets))
        model.warm_start(x, batch_size=32, verbose=0)
        model.fit(x, y, batch_size=32, epochs=3, verbose=0, shuffle=False)
        if strategy:
            for v in model.weights + model.optimizer.variables:
                parts = replica_values(v)
                assert len(parts) == 2
                np.testing.assert_array_equal(parts[0], parts[1], err_msg=v.path)
        results.append(
            [np.array(v) for v in model.weights] + [np.array(v) for v in model.optimizer.variables]
        )
    for a, b in zip(*results, strict=True):
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-6)


def test_mirrored_with_sampled_targets_keeps_replicas_identical():
    x, y = _data(n=64)
    with mirrored().scope():
        model = _compile(_classifier(), curvature_update_period=1)
    model.fit(x, y, batch_size=32, epochs=2, verbose=0)
    assert model.optimizer.curvature_updates == 4
    for v in model.weights + model.optimizer.variables:
        parts = replica_values(v)
        np.testing.assert_array_equal(parts[0], parts[1], err_msg=v.path)


def _statistics_after_two_steps(policy, weights=None):
    keras.mixed_precision.set_global_policy(policy)
    try:
        x, y = _data()
        model = _compile(_classifier(), curvature_update_period=1)
        if weights is not None:
            model.set_weights(weights)
        start = model.get_weights()
        model.fit(x, y, batch_size=32, epochs=1, shuffle=False, verbose=0)
        tnt = model.curvature_optimizer
        kernel = model.trainable_variables[0]
        stats = [np.array(h) for h in tnt.statistics(kernel)]
        factors = tnt.statistics(kernel) + tnt.inverses(kernel)
        dtypes = {keras.backend.standardize_dtype(h.dtype) for h in factors}
        steps = [w - w0 for w, w0 in zip(model.get_weights(), start, strict=True)]
        return start, stats, dtypes, steps, tnt.curvature_updates
    finally:
        keras.mixed_precision.set_global_policy("float32")


@pytest.mark.parametrize("policy, tolerance", [("mixed_float16", 0.02), ("mixed_bfloat16", 0.1)])
def test_mixed_precision_statistics_equal_the_float32_run(policy, tolerance):
    """Under a mixed policy (float16 with Keras' LossScaleOptimizer) the statistics and the
    weight steps after two steps equal the float32 run's to the policy's rounding (float16: 11
    bits, bfloat16: 8 bits); a loss scale left in the Fisher gradients would be off by 2^30."""
    start, reference, _, reference_steps, _ = _statistics_after_two_steps("float32")
    _, stats, dtypes, steps, updates = _statistics_after_two_steps(policy, start)
    assert dtypes == {"float32"} and updates == 2
    for h, h_ref in zip(stats, reference, strict=True):
        assert np.linalg.norm(h - h_ref) <= tolerance * np.linalg.norm(h_ref)
    for d, d_ref in zip(steps, reference_steps, strict=True):
        assert np.linalg.norm(d - d_ref) <= tolerance * np.linalg.norm(d_ref)


def test_float64_model_keeps_float64_statistics(float64):
    x, y = _data()
    model = _compile(_classifier())
    model.fit(x, y, batch_size=16, epochs=1, verbose=0)
    kernel = model.trainable_variables[0]
    assert all(h.dtype == "float64" for h in model.optimizer.statistics(kernel))


def test_from_sequential_model_trains_and_decreases_loss():
    x, y = _data(n=128)
    keras.utils.set_random_seed(0)
    seq = keras.Sequential(
        [keras.Input((8,)), keras.layers.Dense(16, activation="relu"), keras.layers.Dense(5)]
    )
    model = keras_tnt.FisherModel.from_model(seq, fisher_seed=1)
    assert model.trainable_variables[0] is seq.trainable_variables[0]
    model.compile(
        optimizer=keras_tnt.TNT(learning_rate=0.01, damping=0.1),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    history = model.fit(
        x, y, batch_size=32, epochs=8, verbose=0, callbacks=[keras_tnt.WarmStart(x)]
    )
    assert model.optimizer.warm_start_batches == 4
    losses = history.history["loss"]
    assert losses[-1] < 0.8 * losses[0]


def _op_counts(graph_def, ops=("MatMul", "TanhGrad")):
    """``(counts outside any cond, [(then counts, else counts) per cond, nested ones too])``:
    the ``ops`` in the main graph and in each branch function (not counting nested conds)."""
    library = {f.signature.name: f.node_def for f in graph_def.library.function}
    conds = []

    def count(nodes):
        for node in nodes:
            if node.op in ("If", "StatelessIf"):
                branches = (node.attr["then_branch"], node.attr["else_branch"])
                conds.append(tuple(count(library[b.func.name]) for b in branches))
        return {op: sum(node.op == op for node in nodes) for op in ops}

    return count(graph_def.node), conds


def test_second_backward_pass_only_when_statistics_are_due():
    """In the traced TensorFlow step of a Dense(6, tanh) -> Dense(5) model: the forward pass (2
    matmuls), the ordinary backward pass (3: two kernel gradients and one input gradient; one
    tanh gradient) and the preconditioned directions (one matmul per mode) outside any cond; the
    sampled-label backward pass (3 matmuls, one tanh gradient) only in the true branch of one
    cond (the statistics' contractions are in a cond nested in that branch)."""
    x, y = _data(n=80)
    model = _compile(_classifier(), curvature_update_period=3, inverse_update_period=6)
    model.fit(x, y, batch_size=16, epochs=2, verbose=0)  # steps 0..9 -> due at 0, 3, 6, 9
    assert model.optimizer.curvature_updates == 4
    # The step as Keras traces it (one replica: `strategy.run` calls train_step; no autograph).
    step = tf.function(model.train_step, autograph=False)
    graph = step.get_concrete_function((tf.constant(x[:16]), tf.constant(y[:16]))).graph
    outside, conds = _op_counts(graph.as_graph_def())
    directions = sum(len(entry["modes"]) for entry in model.optimizer.plan())
    assert directions == 2 * 2 + 2  # kernels: 2 modes, biases: 1
    assert outside == {"MatMul": 2 + 3 + directions, "TanhGrad": 1}
    fisher = [c for c in conds if c[0]["TanhGrad"] or c[1]["TanhGrad"]]
    assert fisher == [({"MatMul": 3, "TanhGrad": 1}, {"MatMul": 0, "TanhGrad": 0})], conds


def test_warm_start_skips_the_statistics_update_at_step_zero():
    x, y = _data(n=32)
    model = _compile(_classifier(), curvature_update_period=1)
    model.warm_start(x, batch_size=16, verbose=0)
    assert model.optimizer.curvature_updates == 2
    model.train_on_batch(x[:16], y[:16])
    assert model.optimizer.curvature_updates == 2
    model.train_on_batch(x[:16], y[:16])
    assert model.optimizer.curvature_updates == 3


def test_tnt_on_plain_model_fails_with_a_clear_message():
    x, y = _data()
    inputs = keras.Input((8,))
    model = keras.Model(inputs, keras.layers.Dense(5)(inputs))
    model.compile(optimizer=keras_tnt.TNT(), loss="sparse_categorical_crossentropy")
    with pytest.raises(ValueError, match="FisherModel"):
        model.fit(x, y, epochs=1, verbose=0)


def test_first_order_optimizer_on_fisher_model_trains_like_keras_model():
    x, y = _data()
    model = _classifier()
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="sparse_categorical_crossentropy")
    reference = _classifier(model_cls=keras.Model)
    reference.compile(optimizer=keras.optimizers.SGD(0.1), loss="sparse_categorical_crossentropy")
    reference.set_weights(model.get_weights())
    model.fit(x, y, batch_size=16, epochs=1, verbose=0, shuffle=False)
    reference.fit(x, y, batch_size=16, epochs=1, verbose=0, shuffle=False)
    for a, b in zip(model.get_weights(), reference.get_weights(), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.backends("tensorflow", "jax")
def test_warm_start_takes_what_fit_takes():
    """Arrays batched by batch_size, an (x, y) tuple and a keras.utils.PyDataset of the same
    batches give the same statistics (the sampled pass needs x only)."""
    x, y = _data(n=48)

    class Batches(keras.utils.PyDataset):
        def __len__(self):
            return 3

        def __getitem__(self, i):
            return x[16 * i : 16 * (i + 1)], y[16 * i : 16 * (i + 1)]

    states = []
    for source, kwargs in ((x, {"batch_size": 16}), ((x, y), {"batch_size": 16}), (Batches(), {})):
        model = _compile(_classifier())
        model.warm_start(source, verbose=0, **kwargs)
        assert model.optimizer.warm_start_batches == 3
        states.append(_optimizer_state(model))
    for other in states[1:]:
        for a, b in zip(states[0], other, strict=True):
            np.testing.assert_array_equal(a, b)


def test_warm_start_errors():
    model = _classifier()
    with pytest.raises(ValueError, match="compile"):
        model.warm_start(np.zeros((4, 8)))
    _compile(model)
    with pytest.raises(ValueError, match="steps"):
        model.warm_start(np.zeros((4, 8)), steps=0)


def test_warm_start_callback_does_not_repeat_on_resume(tmp_path):
    x, y = _data(n=64)
    model = _compile(_classifier())
    callback = keras_tnt.WarmStart(x, batch_size=32, verbose=0)
    model.fit(x, y, batch_size=32, epochs=1, verbose=0, callbacks=[callback])
    assert model.optimizer.warm_start_batches == 2
    updates = model.optimizer.curvature_updates
    path = os.path.join(tmp_path, "resume.keras")
    model.save(path)
    resumed = keras.models.load_model(path)
    resumed.fit(x, y, batch_size=32, epochs=1, verbose=0, callbacks=[callback])
    assert resumed.optimizer.warm_start_batches == 2
    # Steps 2 and 3 of the resumed run: T1 = 2 folds statistics at step 2 only.
    assert resumed.optimizer.curvature_updates == updates + 1
