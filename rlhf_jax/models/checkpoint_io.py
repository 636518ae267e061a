"""Read and write Hugging Face model folders: `config.json` + `*.safetensors`.

    module, params = load_pretrained("path/to/folder")                 # CausalLM or RewardModel
    module, params = load_pretrained(path, head="value", dtype="bfloat16")
    save_pretrained("out/folder", module, params, pad_token_id=0)        # transformers loads it

Sharded checkpoints (`model.safetensors.index.json` + shards) are read and, with
`max_shard_size`, written. Tokenizer files in the folder are left untouched; load them with
`transformers.AutoTokenizer.from_pretrained(folder)`.
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import safetensors.numpy

from rlhf_jax.models.config import ATTENTION_IMPLS, ModelConfig
from rlhf_jax.models.errors import ModelError
from rlhf_jax.models.heads import RewardModel, ScalarHead, ValueModel, reward_head_std
from rlhf_jax.models.hf_weights import hf_to_params, params_to_hf
from rlhf_jax.models.lora import LoRAModel
from rlhf_jax.models.transformer import CausalLM
from rlhf_jax.ops.checks import check_in

HEADS = ("lm", "value", "reward")
_MODULES = {"lm": CausalLM, "value": ValueModel, "reward": RewardModel}
_ARCHITECTURES = {  # (causal LM, sequence classification) class names per model_type
    "gpt2": ("GPT2LMHeadModel", "GPT2ForSequenceClassification"),
    "llama": ("LlamaForCausalLM", "LlamaForSequenceClassification"),
    "qwen2": ("Qwen2ForCausalLM", "Qwen2ForSequenceClassification"),
    "qwen3": ("Qwen3ForCausalLM", "Qwen3ForSequenceClassification"),
    "mistral": ("MistralForCausalLM", "MistralForSequenceClassification"),
    "gemma2": ("Gemma2ForCausalLM", "Gemma2ForSequenceClassification"),
    "gemma3_text": ("Gemma3ForCausalLM", "Gemma3TextForSequenceClassification"),
}
_SAFETENSORS_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
    "BOOL": np.bool_,
}
_WEIGHT_FILES = re.compile(r"^model(-\d{5}-of-\d{5})?\.safetensors$|^model\.safetensors\.index\.json$")


def read_safetensors(path: Path) -> dict[str, np.ndarray]:
    """All tensors of one `.safetensors` file as NumPy arrays (bfloat16 via ml_dtypes).

    Layout: an 8-byte little-endian header length, a JSON header `{name: {dtype, shape,
    data_offsets: [start, end]}}`, then the data bytes. A file that does not follow it, or is
    shorter than its header says (a truncated copy), is a ModelError naming the file.
    """
    path = Path(path)
    folder, name = path.parent, path.name
    data = path.read_bytes()
    header_size = int.from_bytes(data[:8], "little")
    if len(data) < 8 or header_size > len(data) - 8:
        raise ModelError(folder, f"{name}: not a safetensors file, or truncated ({len(data)} bytes, "
                                 f"the header alone claims {header_size})")
    try:
        header = json.loads(data[8 : 8 + header_size])
        if not isinstance(header, dict):
            raise ValueError(f"the header is a {type(header).__name__}, not an object")
    except (ValueError, UnicodeDecodeError) as err:
        raise ModelError(folder, f"{name}: not a safetensors file ({err})") from None
    body = memoryview(data)[8 + header_size :]
    tensors = {}
    for key, info in header.items():
        if key == "__metadata__":
            continue
        try:
            dtype_name, shape, (start, end) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise ModelError(folder, f"{name}: tensor {key!r} has a malformed header entry {info!r}") from None
        if dtype_name not in _SAFETENSORS_DTYPES:
            raise ModelError(folder, f"{name}: tensor {key!r} has unsupported dtype {dtype_name}")
        dtype = np.dtype(_SAFETENSORS_DTYPES[dtype_name])
        if end > len(body):
            raise ModelError(folder, f"{name}: truncated: tensor {key!r} ends at data byte {end} but "
                                     f"the file holds {len(body)} data bytes")
        if not 0 <= start <= end or end - start != math.prod(shape) * dtype.itemsize:
            raise ModelError(folder, f"{name}: tensor {key!r} spans bytes {start}..{end}, which does "
                                     f"not fit its shape {shape} of {dtype_name}")
        tensors[key] = np.frombuffer(body[start:end], dtype=dtype).reshape(shape)
    return tensors


def _weight_files_found(folder: Path) -> str:
    others = sorted(p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack"))
    return f"; found {', '.join(others)}: convert them to safetensors first" if others else ""


def read_checkpoint_tensors(folder: Path) -> dict[str, np.ndarray]:
    """Tensors of a folder: the index's shards, else model.safetensors, else every *.safetensors."""
    folder = Path(folder)
    index_file = folder / "model.safetensors.index.json"
    if index_file.exists():
        try:
            weight_map = json.loads(index_file.read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            raise ModelError(folder, f"{index_file.name}: not a safetensors index ({err!r})") from None
    elif (folder / "model.safetensors").exists():
        files = ["model.safetensors"]
    else:
        files = sorted(p.name for p in folder.glob("*.safetensors"))
    if not files:
        raise ModelError(folder, "no *.safetensors weights (other weight formats are not read)"
                         + _weight_files_found(folder))
    tensors: dict[str, np.ndarray] = {}
    for name in files:
        if not (folder / name).exists():
            raise ModelError(folder, f"{index_file.name}: shard {name!r} listed in the index is missing")
        for key, value in read_safetensors(folder / name).items():
            if key in tensors:
                raise ModelError(folder, f"tensor {key!r} appears in more than one shard")
            tensors[key] = value
    return tensors


ADAPTER_FOLDER = "a PEFT adapter folder, not a model folder"


def is_adapter_folder(folder) -> bool:
    """Whether `folder` holds a PEFT adapter (`adapter_config.json`) and no model (`config.json`)."""
    folder = Path(folder)
    return (folder / "adapter_config.json").is_file() and not (folder / "config.json").is_file()


def _adapter_folder_error(folder: Path) -> ModelError:
    try:
        base = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8")).get("base_model_name_or_path")
    except (ValueError, OSError, AttributeError):
        base = None
    base = f" ({base})" if isinstance(base, str) and base else ""
    return ModelError(folder, f"{ADAPTER_FOLDER}: load its base model{base} with `load_pretrained`, then the "
                              "adapter with `rlhf_jax.models.peft_io.load_peft_adapter(folder, module)`; or give "
                              "the merged model folder (a LoRA run exports it next to `adapter/`, in `model/`)")


def read_hf_config(folder: Path) -> dict[str, Any]:
    folder = Path(folder)
    if not folder.is_dir():
        raise ModelError(folder, "no such model folder")
    config_file = folder / "config.json"
    if is_adapter_folder(folder):
        raise _adapter_folder_error(folder)
    if not config_file.exists():
        raise ModelError(folder, "no config.json (is this a Hugging Face model folder?)")
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ModelError(folder, f"config.json: invalid JSON ({err})") from None
    if not isinstance(config, dict):
        raise ModelError(folder, f"config.json: expected a JSON object, got {type(config).__name__}")
    return config


def _default_head(hf_config: dict) -> str:
    architectures = hf_config.get("architectures") or []
    is_classifier = any(name.endswith("ForSequenceClassification") for name in architectures)
    return "reward" if is_classifier else "lm"


def load_pretrained(path, *, head: str | None = None, dtype: str | None = None,
                    param_dtype: str = "float32", remat: bool = False, rng=None, attention_impl: str = "auto",
                    fresh_head: bool = True):
    """Load a Hugging Face folder as `(module, params)`.

    head: "lm" -> CausalLM; "reward" -> RewardModel (the checkpoint's `score` head when it
    has one, as `*ForSequenceClassification` checkpoints do, else a fresh N(0, 1/(D+1))
    head from `rng`); "value" -> ValueModel with a zero head; None -> "reward" when
    config.json names a `*ForSequenceClassification` architecture, else "lm".
    fresh_head: with False, a "reward" head the checkpoint does not hold is a ModelError (a
      reward model must bring its trained head) instead of a fresh one.
    dtype: compute dtype (default float32); params are stored in `param_dtype`.
    attention_impl: `ModelConfig.attention_impl` ("auto", "plain" or "blockwise").
    Raises `ModelError` (a ValueError) naming the folder and the file or tensor at fault when
    the folder is missing, unreadable, truncated or does not fit its config.
    """
    folder = Path(path)
    if head is not None and head not in HEADS:
        raise ValueError(f"`head` must be one of {list(HEADS)} or None, got {head!r}")
    check_in(attention_impl, ATTENTION_IMPLS, "attention_impl")
    try:
        hf_config = read_hf_config(folder)
        head = _default_head(hf_config) if head is None else head
        fields: dict[str, Any] = {"param_dtype": param_dtype, "remat": remat, "attention_impl": attention_impl}
        if dtype is not None:
            fields["dtype"] = dtype
        try:
            config = ModelConfig.from_hf_config(hf_config, **fields)
        except (KeyError, TypeError) as err:
            raise ModelError(folder, f"config.json: missing or invalid field {err}") from None
        except ValueError as err:
            message = re.sub(r"^config\.json:? ", "", str(err))
            raise ModelError(folder, f"config.json: {message}") from None
        tensors = read_checkpoint_tensors(folder)
    except OSError as err:  # unreadable files (permissions, I/O errors)
        raise ModelError(folder, f"cannot be read ({err})") from None
    module = _MODULES[head](config)

    if head == "reward" and not fresh_head and "score.weight" not in tensors:
        kind = " / ".join(hf_config.get("architectures") or [hf_config.get("model_type", "model")])
        raise ModelError(folder, f"holds a {kind} checkpoint without a reward head (no `score.weight`), "
                                 f"not a reward model; train one with `rlhf-jax reward`")
    table = {"lm": "lm", "value": "none", "reward": "score" if "score.weight" in tensors else "none"}[head]
    rng = jax.random.PRNGKey(0) if rng is None else rng
    shapes = jax.eval_shape(lambda key: module.init(key, jnp.zeros((1, 1), jnp.int32)), rng)["params"]
    shapes = jax.tree.map(lambda leaf: leaf.shape, shapes)
    params = hf_to_params(tensors, config, table, shapes, source=str(folder))
    if head != "lm":
        std = 0.0 if head == "value" else reward_head_std(config.hidden_size)
        fresh = ScalarHead(kernel_std=std).init(rng, jnp.zeros((1, config.hidden_size)))["params"]
        loaded = params.get("score", {})
        params["score"] = {key: loaded.get(key, np.asarray(fresh[key])) for key in ("kernel", "bias")}
    return module, jax.tree.map(jnp.asarray, params)


def _parse_size(size) -> int:
    if isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?B)\s*", str(size).upper())
    if not match:
        raise ValueError(f"`max_shard_size` must be bytes or like '500MB', got {size!r}")
    return int(float(match[1]) * {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9}[match[2]])


