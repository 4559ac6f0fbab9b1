"""A batch transform: each image flipped left to right with probability flip_prob."""

from dataclasses import dataclass

import torch

from powergrad_train.config.declare import Part, opt


@dataclass
class Keys:
    flip_prob: float = opt(0.5, "probability that an image is flipped", ge=0.0, le=1.0, fixed=True)


class FlipHalf:
    pairs_images = False

    def __init__(self, cfg, num_classes: int):
        self.prob = cfg.flip_prob

    def __call__(self, images: torch.Tensor, targets: torch.Tensor):
        flip = torch.rand(images.shape[0], device=images.device) < self.prob  # the checkpointed generator
        return torch.where(flip[:, None, None, None], images.flip(-1), images), targets


PART = Part(FlipHalf, "flips images at random", keys=Keys)
