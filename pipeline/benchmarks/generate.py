"""Summarization evaluation speed: generated tokens/s, greedy and beam, batched, with the KV cache — next
to the same generation without the cache and one row at a time, in one run.

The models are the default job's summarization modules with pretrained weights from registry packages:
MiniLM encoder + task decoder (cross-attention) and SmolLM2-135M through its LM head. Inputs are XSum
documents from the packaged data (cut to `max_length` tokens). Every row generates exactly
`new_tokens` tokens (`min_new_tokens` = `max_new_tokens`), so tokens/s compare like for like.
"""

from __future__ import annotations

import time
from typing import Any

from pipeline.benchmarks import header, machine, median

VARIANTS = [  # (name, batch size, beams, KV cache)
    ("greedy, batch 16, KV cache", 16, 1, True),
    ("greedy, batch 16, no cache", 16, 1, False),
    ("greedy, batch 1, KV cache", 1, 1, True),
    ("beam 4, batch 16, KV cache", 16, 4, True),
    ("beam 4, batch 16, no cache", 16, 4, False),
]


def _documents(rows: int, max_length: int) -> list[list[int]]:
    from pipeline.config import load_config
    from pipeline.data.preprocess import prepare_tasks
    cfg = load_config(None, ["name=bench-generate", "model.name=minilm-l6", f"model.max_length={max_length}",
                             "tasks={xsum: {}}"])
    task = prepare_tasks(cfg, log=lambda _: None)["xsum"]
    return [r["text"] for r in task.table("validation", limit=rows).to_pylist()]


def _time(model, fmt, docs: list[list[int]], batch: int, beams: int, cache: bool, new_tokens: int) -> float:
    import torch
    start = time.perf_counter()
    with torch.inference_mode():
        for i in range(0, len(docs), batch):
            gen = fmt.generation_batch(docs[i:i + batch])
            out = model.generate("xsum", **gen, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                 num_beams=beams, eos_token_id=fmt.eos, use_cache=cache)
            assert out.shape[1] == new_tokens, out.shape
    return time.perf_counter() - start


def run(command: str, *, models=("minilm-l6", "smollm2-135m"), rows: int = 32, new_tokens: int = 32,
        max_length: int = 128, repeats: int = 3, threads: int = 2) -> tuple[dict[str, Any], str]:
    import torch

    from pipeline.model.multitask import Head, build_model
    from pipeline.model.refs import load_tokenizer
    from pipeline.model.summarize import summary_format
    from pipeline.tasks.catalogue import SUMMARY_PROMPT

    torch.set_num_threads(threads)
    texts = _documents(rows, max_length)
    results: dict[str, list[dict]] = {}
    for name in models:
        tok = load_tokenizer(name)
        model = build_model(name, [Head("xsum", "summarization", None)]).eval()
        fmt = summary_format(model.kind, tok, SUMMARY_PROMPT)
        docs = [tok(t, add_special_tokens=False, truncation=True, max_length=max_length)["input_ids"] for t in texts]
        _time(model, fmt, docs[:2], 2, 1, True, 4)  # warm-up
        results[name] = []
        for label, batch, beams, cache in VARIANTS:
            seconds = [_time(model, fmt, docs, batch, beams, cache, new_tokens) for _ in range(repeats)]
            tps = rows * new_tokens / median(seconds)
            results[name].append({"variant": label, "batch": batch, "beams": beams, "kv_cache": cache,
                                  "seconds": seconds, "tokens_per_s": tps})
            print(f"{name}: {label}: {tps:,.1f} generated tokens/s", flush=True)
    result = {"benchmark": "generate", "command": command, "machine": machine(), "rows": rows,
              "new_tokens": new_tokens, "max_length": max_length, "threads": threads, "repeats": repeats,
              "models": results}
    md = header("summarization generation speed", command, result["machine"]) + [
        f"{rows} XSum documents (≤ {max_length} tokens), exactly {new_tokens} new tokens each, {threads} threads, "
        f"fp32; median of {repeats}. Beam search reports *returned* tokens/s (4 hypotheses are computed per row).", ""]
    for name, rs in results.items():
        base = next(r for r in rs if r["variant"].startswith("greedy, batch 16, KV"))["tokens_per_s"]
        md += [f"### `{name}`", "", "| variant | generated tokens/s | vs greedy batch 16 + cache |", "|---|---:|---:|"]
        md += [f"| {r['variant']} | {r['tokens_per_s']:,.1f} | {r['tokens_per_s'] / base:.2f}× |" for r in rs]
        md.append("")
    return result, "\n".join(md)
