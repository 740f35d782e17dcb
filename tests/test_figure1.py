"""benchmarks/figure1.py: the block Fisher by autodiff, every direction against dense NumPy."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from benchmarks import figure1

WIDTHS = (5, 4, 3, 3)


def _batch(n=12, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, WIDTHS[0])), rng.integers(0, WIDTHS[-1], size=n)


def _keras_model(params):
    """The network as a float64 Keras model with ``params``' weights."""
    model_in = keras.Input((WIDTHS[0],), dtype="float64")
    h = model_in
    for i, width in enumerate(WIDTHS[1:]):
        h = keras.layers.Dense(
            width, activation="tanh" if i < len(WIDTHS) - 2 else None, dtype="float64"
        )(h)
    model = keras.Model(model_in, h)
    model.set_weights([p for layer in params for p in layer])
    return model


def _loss_fn():
    """Created under the float64 fixture (a Keras loss computes in the floatx of its creation)."""
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def test_block_fisher_equals_the_fisher_of_per_example_autodiff_gradients(float64):
    """F_l = mean of vec(dL_n/d[W|b]) vec(...)^T, the per-example gradients taken by
    tf.GradientTape through a Keras model with the same weights."""
    x, labels = _batch()
    params = figure1.init_params(WIDTHS, np.random.default_rng(1))
    inputs, logits = figure1.forward(params, x)
    s = figure1.preactivation_gradients(params, inputs, logits, labels)
    model = _keras_model(params)
    loss_fn = _loss_fn()
    per_example = []
    for n in range(len(x)):
        with tf.GradientTape() as tape:
            loss = loss_fn(labels[n : n + 1], model(x[n : n + 1]))
        per_example.append(tape.gradient(loss, model.trainable_variables))
    for layer in range(len(params)):
        v = np.stack(
            [
                figure1.stack(g[2 * layer].numpy(), g[2 * layer + 1].numpy()).ravel()
                for g in per_example
            ]
        )
        expected = v.T @ v / len(x)
        actual = figure1.block_fisher(inputs[layer], s[layer])
        np.testing.assert_allclose(actual, expected, rtol=1e-12, atol=1e-15)


def _eigh_root(h, p, eps):
    w, q = np.linalg.eigh(h)
    return (q * (w + eps) ** (-1.0 / p)) @ q.T


def _fold_weights(warm, decayed, decay=figure1.DECAY):
    """The weight of each batch in statistics folded from ``warm`` warm-start batches (their
    mean) and then ``decayed`` batches (moving average with ``decay``; a first batch sets the
    statistics), in closed form: batch ``i`` of ``warm`` has ``decay^decayed / warm``, the
    ``k``-th decayed one ``(1 - decay) decay^(decayed - k)`` (the first ``decay^(decayed - 1)``
    without a warm start)."""
    weights = [decay**decayed / warm] * warm if warm else []
    weights += [(1 - decay) * decay ** (decayed - k) for k in range(1, decayed + 1)]
    if not warm:
        weights[0] = decay ** (decayed - 1)
    assert np.isclose(sum(weights), 1.0)
    return weights


