"""keras_tnt's optimizers behave like Keras optimizers: Keras' SGD/Adam are the controls.

Variables are matched by identity (not list position), ``None`` gradients leave a variable alone,
restored state steps, instances get unique names, the state is saved once and a mismatch is an
error, and KerasTuner's usual idiom (a ``build(hp)`` that compiles TNT, ``WarmStart`` on a
``tf.data.Dataset``) works.
"""

import copy
import os

import h5py
import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_tnt

RHO = 0.75


def _t(x):
    return tf.constant(np.asarray(x), tf.float64)


def _contractions(g):
    g = np.asarray(g, np.float64)
    if g.ndim == 1:
        return [np.outer(g, g)]
    return [g @ g.T, g.T @ g]


def _pair(rng, shape=(3, 3)):
    a = keras.Variable(rng.standard_normal(shape), dtype="float64", name="a")
    b = keras.Variable(rng.standard_normal(shape), dtype="float64", name="b")
    return a, b


def _stats(opt, var):
    return [np.array(h) for h in opt.statistics(var)]


# ------------------------------------------------------------- matching by variable


def test_reordered_variables_of_one_shape_keep_their_own_statistics(float64):
    rng = np.random.default_rng(0)
    a, b = _pair(rng)
    ga, gb = rng.standard_normal((3, 3)), rng.standard_normal((3, 3))
    in_order = keras_tnt.TNT(statistics_decay=RHO)
    in_order.build([a, b])
    in_order.update_curvature([_t(ga), _t(gb)])
    swapped = keras_tnt.TNT(statistics_decay=RHO)
    swapped.build([a, b])
    swapped.update_curvature([_t(gb), _t(ga)], [b, a])
    for opt in (in_order, swapped):
        for var, g in ((a, ga), (b, gb)):
            for h, ref in zip(_stats(opt, var), _contractions(g), strict=True):
                np.testing.assert_allclose(h, ref, rtol=1e-14)
    # The step, with the gradients also given in the other order, is the same; as for Adam.
    grads = [rng.standard_normal((3, 3)) for _ in range(2)]
    start = [np.array(a), np.array(b)]
    results = {}
    for name, make in (
        ("tnt", lambda: in_order),
        ("tnt_swapped", lambda: swapped),
        ("adam", lambda: keras.optimizers.Adam(0.0625)),
        ("adam_swapped", lambda: keras.optimizers.Adam(0.0625)),
    ):
        a.assign(start[0])
        b.assign(start[1])
        opt = make()
        if name.endswith("swapped"):
            opt.apply([_t(grads[1]), _t(grads[0])], [b, a])
        else:
            opt.apply([_t(grads[0]), _t(grads[1])], [a, b])
        results[name] = [np.array(a), np.array(b)]
    for kind in ("tnt", "adam"):
        for x, y in zip(results[kind], results[f"{kind}_swapped"], strict=True):
            np.testing.assert_array_equal(x, y)
    assert not np.allclose(results["tnt"][0], start[0])


def test_subset_updates_only_its_own_statistics(float64):
    rng = np.random.default_rng(1)
    a, b = _pair(rng)
    opt = keras_tnt.TNT(statistics_decay=RHO)
    opt.build([a, b])
    ga1, gb1, gb2, ga2 = (rng.standard_normal((3, 3)) for _ in range(4))
    opt.update_curvature([_t(ga1), _t(gb1)])
    opt.update_curvature([_t(gb2)], [b])
    for h, ref in zip(_stats(opt, a), _contractions(ga1), strict=True):
        np.testing.assert_allclose(h, ref, rtol=1e-14)  # untouched: no decay by rho
    for h, c1, c2 in zip(_stats(opt, b), _contractions(gb1), _contractions(gb2), strict=True):
        np.testing.assert_allclose(h, RHO * c1 + (1 - RHO) * c2, rtol=1e-14)
    assert (opt.statistics_count(a), opt.statistics_count(b)) == (1, 2)
    # A None gradient is the same as leaving the variable out.
    opt.update_curvature([_t(ga2), None])
    for h, c1, c2 in zip(_stats(opt, a), _contractions(ga1), _contractions(ga2), strict=True):
        np.testing.assert_allclose(h, RHO * c1 + (1 - RHO) * c2, rtol=1e-14)
    assert (opt.statistics_count(a), opt.statistics_count(b)) == (2, 2)


