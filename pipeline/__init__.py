"""Multi-task fine-tuning of one language model: task catalogue, Ray Data preprocessing, training."""

__version__ = "0.1.0"
