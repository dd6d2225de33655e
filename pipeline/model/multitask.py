"""One shared backbone, one head per task. Knows nothing about ranks, Ray or DeepSpeed.

    model = build_model("minilm-l6", [Head("sst2", "classification", 2), Head("stsb", "regression", 1)])
    logits, loss = model("sst2", input_ids, attention_mask, labels=labels)
    model.save("out/model", tokenizer)             # a folder any plain process can reload:
    model, tokenizer, meta = MultiTaskModel.load("out/model")

Backbones: encoders (BERT family, incl. the packaged MiniLM) pool by the attention-masked mean of the
last hidden states; causal LMs (Llama, GPT-2, Qwen, incl. SmolLM2) by the last non-padding token's
hidden state (inputs are right-padded); encoder-decoders (T5, BART) by the mean of their encoder.
Summarization tasks: a causal LM uses its own LM head; an encoder gets a task decoder with
cross-attention, initialised from the encoder's weights (BERT2BERT); an encoder-decoder uses its
own decoder.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable

import torch
import torch.nn.functional as F
from torch import nn

FORMAT_VERSION = 2
ENCODER_TYPES = {"bert", "roberta", "distilbert", "xlm-roberta", "electra", "deberta", "deberta-v2", "mpnet",
                 "albert", "camembert"}


MODEL_META = "mtl_model.json"  # beside the weights of every model folder: tasks, tokenizer, how dev predictions were made


@dataclass(frozen=True)
class Head:
    task: str
    kind: str  # classification | regression | summarization
    num_labels: int  # classes; 1 for regression, 0 for summarization


def backbone_kind(config) -> str:
    if config.model_type in ENCODER_TYPES:
        return "encoder"
    if getattr(config, "is_encoder_decoder", False):
        return "seq2seq"
    return "causal"


def _load_backbone(kind: str, source: str | Path | Any, dtype=None):
    """`source` is a folder, or a config for random initialisation."""
    from transformers import AutoModel, AutoModelForCausalLM, AutoModelForSeq2SeqLM, PretrainedConfig
    auto = {"encoder": AutoModel, "causal": AutoModelForCausalLM, "seq2seq": AutoModelForSeq2SeqLM}[kind]
    extra = {"add_pooling_layer": False} if kind == "encoder" else {}  # the pooler would be an unused head
    if isinstance(source, PretrainedConfig):
        return auto.from_config(source, **extra)
    return auto.from_pretrained(source, dtype=dtype, **extra)


def task_decoder(encoder_config, encoder: nn.Module | None = None) -> nn.Module:
    """A decoder with cross-attention shaped like the encoder (BERT2BERT), initialised from the
    encoder's weights when given (the cross-attention starts fresh)."""
    import copy

    from transformers import AutoModelForCausalLM
    config = copy.deepcopy(encoder_config)
    config.is_decoder, config.add_cross_attention, config.tie_word_embeddings = True, True, True
    decoder = AutoModelForCausalLM.from_config(config)
    if encoder is not None:
        decoder.base_model.load_state_dict(encoder.state_dict(), strict=False)
    return decoder


