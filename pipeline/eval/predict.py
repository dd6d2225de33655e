"""Predictions from a multi-task model: one batch function shared by distributed evaluation and by
plain-process inference, and a `Predictor` for a saved model folder.

    p = Predictor("runs/mtl-default-1a2b/best_model")
    p.predict_text("rotten_tomatoes", ["a gem of a film"])        # -> ["pos"]   (label names)
    p.predict_ids("xsum", rows)                                    # -> ["a summary", ...]

Classification predictions are class indices inside the library and label names at the edges
(pyfunc, files); regression predictions are scores; summarization predictions are generated text.
`batch_plan(..., world=W)` reproduces the batches W evaluation ranks formed, which is what makes a
reloaded model's predictions *equal* to the engine's (same inputs, same batch composition).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from pipeline.data.tokenize import encode_texts
from pipeline.model.multitask import MODEL_META
from pipeline.model.summarize import pad, summary_format


def batch_plan(n: int, batch_size: int, world: int = 1, rank: int | None = None) -> list[list[int]]:
    """Row indices per batch. Rank r of `world` takes rows r, r+world, … in batches of `batch_size`;
    every rank gets the same number of batches (an empty one where it has run out), because ZeRO-3
    forwards are collective. `rank=None` gives every rank's batches, rank after rank."""
    n_batches = math.ceil(math.ceil(n / world) / batch_size) if n else 0
    plan = []
    for r in range(world) if rank is None else [rank]:
        mine = list(range(r, n, world))
        plan += [mine[b * batch_size:(b + 1) * batch_size] for b in range(n_batches)]
    return plan


def predict_batch(model, task: str, rows: dict[str, list], idx: list[int], *, pad_id: int, fmt=None,
                  tokenizer=None, max_new_tokens: int | None = None, num_beams: int = 1, synced: bool = False,
                  forward: Callable | None = None) -> list:
    """Predictions for rows `idx` of `rows` (`input_ids`, optional `token_type_ids`). `forward` is the
    DeepSpeed engine during training (the model's own forward otherwise). An empty `idx` still runs one
    row, so a rank with nothing left joins collective forwards; its output is discarded."""
    take = idx or [0]
    kind = model.head_specs[task].kind
    if kind == "summarization":
        if max_new_tokens is None:
            raise ValueError(f"{task}: max_new_tokens is required (the task's declared summary length)")
        gen = fmt.generation_batch([list(rows["input_ids"][i]) for i in take])
        new = model.generate(task, **gen, max_new_tokens=max_new_tokens, num_beams=num_beams,
                             eos_token_id=fmt.eos, synced_gpus=synced)
        texts = [t.strip() for t in tokenizer.batch_decode(new, skip_special_tokens=True)]
        return texts[:len(idx)]
    input_ids, mask = pad([list(rows["input_ids"][i]) for i in take], pad_id)
    batch = {"input_ids": input_ids, "attention_mask": mask}
    if rows.get("token_type_ids") is not None:
        batch["token_type_ids"], _ = pad([list(rows["token_type_ids"][i]) for i in take], 0)
    with torch.no_grad():
        logits, _ = (forward or model)(task=task, **batch)
    values = logits.argmax(-1) if kind == "classification" else logits.float()
    return values.tolist()[:len(idx)]


