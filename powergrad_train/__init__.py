"""powergrad-train: an ImageNet trainer with an exact PowerGrad Transform loss."""

__version__ = "0.1.0"
