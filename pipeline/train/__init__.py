"""Training on Ray Train + DeepSpeed: the worker loop, the driver, mixing, weighting, checkpoints and the run folder."""
