"""Training: the epoch loop, checkpoints, the run directory and the protocol's stages."""