@pytest.mark.parametrize("warm, decayed", [(0, 3), (2, 3)], ids=["decayed", "warm-then-decayed"])
def test_every_direction_equals_a_dense_numpy_computation(float64, warm, decayed):
    """After ``warm`` warm-start batches then ``decayed`` batches folded with decay 0.9: TNT and
    KFAC against (np.kron of the damped factors)^-1 vec(m), Shampoo against eigh roots, BF
    against the dense solve, every statistic the NumPy average of the batches' (each batch
    other data and other sampled labels); SGD-m and Adam by formula."""
    gamma = 0.05
    comparison = figure1.Comparison(WIDTHS, figure1.METHODS, gamma, seed=0)
    rng = np.random.default_rng(3)
    batches = []
    for j in range(warm + decayed):
        x, y = _batch(n=16, seed=10 + j)
        inputs, logits = figure1.forward(comparison.params, x)
        drawn = rng.integers(0, WIDTHS[-1], size=len(x))
        s_true = figure1.preactivation_gradients(comparison.params, inputs, logits, y)
        s_drawn = figure1.preactivation_gradients(comparison.params, inputs, logits, drawn)
        g = figure1.mean_gradients(inputs, s_true)
        comparison.fold(inputs, g, s_drawn, warm=j + 1 if j < warm else None)
        batches.append((inputs, s_drawn, g))
    weights = _fold_weights(warm, decayed)

    def average(statistic):  # statistic(inputs, s_drawn, g) of each batch, weighted
        return sum(w * statistic(*batch) for w, batch in zip(weights, batches, strict=True))

    for layer in range(len(comparison.momentum)):
        comparison.momentum[layer] = rng.normal(size=comparison.momentum[layer].shape)
        comparison.second_moment[layer] = rng.uniform(0.5, 2.0, comparison.momentum[layer].shape)
    n = 16
    for layer in range(len(comparison.momentum)):
        m = comparison.momentum[layer]
        d_in, d_out = m.shape[0] - 1, m.shape[1]

        def abar(inputs):
            return np.concatenate([inputs[layer], np.ones((n, 1))], axis=1)

        def block(inputs, s_drawn, g):
            v = np.stack([np.kron(abar(inputs)[i], s_drawn[layer][i]) for i in range(n)])
            return v.T @ v / n

        fisher = average(block)
        lam = gamma * np.trace(fisher) / len(fisher)
        bf = np.linalg.solve(fisher + lam * np.eye(len(fisher)), m.ravel()).reshape(m.shape)
        np.testing.assert_allclose(comparison.bf_direction(layer), bf, rtol=1e-9)

        # TNT: eq. (5) factors of the averaged contractions of the sampled-label mean gradient,
        # eps = sqrt(lam / N).
        def tnt_gradient(inputs, s_drawn):
            return inputs[layer].T @ s_drawn[layer] / n, s_drawn[layer].mean(axis=0)

        h1 = average(lambda i, s, g: tnt_gradient(i, s)[0] @ tnt_gradient(i, s)[0].T)
        h2 = average(lambda i, s, g: tnt_gradient(i, s)[0].T @ tnt_gradient(i, s)[0])
        hb = average(lambda i, s, g: np.outer(tnt_gradient(i, s)[1], tnt_gradient(i, s)[1]))
        c = np.sqrt(np.trace(h1) / (d_in * d_out))
        u1, u2 = h1 / (c * d_out), h2 / (c * d_in)
        eps = np.sqrt(lam / n)
        kron = np.kron(u1 + eps * np.eye(d_in), u2 + eps * np.eye(d_out))
        tnt_w = np.linalg.solve(kron, m[:-1].ravel()).reshape(d_in, d_out)
        tnt_b = np.linalg.solve(hb + eps * np.eye(d_out), m[-1])
        expected = np.concatenate([tnt_w, tnt_b[None]])
        np.testing.assert_allclose(comparison.direction("tnt", layer, n), expected, rtol=1e-8)

        # KFAC: A = E[abar abar^T], G = E[s s^T] (per-example s), averaged, sqrt(lam) on each.
        big_a = average(lambda i, s, g: abar(i).T @ abar(i) / n)
        big_g = average(lambda i, s, g: s[layer].T @ s[layer] / n)
        root = np.sqrt(lam)
        kron = np.kron(big_a + root * np.eye(d_in + 1), big_g + root * np.eye(d_out))
        expected = np.linalg.solve(kron, m.ravel()).reshape(m.shape)
        np.testing.assert_allclose(comparison.direction("kfac", layer, n), expected, rtol=1e-8)

        # Shampoo: averaged statistics of the true-label gradient, (H_i + eps_i I)^(-1/4) by
        # eigh.
        hs = [
            average(lambda i, s, g: g[2 * layer] @ g[2 * layer].T),
            average(lambda i, s, g: g[2 * layer].T @ g[2 * layer]),
        ]
        p1, p2 = (_eigh_root(h, 4, gamma * np.trace(h) / len(h)) for h in hs)
        hb = average(lambda i, s, g: np.outer(g[2 * layer + 1], g[2 * layer + 1]))
        pb = _eigh_root(hb, 2, gamma * np.trace(hb) / len(hb))
        expected_w = (np.kron(p1, p2) @ m[:-1].ravel()).reshape(d_in, d_out)
        expected = np.concatenate([expected_w, (pb @ m[-1])[None]])
        actual = comparison.direction("shampoo", layer, n)
        assert np.abs(actual - expected).max() <= 1e-5 * np.abs(expected).max()

        np.testing.assert_array_equal(comparison.direction("sgd", layer, n), m)
        adam = m / (np.sqrt(comparison.second_moment[layer]) + 1e-8)
        np.testing.assert_allclose(comparison.direction("adam", layer, n), adam, rtol=1e-14)


