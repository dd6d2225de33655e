"""Training on Ray Train + DeepSpeed: the worker loop, the driver, mixing and tracking."""