class MultiTaskModel(nn.Module):
    def __init__(self, backbone: nn.Module, heads: Iterable[Head], dropout: float = 0.1,
                 decoder_start_token_id: int | None = None, init_decoders: bool = True):
        super().__init__()
        self.backbone = backbone
        self.kind = backbone_kind(backbone.config)
        self.head_specs = {h.task: h for h in heads}
        generative = [h.task for h in self.head_specs.values() if h.kind == "summarization"]
        if generative and self.kind == "encoder" and decoder_start_token_id is None:
            raise ValueError("an encoder backbone with summarization tasks needs decoder_start_token_id")
        self.decoder_start_token_id = decoder_start_token_id
        hidden = backbone.config.hidden_size
        # Summarization: causal LMs and encoder-decoders use their own LM head/decoder; an encoder
        # gets one decoder per summarization task.
        self.heads = nn.ModuleDict({h.task: nn.Sequential(nn.Dropout(dropout), nn.Linear(hidden, h.num_labels))
                                    for h in self.head_specs.values() if h.kind != "summarization"})
        self.decoders = nn.ModuleDict({t: task_decoder(backbone.config, backbone if init_decoders else None)
                                       for t in generative} if self.kind == "encoder" else {})
        self.adapter: dict[str, Any] | None = None  # model.adapter as a dict, once adapters are attached
        self.adapter_names: list[str] = []
        self.base_name: str | None = None  # the model reference the frozen backbone comes from
        self.feature_grad: torch.Tensor | None = None  # see watch_heads_input
        self._watching = False

    def add_adapters(self, spec: dict[str, Any], base_name: str) -> None:
        """LoRA adapters on the backbone (pipeline/model/adapters.py), which is frozen from here on."""
        from pipeline.model.adapters import attach
        self.adapter_names = attach(self.backbone, spec, self.head_specs)
        self.adapter, self.base_name = dict(spec), base_name

    def _route(self, task: str) -> None:
        """Per-task adapters: the task's own adapter carries its forward pass."""
        if len(self.adapter_names) > 1:
            from pipeline.model.adapters import activate
            activate(self.backbone, task)

    def watch_heads_input(self) -> None:
        """For gradient-based loss weighting when no trainable parameter is shared (per-task adapters on a
        frozen backbone): from now on every training forward adds the gradient of its loss with respect to
        the heads' common input, summed over rows and positions, to `feature_grad` (hidden-size long). The
        input is the pooled features for classification and regression heads, the hidden states entering
        the LM head for a causal LM's (or encoder-decoder's) summarization, and the encoder states an
        encoder's task decoder attends to. Whoever reads `feature_grad` resets it to None."""
        self._watching = True
        if self.kind != "encoder" and any(h.kind == "summarization" for h in self.head_specs.values()):
            def before_lm_head(_module, args):
                self._watch(args[0])  # returns nothing: the LM head's input is unchanged
            self.backbone.get_output_embeddings().register_forward_pre_hook(before_lm_head)

    def _watch(self, features: torch.Tensor) -> torch.Tensor:
        if self._watching and features.requires_grad:
            def keep(grad: torch.Tensor) -> None:
                summed = grad.detach().float().reshape(-1, grad.size(-1)).sum(0)
                self.feature_grad = summed if self.feature_grad is None else self.feature_grad + summed
            features.register_hook(keep)
        return features

    def enable_activation_checkpointing(self) -> None:
        """Recompute the backbone's (and task decoders') layer activations during backward instead of
        keeping them: transformers' activation checkpointing, non-reentrant (works with sharded parameters)."""
        kwargs = {"use_reentrant": False}
        for module in [self.backbone, *self.decoders.values()]:
            module.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)

    def pooled(self, input_ids, attention_mask, token_type_ids=None) -> torch.Tensor:
        if self.kind in ("encoder", "seq2seq"):
            extra = {"token_type_ids": token_type_ids} if token_type_ids is not None else {}
            encoder = self.backbone if self.kind == "encoder" else self.backbone.get_encoder()
            hidden = encoder(input_ids=input_ids, attention_mask=attention_mask, **extra).last_hidden_state
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
        hidden = self.backbone.base_model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        last = attention_mask.sum(1).long() - 1  # right padding: the last real token
        return hidden[torch.arange(hidden.size(0), device=hidden.device), last]

    def forward(self, task: str, input_ids, attention_mask, token_type_ids=None, labels=None):
        self._route(task)
        if self.head_specs[task].kind == "summarization":  # labels: -100 where there is no target
            if self.kind == "encoder":
                return self._decode(task, input_ids, attention_mask, labels)
            out = self.backbone(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
            return out.logits, out.loss
        logits = self.heads[task](self._watch(self.pooled(input_ids, attention_mask, token_type_ids)))
        if self.head_specs[task].kind == "regression":
            logits = logits.squeeze(-1)
        loss = None
        if labels is not None:
            if self.head_specs[task].kind == "regression":
                loss = F.mse_loss(logits.float(), labels.float())
            else:
                loss = F.cross_entropy(logits.float(), labels.long())
        return logits, loss

    @torch.no_grad()
    def predict(self, task: str, input_ids, attention_mask, token_type_ids=None) -> torch.Tensor:
        """Class indices (classification) or scores (regression)."""
        logits, _ = self(task, input_ids, attention_mask, token_type_ids)
        return logits.argmax(-1) if self.head_specs[task].kind == "classification" else logits.float()

    def _decode(self, task: str, input_ids, attention_mask, labels):
        """Encoder + task decoder; decoder inputs are the labels shifted right behind a start token."""
        memory = self._watch(self.backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state)
        pad = self.backbone.config.pad_token_id or 0
        targets = labels.masked_fill(labels == -100, pad)
        start = torch.full_like(targets[:, :1], self.decoder_start_token_id)
        decoder_ids = torch.cat([start, targets[:, :-1]], dim=1)
        decoder_mask = torch.cat([torch.ones_like(start), (labels[:, :-1] != -100).long()], dim=1)
        logits = self.decoders[task](input_ids=decoder_ids, attention_mask=decoder_mask, encoder_hidden_states=memory,
                                     encoder_attention_mask=attention_mask).logits
        loss = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), labels.reshape(-1), ignore_index=-100)
        return logits, loss

    @torch.no_grad()
    def generate(self, task: str, input_ids, attention_mask, max_new_tokens: int, num_beams: int = 1,
                 synced_gpus: bool = False, eos_token_id: int | None = None, pad_token_id: int | None = None,
                 use_cache: bool = True, **kwargs) -> torch.Tensor:
        """New tokens only, batched, with the KV cache unless `use_cache=False` (causal prompts are
        left-padded). `max_new_tokens`
        is required: it comes from the task's declared summary length. `synced_gpus` keeps every rank
        stepping until all are done, which sharded (ZeRO-3) parameters need."""
        self._route(task)
        config = self.backbone.config
        common = dict(max_new_tokens=max_new_tokens, num_beams=num_beams, do_sample=False, use_cache=use_cache,
                      synced_gpus=synced_gpus, pad_token_id=config.pad_token_id if pad_token_id is None else pad_token_id,
                      eos_token_id=config.eos_token_id if eos_token_id is None else eos_token_id, **kwargs)
        if self.kind == "causal":
            out = self.backbone.generate(input_ids=input_ids, attention_mask=attention_mask, **common)
            return out[:, input_ids.shape[1]:]
        if self.kind == "seq2seq":
            return self.backbone.generate(input_ids=input_ids, attention_mask=attention_mask, **common)[:, 1:]
        from transformers.cache_utils import DynamicCache, EncoderDecoderCache
        memory = self.backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        start = torch.full((input_ids.size(0), 1), self.decoder_start_token_id, dtype=torch.long, device=input_ids.device)
        out = self.decoders[task].generate(
            input_ids=start, encoder_hidden_states=memory, encoder_attention_mask=attention_mask,
            **({"cache": EncoderDecoderCache(DynamicCache(), DynamicCache())} if use_cache else {}), **common)
        return out[:, 1:]

    def param_groups(self, lr: float, weight_decay: float, head_lr_mult: dict[str, float]) -> list[dict]:
        """Backbone and task decoders with and without weight decay (no decay on biases and norms), one
        group per head with its learning-rate multiplier. Every trainable parameter is in exactly one group
        (with adapters, the backbone's group holds only the adapters)."""
        def split(module: nn.Module, name: str) -> list[dict]:
            decay, no_decay, seen = [], [], set()
            for pname, p in module.named_parameters():  # tied weights appear once; frozen ones not at all
                if id(p) not in seen and p.requires_grad:
                    seen.add(id(p))
                    (no_decay if p.ndim < 2 or "norm" in pname.lower() else decay).append(p)
            return [{"params": decay, "weight_decay": weight_decay, "lr": lr, "name": name},
                    {"params": no_decay, "weight_decay": 0.0, "lr": lr, "name": f"{name}_no_decay"}]

        groups = split(self.backbone, "backbone")
        for task, decoder in self.decoders.items():  # initialised from the backbone: the backbone's rate
            groups += split(decoder, f"decoder/{task}")
        for task, head in self.heads.items():
            groups.append({"params": list(head.parameters()), "weight_decay": weight_decay,
                           "lr": lr * head_lr_mult.get(task, 1.0), "name": f"head/{task}"})
        return [g for g in groups if g["params"]]

    def shared_parameters(self, prefix: str | None = None) -> list[tuple[str, nn.Parameter]]:
        """The declared shared parameter group, as (name, parameter): every trainable parameter whose name
        starts with `prefix` (e.g. "backbone.encoder.layer.5."), by default the backbone's last block, or
        with one shared adapter that adapter. Gradient-based loss weighting compares the tasks' gradients on it
        (with per-task adapters, which share no parameter, it compares them on the heads' input instead:
        watch_heads_input)."""
        if prefix is None and self.adapter_names:
            from pipeline.model.adapters import SHARED, is_adapter_parameter
            if self.adapter_names != [SHARED]:
                raise ValueError("per-task adapters on a frozen backbone share no trainable parameter: "
                                 "compare gradients on the heads' input (watch_heads_input), use one shared "
                                 "adapter (model.adapter.per_task=false) or name a shared group")
            return [(n, p) for n, p in self.named_parameters() if is_adapter_parameter(n)]
        prefix = prefix or self.last_block_prefix()
        named = [(n, p) for n, p in self.named_parameters() if n.startswith(prefix) and p.requires_grad]
        if not named:
            raise ValueError(f"no parameter name starts with {prefix!r}: use a prefix such as "
                             f"{self.last_block_prefix()!r} (the backbone's last block)")
        return named

    def last_block_prefix(self) -> str:
        """Name prefix of the last transformer block every task runs through: of the encoder for
        encoders and encoder-decoders, of the decoder stack for causal LMs. Found generically as the
        last entry of the longest list of same-type modules (BERT `encoder.layer`, Llama `model.layers`,
        GPT-2 `transformer.h`, T5 `encoder.block`, BART `model.encoder.layers`)."""
        trunk = self.backbone.get_encoder() if self.kind == "seq2seq" else self.backbone.base_model
        stacks = [(name, m) for name, m in trunk.named_modules()
                  if isinstance(m, nn.ModuleList) and len(m) and len({type(block) for block in m}) == 1]
        if not stacks:
            raise ValueError(f"no stack of transformer blocks found in {type(trunk).__name__}: "
                             "declare the shared group with a parameter-name prefix")
        name, blocks = max(stacks, key=lambda item: len(item[1]))  # the first of the longest
        trunk_name = next(n for n, m in self.named_modules() if m is trunk)
        return f"{trunk_name}.{name}.{len(blocks) - 1}."

    # -- a folder any plain process can reload ------------------------------------------------------
    def save(self, folder: str | Path, tokenizer, state_dict: dict[str, torch.Tensor] | None = None,
             metadata: dict[str, Any] | None = None) -> Path:
        """Write backbone (safetensors), heads, tokenizer and `mtl_model.json`. `state_dict` lets a
        caller pass weights gathered from elsewhere (e.g. from sharded training)."""
        from safetensors.torch import save_file
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        state = state_dict if state_dict is not None else self.state_dict()
        backbone_sd = {k.removeprefix("backbone."): v for k, v in state.items() if k.startswith("backbone.")}
        # Heads and task decoders, by full name; clones break the decoders' tied embeddings for safetensors.
        heads_sd = {k: v.contiguous().clone() for k, v in state.items() if k.startswith(("heads.", "decoders."))}
        extra: dict[str, Any] = {}
        if self.adapter is not None:  # a bundle: the base by reference, the adapters in PEFT's format
            from pipeline.model.adapters import describe, save_adapters
            sizes = save_adapters(self.backbone, backbone_sd, folder / "adapters", self.adapter, self.base_name,
                                  self.adapter_names)
            extra = {"adapter": self.adapter, "base": self.base_name, "adapter_bytes": sizes,
                     "base_sha256": base_digest(backbone_sd), **describe(self.backbone, self.adapter_names)}
        else:
            self.backbone.save_pretrained(folder / "backbone", state_dict=backbone_sd)
        save_file(heads_sd, str(folder / "heads.safetensors"))
        tokenizer.save_pretrained(folder / "tokenizer")
        meta = {"format_version": FORMAT_VERSION, "backbone_kind": self.kind,
                "decoder_start_token_id": self.decoder_start_token_id,
                "heads": [asdict(h) for h in self.head_specs.values()], **extra, **(metadata or {})}
        (folder / MODEL_META).write_text(json.dumps(meta, indent=2, default=str))
        return folder

    @classmethod
    def load(cls, folder: str | Path, dtype=None):
        from safetensors.torch import load_file
        from transformers import AutoConfig, AutoTokenizer
        folder = Path(folder)
        meta = json.loads((folder / MODEL_META).read_text())
        heads = [Head(**h) for h in meta["heads"]]
        if meta.get("adapter"):  # a bundle: the base from its reference, then the adapters
            from pipeline.model.adapters import load_adapters
            model = cls(base_backbone(meta["base"], dtype), heads, decoder_start_token_id=meta.get("decoder_start_token_id"),
                        init_decoders=False)
            model.add_adapters(meta["adapter"], meta["base"])
            load_adapters(model.backbone, folder / "adapters", model.adapter_names)
        else:
            kind = backbone_kind(AutoConfig.from_pretrained(folder / "backbone"))
            model = cls(_load_backbone(kind, folder / "backbone", dtype), heads,
                        decoder_start_token_id=meta.get("decoder_start_token_id"), init_decoders=False)
        saved = load_file(str(folder / "heads.safetensors"))
        expected = {k for k in model.state_dict() if k.startswith(("heads.", "decoders."))}
        if set(saved) != expected:
            raise ValueError(f"{folder}: heads.safetensors holds {sorted(set(saved) ^ expected)[:5]} unexpectedly")
        model.load_state_dict(saved, strict=False)
        return model.eval(), AutoTokenizer.from_pretrained(folder / "tokenizer"), meta


