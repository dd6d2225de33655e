#!/bin/bash
# Two Ray nodes vs one on this machine: the training benchmark's job side alone (tests/bench/tools/job_side.py),
# ZeRO-0, 2 workers, long rows, in pairs whose order alternates (two nodes first, then one node first, ...); each job
# submitted with `ray job submit` to a fresh cluster/local cluster.
#   PAIRS=5 OUT=pairs.jsonl LOG=layout_ab.log bash tests/bench/tools/layout_ab.sh     (from the repository root)
set -u
PY=${MTL_PYTHON:-python}
export RAY_AUTH_MODE=token
OUT=$(realpath -m ${OUT:-layout_ab.jsonl}); LOG=$(realpath -m ${LOG:-layout_ab.log})
for pair in $(seq 1 ${PAIRS:-5}); do
  if [ $((pair % 2)) = 1 ]; then order="twonode onenode"; else order="onenode twonode"; fi
  for layout in $order; do
    if [ $layout = twonode ]; then
      RAY_NUM_CPUS=1 RAY_WORKER_NODES=1 RAY_NODE_CPUS=1 bash cluster/local/start.sh >> $LOG 2>&1
      extra="train.placement=STRICT_SPREAD"
    else
      RAY_NUM_CPUS=2 bash cluster/local/start.sh >> $LOG 2>&1
      extra=""
    fi
    echo "pair $pair $layout start $(date)" >> $LOG
    ray job submit --address http://127.0.0.1:8265 --working-dir . --runtime-env cluster/runtime_env.yaml -- $PY tests/bench/tools/job_side.py jobs/configs/bench_train.yaml 2 $OUT "pair$pair-$layout" $extra >> $LOG 2>&1
    echo "pair $pair $layout exit $? $(date)" >> $LOG
    bash cluster/local/stop.sh >> $LOG 2>&1
  done
done
echo "layout_ab done $(date)" >> $LOG
