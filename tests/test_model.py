"""The multi-task model on its own (plain PyTorch, no Ray or DeepSpeed)."""

from __future__ import annotations

import pytest
import torch

from pipeline.model.multitask import Head, MultiTaskModel, build_model
from pipeline.model.refs import load_tokenizer

HEADS = [Head("cls", "classification", 3), Head("reg", "regression", 1)]


def _batch(name: str, texts=("a short one", "a somewhat longer second sentence")):
    return load_tokenizer(name)(list(texts), padding=True, return_tensors="pt")


def test_only_the_trained_task_head_and_the_backbone_get_gradient():
    torch.manual_seed(0)
    model = build_model("tiny-bert", HEADS)
    enc = _batch("tiny-bert")
    _, loss = model("cls", enc.input_ids, enc.attention_mask, enc.token_type_ids, labels=torch.tensor([0, 2]))
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert all(g is not None and g.abs().sum() > 0 for n, g in grads.items() if n.startswith("heads.cls."))
    assert all(g is None for n, g in grads.items() if n.startswith("heads.reg."))
    assert grads["backbone.embeddings.word_embeddings.weight"].abs().sum() > 0


def test_causal_pooling_reads_the_last_real_token():
    torch.manual_seed(0)
    model = build_model("tiny-llama", HEADS).eval()
    tok = load_tokenizer("tiny-llama")
    alone = tok(["hello world"], return_tensors="pt")
    padded = tok(["hello world", "a much longer sentence to force padding"], padding=True, return_tensors="pt")
    with torch.no_grad():
        a = model.pooled(alone.input_ids, alone.attention_mask)
        b = model.pooled(padded.input_ids, padded.attention_mask)[:1]
    assert torch.allclose(a, b, atol=1e-5)


def test_regression_head_and_head_learning_rates():
    model = build_model("tiny-gpt2", HEADS)
    enc = _batch("tiny-gpt2")
    logits, loss = model("reg", enc.input_ids, enc.attention_mask, labels=torch.tensor([0.5, 4.0]))
    assert logits.shape == (2,) and loss.item() > 0
    groups = {g["name"]: g for g in model.param_groups(1e-4, 0.01, {"cls": 10.0})}
    assert groups["head/cls"]["lr"] == 1e-3 and groups["head/reg"]["lr"] == 1e-4
    assert groups["backbone_no_decay"]["weight_decay"] == 0.0 and groups["backbone"]["weight_decay"] == 0.01


def test_saved_folder_reloads_with_identical_predictions(tmp_path):
    for name in ("tiny-bert", "tiny-llama"):
        model = build_model(name, HEADS).eval()
        enc = _batch(name)
        model.save(tmp_path / name, load_tokenizer(name), metadata={"note": "x"})
        again, tokenizer, meta = MultiTaskModel.load(tmp_path / name)
        assert meta["note"] == "x" and [h["task"] for h in meta["heads"]] == ["cls", "reg"]
        for task in ("cls", "reg"):
            assert torch.equal(model.predict(task, enc.input_ids, enc.attention_mask),
                               again.predict(task, enc.input_ids, enc.attention_mask))
        assert tokenizer("hello")["input_ids"] == load_tokenizer(name)("hello")["input_ids"]


def test_every_parameter_is_in_exactly_one_optimizer_group():
    for name, heads in [("tiny-bert", HEADS + [Head("xsum", "summarization", 0)]), ("tiny-llama", HEADS),
                        ("tiny-t5", HEADS + [Head("xsum", "summarization", 0)])]:
        model = build_model(name, heads)
        grouped = [id(p) for g in model.param_groups(1e-4, 0.01, {}) for p in g["params"]]
        assert len(grouped) == len(set(grouped)) == len({id(p) for p in model.parameters()}), name


@pytest.mark.parametrize("name", ["tiny-bert", "tiny-llama"])
def test_activation_checkpointing_gives_the_same_loss_and_gradients(name):
    """Recomputing activations in backward changes memory, not results (dropout off)."""
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        heads = HEADS + [Head("xsum", "summarization", 0)] if name == "tiny-bert" else HEADS
        model = build_model(name, heads, dropout=0.0).train()
        for module in model.modules():  # the backbone's own dropout too
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
        if checkpointing:
            model.enable_activation_checkpointing()
            assert model.backbone.is_activation_checkpointing
        enc = _batch(name)
        _, loss = model("cls", enc["input_ids"], enc["attention_mask"], labels=torch.tensor([0, 2]))
        loss.backward()
        grads.append((loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (loss_a, a), (loss_b, b) = grads
    assert loss_a == pytest.approx(loss_b, abs=1e-6) and a.keys() == b.keys() and len(a) > 4
    for n in a:
        torch.testing.assert_close(a[n], b[n], atol=1e-6, rtol=1e-5, msg=n)
