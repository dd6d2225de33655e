"""ray job submit --working-dir . --runtime-env cluster/runtime_env.yaml -- python jobs/preprocess.py --config jobs/configs/default.yaml

Read every configured task with Ray Data, normalise it to one schema, tokenize it and cache it as
Parquet under `data.cache_dir` (keyed by a hash of source content, task, tokenizer and lengths).
A second run with the same key reads the cache and says so. Bad rows are dropped and counted per
task and reason (see each task's manifest.json). Locally, without a cluster, run it directly:

    python jobs/preprocess.py --config jobs/configs/default.yaml data.glue_dir=path/to/glue tasks.sst2={}

Exit status 2 means bad input: every problem is printed on its own line with the fix.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a working dir without install

from pipeline.config import load_config  # noqa: E402
from pipeline.data.preprocess import prepare_tasks  # noqa: E402
from pipeline.errors import exits_on_bad_input  # noqa: E402
from pipeline.runtime import init_ray, job_parser  # noqa: E402


@exits_on_bad_input
def main(argv: list[str] | None = None) -> int:
    args = job_parser(__doc__).parse_intermixed_args(argv)
    cfg = load_config(args.config, args.overrides)
    init_ray(verbose=args.verbose)
    prepared = prepare_tasks(cfg, bar=sys.stderr.isatty())
    print(f"\n{'task':<18}{'train':>9}{'valid':>9}{'test':>9}{'dropped':>9}  cache")
    for name, task in prepared.items():
        counts = task.manifest["counts"]
        dropped = sum(sum(c["dropped"].values()) for c in counts.values())
        cells = "".join(f"{counts.get(s, {}).get('kept', 0):>9,}" for s in ("train", "validation", "test"))
        print(f"{name:<18}{cells}{dropped:>9,}  {'hit' if task.cache_hit else 'built'} {task.path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
