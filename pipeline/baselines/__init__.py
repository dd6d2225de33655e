"""Classic non-transformer baselines from the paper, trained from scratch in plain PyTorch."""
