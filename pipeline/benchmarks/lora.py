"""Full fine-tuning vs one shared LoRA vs per-task LoRA, side by side in one invocation: SmolLM2-135M, 2 workers,
ZeRO-2, the same tasks, batch and steps. Per variant: trainable parameters, model-state bytes per rank
(pipeline/train/memory.py), checkpoint bytes, peak RSS, training tokens/s. Then the GPU plan on paper for
the shipped per-task LoRA config on Llama-3.1-8B, on 1 GPU and on 8 (parameters counted on the meta device
with the adapters injected; memory from the ZeRO paper's formulas applied to the trainable part).
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

from pipeline.benchmarks import header, machine

GB, MB = 2**30, 2**20
VARIANTS = [("full fine-tuning", None), ("shared LoRA", "{r: 8, alpha: 16, per_task: false}"),
            ("per-task LoRA", "{r: 8, alpha: 16, per_task: true}")]
TASKS = ("{rotten_tomatoes: {max_rows: {train: 512, validation: 8}}, bbc_news: {max_rows: {train: 512, validation: 8}}, "
         "xsum: {max_rows: {train: 512, validation: 4}}}")
GPU_CONFIG = "jobs/configs/lora_llama8b_gpu.yaml"


def run(command: str, *, model: str = "smollm2-135m", steps: int = 30, log_every: int = 5) -> tuple[dict[str, Any], str]:
    from pipeline.config import load_config
    from pipeline.runtime import init_ray
    from pipeline.tracking import metric_history, run_metrics
    from pipeline.train.driver import train_driver

    init_ray()
    rows = []
    for label, adapter in VARIANTS:
        tmp = Path(tempfile.mkdtemp(prefix="bench-lora-"))
        try:
            cfg = load_config(None, [
                "name=bench-lora", f"model.name={model}", "model.max_length=64", "model.max_target_length=16",
                f"tasks={TASKS}", *( [f"model.adapter={adapter}"] if adapter else []),
                "train.num_workers=2", "train.cpus_per_worker=1", "train.zero_stage=2", "train.batch_size=8",
                f"train.steps={steps}", f"train.log_every={log_every}", f"train.eval_every={steps}",
                f"train.checkpoint_every={steps}", "train.warmup_steps=0", "train.lr=1e-4",
                f"train.storage_path={tmp / 'runs'}", f"tracking.uri=sqlite:///{tmp / 'mlflow.db'}"])
            print(f"{label}: {steps} steps of {model} on 2 workers at ZeRO-2 ...", flush=True)
            result = train_driver(cfg, log=lambda _: None)
            metrics = run_metrics(result.tracking_uri, result.run_id)
            speeds = [v for _, v in metric_history(result.tracking_uri, result.run_id, "tokens_per_s")][1:]  # warm-up window out
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        ranks = [{k: metrics[f"memory/rank{r}/{k}"] for k in ("parameters", "gradients", "optimizer", "total", "peak_rss")}
                 for r in range(2)]
        rows.append({"variant": label, "adapter": adapter, "psi": int(metrics["memory/psi"]),
                     "trainable": int(metrics["memory/trainable_params"]), "ranks": ranks,
                     "checkpoint_bytes": metrics["checkpoint/bytes"], "tokens_per_s": sum(speeds) / len(speeds),
                     "tokens_per_s_windows": speeds})
        print(f"  trainable {rows[-1]['trainable']:,}, rank 0 model states {ranks[0]['total'] / MB:.0f} MiB, "
              f"checkpoint {rows[-1]['checkpoint_bytes'] / MB:.1f} MiB, {rows[-1]['tokens_per_s']:.0f} tokens/s", flush=True)
    full = rows[0]
    for row in rows:
        row["vs_full"] = {"model_states": row["ranks"][0]["total"] / full["ranks"][0]["total"],
                          "checkpoint": row["checkpoint_bytes"] / full["checkpoint_bytes"],
                          "tokens_per_s": row["tokens_per_s"] / full["tokens_per_s"]}
    result = {"benchmark": "lora", "command": command, "machine": machine(), "model": model, "steps": steps,
              "world": 2, "zero_stage": 2, "rows": rows, "gpu_plan": [gpu_plan(GPU_CONFIG, n) for n in (1, 8)]}
    return result, markdown(result)


def lora_parameters(name: str, spec: dict[str, Any], adapters: int) -> dict[str, int]:
    """Exact counts from the architecture on the meta device, LoRA injected as the config asks."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from pipeline.benchmarks.gpu_plan import ARCHITECTURES
    from pipeline.model.adapters import is_adapter_parameter, lora_config

    arch = dict(ARCHITECTURES[name])
    config = AutoConfig.for_model(arch.pop("model_type"), **arch)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
        from peft import inject_adapter_in_model
        inject_adapter_in_model(lora_config(spec), model, adapter_name="one")
    per_adapter = sum(p.numel() for n, p in model.named_parameters() if is_adapter_parameter(n))
    base = sum(p.numel() for n, p in model.named_parameters() if not is_adapter_parameter(n))
    return {"base": base, "per_adapter": per_adapter, "adapters": adapters, "trainable": per_adapter * adapters}