def test_first_batch_of_each_variable_sets_its_statistics(float64):
    rng = np.random.default_rng(2)
    a, b = _pair(rng)
    opt = keras_tnt.TNT(statistics_decay=RHO)
    opt.build([a, b])
    for _ in range(3):
        opt.update_curvature([_t(rng.standard_normal((3, 3)))], [a])
    gb = rng.standard_normal((3, 3))
    opt.update_curvature([_t(gb)], [b])  # b's first batch, the optimizer's fourth
    for h, ref in zip(_stats(opt, b), _contractions(gb), strict=True):
        np.testing.assert_allclose(h, ref, rtol=1e-14)  # not (1 - rho) * contraction
    # Warm start after a subset's warm start: each variable's running mean over its own batches.
    opt2 = keras_tnt.TNT(statistics_decay=RHO)
    opt2.build([a, b])
    g1, g2, g3 = (rng.standard_normal((3, 3)) for _ in range(3))
    opt2.accumulate_curvature([_t(g1)], [a])
    opt2.accumulate_curvature([_t(g2), _t(g3)], [a, b])
    for h, c1, c2 in zip(_stats(opt2, a), _contractions(g1), _contractions(g2), strict=True):
        np.testing.assert_allclose(h, (c1 + c2) / 2, rtol=1e-14)
    for h, c3 in zip(_stats(opt2, b), _contractions(g3), strict=True):
        np.testing.assert_allclose(h, c3, rtol=1e-14)


def test_unknown_or_repeated_variables_are_clear_errors():
    rng = np.random.default_rng(3)
    a, b = _pair(rng)
    other = keras.Variable(np.ones((3, 3)), name="other")
    opt = keras_tnt.TNT()
    opt.build([a, b])
    g = tf.ones((3, 3), a.dtype)
    with pytest.raises(ValueError, match="Unknown variable 'other'"):
        opt.update_curvature([g], [other])
    with pytest.raises(ValueError, match="`trainable_variables` names the same trainable variable"):
        opt.update_curvature([g, g], [a, a])
    with pytest.raises(ValueError, match="must have the same length; received 1 and 2"):
        opt.update_curvature([g], [a, b])
    with pytest.raises(ValueError, match=r"one gradient per trainable variable .* \(2\)"):
        opt.update_curvature([g])


def _factor_reads(opt):
    return (opt.statistics, opt.inverses)


@pytest.mark.parametrize(
    "make",
    [
        lambda: keras_tnt.TNT(empirical_fisher=True, statistics_decay=RHO),
        lambda: keras_tnt.Shampoo(statistics_decay=RHO),
        lambda: keras.optimizers.SGD(0.0625, momentum=0.5),
        lambda: keras.optimizers.Adam(0.0625),
    ],
    ids=["tnt_ef", "shampoo", "sgd_control", "adam_control"],
)
def test_none_gradient_leaves_weights_momentum_and_statistics(float64, make):
    rng = np.random.default_rng(4)
    a, b = _pair(rng)
    opt = make()
    opt.build([a, b])
    opt.apply([_t(rng.standard_normal((3, 3))) for _ in range(2)], [a, b])
    b_before = np.array(b)
    a_before = np.array(a)
    state_before = [np.array(v) for v in opt.variables]
    factored = isinstance(opt, keras_tnt.TNT)
    if factored:  # a's and b's factors are rows of the same buffers (docs/algorithm.md §2)
        assert opt._statistics[0][0].buffer is opt._statistics[1][0].buffer
        factors_before = [[np.array(x) for x in f(v)] for v in (a, b) for f in _factor_reads(opt)]
    with pytest.warns(UserWarning, match="Gradients do not exist"):
        opt.apply([_t(rng.standard_normal((3, 3))), None], [a, b])
    if factored:  # b's rows keep their values; the step refreshed a's inverses (t = 1 < T2)
        after = [[np.array(x) for x in f(v)] for v in (a, b) for f in _factor_reads(opt)]
        for new, old in zip(
            after[2] + after[3], factors_before[2] + factors_before[3], strict=True
        ):
            np.testing.assert_array_equal(new, old)
        assert not np.array_equal(after[1][0], factors_before[1][0])
    np.testing.assert_array_equal(np.array(b), b_before)
    assert not np.allclose(np.array(a), a_before)
    # Every slot of b (momentum, statistics, inverses, counts) is unchanged.
    changed = {
        v.path
        for v, old in zip(opt.variables, state_before, strict=True)
        if not np.array_equal(np.array(v), old)
    }
    assert any("/a_" in p for p in changed), changed  # the filter below sees slot paths
    assert not [p for p in changed if "/b_" in p], changed
    if isinstance(opt, keras_tnt.TNT):
        assert (opt.statistics_count(a), opt.statistics_count(b)) == (2, 1)


