"""The paper's model zoo (see docs/algorithm.md §5 of the project's reference notes)."""

from models.autoencoder import autoencoder
from models.autoencoder import faces_autoencoder
from models.autoencoder import mnist_autoencoder
from models.resnet import resnet32

__all__ = ["autoencoder", "faces_autoencoder", "mnist_autoencoder", "resnet32"]
