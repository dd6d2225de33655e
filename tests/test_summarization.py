"""Summarization through the causal LM head: loss on summary tokens only, generation, ROUGE."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pipeline.eval.metrics import rouge, task_metrics
from pipeline.model.multitask import Head, build_model
from pipeline.model.refs import load_tokenizer
from pipeline.model.summarize import IGNORE, PromptFormat
from pipeline.tasks import BUILTIN

HEADS = [Head("xsum", "summarization", 0), Head("sst2", "classification", 2)]


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    model = build_model("tiny-llama", HEADS).eval()
    tok = load_tokenizer("tiny-llama")
    fmt = PromptFormat(tok, BUILTIN.get("xsum").prompt)
    docs = [tok("the council approved a new budget for the city schools", add_special_tokens=False)["input_ids"],
            tok("storms closed roads across the north", add_special_tokens=False)["input_ids"]]
    sums = [tok("budget approved", add_special_tokens=False)["input_ids"],
            tok("roads closed by storms in the north", add_special_tokens=False)["input_ids"]]
    return model, tok, fmt, docs, sums


def test_loss_is_on_summary_tokens_only(setup):
    model, tok, fmt, docs, sums = setup
    batch = fmt.training_batch(docs, sums)
    for i, (d, s) in enumerate(zip(docs, sums)):
        prompt_len = len(fmt.prompt(d))
        labels = batch["labels"][i]
        assert (labels[:prompt_len] == IGNORE).all()
        assert labels[prompt_len:prompt_len + len(s) + 1].tolist() == s + [fmt.eos]
        assert (labels[prompt_len + len(s) + 1:] == IGNORE).all()  # padding
    logits, loss = model("xsum", **batch)
    # The same loss by hand: next-token cross-entropy over summary (and EOS) positions only.
    shift_logits, shift_labels = logits[:, :-1].float(), batch["labels"][:, 1:]
    keep = shift_labels != IGNORE
    manual = F.cross_entropy(shift_logits[keep], shift_labels[keep])
    assert loss.item() == pytest.approx(manual.item(), rel=1e-5)
    # Changing a prompt token changes the inputs but no label: the prompt is context, not a target.
    other = fmt.training_batch([[tok.convert_tokens_to_ids("river")] + d[1:] for d in docs], sums)
    assert torch.equal(other["labels"], batch["labels"])


def test_generation_respects_the_length_and_pads_on_the_left(setup):
    model, tok, fmt, docs, _ = setup
    batch = fmt.generation_batch(docs)
    assert batch["attention_mask"][1, 0] == 0 and batch["attention_mask"][1, -1] == 1  # left padding
    for n in (3, 7):
        new = model.generate(**batch, max_new_tokens=n, eos_token_id=fmt.eos)
        assert new.shape[0] == 2 and new.shape[1] <= n
        forced = model.generate(**batch, max_new_tokens=n, min_new_tokens=n, eos_token_id=fmt.eos)
        assert forced.shape[1] == n
    # Batched generation equals generating each row alone (padding does not leak into the result).
    both = model.generate(**batch, max_new_tokens=5, min_new_tokens=5, eos_token_id=fmt.eos)
    alone = model.generate(**fmt.generation_batch(docs[1:]), max_new_tokens=5, min_new_tokens=5, eos_token_id=fmt.eos)
    assert torch.equal(both[1], alone[0])


def _log_likelihood(model, prompt: dict, new: torch.Tensor) -> float:
    ids = torch.cat([prompt["input_ids"], new], dim=1)
    mask = torch.cat([prompt["attention_mask"], torch.ones_like(new)], dim=1)
    logits = model.backbone(input_ids=ids, attention_mask=mask).logits.float()
    logp = logits[:, prompt["input_ids"].shape[1] - 1:-1].log_softmax(-1)
    return logp.gather(-1, new.unsqueeze(-1)).sum().item()


def test_beam_search_finds_at_least_the_greedy_log_likelihood(setup):
    model, _, fmt, docs, _ = setup
    prompt = fmt.generation_batch(docs[:1])
    kw = dict(max_new_tokens=6, min_new_tokens=6, eos_token_id=fmt.eos)
    greedy = model.generate(**prompt, num_beams=1, **kw)
    beam = model.generate(**prompt, num_beams=4, length_penalty=0.0, **kw)
    assert _log_likelihood(model, prompt, beam) >= _log_likelihood(model, prompt, greedy) - 1e-4


def test_rouge_against_known_values():
    # Worked by hand: pred "the cat sat", ref "the cat sat on the mat".
    # ROUGE-1: 3 of 3 predicted unigrams match, 3 of 6 reference unigrams: P=1, R=0.5, F=2/3.
    # ROUGE-2: bigrams (the cat, cat sat) both in the reference's 5: P=1, R=0.4, F=4/7.
    scores = rouge(["the cat sat"], ["the cat sat on the mat"])
    assert scores["rouge1"] == pytest.approx(2 / 3)
    assert scores["rouge2"] == pytest.approx(4 / 7)
    assert scores["rougeL"] == pytest.approx(2 / 3)
    assert rouge(["running dogs"], ["the dog runs"])["rouge1"] == pytest.approx(0.8)  # stemming: run, dog
    assert rouge(["a b"], ["c d"])["rouge1"] == 0.0
    xsum = task_metrics(BUILTIN.get("xsum"), ["the cat sat"], ["the cat sat on the mat"])
    assert set(xsum) == {"rouge1", "rouge2", "rougeL", "rougeLsum"}


def test_summarization_needs_a_causal_backbone():
    with pytest.raises(ValueError, match="need a causal LM backbone"):
        build_model("tiny-bert", HEADS)
