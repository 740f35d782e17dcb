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
