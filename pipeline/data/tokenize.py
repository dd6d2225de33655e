"""Tokenization of normalised batches, for Ray Data `map_batches(batch_format="pyarrow")`.

No padding here: batches are padded dynamically at training time, so the cache stores exact-length
token id lists (`input_ids`, optional `token_type_ids`, and `target_ids` for summarization). For
summarization, `input_ids` are the document's tokens without special tokens (a prompt wraps them).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from pipeline.model.refs import load_tokenizer


def list_array(seqs: list[list[int]], dtype=np.int32) -> pa.ListArray:
    """Python lists of ids -> an Arrow list array, via flat numpy buffers (much faster than pa.array)."""
    lengths = np.fromiter(map(len, seqs), dtype=np.int32, count=len(seqs))
    offsets = np.zeros(len(seqs) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    values = np.fromiter(itertools.chain.from_iterable(seqs), dtype=dtype, count=int(offsets[-1]))
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values))


def encode_texts(tok, texts: list[str], pairs: list[str] | None, max_length: int, summarization: bool) -> dict[str, list]:
    """The one place text becomes ids (the cache and inference both call it). Summarization documents
    are wrapped in a prompt later, so they get no special tokens here.

    Fast tokenizers go straight to the Rust backend's `encode_batch` and read only the ids: the same
    ids as `tok(texts, pairs, truncation=True, max_length=...)` (tested), without the per-row Python
    conversion of every output field that costs about a third of the time."""
    texts = [t or "" for t in texts]
    pairs = [p or "" for p in pairs] if pairs is not None else None
    if getattr(tok, "is_fast", False):
        backend = tok.backend_tokenizer
        backend.no_padding()
        backend.enable_truncation(max_length=max_length, strategy="longest_first", direction=tok.truncation_side)
        encodings = backend.encode_batch(list(zip(texts, pairs)) if pairs is not None else texts,
                                         add_special_tokens=not summarization)
        out = {"input_ids": [e.ids for e in encodings]}
        if "token_type_ids" in tok.model_input_names:
            out["token_type_ids"] = [e.type_ids for e in encodings]
        return out
    enc = tok(texts, pairs, truncation=True, max_length=max_length, return_attention_mask=False,
              add_special_tokens=not summarization)
    return {k: enc[k] for k in ("input_ids", "token_type_ids") if k in enc}


@dataclass
class Tokenizer:
    model: str  # model reference; each Ray worker process loads (and caches) the tokenizer once
    max_length: int
    max_target_length: int | None = None  # summarization targets
    pair: bool = False

    def __call__(self, batch: pa.Table) -> pa.Table:
        tok = load_tokenizer(self.model)
        pairs = batch["text_pair"].to_pylist() if self.pair else None
        enc = encode_texts(tok, batch["text"].to_pylist(), pairs, self.max_length, bool(self.max_target_length))
        ids = enc["input_ids"]
        batch = batch.append_column("input_ids", list_array(ids))
        batch = batch.append_column("num_tokens", pa.array(np.fromiter(map(len, ids), np.int32, len(ids))))
        if "token_type_ids" in enc:
            batch = batch.append_column("token_type_ids", list_array(enc["token_type_ids"], np.int8))
        if self.max_target_length:
            targets = [t or "" for t in batch["target"].to_pylist()]
            tgt = tok(targets, add_special_tokens=False, truncation=True, max_length=self.max_target_length,
                      return_attention_mask=False, return_token_type_ids=False)["input_ids"]
            batch = batch.append_column("target_ids", list_array(tgt))
        return batch