def save_pretrained(path, module, params, *, dtype: str = "float32", max_shard_size=None,
                    **config_overrides) -> Path:
    """Write `config.json` + safetensors that `transformers` loads.

    A CausalLM is saved as `*ForCausalLM` (GPT-2: `GPT2LMHeadModel`); a RewardModel or
    ValueModel as `*ForSequenceClassification` with one label. dtype: storage dtype of the
    tensors. max_shard_size (bytes or e.g. "200MB") splits the weights into shards with a
    `model.safetensors.index.json`. `config_overrides` are written into config.json last
    (e.g. `pad_token_id=0`, `eos_token_id=2`). A nonzero score-head bias is written as
    `score.bias`: our loader reads it back; transformers, whose score heads have no bias,
    reports it as unexpected and ignores it. Returns the folder.
    """
    if not isinstance(module, (CausalLM, RewardModel, ValueModel)):
        lora = (" (a LoRAModel: save `module.module` with `merge_adapters(params, module.lora.scale)` or a "
                "train state's `merged_params(state)`, or the adapters alone with `save_peft_adapter`)"
                if isinstance(module, LoRAModel) else "")
        raise ValueError(
            f"`module` must be a CausalLM, RewardModel or ValueModel, got {type(module).__name__}{lora}"
        )
    max_bytes = None if max_shard_size is None else _parse_size(max_shard_size)
    config: ModelConfig = module.config
    is_lm = isinstance(module, CausalLM)
    tensors = params_to_hf(params, config, "lm" if is_lm else "score", jnp.dtype(dtype))

    hf_config = config.to_hf_config()
    hf_config["architectures"] = [_ARCHITECTURES[config.model_type][0 if is_lm else 1]]
    hf_config["torch_dtype"] = hf_config["dtype"] = str(jnp.dtype(dtype))
    if not is_lm:
        hf_config.update(id2label={"0": "LABEL_0"}, label2id={"LABEL_0": 0})
    hf_config.update(config_overrides)

    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.iterdir():  # weights of an earlier save would shadow the new ones
        if _WEIGHT_FILES.match(old.name):
            old.unlink()
    (folder / "config.json").write_text(json.dumps(hf_config, indent=2, sort_keys=True) + "\n")
    shards = _split_shards(tensors, max_bytes)
    metadata = {"format": "pt"}
    if len(shards) == 1:
        safetensors.numpy.save_file(shards[0], folder / "model.safetensors", metadata=metadata)
        return folder
    weight_map = {}
    for number, shard in enumerate(shards, start=1):
        name = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
        safetensors.numpy.save_file(shard, folder / name, metadata=metadata)
        weight_map.update({key: name for key in shard})
    index = {"metadata": {"total_size": sum(t.nbytes for t in tensors.values())}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return folder


def _split_shards(tensors: dict[str, np.ndarray], max_bytes: int | None) -> list[dict[str, np.ndarray]]:
    """Greedy split in name order; a tensor larger than the limit gets a shard of its own."""
    if max_bytes is None:
        return [tensors]
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for name in sorted(tensors):
        nbytes = tensors[name].nbytes
        if shards[-1] and size + nbytes > max_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensors[name]
        size += nbytes
    return shards