# ------------------------------------------------------------ freezing and recompiling


def _digits_model(model_cls=keras_tnt.FisherModel):
    keras.utils.set_random_seed(5)
    inputs = keras.Input((8,))
    h = keras.layers.Dense(6, activation="tanh", name="hidden")(inputs)
    outputs = keras.layers.Dense(4, name="head")(h)
    if model_cls is keras.Model:
        return keras.Model(inputs, outputs)
    return model_cls(inputs, outputs, fisher_seed=3)


def _xy(n=32):
    rng = np.random.default_rng(6)
    return rng.normal(size=(n, 8)).astype("float32"), rng.integers(0, 4, size=n)


def _slots(opt, layer):
    """The optimizer variables belonging to ``layer`` (paths name the layer)."""
    slots = {v.path: np.array(v) for v in opt.variables if f"/{layer.name}_" in v.path}
    assert slots, [v.path for v in opt.variables]
    return slots


@pytest.mark.parametrize(
    "make, model_cls",
    [
        (lambda: keras_tnt.TNT(learning_rate=0.01), keras_tnt.FisherModel),
        (lambda: keras_tnt.KFAC(learning_rate=0.01), keras_tnt.FisherModel),
        (lambda: keras_tnt.Shampoo(learning_rate=0.01), keras.Model),
        (lambda: keras.optimizers.Adam(0.01), keras.Model),
    ],
    ids=["tnt", "kfac", "shampoo", "adam_control"],
)
def test_freeze_a_layer_and_recompile_with_the_same_optimizer(make, model_cls):
    x, y = _xy()
    model = _digits_model(model_cls)
    opt = make()
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    model.compile(optimizer=opt, loss=loss)
    model.fit(x, y, batch_size=16, epochs=1, verbose=0)
    hidden, head = model.get_layer("hidden"), model.get_layer("head")
    hidden.trainable = False
    model.compile(optimizer=opt, loss=loss)
    frozen_weights = [np.array(w) for w in hidden.weights]
    frozen_slots = _slots(opt, hidden)
    head_weights = [np.array(w) for w in head.weights]
    model.fit(x, y, batch_size=16, epochs=1, verbose=0)
    assert int(opt.iterations) == 4
    for w, old in zip(hidden.weights, frozen_weights, strict=True):
        np.testing.assert_array_equal(np.array(w), old)
    for path, old in _slots(opt, hidden).items():
        np.testing.assert_array_equal(old, frozen_slots[path], err_msg=path)
    assert not np.allclose(np.array(head.kernel), head_weights[0])
    if isinstance(opt, keras_tnt.KFAC):
        assert (opt.factor_count(hidden), opt.factor_count(head)) == (2, 4)
    elif isinstance(opt, keras_tnt.TNT):
        assert opt.statistics_count(hidden.kernel) == 2
        assert opt.statistics_count(head.kernel) == 4


# ----------------------------------------------------------------------------- KFAC


