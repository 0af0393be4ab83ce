"""``cs231n/classifiers``: the assignment's models."""

from jaxbn.cs231n.classifiers.fc_net import FullyConnectedNet

__all__ = ["FullyConnectedNet"]
