"""The GPU plan on paper: for each shipped GPU config, parameters counted exactly from the architecture
(instantiated on the meta device: no weights, no download), model-state memory per GPU from the ZeRO
paper's formulas, activation memory with and without activation checkpointing (Korthikanti et al. 2022),
the logits buffer and ZeRO-3's live-parameter buffer, against the GPU's memory; plus the FLOPs per token
the training benchmark turns into model FLOPs utilisation (MFU) when it runs on a GPU.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.benchmarks import header, machine

ROOT = Path(__file__).resolve().parents[2]
GB = 2**30

# Architectures as published in each model's config.json (needed offline: the hub is not reachable here).
ARCHITECTURES: dict[str, dict[str, Any]] = {
    "HuggingFaceTB/SmolLM2-135M": dict(model_type="llama", hidden_size=576, intermediate_size=1536,
                                       num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                                       vocab_size=49152, tie_word_embeddings=True),
    "meta-llama/Llama-3.2-1B": dict(model_type="llama", hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                                    num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                                    tie_word_embeddings=True),
    "meta-llama/Llama-3.1-8B": dict(model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                    num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                                    tie_word_embeddings=False),
}
# Dense (no sparsity) bf16 tensor-core peak, TFLOP/s, from the vendors' datasheets.
PEAK_TFLOPS = {"H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0, "L4": 121.0, "V100": 125.0}
GPU_MEMORY_GB = {"A10G": 24, "A100-80GB": 80, "H100-80GB": 80}
CONFIGS = [  # (config, GPU it is sized for)
    ("jobs/configs/cluster_gpu.yaml", "A10G"),
    ("jobs/configs/gpu_llama1b.yaml", "A10G"),
    ("jobs/configs/gpu_llama8b.yaml", "A100-80GB"),
]


def count_parameters(name: str) -> dict[str, int]:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    arch = dict(ARCHITECTURES[name])
    config = AutoConfig.for_model(arch.pop("model_type"), **arch)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    total = sum(p.numel() for p in model.parameters())
    embedding = model.get_input_embeddings().weight.numel()
    return {"total": total, "non_embedding": total - embedding * (1 if config.tie_word_embeddings else 2)}


def flops_per_token(name: str, seq_len: int, non_embedding: int | None = None) -> float:
    """Training FLOPs per token: 6 × non-embedding parameters + 12 × layers × hidden × sequence (attention),
    as in the PaLM paper's MFU definition."""
    arch = ARCHITECTURES[name]
    n = non_embedding if non_embedding is not None else count_parameters(name)["non_embedding"]
    return 6.0 * n + 12.0 * arch["num_hidden_layers"] * arch["hidden_size"] * seq_len


def peak_tflops(device_name: str) -> float | None:
    for key, value in PEAK_TFLOPS.items():
        if key.lower() in device_name.lower():
            return value
    return None


def mfu(flops_token: float, tokens_per_s: float, device_name: str, gpus: int) -> float | None:
    peak = peak_tflops(device_name)
    return None if peak is None else flops_token * tokens_per_s / (peak * 1e12 * gpus)


def activation_bytes(name: str, batch: int, seq: int, checkpointing: bool) -> float:
    """Per GPU, bf16. Without checkpointing every layer keeps s·b·h·(34 + 5·a·s/h) bytes; with it only each
    layer's input (2·s·b·h bytes) plus one layer's full set while it is recomputed."""
    a = ARCHITECTURES[name]
    h, layers, heads = a["hidden_size"], a["num_hidden_layers"], a["num_attention_heads"]
    per_layer = seq * batch * h * (34 + 5 * heads * seq / h)
    return (layers * 2 * seq * batch * h + per_layer) if checkpointing else layers * per_layer


