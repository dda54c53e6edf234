"""The training engine: joint multi-task training on accelerate, its options, checkpoints and loss weighting."""