def test_kfac_none_gradient_moves_only_the_members_with_one(float64):
    rng = np.random.default_rng(7)
    inputs = keras.Input((5,))
    layer = keras.layers.Dense(3, name="dense")
    model = keras_tnt.FisherModel(inputs, layer(inputs), fisher_seed=1)
    opt = keras_tnt.KFAC(learning_rate=0.0625, damping=0.25, momentum=0.5)
    model.compile(optimizer=opt, loss="mse")
    opt.build(model.trainable_variables)
    a = _t(rng.standard_normal((8, 5)))
    s = _t(rng.standard_normal((8, 3)) / 8)
    opt.update_curvature([(a, s)])
    kernel, bias = layer.kernel, layer.bias
    opt.apply([_t(rng.standard_normal((5, 3))), _t(rng.standard_normal(3))], [kernel, bias])
    m_kernel, m_bias = (np.array(v) for v in opt._momenta)
    w_kernel, w_bias = np.array(kernel), np.array(bias)
    g_kernel = rng.standard_normal((5, 3))
    with pytest.warns(UserWarning, match="Gradients do not exist"):
        opt.apply([_t(g_kernel), None], [kernel, bias])
    np.testing.assert_array_equal(np.array(bias), w_bias)
    np.testing.assert_array_equal(np.array(opt._momenta[1]), m_bias)
    # The kernel's part of the layer's direction from [new m_kernel; unchanged m_bias].
    inv_a, inv_g = (np.array(v) for v in opt.factor_inverses(layer))
    new_m = 0.5 * m_kernel + g_kernel
    direction = inv_a @ np.vstack([new_m, m_bias[None]]) @ inv_g
    np.testing.assert_allclose(np.array(kernel), w_kernel - 0.0625 * direction[:5], rtol=1e-12)
    # A None pair leaves that layer's factors and count.
    factors = [np.array(f) for f in opt.factors(layer)]
    opt.update_curvature([None])
    for f, old in zip(opt.factors(layer), factors, strict=True):
        np.testing.assert_array_equal(np.array(f), old)
    assert opt.factor_count(layer) == 1
    with pytest.raises(ValueError, match="not Kronecker-factored"):
        opt.update_curvature([(a, s)], [keras.layers.Dense(2)])


# ----------------------------------------------------------------- restored state steps


def _trained_run(make=None):
    x, y = _xy()
    model = _digits_model()
    opt = (make or _fresh_tnt)()
    model.compile(optimizer=opt, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x, y, batch_size=16, epochs=1, verbose=0)  # t = 2: no statistics due at t = 2
    return model, opt


def _fresh_tnt():
    return keras_tnt.TNT(learning_rate=0.01, curvature_update_period=5, inverse_update_period=5)


def _fresh_kfac():
    return keras_tnt.KFAC(learning_rate=0.01, curvature_update_period=5, inverse_update_period=5)


def _trained_tnt_run():
    return _trained_run(_fresh_tnt)


@pytest.mark.parametrize("how", ["tf_checkpoint", "tf_checkpoint_before_build", "set_weights"])
@pytest.mark.parametrize("kind", ["tnt", "kfac", "adam_control"])
def test_restored_state_steps_in_a_custom_loop(tmp_path, how, kind):
    if kind == "adam_control":
        x, y = _xy()
        model = _digits_model(keras.Model)
        opt = keras.optimizers.Adam(0.01)
        model.compile(optimizer=opt, loss="mse")
        model.fit(x, np.eye(4)[y], batch_size=16, epochs=1, verbose=0)

        def fresh():
            return keras.optimizers.Adam(0.01)
    else:
        fresh = _fresh_tnt if kind == "tnt" else _fresh_kfac
        model, opt = _trained_run(fresh)

    variables = model.trainable_variables
    start = [np.array(v) for v in variables]
    restored = fresh()
    if kind == "kfac":
        restored.register_layers(model)
    if how != "tf_checkpoint_before_build":
        restored.build(variables)
    if how.startswith("tf_checkpoint"):
        path = tf.train.Checkpoint(optimizer=opt).save(os.path.join(tmp_path, "ckpt"))
        # Partial: the optimizer's checkpoint also lists the model variables it refers to.
        tf.train.Checkpoint(optimizer=restored).restore(path).expect_partial()
    else:
        restored.set_weights([np.array(v) for v in opt.variables])
    grads = [tf.fill(v.shape, 0.5) for v in variables]
    results = []
    for o in (opt, restored):
        for v, s in zip(variables, start, strict=True):
            v.assign(s)
        o.apply(grads, variables)  # t = 2: no statistics due, the restored ones are used
        results.append([np.array(v) for v in variables])
    for a, b in zip(opt.variables, restored.variables, strict=True):
        np.testing.assert_array_equal(np.array(a), np.array(b), err_msg=a.path)
    for a, b in zip(*results, strict=True):
        np.testing.assert_array_equal(a, b)
    assert not np.allclose(results[0][0], start[0])