def base_digest(backbone_state: dict[str, torch.Tensor]) -> str:
    """SHA-256 of a backbone's weights without its adapters, by plain parameter name: a frozen base that
    was never touched gives the digest of the model its reference names."""
    import hashlib
    from pipeline.model.adapters import is_adapter_parameter
    digest = hashlib.sha256()
    for key in sorted(k for k in backbone_state if not is_adapter_parameter(k)):
        digest.update(key.replace(".base_layer.", ".").encode())
        digest.update(backbone_state[key].detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def base_backbone(model_name: str, dtype=None, *, fixed_init: bool = True) -> nn.Module:
    """The backbone a model reference names. A test config (`tiny-*`) has no pretrained weights: with
    `fixed_init` its random weights come from a fixed seed, so a frozen tiny base is the same in every
    process (as a pretrained one is), whatever the caller's RNG state."""
    from transformers import AutoConfig

    from pipeline.model.refs import resolve_model
    ref = resolve_model(model_name)
    if ref.source != "tiny":
        return _load_backbone(backbone_kind(AutoConfig.from_pretrained(ref.path)), ref.path, dtype)
    config = AutoConfig.for_model(**ref.config)
    if not fixed_init:
        return _load_backbone(backbone_kind(config), config)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return _load_backbone(backbone_kind(config), config)


def build_model(model_name: str, heads: Iterable[Head], dropout: float = 0.1,
                adapter: dict[str, Any] | None = None) -> MultiTaskModel:
    """A backbone from a model reference (see refs.py) with fresh heads; with `adapter` (model.adapter as
    a dict) the backbone is frozen and carries LoRA adapters."""
    from pipeline.model.refs import load_tokenizer
    backbone = base_backbone(model_name, fixed_init=adapter is not None)
    tok = load_tokenizer(model_name)
    start = tok.cls_token_id if tok.cls_token_id is not None else tok.bos_token_id
    model = MultiTaskModel(backbone, heads, dropout, decoder_start_token_id=start)
    if adapter is not None:
        model.add_adapters(adapter, model_name)
    return model
