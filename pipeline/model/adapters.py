"""LoRA adapters on a frozen backbone (peft), one per task or one shared. Knows nothing about ranks or DeepSpeed.

    names = attach(backbone, spec, ["sst2", "xsum"])     # spec: model.adapter as a dict; per task: one each
    activate(backbone, "sst2")                            # the step's task uses its adapter
    save_adapters(backbone, state, folder, spec, base)    # adapters/<name>/ in PEFT's own format
    load_adapters(backbone, folder, names)

The bundle's adapters are plain PEFT folders (adapter_config.json + adapter_model.safetensors), so
`PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), "adapters/<task>")` reads one too.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Iterable

import torch
from torch import nn

SHARED = "shared"  # the adapter's name when one LoRA serves every task
PEFT_PREFIX = "base_model.model."  # how PeftModel.save_pretrained names the wrapped model's weights


def adapter_names(spec: dict[str, Any], tasks: Iterable[str]) -> list[str]:
    return list(tasks) if spec.get("per_task", True) else [SHARED]


def lora_config(spec: dict[str, Any], base: str | None = None):
    from peft import LoraConfig
    targets = spec.get("target_modules", "all-linear")
    return LoraConfig(r=spec.get("r", 8), lora_alpha=spec.get("alpha", 16.0), lora_dropout=spec.get("dropout", 0.05),
                      target_modules=targets if isinstance(targets, str) else list(targets),
                      base_model_name_or_path=base)


def linear_module_names(backbone: nn.Module) -> list[str]:
    """The last name part of every linear layer: what `target_modules` can name."""
    return sorted({name.rsplit(".", 1)[-1] for name, m in backbone.named_modules()
                   if isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D"})


def unknown_targets(backbone: nn.Module, targets: list[str] | str) -> list[str]:
    if isinstance(targets, str):
        return []
    names = {name for name, _ in backbone.named_modules()}
    return [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]


def attach(backbone: nn.Module, spec: dict[str, Any], tasks: Iterable[str]) -> list[str]:
    """Inject the adapters in place and freeze everything of the backbone that is not an adapter."""
    from peft import inject_adapter_in_model
    names = adapter_names(spec, tasks)
    missing = unknown_targets(backbone, spec.get("target_modules", "all-linear"))
    if missing:
        raise ValueError(f"target_modules {missing} name no module of {type(backbone).__name__}; its linear layers "
                         f"are {linear_module_names(backbone)}")
    for name in names:
        with warnings.catch_warnings():  # "multiple adapters in the model": per-task adapters are exactly that
            warnings.filterwarnings("ignore", message="Already found a `peft_config`")
            inject_adapter_in_model(lora_config(spec), backbone, adapter_name=name)
    for pname, p in backbone.named_parameters():
        p.requires_grad = is_adapter_parameter(pname)
    activate(backbone, names[0])
    return names


def is_adapter_parameter(name: str) -> bool:
    return ".lora_" in name or name.startswith("lora_")


def lora_layers(backbone: nn.Module) -> list[nn.Module]:
    from peft.tuners.tuners_utils import BaseTunerLayer
    return [m for m in backbone.modules() if isinstance(m, BaseTunerLayer)]


def activate(backbone: nn.Module, name: str) -> None:
    """Route the backbone through adapter `name`. peft's set_adapter also freezes the other adapters;
    they stay trainable here (a step simply gives them no gradient, like the other tasks' heads), since
    a DeepSpeed engine fixes its trainable parameters when it starts."""
    for layer in lora_layers(backbone):
        if layer.active_adapters != [name]:
            layer.set_adapter(name)
            for pname, p in layer.named_parameters():
                if is_adapter_parameter(pname):
                    p.requires_grad = True


def adapter_state(backbone: nn.Module, state: dict[str, torch.Tensor], name: str) -> dict[str, torch.Tensor]:
    """Adapter `name`'s weights out of the backbone's state dict, named as PEFT saves them."""
    from peft import get_peft_model_state_dict
    own = get_peft_model_state_dict(backbone, state_dict=state, adapter_name=name)
    return {PEFT_PREFIX + k: v.detach().cpu().contiguous() for k, v in own.items()}


def save_adapters(backbone: nn.Module, state: dict[str, torch.Tensor], folder: Path, spec: dict[str, Any],
                  base: str, names: list[str]) -> dict[str, int]:
    """`folder/<name>/` per adapter, in PEFT's format; the bytes written per adapter."""
    from safetensors.torch import save_file
    sizes = {}
    for name in names:
        out = Path(folder) / name
        out.mkdir(parents=True, exist_ok=True)
        lora_config(spec, base).save_pretrained(str(out))
        save_file(adapter_state(backbone, state, name), str(out / "adapter_model.safetensors"))
        sizes[name] = sum(f.stat().st_size for f in out.iterdir())
    return sizes


def load_adapters(backbone: nn.Module, folder: Path, names: list[str]) -> None:
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file
    for name in names:
        saved = load_file(str(Path(folder) / name / "adapter_model.safetensors"))
        result = set_peft_model_state_dict(backbone, {k.removeprefix(PEFT_PREFIX): v for k, v in saved.items()},
                                           adapter_name=name)
        unexpected = getattr(result, "unexpected_keys", [])
        if unexpected:
            raise ValueError(f"{folder}/{name}: weights {unexpected[:3]} do not fit the base model")


def merged_backbone_state(backbone: nn.Module, name: str) -> dict[str, torch.Tensor]:
    """The plain backbone's state dict (no adapter names) with adapter `name` merged into its weights."""
    state = {}
    layers = {id(m) for m in lora_layers(backbone)}
    prefixes = {}
    for mname, module in backbone.named_modules():
        if id(module) in layers:
            prefixes[mname] = module
    for key, value in backbone.state_dict().items():
        if is_adapter_parameter(key):
            continue
        state[key.replace(".base_layer.", ".")] = value.detach().clone()
    for mname, module in prefixes.items():
        if name in module.lora_A:
            key = f"{mname}.weight"
            state[key] = state[key] + module.get_delta_weight(name).to(state[key].dtype)
    return state


def describe(backbone: nn.Module, names: list[str]) -> dict[str, Any]:
    """Trainable adapter parameters per adapter (for version tags and logs)."""
    counts = {n: 0 for n in names}
    for pname, p in backbone.named_parameters():
        if is_adapter_parameter(pname):
            for n in names:
                if f".{n}." in pname:
                    counts[n] += getattr(p, "ds_numel", p.numel())
    return {"adapters": names, "adapter_params": counts}


def check_targets(model_name: str, targets: list[str] | str) -> None:
    """Before any training: every name in `targets` must match a module of the model (built on the meta
    device: no weights are loaded or allocated). PipelineError naming the model's own linear layers."""
    if isinstance(targets, str):
        return
    from transformers import AutoConfig

    from pipeline.errors import PipelineError
    from pipeline.model.multitask import _load_backbone, backbone_kind
    from pipeline.model.refs import resolve_model
    ref = resolve_model(model_name, weights=False, where="model.name")  # a hub model: its config files only
    if ref.source != "tiny" and not (ref.tokenizer_path / "config.json").is_file():
        ref = resolve_model(model_name, where="model.name")  # a packaged GGUF: converted once (training needs it)
    folder = ref.path or ref.tokenizer_path
    config = AutoConfig.for_model(**ref.config) if ref.source == "tiny" else AutoConfig.from_pretrained(folder)
    with torch.device("meta"):
        backbone = _load_backbone(backbone_kind(config), config)
    missing = unknown_targets(backbone, targets)
    if missing:
        raise PipelineError.one("model.adapter.target_modules", f"{missing} name no module of {model_name}",
                                f"name some of its linear layers ({', '.join(linear_module_names(backbone))}) "
                                "or use all-linear")
