"""LoRA adapters as PEFT folders: `adapter_config.json` + `adapter_model.safetensors`.

The layout is the one `peft` (0.x) writes and `PeftModel.from_pretrained` reads:

    adapter_config.json         peft_type "LORA", task_type ("CAUSAL_LM" | "SEQ_CLS"), r,
                                lora_alpha, lora_dropout, target_modules, fan_in_fan_out, ...
    adapter_model.safetensors   base_model.model.<module>.lora_A.weight   [r, in]
                                base_model.model.<module>.lora_B.weight   [out, r]
                                base_model.model.score.weight             [1, D] (SEQ_CLS head)

`<module>` is the Hugging Face module name of an adapted layer (e.g.
`model.layers.0.self_attn.q_proj`, GPT-2 `transformer.h.0.attn.c_attn`), found through the
weight tables of `rlhf_jax.models.hf_weights`. Our `lora_a` [in, r] and `lora_b` [r, out] are
the transposes of PEFT's (torch `nn.Linear` weights are [out, in]); the scale `lora_alpha / r`
is the same. `target_modules` lists each adapted layer's name below its layer index
(`self_attn.q_proj`, `mlp.c_proj`), which PEFT matches as a suffix, so the targets are exact
also where a short name is ambiguous (GPT-2's two `c_proj`).

Only plain LoRA is read: a folder using DoRA, rsLoRA, trained biases or per-layer rank/alpha
patterns is refused with the field named. A reward or value head trained in full is saved as
`score.weight` with `modules_to_save: ["score"]`; PEFT has no place for a head bias (Hugging Face
score heads have none), so a nonzero bias is kept only in the merged model folder.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file, save_file

from rlhf_jax.models.hf_weights import weight_rules
from rlhf_jax.models.lora import LoRAConfig, adapter_layers
from rlhf_jax.models.transformer import CausalLM

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."
_KEY = re.compile(r"^base_model\.model\.(.+)\.(lora_A|lora_B)(?:\.[A-Za-z0-9_]+)?\.weight$")


def _head_of(module) -> str:
    return "lm" if isinstance(module, CausalLM) else "score"


def _task_type(module) -> str:
    return "CAUSAL_LM" if isinstance(module, CausalLM) else "SEQ_CLS"


def module_names(module) -> dict[tuple[str, ...], str]:
    """Our linear-layer module paths -> their Hugging Face module names."""
    names = {}
    for rule in weight_rules(module.config, _head_of(module)):
        if rule.param_path.endswith("/kernel") and rule.hf_name.endswith(".weight"):
            names[tuple(rule.param_path.split("/")[:-1])] = rule.hf_name[: -len(".weight")]
    return names


def _target_suffix(hf_name: str) -> str:
    """The name below the layer index: `model.layers.3.self_attn.q_proj` -> `self_attn.q_proj`."""
    match = re.search(r"\.\d+\.(.+)$", hf_name)
    return match.group(1) if match else hf_name


def _get(tree, path):
    for key in path:
        tree = tree[key]
    return tree


def save_peft_adapter(folder, module, adapters, config: LoRAConfig, *, modules=None,
                      base_model_name_or_path: str | None = None) -> Path:
    """Write `adapters` (our layout, see `rlhf_jax.models.lora`) of `module` as a PEFT folder;
    `modules` may hold a fully trained `score` head. Returns the folder."""
    folder = Path(folder)
    names = module_names(module)
    tensors, targets = {}, set()
    for path in adapter_layers(adapters):
        if path not in names:
            raise ValueError(f"adapted layer {'/'.join(path)} has no Hugging Face name for {type(module).__name__}")
        node = _get(adapters, path)
        hf_name = names[path]
        tensors[f"{PREFIX}{hf_name}.lora_A.weight"] = np.ascontiguousarray(np.asarray(node["lora_a"], np.float32).T)
        tensors[f"{PREFIX}{hf_name}.lora_B.weight"] = np.ascontiguousarray(np.asarray(node["lora_b"], np.float32).T)
        targets.add(_target_suffix(hf_name))
    modules_to_save = None
    for name, subtree in (modules or {}).items():
        if name != "score":
            raise ValueError(f"only a `score` head can be saved with a PEFT adapter, got module {name!r}")
        tensors[f"{PREFIX}score.weight"] = np.ascontiguousarray(np.asarray(subtree["kernel"], np.float32).T)
        modules_to_save = ["score"]
    settings = {
        "peft_type": "LORA",
        "task_type": _task_type(module),
        "base_model_name_or_path": base_model_name_or_path,
        "r": config.rank,
        "lora_alpha": config.alpha,
        "lora_dropout": config.dropout,
        "target_modules": sorted(targets),
        "modules_to_save": modules_to_save,
        "bias": "none",
        "fan_in_fan_out": module.config.model_type == "gpt2",  # GPT-2's Conv1D stores [in, out]
        "init_lora_weights": True,
        "inference_mode": True,
        "use_rslora": False,
        "use_dora": False,
        "rank_pattern": {},
        "alpha_pattern": {},
        "layers_to_transform": None,
        "layers_pattern": None,
    }
    folder.mkdir(parents=True, exist_ok=True)
    (folder / ADAPTER_CONFIG).write_text(json.dumps(settings, indent=2) + "\n")
    save_file(tensors, str(folder / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    return folder


def _read_settings(folder: Path) -> dict:
    path = folder / ADAPTER_CONFIG
    if not path.is_file():
        raise ValueError(f"{folder} is not a PEFT adapter folder: {ADAPTER_CONFIG} is missing")
    try:
        settings = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from None
    if settings.get("peft_type") != "LORA":
        raise ValueError(f"{path}: `peft_type` must be LORA, got {settings.get('peft_type')!r}")
    refused = {"use_dora": False, "use_rslora": False, "bias": "none"}
    for key, plain in refused.items():
        if settings.get(key, plain) != plain:
            raise ValueError(f"{path}: `{key}` = {settings[key]!r} is not supported (plain LoRA needs {plain!r})")
    for key in ("rank_pattern", "alpha_pattern"):
        if settings.get(key):
            raise ValueError(f"{path}: `{key}` (per-layer rank or alpha) is not supported")
    return settings


def load_peft_adapter(folder, module) -> tuple[LoRAConfig, dict, dict]:
    """`(config, adapters, modules)` of a PEFT LoRA folder for `module` (our layout; `modules`
    holds a saved `score` head, else is empty). Raises ValueError naming the file and key
    when the folder does not fit the model."""
    folder = Path(folder)
    settings = _read_settings(folder)
    weights_path = folder / ADAPTER_WEIGHTS
    if not weights_path.is_file():
        raise ValueError(f"{folder}: {ADAPTER_WEIGHTS} is missing")
    tensors = load_file(str(weights_path))
    paths = {hf_name: path for path, hf_name in module_names(module).items()}
    rank = settings.get("r")
    adapters, modules, leaf_names = {}, {}, set()
    for key, value in tensors.items():
        if key == f"{PREFIX}score.weight":
            modules["score"] = {"kernel": np.asarray(value, np.float32).T,
                                "bias": np.zeros((value.shape[0],), np.float32)}
            continue
        match = _KEY.match(key)
        if match is None or match.group(1) not in paths:
            raise ValueError(f"{weights_path}: tensor {key!r} is not a LoRA weight of a {type(module).__name__} "
                             f"layer ({module.config.model_type})")
        path = paths[match.group(1)]
        node = adapters
        for part in path:
            node = node.setdefault(part, {})
        if match.group(2) == "lora_A":
            node["lora_a"] = np.asarray(value, np.float32).T  # [in, r]
        else:
            node["lora_b"] = np.asarray(value, np.float32).T  # [r, out]
        leaf_names.add(path[-1])
    for path in adapter_layers(adapters) + _half_layers(adapters):
        node = _get(adapters, path)
        if set(node) != {"lora_a", "lora_b"}:
            raise ValueError(f"{weights_path}: layer {'/'.join(path)} needs both lora_A and lora_B")
        if node["lora_a"].shape[1] != rank or node["lora_b"].shape[0] != rank:
            raise ValueError(f"{weights_path}: layer {'/'.join(path)} has rank "
                             f"{node['lora_a'].shape[1]}, but {ADAPTER_CONFIG} says r = {rank}")
    if not leaf_names:
        raise ValueError(f"{weights_path}: holds no LoRA weights")
    config = LoRAConfig(rank=rank, alpha=float(settings.get("lora_alpha", 8)),
                        dropout=float(settings.get("lora_dropout", 0.0)), targets=tuple(sorted(leaf_names)))
    return config, adapters, modules


def _half_layers(adapters, prefix=()):
    """Layers holding only `lora_b` (a file missing its lora_A tensors)."""
    found = []
    for name, node in adapters.items():
        if isinstance(node, dict):
            if "lora_b" in node and "lora_a" not in node:
                found.append(prefix + (name,))
            elif "lora_a" not in node:
                found.extend(_half_layers(node, prefix + (name,)))
    return found


__all__ = ["ADAPTER_CONFIG", "ADAPTER_WEIGHTS", "module_names", "save_peft_adapter", "load_peft_adapter"]
