"""Compile DeepSpeed's JIT ops once (cached in ~/.cache/torch_extensions): DeepSpeedCPUAdam, which
optimizer offload (`train.offload_optimizer`) uses, takes about 1.5 minutes on a fresh machine, then
loads instantly. `make setup` (the install) runs this once per machine, as DeepSpeed's own ahead-of-time
op builds do, so neither a training run nor a test pays for it. (Training builds no other
op: DeepSpeed's CPU shared-memory comm op serves only DeepSpeed-Inference and is skipped, see
pipeline/train/loop.py skip_inference_comm_op.)

    python -m pipeline.train.warmup --offload
"""

from __future__ import annotations

import sys
import time


def main(argv: list[str]) -> int:
    from deepspeed.accelerator import get_accelerator
    if get_accelerator().device_name() != "cpu":
        print("warmup: GPU accelerator, nothing to compile ahead of time")
        return 0
    builders = []
    if "--offload" in argv:
        from deepspeed.ops.op_builder.cpu.cpu_adam import CPUAdamBuilder
        builders.append(CPUAdamBuilder)
    for builder in builders:
        start = time.monotonic()
        builder().load(verbose=False)
        print(f"warmup: {builder.NAME} ready in {time.monotonic() - start:.0f}s", flush=True)
    if not builders:
        print("warmup: nothing to compile (pass --offload for DeepSpeedCPUAdam)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