def test_cosine_of_a_direction_with_itself_and_its_negative():
    d = np.random.default_rng(0).normal(size=(7, 3))
    assert figure1.cosine(d, d) == pytest.approx(1.0, abs=1e-15)
    assert figure1.cosine(d, -d) == pytest.approx(-1.0, abs=1e-15)
    assert figure1.cosine(d, 3.0 * d) == pytest.approx(1.0, abs=1e-15)


def _autodiff_mean_gradient(params, x, y):
    """``[dL/d[W_1|b_1], ...]`` of the batch-mean cross-entropy, by tf.GradientTape."""
    model = _keras_model(params)
    with tf.GradientTape() as tape:
        loss = _loss_fn()(y, model(x))
    g = [v.numpy() for v in tape.gradient(loss, model.trainable_variables)]
    return [figure1.stack(g[2 * k], g[2 * k + 1]) for k in range(len(params))]


def test_momentum_is_the_0_9_moving_average_and_bf_steps_along_it(float64):
    """§3.4: BF's gradient is a moving average with decay 0.9, ``m <- 0.9 m + 0.1 g`` (not the
    sum ``0.9 m + g``, whose steps are 10 times longer), Adam's ``v <- 0.9 v + 0.1 g^2``, and
    BF's step is ``-lr (F + lambda I)^-1 m`` with that ``m``; ``g`` by autodiff, two
    iterations from ``m = v = 0``."""
    gamma, lr = 0.05, 0.3
    comparison = figure1.Comparison(WIDTHS, ["sgd", "adam"], gamma, seed=0)
    m = [np.zeros_like(v) for v in comparison.momentum]
    v = [np.zeros_like(x) for x in comparison.momentum]
    for j in range(2):
        x, y = _batch(n=12, seed=20 + j)
        before = [[w.copy(), b.copy()] for w, b in comparison.params]
        g = _autodiff_mean_gradient(before, x, y)
        cosines = comparison.iteration(x, y, lr)
        for layer in range(len(m)):
            m[layer] = 0.9 * m[layer] + 0.1 * g[layer]
            v[layer] = 0.9 * v[layer] + 0.1 * g[layer] ** 2
            np.testing.assert_allclose(comparison.momentum[layer], m[layer], rtol=1e-10)
            np.testing.assert_allclose(comparison.second_moment[layer], v[layer], rtol=1e-10)
            fisher = comparison.fisher[layer]
            lam = gamma * np.trace(fisher) / len(fisher)
            step = np.linalg.solve(fisher + lam * np.eye(len(fisher)), m[layer].ravel())
            expected = figure1.stack(*before[layer]) - lr * step.reshape(m[layer].shape)
            actual = figure1.stack(*comparison.params[layer])
            np.testing.assert_allclose(actual, expected, rtol=1e-9, atol=1e-12)
            # SGD-m's direction is m itself, so its cosine is cos(m, D_BF).
            assert cosines["sgd"][layer] == pytest.approx(figure1.cosine(m[layer], step), abs=1e-10)


def test_a_short_run_is_deterministic_per_seed(float64):
    x, y = _batch(n=40, seed=4)
    kwargs = dict(iterations=3, learning_rate=0.01, batch_size=16, methods=("tnt", "kfac"))
    first = figure1.run(x, y, WIDTHS, gamma=1e-3, seed=5, **kwargs)
    again = figure1.run(x, y, WIDTHS, gamma=1e-3, seed=5, **kwargs)
    other = figure1.run(x, y, WIDTHS, gamma=1e-3, seed=6, **kwargs)
    for method in ("tnt", "kfac"):
        assert first.cosines[method].shape == (3, 3)
        np.testing.assert_array_equal(first.cosines[method], again.cosines[method])
        assert not np.array_equal(first.cosines[method], other.cosines[method])
        assert np.all(np.abs(first.cosines[method]) <= 1.0 + 1e-12)
    np.testing.assert_array_equal(first.loss, again.loss)
    assert first.loss.shape == first.accuracy.shape == (4,)


def _keras_loss_and_accuracy(params, x, y):
    logits = _keras_model(params)(x).numpy()
    return float(_loss_fn()(y, logits).numpy()), float(np.mean(logits.argmax(axis=1) == y))


