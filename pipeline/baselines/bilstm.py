"""The paper's Bi-LSTM + attention baseline, trained from scratch on the backbone tokenizer's ids.

    result = train_bilstm({"input_ids": ids, "label": labels}, "classification", num_labels=2,
                          vocab_size=tokenizer.vocab_size, pad_id=tokenizer.pad_token_id, steps=500)
    preds = predict_bilstm(result.model, dev_ids, "classification")

Embedding -> 1-layer bidirectional LSTM over packed sequences (padding never enters the recurrence)
-> additive attention pooling over the real tokens (Yang et al. 2016) -> dropout -> linear. Plain
single-process PyTorch on purpose: it is a reference point, not part of the distributed pipeline.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from pipeline.model.summarize import pad

KINDS = ("classification", "regression")


class BiLSTMAttention(nn.Module):
    def __init__(self, vocab_size: int, num_outputs: int, pad_id: int = 0, embed_dim: int = 128,
                 hidden: int = 128, dropout: float = 0.1):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, embed_dim, padding_idx=pad_id)
        self.lstm = nn.LSTM(embed_dim, hidden, num_layers=1, batch_first=True, bidirectional=True)
        self.attn_proj = nn.Linear(2 * hidden, 2 * hidden)  # W in u = tanh(W h + b)
        self.attn_query = nn.Linear(2 * hidden, 1, bias=False)  # v in score = v·u
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(2 * hidden, num_outputs)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, T) right-padded ids and 0/1 mask -> (B, num_outputs)."""
        T = input_ids.shape[1]
        # A row with no real tokens still gets one step, so packing and the softmax stay defined.
        lengths = attention_mask.sum(dim=1).clamp(min=1)
        packed = pack_padded_sequence(self.embed(input_ids), lengths.cpu(), batch_first=True,
                                      enforce_sorted=False)
        h, _ = pad_packed_sequence(self.lstm(packed)[0], batch_first=True, total_length=T)  # (B, T, 2H)
        scores = self.attn_query(torch.tanh(self.attn_proj(h))).squeeze(-1)  # (B, T)
        real = torch.arange(T, device=h.device)[None, :] < lengths[:, None]
        weights = scores.masked_fill(~real, float("-inf")).softmax(dim=1)
        pooled = torch.einsum("bt,btd->bd", weights, h)
        return self.head(self.dropout(pooled))


def _pad(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad to the longest sequence; an empty sequence becomes one pad token."""
    return pad([list(s) or [pad_id] for s in seqs], pad_id)


@dataclass
class BiLSTMResult:
    model: BiLSTMAttention
    losses: list[tuple[int, float]]  # (step, mean training loss over the log window)
    steps: int
    wall_seconds: float


def train_bilstm(rows: dict[str, list], kind: str, num_labels: int, vocab_size: int, pad_id: int, *,
                 steps: int, batch_size: int = 32, lr: float = 2e-3, seed: int = 0, log_every: int = 10,
                 max_length: int | None = None,
                 on_log: Callable[[int, float], None] | None = None) -> BiLSTMResult:
    """Exactly `steps` Adam steps on random batches (with replacement) drawn from `rows`.

    classification: cross-entropy over `num_labels` classes; regression: MSE on one output
    (`num_labels` must be 1). Same seed, same data -> same losses and weights.
    """
    assert kind in KINDS, f"kind must be one of {KINDS}, got {kind!r}"
    assert kind == "classification" or num_labels == 1, "regression has one output: pass num_labels=1"
    assert len(rows["input_ids"]) == len(rows["label"]) > 0, "rows need equally long, non-empty input_ids and label"
    torch.manual_seed(seed)  # weight init and dropout
    batch_gen = torch.Generator().manual_seed(seed)
    seqs = [s[:max_length] if max_length else s for s in rows["input_ids"]]
    labels = torch.tensor(rows["label"], dtype=torch.long if kind == "classification" else torch.float)
    model = BiLSTMAttention(vocab_size, num_labels, pad_id=pad_id)
    opt = torch.optim.Adam(model.parameters(), lr=lr)

    losses: list[tuple[int, float]] = []
    window: list[float] = []
    t0 = time.perf_counter()
    model.train()
    for step in range(1, steps + 1):
        idx = torch.randint(len(seqs), (batch_size,), generator=batch_gen).tolist()
        ids, mask = _pad([seqs[i] for i in idx], pad_id)
        out = model(ids, mask)
        if kind == "classification":
            loss = F.cross_entropy(out, labels[idx])
        else:
            loss = F.mse_loss(out.squeeze(-1), labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        window.append(loss.item())
        if step % log_every == 0 or step == steps:
            mean = sum(window) / len(window)
            losses.append((step, mean))
            window.clear()
            if on_log is not None:
                on_log(step, mean)
    model.eval()
    return BiLSTMResult(model, losses, steps, time.perf_counter() - t0)


@torch.no_grad()
def predict_bilstm(model: BiLSTMAttention, input_ids: list[list[int]], kind: str, batch_size: int = 64) -> list:
    """Class ids (classification) or floats (regression), in input order. Truncate as in training."""
    assert kind in KINDS, f"kind must be one of {KINDS}, got {kind!r}"
    model.eval()
    device = next(model.parameters()).device
    pad_id = model.embed.padding_idx
    preds: list = []
    for start in range(0, len(input_ids), batch_size):
        ids, mask = _pad(input_ids[start:start + batch_size], pad_id)
        out = model(ids.to(device), mask.to(device))
        preds += out.argmax(dim=-1).tolist() if kind == "classification" else out.squeeze(-1).tolist()
    return preds
