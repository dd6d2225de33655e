"""LoRA adapters (model.adapter, peft) at the model level: what trains, bundles in PEFT's format, merging,
strict target names. Through Ray Train and DeepSpeed: tests/test_train.py (test_lora_*)."""

from __future__ import annotations

import json

import pytest
import torch

from pipeline.config import load_config
from pipeline.errors import PipelineError
from pipeline.model.adapters import SHARED, check_targets, is_adapter_parameter
from pipeline.model.multitask import Head, MultiTaskModel, base_backbone, base_digest, build_model
from pipeline.model.refs import load_tokenizer

HEADS = [Head("cls", "classification", 2), Head("reg", "regression", 1), Head("xsum", "summarization", 0)]
SPEC = {"kind": "lora", "r": 4, "alpha": 8.0, "dropout": 0.0, "target_modules": "all-linear", "per_task": True}


def _batch(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 200, (3, 7), generator=gen)
    return ids, torch.ones_like(ids)


def _nudge(model: MultiTaskModel) -> None:
    """LoRA's B starts at zero (the adapter is a no-op until trained): give every adapter weights of its own."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if is_adapter_parameter(name):
                p.add_(0.05 * torch.randn(p.shape, generator=gen))


def test_only_the_steps_adapter_and_head_receive_gradient():
    model = build_model("tiny-llama", HEADS, adapter=SPEC)
    assert model.adapter_names == ["cls", "reg", "xsum"]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(is_adapter_parameter(n) or n.startswith("heads.") for n in trainable)
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert any(n.endswith("embed_tokens.weight") for n in frozen) and any(".base_layer." in n for n in frozen)
    grouped = [p for g in model.param_groups(1e-3, 0.01, {}) for p in g["params"]]
    assert len(grouped) == len(trainable)  # the optimizer never sees a frozen weight

    ids, mask = _batch()
    _, loss = model("cls", ids, mask, labels=torch.tensor([0, 1, 1]))
    loss.backward()
    got = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert got and all(".cls." in n or n.startswith("heads.cls.") for n in got), sorted(got)[:5]
    # LoRA's B starts at zero, so at the first step only B (not A) has a gradient
    assert any(n.startswith("heads.cls.") for n in got) and any(".lora_B.cls." in n for n in got)
    # every adapter stays trainable whichever task ran last (DeepSpeed fixes its trainable set at the start)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == trainable

    # the summarization task runs through its own adapter and the LM head
    model.zero_grad()
    labels = ids.clone()
    labels[:, :3] = -100
    _, loss = model("xsum", ids, mask, labels=labels)
    loss.backward()
    got = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert got and all(".xsum." in n for n in got), sorted(got)[:5]


def test_the_frozen_tiny_base_is_the_same_in_every_process_whatever_the_rng():
    torch.manual_seed(123)
    first = build_model("tiny-llama", HEADS, adapter=SPEC)
    torch.manual_seed(456)
    second = base_backbone("tiny-llama")
    state = {k.removeprefix("backbone."): v for k, v in first.state_dict().items() if k.startswith("backbone.")}
    assert base_digest(state) == base_digest(second.state_dict())


def test_bundle_is_peft_format_and_reloads_to_the_same_predictions(tmp_path):
    from peft import PeftModel

    torch.manual_seed(0)
    model = build_model("tiny-llama", HEADS, adapter=SPEC).eval()
    _nudge(model)
    tok = load_tokenizer("tiny-llama")
    model.save(tmp_path / "bundle", tok, metadata={"run_name": "r"})
    bundle = tmp_path / "bundle"
    assert not (bundle / "backbone").exists()  # the base is a reference, not a copy
    meta = json.loads((bundle / "mtl_model.json").read_text())
    assert meta["base"] == "tiny-llama" and meta["adapter"]["r"] == 4 and meta["adapters"] == ["cls", "reg", "xsum"]
    assert set(meta["adapter_bytes"]) == {"cls", "reg", "xsum"} and all(v > 0 for v in meta["adapter_bytes"].values())
    assert meta["base_sha256"] == base_digest(base_backbone("tiny-llama").state_dict())  # the base was not touched
    config = json.loads((bundle / "adapters" / "xsum" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["base_model_name_or_path"] == "tiny-llama"

    again, _, _ = MultiTaskModel.load(bundle)
    ids, mask = _batch(3)
    for task in ("cls", "reg", "xsum"):
        want, _ = model(task, ids, mask)
        got, _ = again(task, ids, mask)
        assert torch.allclose(want, got, atol=1e-6), task

    # a plain PEFT user reads one adapter folder onto the base and gets the task's LM logits
    peft_model = PeftModel.from_pretrained(base_backbone("tiny-llama"), str(bundle / "adapters" / "xsum")).eval()
    want, _ = model("xsum", ids, mask)
    assert torch.allclose(peft_model(input_ids=ids, attention_mask=mask).logits, want, atol=1e-5)


def test_merge_writes_a_plain_model_with_the_same_predictions(tmp_path):
    from transformers import AutoModelForCausalLM

    from pipeline.train.export import merge_task

    torch.manual_seed(0)
    model = build_model("tiny-llama", HEADS, adapter=SPEC).eval()
    _nudge(model)
    model.save(tmp_path / "bundle", load_tokenizer("tiny-llama"))
    ids, mask = _batch(5)
    for task in ("cls", "xsum"):
        out = merge_task(tmp_path / "bundle", task, tmp_path / f"merged-{task}")
        merged, _, meta = MultiTaskModel.load(out)
        assert not merged.adapter_names and meta["merged_task"] == task and list(merged.head_specs) == [task]
        want, _ = model(task, ids, mask)
        got, _ = merged(task, ids, mask)
        assert torch.allclose(want, got, atol=1e-5), task
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "merged-xsum" / "backbone").eval()  # any HF server's view
    assert torch.allclose(plain(input_ids=ids, attention_mask=mask).logits, model("xsum", ids, mask)[0], atol=1e-5)
    with pytest.raises(PipelineError, match="choose one of: cls, reg, xsum"):
        merge_task(tmp_path / "bundle", "sst2", tmp_path / "nope")


def test_one_shared_adapter_is_the_shared_group_on_an_encoder_with_a_task_decoder():
    heads = [Head("cls", "classification", 2), Head("xsum", "summarization", 0)]
    model = build_model("tiny-bert", heads, adapter={**SPEC, "per_task": False, "target_modules": ["query", "value"]})
    assert model.adapter_names == [SHARED]
    shared = model.shared_parameters()
    assert shared and all(".lora_" in n and ".shared." in n for n, _ in shared)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any(n.startswith("decoders.xsum.") for n in trainable)  # the task decoder is the task's module: it trains
    assert not any(n.startswith("backbone.") and not is_adapter_parameter(n) for n in trainable)


def test_unknown_target_modules_name_the_models_own_layers():
    with pytest.raises(PipelineError) as info:
        check_targets("tiny-llama", ["q_proj", "qkv"])
    text = str(info.value)
    assert text.startswith("model.adapter.target_modules: ['qkv'] name no module of tiny-llama")
    assert "q_proj" in text and "gate_proj" in text and "all-linear" in text
    check_targets("tiny-llama", ["q_proj", "v_proj"])  # fine: nothing raised
    check_targets("tiny-bert", "all-linear")


def test_gradient_weighting_on_per_task_adapters_compares_the_heads_input():
    """Per-task adapters share no trainable parameter, so gradcos compares the tasks' gradients with respect
    to the heads' common input: the pooled features for a head, the hidden states entering the LM head for
    summarization. Checked against torch.autograd.grad of the same loss; micro-batches add up."""
    import torch.nn.functional as F
    base = ["name=x", "model.name=tiny-llama", "tasks={rotten_tomatoes: {}}", "model.adapter={r: 4}"]
    assert load_config(None, [*base, "train.weighting=gradcos"]).model.adapter.per_task  # accepted at load time
    with pytest.raises(PipelineError, match=r"model\.adapter\.rank"):
        load_config(None, [*base, "model.adapter.rank=4"])

    model = build_model("tiny-llama", HEADS, adapter=SPEC)
    _nudge(model)
    model.eval()  # no dropout: the two computations see the same function
    model.watch_heads_input()
    ids, mask = _batch()
    labels = torch.tensor([0, 1, 1])
    _, loss = model("cls", ids, mask, labels=labels)
    loss.backward()
    got, model.feature_grad = model.feature_grad, None
    model._route("cls")
    pooled = model.pooled(ids, mask)
    want = torch.autograd.grad(F.cross_entropy(model.heads["cls"](pooled).float(), labels), pooled)[0].sum(0)
    assert got.shape == (model.backbone.config.hidden_size,) and torch.allclose(got, want, atol=1e-6), (got, want)

    targets = ids.clone()
    targets[:, :3] = -100
    for _ in range(2):  # two micro-batches of one step: their gradients add up
        _, loss = model("xsum", ids, mask, labels=targets)
        loss.backward()
    got, model.feature_grad = model.feature_grad, None
    model._route("xsum")
    hidden = model.backbone.base_model(input_ids=ids, attention_mask=mask).last_hidden_state
    logits = model.backbone.get_output_embeddings()(hidden).float()
    lm_loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), targets[:, 1:].reshape(-1), ignore_index=-100)
    want = 2 * torch.autograd.grad(lm_loss, hidden)[0].reshape(-1, hidden.size(-1)).sum(0)
    assert torch.allclose(got, want, atol=1e-6), (got, want)
    model.feature_grad = None  # (the reference's own pass through the LM head was watched too)
    with torch.no_grad():  # evaluation keeps nothing
        model("cls", ids, mask)
        model("xsum", ids, mask, labels=targets)
    assert model.feature_grad is None


def test_weighting_registry_agrees_with_the_methods():
    from pipeline.config import WEIGHTING_NEEDS_GRADS, WEIGHTING_OPTIONS
    from pipeline.train.weighting import make_weighting
    for method in WEIGHTING_OPTIONS:
        assert make_weighting(method, ["a", "b"], {"a": 1.0, "b": 1.0}).needs_grads == WEIGHTING_NEEDS_GRADS.get(method, False)
