"""The trainer: assembly of a run from its parts, the training step, its parts, checkpoints and the run folder."""
