"""Summarization evaluation speed: generated tokens/s, greedy and beam, batched, with the KV cache — next
to the same generation without the cache and one row at a time, in one run.

The models are the summarization modules with pretrained backbones from registry packages: MiniLM
encoder + task decoder (cross-attention) and SmolLM2-135M through its LM head. Inputs are XSum documents
from the packaged data (cut to a token limit). Every row generates exactly its number of new tokens
(`min_new_tokens` = `max_new_tokens`), so tokens/s compare like for like.
"""

from __future__ import annotations

import time
from typing import Any

from pipeline.benchmarks import header, machine, median

VARIANTS = [  # (name, batch size, beams, KV cache)
    ("greedy, batched, KV cache", 16, 1, True),
    ("greedy, batched, no cache", 16, 1, False),
    ("greedy, one row at a time, KV cache", 1, 1, True),
    ("beam 4, batched, KV cache", 16, 4, True),
    ("beam 4, batched, no cache", 16, 4, False),
]
# (model, rows, new tokens, max document tokens, batch size, variants): SmolLM2 is ~6x MiniLM's compute per
# token here, so it runs fewer, shorter rows and skips the slowest variant (beam without cache).
MODELS = [("minilm-l6", 32, 32, 128, 16, VARIANTS), ("smollm2-135m", 8, 16, 64, 8, VARIANTS[:4])]


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


def run(command: str, *, models=MODELS, repeats: int = 3, threads: int = 2) -> tuple[dict[str, Any], str]:
    import torch

    from pipeline.model.multitask import Head, build_model
    from pipeline.model.refs import load_tokenizer
    from pipeline.model.summarize import summary_format
    from pipeline.tasks.catalogue import SUMMARY_PROMPT

    torch.set_num_threads(threads)
    results: dict[str, dict] = {}
    for name, rows, new_tokens, max_length, batch, variants in models:
        texts = _documents(rows, max_length)
        tok = load_tokenizer(name)
        model = build_model(name, [Head("xsum", "summarization", None)]).eval()
        fmt = summary_format(model.kind, tok, SUMMARY_PROMPT)
        docs = [tok(t, add_special_tokens=False, truncation=True, max_length=max_length)["input_ids"] for t in texts]
        _time(model, fmt, docs[:2], 2, 1, True, 4)  # warm-up
        runs = []
        for label, _, beams, cache in variants:
            size = 1 if "one row" in label else batch
            seconds = [_time(model, fmt, docs, size, beams, cache, new_tokens) for _ in range(repeats)]
            tps = rows * new_tokens / median(seconds)
            runs.append({"variant": label, "batch": size, "beams": beams, "kv_cache": cache, "seconds": seconds,
                         "tokens_per_s": tps})
            print(f"{name}: {label}: {tps:,.1f} generated tokens/s", flush=True)
        results[name] = {"rows": rows, "new_tokens": new_tokens, "max_length": max_length, "batch": batch, "runs": runs}
    result = {"benchmark": "generate", "command": command, "machine": machine(), "threads": threads,
              "repeats": repeats, "models": results}
    md = header("summarization generation speed", command, result["machine"]) + [
        f"XSum documents from the packaged data, every row generating exactly its model's number of new tokens; "
        f"{threads} threads, fp32, median of {repeats}. Beam search reports *returned* tokens/s (4 hypotheses are "
        "computed per row). Untrained summarization modules: speed does not depend on the weights.", ""]
    for name, r in results.items():
        base = r["runs"][0]["tokens_per_s"]
        md += [f"### `{name}`: {r['rows']} rows, ≤ {r['max_length']} document tokens, {r['new_tokens']} new tokens, "
               f"batch {r['batch']}", "", "| variant | generated tokens/s | vs greedy batched + cache |", "|---|---:|---:|"]
        md += [f"| {x['variant']} | {x['tokens_per_s']:,.1f} | {x['tokens_per_s'] / base:.2f}× |" for x in r["runs"]]
        md.append("")
    return result, "\n".join(md)