def gpu_plan(config_path: str, gpus: int) -> dict[str, Any]:
    """Memory per GPU of per-task LoRA on the config's model with `gpus` GPUs (ZeRO stage as configured, or 0
    on one GPU): frozen bf16 base (2 B/param, sharded at ZeRO-3) + trainable states (bf16 weights and
    gradients, fp32 master weights and Adam moments: 16 B/param, partitioned by stage) + activations,
    logits and ZeRO-3's live parameters as in gpu_plan.py."""
    from pipeline.benchmarks.gpu_plan import ROOT, activation_bytes
    from pipeline.config import load_config

    cfg = load_config(ROOT / config_path, [])
    spec = cfg.model.adapter.model_dump()
    counts = lora_parameters(cfg.model.name, spec, len(cfg.tasks) if spec["per_task"] else 1)
    stage = cfg.train.zero_stage if gpus > 1 else 0
    base = 2 * counts["base"] / (gpus if stage == 3 else 1)
    t = counts["trainable"]
    weights, grads, optim = 2 * t, 2 * t, 12 * t
    if stage >= 1:
        optim /= gpus
    if stage >= 2:
        grads /= gpus
    if stage >= 3:
        weights /= gpus
    b, s = cfg.train.batch_size, cfg.model.max_length
    from pipeline.benchmarks.gpu_plan import ARCHITECTURES
    act = activation_bytes(cfg.model.name, b, s, cfg.train.activation_checkpointing)
    logits = b * s * ARCHITECTURES[cfg.model.name]["vocab_size"] * (2 + 4)
    live = 2 * min(1e9, counts["base"]) if stage == 3 else 0
    total = base + weights + grads + optim + act + logits + live
    full_states = 16 * (counts["base"] + t) / (gpus if stage == 3 else 1)  # full fine-tuning at the same stage, for scale
    return {"config": config_path, "model": cfg.model.name, "gpus": gpus, "zero_stage": stage, **counts,
            "frozen_base_gb": base / GB, "trainable_states_gb": (weights + grads + optim) / GB, "activations_gb": act / GB,
            "logits_gb": logits / GB, "live_params_gb": live / GB, "total_gb": total / GB,
            "full_finetune_states_gb": full_states / GB, "fits_a100_80gb": total / GB < 0.9 * 80}


def markdown(r: dict) -> str:
    md = header("LoRA vs full fine-tuning", r["command"], r["machine"]) + [
        f"`{r['model']}`, 2 workers, ZeRO-{r['zero_stage']}, fp32, {r['steps']} steps of Rotten Tomatoes + BBC News + "
        "XSum, batch 8, max length 64, the same seed and data for every variant. Model states: bytes of the tensors "
        "rank 0 holds (parameters, gradients, optimizer) after the third step's backward. Checkpoint: bytes all ranks "
        "wrote for the last step. Tokens/s: mean over the log windows after the first. MiB = 2^20 bytes.", "",
        "| variant | trainable params | of Ψ | model states rank 0 (MiB) | checkpoint (MiB) | peak RSS rank 0 (GiB) | "
        "tokens/s | model states / full | checkpoint / full | tokens/s / full |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row in r["rows"]:
        v = row["vs_full"]
        md.append(f"| {row['variant']} | {row['trainable']:,} | {row['trainable'] / row['psi']:.2%} | "
                  f"{row['ranks'][0]['total'] / MB:.0f} | {row['checkpoint_bytes'] / MB:.1f} | "
                  f"{row['ranks'][0]['peak_rss'] / GB:.2f} | {row['tokens_per_s']:.0f} | {v['model_states']:.3f} | "
                  f"{v['checkpoint']:.3f} | {v['tokens_per_s']:.2f} |")
    md += ["", "GPU plan (on paper) for `" + GPU_CONFIG + "`: per-task LoRA, bf16 frozen base, per GPU, GiB.", "",
           "| GPUs | ZeRO | base Ψ | adapters × params | frozen base | trainable states | activations | logits | "
           "live params | total | full fine-tuning states (same stage) | fits A100-80GB (< 90%) |",
           "|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for p in r["gpu_plan"]:
        md.append(f"| {p['gpus']} | {p['zero_stage']} | {p['base'] / 1e9:.2f} B | {p['adapters']} × {p['per_adapter'] / 1e6:.1f} M | "
                  f"{p['frozen_base_gb']:.2f} | {p['trainable_states_gb']:.2f} | {p['activations_gb']:.2f} | "
                  f"{p['logits_gb']:.2f} | {p['live_params_gb']:.2f} | **{p['total_gb']:.1f}** | "
                  f"{p['full_finetune_states_gb']:.1f} | {'yes' if p['fits_a100_80gb'] else 'NO'} |")
    md.append("")
    return "\n".join(md)
