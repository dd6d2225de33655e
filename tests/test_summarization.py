"""Summarization modules for every backbone kind: loss on summary tokens only, generation, ROUGE."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pipeline.eval.metrics import rouge, task_metrics
from pipeline.model.multitask import Head, MultiTaskModel, build_model
from pipeline.model.refs import load_tokenizer
from pipeline.model.summarize import IGNORE, PromptFormat, summary_format
from pipeline.tasks import BUILTIN

HEADS = [Head("xsum", "summarization", 0), Head("sst2", "classification", 2)]
BACKBONES = ["tiny-llama", "tiny-bert", "tiny-t5", "tiny-bart"]  # causal, encoder (BERT2BERT), seq2seq x2


def _setup(name):
    torch.manual_seed(0)
    model = build_model(name, HEADS).eval()
    tok = load_tokenizer(name)
    fmt = summary_format(model.kind, tok, BUILTIN.get("xsum").prompt)
    docs = [tok("the council approved a new budget for the city schools", add_special_tokens=False)["input_ids"],
            tok("storms closed roads across the north", add_special_tokens=False)["input_ids"]]
    sums = [tok("budget approved", add_special_tokens=False)["input_ids"],
            tok("roads closed by storms in the north", add_special_tokens=False)["input_ids"]]
    return model, tok, fmt, docs, sums


def test_causal_loss_is_on_summary_tokens_only():
    model, tok, fmt, docs, sums = _setup("tiny-llama")
    assert isinstance(fmt, PromptFormat)
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
    assert loss.item() == pytest.approx(F.cross_entropy(shift_logits[keep], shift_labels[keep]).item(), rel=1e-5)
    other = fmt.training_batch([[tok.convert_tokens_to_ids("river")] + d[1:] for d in docs], sums)
    assert torch.equal(other["labels"], batch["labels"])  # the prompt is context, never a target


@pytest.mark.parametrize("name", ["tiny-bert", "tiny-t5", "tiny-bart"])
def test_encoder_side_models_take_the_summary_as_labels(name):
    model, tok, fmt, docs, sums = _setup(name)
    batch = fmt.training_batch(docs, sums)
    assert batch["labels"][0].tolist() == sums[0] + [fmt.eos] + [IGNORE] * (len(sums[1]) - len(sums[0]))
    assert batch["input_ids"][0].tolist()[:len(docs[0]) + 2] == [tok.cls_token_id] + docs[0] + [tok.sep_token_id]
    logits, loss = model("xsum", **batch)
    keep = batch["labels"] != IGNORE
    assert loss.item() == pytest.approx(F.cross_entropy(logits.float()[keep], batch["labels"][keep]).item(), rel=1e-5)
    loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if "crossattention" in n or "EncDecAttention" in n
             or "encoder_attn" in n]
    assert grads and all(g is not None for g in grads)  # the decoder reads the document


@pytest.mark.parametrize("name", BACKBONES)
def test_generation_respects_the_length_and_batching(name):
    model, tok, fmt, docs, _ = _setup(name)
    batch = fmt.generation_batch(docs)
    for n in (3, 7):
        assert model.generate("xsum", **batch, max_new_tokens=n, eos_token_id=fmt.eos).shape[1] <= n
        forced = model.generate("xsum", **batch, max_new_tokens=n, min_new_tokens=n, eos_token_id=fmt.eos)
        assert forced.shape == (2, n)
    # Batched generation equals generating each row alone (padding does not leak into the result).
    both = model.generate("xsum", **batch, max_new_tokens=5, min_new_tokens=5, eos_token_id=fmt.eos)
    alone = model.generate("xsum", **fmt.generation_batch(docs[1:]), max_new_tokens=5, min_new_tokens=5,
                           eos_token_id=fmt.eos)
    assert torch.equal(both[1], alone[0])


def _log_likelihood(model, fmt, docs, new: torch.Tensor) -> float:
    """Sum of log-probabilities of `new` under the model, scored through its training forward."""
    batch = fmt.training_batch(docs, [new[0].tolist()[:-1]])
    batch["labels"][0, -1 if model.kind != "causal" else batch["labels"].shape[1] - 1] = new[0, -1]
    logits, _ = model("xsum", **batch)
    labels = batch["labels"]
    if model.kind == "causal":
        logits, labels = logits[:, :-1], labels[:, 1:]
    keep = labels != IGNORE
    return logits.float().log_softmax(-1)[keep].gather(-1, labels[keep].unsqueeze(-1)).sum().item()


@pytest.mark.parametrize("name", BACKBONES)
def test_beam_search_finds_at_least_the_greedy_log_likelihood(name):
    model, _, fmt, docs, _ = _setup(name)
    prompt = fmt.generation_batch(docs[:1])
    kw = dict(max_new_tokens=6, min_new_tokens=6, eos_token_id=fmt.eos)
    greedy = model.generate("xsum", **prompt, num_beams=1, **kw)
    beam = model.generate("xsum", **prompt, num_beams=4, length_penalty=0.0, **kw)
    assert _log_likelihood(model, fmt, docs[:1], beam) >= _log_likelihood(model, fmt, docs[:1], greedy) - 1e-4


@pytest.mark.parametrize("name", ["tiny-bert", "tiny-bart"])
def test_folders_with_decoders_reload_and_generate_the_same(tmp_path, name):
    model, tok, fmt, docs, _ = _setup(name)
    model.save(tmp_path, tok)
    again, _, meta = MultiTaskModel.load(tmp_path)
    batch = fmt.generation_batch(docs)
    kw = dict(max_new_tokens=5, min_new_tokens=5, eos_token_id=fmt.eos)
    assert torch.equal(model.generate("xsum", **batch, **kw), again.generate("xsum", **batch, **kw))


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