def test_bf_loss_and_accuracy_are_the_full_set_ones_at_every_point(float64):
    """Run.loss/accuracy[t]: BF's full-set loss and accuracy after t steps, equal to a Keras
    model's at the initial weights, at the end of a 2-step run (a prefix of a 4-step one with
    the same seed) and at the end of the 4-step run."""
    x, y = _batch(n=40, seed=4)
    kwargs = dict(learning_rate=0.05, batch_size=16, methods=("sgd",), gamma=0.1, seed=5)
    short = figure1.run(x, y, WIDTHS, iterations=2, **kwargs)
    long = figure1.run(x, y, WIDTHS, iterations=4, **kwargs)
    np.testing.assert_array_equal(short.loss, long.loss[:3])
    np.testing.assert_array_equal(short.accuracy, long.accuracy[:3])
    initial = figure1.init_params(WIDTHS, np.random.default_rng(5))
    for params, t in ((initial, 0), (short.params, 2), (long.params, 4)):
        loss, accuracy = _keras_loss_and_accuracy(params, x, y)
        assert long.loss[t] == pytest.approx(loss, rel=1e-12)
        assert long.accuracy[t] == accuracy
    assert long.loss[4] < long.loss[0]  # BF trains on these 40 points


def test_outputs_report_the_bf_trajectory(float64, tmp_path):
    """The table's BF rows are the mean ± std over seeds of Run.loss/accuracy at 0, half and
    all of the steps; the trajectory CSV holds every point; the files carry the prefix."""
    x, y = _batch(n=40, seed=4)
    kwargs = dict(iterations=4, learning_rate=0.05, batch_size=16, methods=["sgd", "adam"])
    results = {(0.1, s): figure1.run(x, y, WIDTHS, gamma=0.1, seed=s, **kwargs) for s in (0, 1)}
    table = figure1.write_outputs(results, ["sgd", "adam"], [2], str(tmp_path), 4, "fig_x")
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == [
        "fig_x.csv",
        "fig_x_gamma0.1.png",
        "fig_x_table.md",
        "fig_x_trajectory.csv",
    ]
    assert (tmp_path / "fig_x_table.md").read_text() == table
    for name, key in (("loss", "loss"), ("accuracy", "accuracy")):
        cells = []
        for t in (0, 2, 4):
            values = np.array([getattr(results[(0.1, s)], key)[t] for s in (0, 1)])
            cells.append(f"{values.mean():.3f} ± {values.std():.3f}")
        assert f"| full-set {name} | " + " | ".join(cells) + " |" in table.splitlines()
    rows = (tmp_path / "fig_x_trajectory.csv").read_text().splitlines()
    assert rows[0] == "gamma,seed,steps,loss,accuracy"
    assert len(rows) == 1 + 2 * 5
    for row in rows[1:]:
        gamma, seed, t, loss, accuracy = row.split(",")
        run_result = results[(float(gamma), int(seed))]
        assert float(loss) == pytest.approx(run_result.loss[int(t)], abs=1e-6)
        assert float(accuracy) == pytest.approx(run_result.accuracy[int(t)], abs=1e-6)
    assert figure1.output_prefix("digits") == "figure1"
    assert figure1.output_prefix("mnist5k16") == "figure1_mnist5k16"
    assert figure1.output_prefix("mnist5k16", "mine") == "mine"


def test_bad_input_names_the_flag():
    with pytest.raises(ValueError, match=r"--methods: unknown \['newton'\]"):
        figure1.Comparison(WIDTHS, ["tnt", "newton"], 1e-3, seed=0)
    with pytest.raises(ValueError, match="--gammas: every gamma must be > 0; received 0.0"):
        figure1.Comparison(WIDTHS, ["tnt"], 0.0, seed=0)
    with pytest.raises(ValueError, match=r"--layers: \[7\] out of range; the network has layers"):
        figure1.check_layers([2, 7], 6)
    x, y = _batch(n=10)
    with pytest.raises(ValueError, match=r"--batch_size must be in \[1, 10\]"):
        figure1.run(x, y, WIDTHS, ["tnt"], 1e-3, 0, 2, 0.01, 11)


def test_mnist5k16_data_is_the_fixed_training_split_at_16x16():
    """--data=mnist5k16: the 4,000 training images of models.data's mnist5k16, in float64."""
    from models import data

    x, y = figure1.load_data("mnist5k16")
    assert x.shape == (4000, 256) and x.dtype == np.float64
    assert y.shape == (4000,) and np.issubdtype(y.dtype, np.integer)
    assert np.bincount(y, minlength=10).tolist() == [400] * 10
    expected = data.load("mnist5k16", "train", 4000, shuffle=False).get_single_element()
    np.testing.assert_array_equal(x, np.asarray(expected[0], np.float64))
    np.testing.assert_array_equal(y, np.asarray(expected[1]))
    assert "mnist5k16" in figure1.DATA_CHOICES
    with pytest.raises(ValueError, match="--data: unknown 'mnist5k'"):
        figure1.load_data("mnist5k")