def plan(config_path: str, gpu: str) -> dict[str, Any]:
    from pipeline.config import load_config
    from pipeline.train.memory import zero_formula

    cfg = load_config(ROOT / config_path, [])
    name = cfg.model.name
    params = count_parameters(name)
    n = cfg.train.num_workers
    states = zero_formula(params["total"], n, cfg.train.zero_stage, cfg.train.precision)["total"]
    b, s = cfg.train.batch_size, cfg.model.max_length
    act = activation_bytes(name, b, s, cfg.train.activation_checkpointing)
    act_other = activation_bytes(name, b, s, not cfg.train.activation_checkpointing)
    logits = b * s * ARCHITECTURES[name]["vocab_size"] * (2 + 4)  # bf16 logits + fp32 copy for the loss
    live = 2 * min(1e9, params["total"]) if cfg.train.zero_stage == 3 else 0  # stage3_max_live_parameters default
    total = states + act + logits + live
    return {"config": config_path, "model": name, "gpus": n, "gpu": gpu, "gpu_memory_gb": GPU_MEMORY_GB[gpu],
            "zero_stage": cfg.train.zero_stage, "precision": cfg.train.precision,
            "activation_checkpointing": cfg.train.activation_checkpointing, "micro_batch": b, "seq_len": s,
            "parameters": params, "model_states_gb": states / GB, "activations_gb": act / GB,
            "activations_other_setting_gb": act_other / GB, "logits_gb": logits / GB, "zero3_live_params_gb": live / GB,
            "total_gb": total / GB, "fits": total / GB < 0.9 * GPU_MEMORY_GB[gpu],
            "flops_per_token": flops_per_token(name, s, params["non_embedding"])}


def run(command: str) -> tuple[dict[str, Any], str]:
    plans = [plan(c, g) for c, g in CONFIGS]
    result = {"benchmark": "gpu_plan", "command": command, "machine": machine(), "plans": plans,
              "peak_tflops": PEAK_TFLOPS}
    md = header("GPU plan (memory per GPU and FLOPs per token, on paper)", command, result["machine"]) + [
        "Per GPU, GiB. Model states: ZeRO paper formula for the config's stage and precision with N = its GPU count "
        "(bf16: 2Ψ + 2Ψ + 12Ψ at ZeRO-0, 16Ψ/N at ZeRO-3). Activations: Korthikanti et al. (bf16, no sequence "
        "parallelism) at the config's micro-batch and max length. Logits: bf16 + fp32 copy. ZeRO-3 live parameters: "
        "DeepSpeed's default `stage3_max_live_parameters` (1e9) in bf16, or the whole model if smaller.", "",
        "| config | model | Ψ | GPUs | ZeRO / precision | act. ckpt | model states | activations (other setting) | "
        "logits | live params | total | GPU | fits (< 90%) | FLOPs/token |",
        "|---|---|---:|---|---|---|---:|---:|---:|---:|---:|---|---|---:|"]
    for p in plans:
        md.append(f"| `{p['config']}` | `{p['model']}` | {p['parameters']['total'] / 1e9:.3f} B | {p['gpus']} | "
                  f"{p['zero_stage']} / {p['precision']} | {'on' if p['activation_checkpointing'] else 'off'} | "
                  f"{p['model_states_gb']:.2f} | {p['activations_gb']:.2f} ({p['activations_other_setting_gb']:.2f}) | "
                  f"{p['logits_gb']:.2f} | {p['zero3_live_params_gb']:.2f} | **{p['total_gb']:.1f}** | "
                  f"{p['gpu']} {p['gpu_memory_gb']} GB | {'yes' if p['fits'] else 'NO'} | {p['flops_per_token']:.3g} |")
    md += ["", "MFU = FLOPs/token × tokens/s ÷ (GPU peak × GPUs); peaks used (dense bf16 TFLOP/s): "
           + ", ".join(f"{k} {v:g}" for k, v in PEAK_TFLOPS.items())
           + ". `jobs/benchmark.py train` reports it when it runs on a GPU.", ""]
    return result, "\n".join(md)
