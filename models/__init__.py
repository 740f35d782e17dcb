"""The paper's model zoo (see docs/algorithm.md §8)."""

from models.autoencoder import autoencoder
from models.autoencoder import digits_autoencoder
from models.autoencoder import faces_autoencoder
from models.autoencoder import mnist_autoencoder
from models.mlp import digits_classifier
from models.mlp import figure1_mlp
from models.mlp import linear
from models.mlp import mlp
from models.resnet import ZeroPadShortcut
from models.resnet import resnet32
from models.transformer import PositionEmbedding
from models.transformer import digits_transformer
from models.transformer import transformer_classifier
from models.vgg import vgg16_bn

__all__ = [
    "PositionEmbedding",
    "ZeroPadShortcut",
    "autoencoder",
    "digits_autoencoder",
    "digits_classifier",
    "digits_transformer",
    "faces_autoencoder",
    "figure1_mlp",
    "linear",
    "mlp",
    "mnist_autoencoder",
    "resnet32",
    "transformer_classifier",
    "vgg16_bn",
]