def test_fresh_tnt_without_statistics_still_refuses():
    a = keras.Variable(np.ones((3, 2)), name="a")
    opt = keras_tnt.TNT()
    opt.build([a])
    opt.set_weights([np.array(v) for v in opt.variables])  # all-zero state: nothing restored
    with pytest.raises(ValueError, match="nothing has provided them"):
        opt.apply([tf.ones((3, 2))], [a])


# ---------------------------------------------------------------------------- names


@pytest.mark.parametrize(
    "cls, base",
    [
        (keras_tnt.TNT, "tnt"),
        (keras_tnt.Shampoo, "shampoo"),
        (keras_tnt.KFAC, "kfac"),
        (keras.optimizers.Adam, "adam"),
    ],
)
def test_unnamed_instances_get_unique_names(cls, base):
    keras.backend.clear_session()
    assert [cls().name, cls().name, cls(name="mine").name] == [base, f"{base}_1", "mine"]


# ------------------------------------------------------------------- saving and loading


def _weights_file_groups(path):
    with h5py.File(path, "r") as f:
        return sorted(f.keys())


def test_optimizer_state_is_saved_once(tmp_path):
    model, opt = _trained_tnt_run()
    path = os.path.join(tmp_path, "w.weights.h5")
    model.save_weights(path)
    groups = _weights_file_groups(path)
    assert "optimizer" in groups
    assert not {"curvature_optimizer", "statistics_optimizer"} & set(groups), groups
    with h5py.File(path, "r") as f:
        assert len(f["optimizer/vars"]) == len(opt.variables)


def _kfac_weights_file(tmp_path, model_cls=keras_tnt.FisherModel, make=_fresh_kfac):
    model, _ = _trained_run(make) if model_cls is keras_tnt.FisherModel else _trained_plain(make)
    path = os.path.join(tmp_path, "other.weights.h5")
    model.save_weights(path)
    return path


def _trained_plain(make):
    x, y = _xy()
    model = _digits_model(keras.Model)
    opt = make()
    model.compile(optimizer=opt, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x, y, batch_size=16, epochs=1, verbose=0)
    return model, opt


def test_mismatched_optimizer_state_is_an_error_not_swallowed(tmp_path):
    path = _kfac_weights_file(tmp_path)
    model = _digits_model()
    model.compile(optimizer=_fresh_tnt(), loss="mse")
    with pytest.raises(ValueError, match="Cannot restore optimizer"):
        model.load_weights(path)  # FisherModel builds the optimizer first: the error is here
    # Keras' way to take only the model's weights: a warning, and the optimizer keeps its state.
    with pytest.warns(UserWarning, match="Cannot restore optimizer"):
        model.load_weights(path, skip_mismatch=True)
    assert model.optimizer.curvature_updates == 0


def test_mismatched_state_loaded_before_the_build_warns_and_trains(tmp_path):
    # A plain Keras model builds its optimizer inside the first step: a loud warning there.
    path = _kfac_weights_file(tmp_path, keras.Model, lambda: keras.optimizers.Adam(0.01))
    model = _digits_model(keras.Model)
    model.compile(optimizer=keras_tnt.Shampoo(learning_rate=0.01), loss="mse")
    model.load_weights(path)
    x, y = _xy()
    with pytest.warns(UserWarning, match="NOT restored"):
        model.fit(x, np.eye(4)[y], batch_size=16, epochs=1, verbose=0)
    model.fit(x, np.eye(4)[y], batch_size=16, epochs=1, verbose=0)
    assert int(model.optimizer.iterations) == 4
    assert all(np.all(np.isfinite(w)) for w in model.get_weights())


