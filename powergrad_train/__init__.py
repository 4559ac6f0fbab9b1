"""powergrad-train: an ImageNet trainer with an exact PowerGrad Transform loss.

`from powergrad_train import PowerGradCrossEntropy` (or `power_grad_cross_entropy`) gives the loss
alone; it imports torch and nothing else of the trainer.
"""

__version__ = "0.1.0"
__all__ = ["PowerGradCrossEntropy", "power_grad_cross_entropy"]


def __getattr__(name: str):
    # Imported on first use, so that the command line's --help and config errors need no torch.
    if name in __all__:
        from powergrad_train import pgt
        return getattr(pgt, name)
    raise AttributeError(f"module 'powergrad_train' has no attribute {name!r}")
