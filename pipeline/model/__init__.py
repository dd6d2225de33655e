"""Model code: backbones, heads and references. Knows nothing about distribution (no ray/deepspeed)."""