@pytest.mark.parametrize(
    "model_cls, make",
    [(keras_tnt.FisherModel, _fresh_tnt), (keras.Model, lambda: keras_tnt.Shampoo(0.01))],
    ids=["fisher_model_tnt", "plain_model_shampoo"],
)
def test_weights_file_into_a_freshly_compiled_model_continues_the_run(tmp_path, model_cls, make):
    model, opt = _trained_run(make) if model_cls is keras_tnt.FisherModel else _trained_plain(make)
    path = os.path.join(tmp_path, "w.weights.h5")
    model.save_weights(path)

    def fresh_model():
        m = _digits_model(model_cls)
        m.compile(optimizer=make(), loss=keras.losses.SparseCategoricalCrossentropy(True))
        return m

    fresh = fresh_model()
    fresh.load_weights(path)
    # FisherModel builds its optimizer to load; a plain model's TNT keeps the state until it is
    # built, and saves it again meanwhile.
    assert fresh.optimizer.built == (model_cls is keras_tnt.FisherModel)
    path2 = os.path.join(tmp_path, "w2.weights.h5")
    fresh.save_weights(path2)
    again = fresh_model()
    again.load_weights(path2)
    x, y = _xy()
    for m in (model, fresh, again):
        m.train_on_batch(x[:16], y[:16])
    for other in (fresh, again):
        for a, b in zip(model.get_weights(), other.get_weights(), strict=True):
            np.testing.assert_array_equal(a, b)
        for a, b in zip(opt.variables, other.optimizer.variables, strict=True):
            np.testing.assert_array_equal(np.array(a), np.array(b))
    assert opt.curvature_updates > 0


# ------------------------------------------------------------------------- KerasTuner


def test_warm_start_callback_deep_copies_with_a_dataset():
    x, y = _xy()
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(16)
    callback = keras_tnt.WarmStart(dataset, steps=1, verbose=0)
    clone = copy.deepcopy(callback)
    assert clone is not callback and clone.data is dataset
    assert (clone.batch_size, clone.steps, clone.verbose) == (None, 1, 0)


def test_keras_tuner_search_with_tnt_and_a_dataset_warm_start(tmp_path):
    import keras_tuner  # a test dependency (setup.cfg): a broken install fails, never skips

    x, y = _xy(48)
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(16)

    def build(hp):
        model = _digits_model()
        model.compile(
            optimizer=keras_tnt.TNT(
                learning_rate=hp.Choice("learning_rate", [0.01, 0.003]),
                damping=hp.Choice("damping", [0.1]),
            ),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        )
        return model

    tuner = keras_tuner.GridSearch(
        build, objective="loss", max_trials=2, directory=str(tmp_path), project_name="p"
    )
    tuner.search(dataset, epochs=1, verbose=0, callbacks=[keras_tnt.WarmStart(dataset, verbose=0)])
    assert len(tuner.oracle.trials) == 2
    best = tuner.get_best_models(1)[0]
    assert isinstance(best.optimizer, keras_tnt.TNT)
    # The best epoch's optimizer state comes back when the optimizer is built: 3 warm-start
    # batches and 3 steps (statistics at t = 1, 2; t = 0 uses the warm start).
    best.optimizer.build(best.trainable_variables)
    assert int(best.optimizer.iterations) == 3
    assert best.optimizer.warm_start_batches == 3
    assert best.optimizer.curvature_updates == 5
    # Training the best model further continues that state: no second warm start.
    best.fit(dataset, epochs=1, verbose=0, callbacks=[keras_tnt.WarmStart(dataset, verbose=0)])
    assert int(best.optimizer.iterations) == 6
    assert best.optimizer.warm_start_batches == 3
    assert best.optimizer.curvature_updates == 8


def test_warm_start_is_not_repeated_after_load_weights(tmp_path):
    model, opt = _trained_run(lambda: keras_tnt.TNT(learning_rate=0.01, curvature_update_period=5))
    path = os.path.join(tmp_path, "w.weights.h5")
    model.save_weights(path)
    fresh = _digits_model()
    fresh.compile(
        optimizer=keras_tnt.TNT(learning_rate=0.01, curvature_update_period=5),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    fresh.load_weights(path)
    x, y = _xy()
    fresh.fit(
        x,
        y,
        batch_size=16,
        epochs=1,
        verbose=0,
        callbacks=[keras_tnt.WarmStart(x, batch_size=16, verbose=0)],
    )
    assert fresh.optimizer.warm_start_batches == 0
    assert int(fresh.optimizer.iterations) == 4
