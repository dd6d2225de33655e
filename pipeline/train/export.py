"""Turn any training checkpoint (ZeRO 0-3, any number of ranks) into a reloadable model folder, in a
plain process: no Ray, no distributed group.

    consolidate_checkpoint("~/.cache/mtl-pipeline/runs/mtl-1a2b/step_0000300", "out/model")

ZeRO 1-3 checkpoints are merged from the ranks' fp32 optimizer partitions with DeepSpeed's own
`zero_to_fp32`; ZeRO-0 checkpoints hold the whole module already.
"""

from __future__ import annotations

import json
from pathlib import Path

from pipeline.errors import PipelineError
from pipeline.train.checkpoints import safe_torch_load, verify
from pipeline.train.rundir import CHECKPOINT_META, DS_TAG, RUN_RECORD


def consolidated_state_dict(checkpoint: Path) -> dict:
    folder = checkpoint / DS_TAG
    if list(folder.glob("*optim_states.pt")) and list(folder.glob("zero_pp_rank_*")):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
        return get_fp32_state_dict_from_zero_checkpoint(str(checkpoint), tag=DS_TAG)
    # ZeRO-0: one full copy of the module, written by rank 0 (weights_only, DeepSpeed's state classes allowed).
    states = safe_torch_load(folder / "mp_rank_00_model_states.pt")
    return {k: v.float() for k, v in states["module"].items()}


def consolidate_checkpoint(checkpoint: str | Path, out: str | Path) -> Path:
    from pipeline.config import Config
    from pipeline.model.multitask import Head, build_model
    from pipeline.model.refs import load_tokenizer
    from pipeline.train.driver import model_metadata

    checkpoint = Path(checkpoint).expanduser()
    run_json = checkpoint.parent / RUN_RECORD
    if not (checkpoint / DS_TAG).is_dir() or not run_json.is_file():
        raise PipelineError.one(str(checkpoint), "not a training checkpoint of this project (no ds/ or ../run.json)",
                                "pass a step_NNNNNNN folder inside a run folder")
    problem = verify(checkpoint)  # DeepSpeed's zero_to_fp32 unpickles fully: only verified files get that far
    if problem:
        raise PipelineError.one(str(checkpoint), f"checkpoint failed verification: {problem}",
                                "export an earlier step (--step), or check the storage the run was written to")
    run = json.loads(run_json.read_text())
    cfg = Config.model_validate(run["config"])
    specs = cfg.task_specs()
    adapter = cfg.model.adapter.model_dump() if cfg.model.adapter is not None else None
    model = build_model(cfg.model.name, [Head(t, s.kind, s.num_labels) for t, s in specs.items()], cfg.train.dropout,
                        adapter=adapter)
    state = consolidated_state_dict(checkpoint)
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {k for k in missing if k.endswith("lm_head.weight") and getattr(model.backbone.config, "tie_word_embeddings", False)}
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}  # adapters: the base, from its reference
    frozen |= {n for n, _ in model.named_buffers()} if adapter else set()
    if set(missing) - tied - frozen or unexpected:
        raise PipelineError.one(str(checkpoint), f"weights do not match the run's model (missing {sorted(set(missing) - tied)[:5]}, "
                                f"unexpected {sorted(unexpected)[:5]})", "export with the code version that trained the run")
    meta = json.loads((checkpoint / CHECKPOINT_META).read_text()) if (checkpoint / CHECKPOINT_META).is_file() else {}
    return model.save(out, load_tokenizer(cfg.model.name), metadata={
        **model_metadata(cfg, run.get("run_name")), "step": meta.get("step"), "run_id": run.get("run_id"),
        "exported_from": str(checkpoint)})


def merge_task(bundle: str | Path, task: str, out: str | Path) -> Path:
    """One task of an adapter bundle as a plain model folder: the task's adapter merged into the base
    weights (`backbone/` is an ordinary transformers folder any HF-compatible server loads) and its head."""
    import torch

    from pipeline.model.adapters import SHARED, merged_backbone_state
    from pipeline.model.multitask import MultiTaskModel, base_backbone
    model, tokenizer, meta = MultiTaskModel.load(bundle)
    if not meta.get("adapter"):
        raise PipelineError.one("--merge", f"{bundle} holds a fully fine-tuned model, not adapters",
                                "drop --merge: the exported folder is already a plain model")
    if task not in model.head_specs:
        raise PipelineError.one("--merge", f"no task {task!r} in this run",
                                f"choose one of: {', '.join(model.head_specs)}")
    name = task if task in model.adapter_names else SHARED
    backbone = base_backbone(meta["base"])
    backbone.load_state_dict(merged_backbone_state(model.backbone, name))
    merged = MultiTaskModel(backbone, [model.head_specs[task]], decoder_start_token_id=model.decoder_start_token_id,
                            init_decoders=False)
    own = {k: v for k, v in model.state_dict().items() if k.startswith((f"heads.{task}.", f"decoders.{task}."))}
    missing, unexpected = merged.load_state_dict(own, strict=False)
    if unexpected or any(k.startswith(("heads.", "decoders.")) for k in missing):
        raise PipelineError.one("--merge", f"task {task!r}'s head does not fit (unexpected {unexpected[:3]})",
                                "export with the code version that trained the run")
    keep = {k: v for k, v in meta.items() if k not in ("adapter", "adapter_bytes", "adapters", "adapter_params", "heads")}
    with torch.no_grad():
        return merged.save(out, tokenizer, metadata={**keep, "merged_from": str(bundle), "merged_task": task,
                                                      "merged_adapter": name})