class Predictor:
    """A saved model folder (`best_model/`, `final_model/`, an export, a registry artifact) in a plain
    process: tokenization as at training time, batched prediction, label names."""

    def __init__(self, folder: str | Path, device: str = "cpu"):
        from pipeline.model.multitask import MultiTaskModel
        from pipeline.tasks.catalogue import BUILTIN

        self.folder = Path(folder)
        self.model, self.tokenizer, self.meta = MultiTaskModel.load(self.folder)
        self.model.to(device)
        self.device = device
        self.max_length = int(self.meta.get("max_length", 128))
        self.tasks: dict[str, dict[str, Any]] = {}
        for head in self.meta["heads"]:
            task = dict(self.meta.get("tasks", {}).get(head["task"], {}))
            # A folder written without task details (by hand, or an old run): a built-in task's own.
            builtin = BUILTIN.get(head["task"]) if head["task"] in BUILTIN.names() else None
            if builtin is not None:
                task.setdefault("label_names", builtin.label_names)
                task.setdefault("label_range", builtin.label_range)
            if head["kind"] == "summarization" and "max_new_tokens" not in task:
                task.setdefault("prompt", builtin.prompt if builtin else None)
                task["max_new_tokens"] = min(int(self.meta.get("max_target_length", 64)),
                                             builtin.max_target_tokens if builtin and builtin.max_target_tokens else 64)
            self.tasks[head["task"]] = {"kind": head["kind"], **task}
        self.formats = {t: summary_format(self.model.kind, self.tokenizer, s.get("prompt"))
                        for t, s in self.tasks.items() if s["kind"] == "summarization"}

    def _check(self, task: str) -> None:
        if task not in self.tasks:
            raise KeyError(f"{self.folder}: the model has no head for task {task!r}; it has {', '.join(self.tasks)}")

    def predict_ids(self, task: str, rows: dict[str, Sequence], batch_size: int = 32, world: int = 1,
                    num_beams: int = 1, max_new_tokens: int | None = None) -> list:
        """Predictions for tokenized rows, in row order. `world` > 1 forms the batches that many
        evaluation ranks formed (for exact reproduction of a run's dev predictions)."""
        self._check(task)
        n = len(rows["input_ids"])
        out: dict[int, Any] = {}
        for idx in batch_plan(n, batch_size, world):
            if idx:
                out.update(zip(idx, predict_batch(
                    self.model, task, rows, idx, pad_id=self.tokenizer.pad_token_id, fmt=self.formats.get(task),
                    tokenizer=self.tokenizer, num_beams=num_beams,
                    max_new_tokens=max_new_tokens or self.tasks[task].get("max_new_tokens"))))
        return [out[i] for i in range(n)]

    def encode(self, task: str, texts: Sequence[str], text_pairs: Sequence[str | None] | None = None) -> dict[str, list]:
        """Raw text -> token ids, exactly as the training cache tokenized it."""
        self._check(task)
        pairs = list(text_pairs) if text_pairs is not None and any(p is not None for p in text_pairs) else None
        return encode_texts(self.tokenizer, list(texts), pairs, self.max_length,
                            summarization=self.tasks[task]["kind"] == "summarization")

    def predict_text(self, task: str, texts: Sequence[str], text_pairs: Sequence[str | None] | None = None,
                     batch_size: int = 32, num_beams: int = 1) -> list:
        return self.predict_ids(task, self.encode(task, texts, text_pairs), batch_size, num_beams=num_beams)

    def label_name(self, task: str, value) -> Any:
        """A class index as the task's label name (when it has names); scores and texts unchanged."""
        names = self.tasks[task].get("label_names")
        if self.tasks[task]["kind"] == "classification" and names:
            return names[int(value)]
        return value


OUTPUT_COLUMNS = ["task", "label", "label_id", "score", "summary"]


def predict_frame(predictor: Predictor, frame, params: dict[str, Any] | None = None):
    """A DataFrame of (task, text[, text_pair]) -> a DataFrame with `task`, `label` (class name),
    `label_id`, `score` (regression) and `summary`, empty where the task does not produce them. Rows
    of one task are predicted together; the output keeps the input's order and index."""
    import pandas as pd
    params = {"batch_size": 32, "num_beams": 1, "eval_world": 1, **(params or {})}
    missing = [c for c in ("task", "text") if c not in frame.columns]
    if missing:
        raise ValueError(f"input is missing column(s) {missing}: send task, text and (for pair tasks) text_pair")
    unknown = sorted(set(frame["task"]) - set(predictor.tasks))
    if unknown:
        raise ValueError(f"unknown task(s) {unknown}: this model predicts {sorted(predictor.tasks)}")
    out = pd.DataFrame({"task": frame["task"].astype(str), "label": None, "label_id": -1, "score": math.nan,
                        "summary": None}, index=frame.index)
    out = out.astype({"label": object, "summary": object, "label_id": "int64", "score": "float64"})
    for task, rows in frame.groupby("task", sort=False):
        kind = predictor.tasks[task]["kind"]
        pairs = None
        if "text_pair" in rows.columns:
            pairs = [p if isinstance(p, str) and p else None for p in rows["text_pair"]]
            pairs = pairs if any(p is not None for p in pairs) else None
        ids = predictor.encode(task, rows["text"].fillna("").astype(str).tolist(), pairs)
        preds = predictor.predict_ids(task, ids, int(params["batch_size"]), world=int(params["eval_world"]),
                                      num_beams=int(params["num_beams"]))
        if kind == "classification":
            out.loc[rows.index, "label_id"] = [int(p) for p in preds]
            out.loc[rows.index, "label"] = [str(predictor.label_name(task, p)) for p in preds]
        elif kind == "regression":
            out.loc[rows.index, "score"] = [float(p) for p in preds]
        else:
            out.loc[rows.index, "summary"] = preds
    return out[OUTPUT_COLUMNS]


def read_meta(folder: str | Path) -> dict:
    return json.loads((Path(folder) / MODEL_META).read_text())
