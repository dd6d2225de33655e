"""The run folder, in one place: every name in it and the reading and writing of its record.

    <train.storage_path>/<run name>/          a local folder or an object-store URI
        run.json                              run name, MLflow run id, tracking URI, config; `result` when finished
        step_0000060/                         a checkpoint (Ray Train merges the ranks' folders)
            ds/                               DeepSpeed's shards (engine.save_checkpoint tag)
            meta.json                         step, world size, MLflow run id, best score, sampler (rank 0)
            manifest/rank<r>.json             size + sha256 of every file rank r wrote (pipeline/train/checkpoints.py)
        step_0000060.r1/                      the same step redone after a restart (never an existing folder)
        best_model/, final_model/             reloadable model folders (weights + mtl_model.json + tokenizer)
        tracking_spool.jsonl                  metrics MLflow did not receive during an outage
        failure.json, failure.log             why an attempt stopped early (pipeline/train/failure.py)
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from pipeline import storage
from pipeline.model.multitask import MODEL_META  # noqa: F401  (re-exported: the model code names its folder's file)

RUN_RECORD = "run.json"
DS_TAG = "ds"
CHECKPOINT_META = "meta.json"
MANIFEST_DIR = "manifest"
STEP_DIR = re.compile(r"^step_(\d+)(?:\.r(\d+))?$")  # step_0000012, or step_0000012.r1 when a restart redid step 12
BEST_MODEL, FINAL_MODEL = "best_model", "final_model"
SPOOL = "tracking_spool.jsonl"
FAILURE_RECORD, FAILURE_LOG = "failure.json", "failure.log"


@dataclass(frozen=True)
class RunDir:
    path: str  # local folder or URI

    def join(self, *parts: str) -> str:
        return storage.join(self.path, *parts)

    @property
    def name(self) -> str:
        return self.path.rstrip("/").rsplit("/", 1)[-1]

    def exists(self) -> bool:
        return storage.is_file(self.join(RUN_RECORD))

    def read_record(self) -> dict | None:
        """run.json, or None when this is not (yet) a run folder."""
        file = self.join(RUN_RECORD)
        return json.loads(storage.read_text(file)) if storage.is_file(file) else None

    def write_record(self, record: dict) -> None:
        storage.write_text(self.join(RUN_RECORD), json.dumps(record, indent=2))

    def model(self, which: str = BEST_MODEL) -> str:
        return self.join(which)

    def checkpoint_steps(self) -> list[int]:
        return [int(m.group(1)) for name, _ in storage.subdirs(self.path, "step_") if (m := STEP_DIR.match(name))]
