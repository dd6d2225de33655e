"""Compile DeepSpeed's JIT ops once (cached in ~/.cache/torch_extensions): about 1-3 minutes on a
fresh machine, then instant. CI runs this before the tests so no single test pays for it.

    python -m pipeline.train.warmup            # the CPU shared-memory comm op (every CPU run uses it)
    python -m pipeline.train.warmup --offload  # plus DeepSpeedCPUAdam (optimizer offload)
"""

from __future__ import annotations

import sys
import time


def main(argv: list[str]) -> int:
    from deepspeed.accelerator import get_accelerator
    if get_accelerator().device_name() != "cpu":
        print("warmup: GPU accelerator, nothing to compile ahead of time")
        return 0
    from deepspeed.ops.op_builder.cpu.comm import ShareMemCommBuilder
    builders = [ShareMemCommBuilder]
    if "--offload" in argv:
        from deepspeed.ops.op_builder.cpu.cpu_adam import CPUAdamBuilder
        builders.append(CPUAdamBuilder)
    for builder in builders:
        start = time.monotonic()
        builder().load(verbose=False)
        print(f"warmup: {builder.NAME} ready in {time.monotonic() - start:.0f}s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
