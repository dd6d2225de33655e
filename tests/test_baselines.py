"""Bi-LSTM + attention baseline: learns toy tasks, ignores padding, and is deterministic for a seed."""

from __future__ import annotations

import random

import torch
from scipy.stats import pearsonr

from pipeline.baselines.bilstm import BiLSTMAttention, _pad, predict_bilstm, train_bilstm

VOCAB, PAD = 200, 0


def noise(rng: random.Random) -> list[int]:
    return [rng.randrange(10, VOCAB) for _ in range(rng.randint(5, 20))]


def marker_rows(n: int, seed: int) -> dict[str, list]:
    """Class 0 carries token 3 somewhere in the noise, class 1 carries token 4."""
    rng = random.Random(seed)
    rows = {"input_ids": [], "label": []}
    for _ in range(n):
        label, seq = rng.randint(0, 1), noise(rng)
        seq.insert(rng.randint(0, len(seq)), 3 + label)
        rows["input_ids"].append(seq)
        rows["label"].append(label)
    return rows


def count_rows(n: int, seed: int) -> dict[str, list]:
    """Target = (number of token 5 in the noise) / 3, with 0-3 copies."""
    rng = random.Random(seed)
    rows = {"input_ids": [], "label": []}
    for _ in range(n):
        k, seq = rng.randint(0, 3), noise(rng)
        for _ in range(k):
            seq.insert(rng.randint(0, len(seq)), 5)
        rows["input_ids"].append(seq)
        rows["label"].append(k / 3)
    return rows


def test_learns_a_separable_classification_task():
    train, dev = marker_rows(512, seed=1), marker_rows(200, seed=2)
    result = train_bilstm(train, "classification", 2, VOCAB, PAD, steps=150, seed=0)
    assert result.steps == 150 and len(result.losses) == 15
    assert result.losses[-1][1] < result.losses[0][1], result.losses
    preds = predict_bilstm(result.model, dev["input_ids"], "classification")
    accuracy = sum(p == y for p, y in zip(preds, dev["label"])) / len(preds)
    assert accuracy >= 0.95, f"held-out accuracy {accuracy:.3f}"


def test_learns_a_counting_regression_task():
    train, dev = count_rows(512, seed=3), count_rows(200, seed=4)
    result = train_bilstm(train, "regression", 1, VOCAB, PAD, steps=200, seed=0)
    preds = predict_bilstm(result.model, dev["input_ids"], "regression")
    assert all(isinstance(p, float) for p in preds)
    r = pearsonr(preds, dev["label"]).statistic
    assert r > 0.9, f"held-out Pearson r {r:.3f}"


def test_padding_does_not_change_the_logits():
    torch.manual_seed(0)
    model = BiLSTMAttention(VOCAB, 3, pad_id=PAD).eval()
    short, long = [11, 12, 13, 14], list(range(20, 120))
    with torch.no_grad():
        alone = model(*_pad([short], PAD))
        batched = model(*_pad([long, short, long], PAD))
    torch.testing.assert_close(batched[1:2], alone, atol=1e-5, rtol=0)


def test_empty_sequences_do_not_crash():
    model = BiLSTMAttention(VOCAB, 2, pad_id=PAD)
    assert len(predict_bilstm(model, [[], [7, 8, 9], []], "classification")) == 3
    result = train_bilstm({"input_ids": [[], [3, 11]], "label": [0, 1]}, "classification", 2, VOCAB, PAD,
                          steps=2, batch_size=4)
    assert all(loss == loss for _, loss in result.losses), "loss is NaN"


def test_training_is_deterministic_for_a_seed():
    rows = marker_rows(128, seed=5)

    def run(seed, on_log=None):
        return train_bilstm(rows, "classification", 2, VOCAB, PAD, steps=20, seed=seed, log_every=5,
                            on_log=on_log).losses

    logged = []
    first = run(0, on_log=lambda step, loss: logged.append((step, loss)))
    assert first == logged == run(0)
    assert [step for step, _ in first] == [5, 10, 15, 20]
    assert run(1) != first
