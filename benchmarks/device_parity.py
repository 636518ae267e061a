"""Logits parity with transformers + torch on the default jax device, for every model family.

For each `model_type` in `rlhf_jax.models.config.MODEL_TYPES` (so families added later are
picked up without a change here), a tiny random model is built from the family preset
(`ModelConfig.<model_type>(...)` with small sizes; grouped-query attention where the layout
allows it; a sliding window of half the sequence where the family has one), every parameter
redrawn (norm scales 1 + 0.1 N(0, 1), everything else
0.15 N(0, 1), so biases and scales are not at their trivial init values), written with our
`save_pretrained` and read back by `transformers.AutoModelForCausalLM.from_pretrained`.
Both score the same left-padded batch (position ids from the mask, as `generate` uses):

- float32: ours with `jax_default_matmul_precision = "highest"`, torch without TF32; the
  largest |difference| over real tokens must be <= `F32_TOLERANCE` (1e-4).
- bfloat16: both sides load the weights in bfloat16 and compute in it. Two rounding paths
  never agree bit for bit, so the check is against the float32 transformers logits: our
  bfloat16 error must be <= `BF16_ERROR_RATIO` x transformers' own bfloat16 error +
  `BF16_SLACK` x max |logit| (both recorded, with the direct ours-vs-transformers bfloat16
  difference).

    python benchmarks/device_parity.py            # prints one JSON line per family
"""
from __future__ import annotations

import contextlib
import json
import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax.models.checkpoint_io import load_pretrained, save_pretrained
from rlhf_jax.models.config import MODEL_TYPES, ModelConfig
from rlhf_jax.models.transformer import CausalLM

F32_TOLERANCE = 1e-4
BF16_ERROR_RATIO = 2.0
BF16_SLACK = 0.01
SIZES = dict(vocab_size=256, hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128,
             max_position_embeddings=128, bos_token_id=1, eos_token_id=2, pad_token_id=0)


def family_config(model_type: str, window: int | None = None, **sizes) -> ModelConfig:
    """A small config from the family preset `ModelConfig.<model_type>`; grouped-query
    attention (2 key/value heads) unless the layout fuses q/k/v (GPT-2); an explicit
    `head_dim` of the preset is replaced by hidden / heads; a preset's sliding window becomes
    `window` tokens (shorter than the batch, so the window matters)."""
    preset = getattr(ModelConfig, model_type, None)
    if preset is None:
        raise LookupError(f"ModelConfig has no preset for model_type {model_type!r}")
    sizes = {**SIZES, **sizes}
    base = preset()
    if not base.fused_qkv:
        sizes.setdefault("num_kv_heads", sizes["num_heads"] // 2)
    if base.head_dim is not None:
        sizes.setdefault("head_dim", sizes["hidden_size"] // sizes["num_heads"])
    if window is not None and getattr(base, "sliding_window", None) is not None:
        sizes.setdefault("sliding_window", window)
    return preset(**sizes)


def random_params(module: CausalLM, seed: int, std: float = 0.15):
    """Fresh parameters of `module` with every leaf redrawn (norm scales around 1)."""
    params = module.init(jax.random.PRNGKey(seed), jnp.zeros((1, 2), jnp.int32))["params"]
    rng = np.random.default_rng(seed)

    def redraw(path, leaf):
        noise = rng.standard_normal(leaf.shape).astype(np.float32)
        is_scale = jax.tree_util.keystr(path).endswith("['scale']")
        return jnp.asarray(1.0 + 0.1 * noise if is_scale else std * noise)

    return jax.tree_util.tree_map_with_path(redraw, params)


def padded_batch(vocab_size: int, batch: int = 3, length: int = 16, pad_id: int = 0, seed: int = 0):
    """Left-padded ids and mask, rows of different lengths (the shortest a third)."""
    rng = np.random.default_rng(seed)
    lengths = np.linspace(length, max(2, length // 3), batch).astype(int)
    mask = (np.arange(length)[None, :] >= length - lengths[:, None]).astype(np.int64)
    ids = np.where(mask == 1, rng.integers(3, vocab_size, (batch, length)), pad_id)
    return ids, mask


@contextlib.contextmanager
def highest_matmul_precision():
    """`jax_default_matmul_precision = "highest"` (full float32 matmuls on GPUs and TPUs, no
    TF32 / bfloat16 passes) inside the block, the previous value after it."""
    previous = jax.config.jax_default_matmul_precision
    jax.config.update("jax_default_matmul_precision", "highest")
    try:
        yield
    finally:
        jax.config.update("jax_default_matmul_precision", previous)


def _torch_logits(model, ids, mask, device):
    import torch

    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    with torch.no_grad():
        out = model(input_ids=torch.tensor(ids, device=device), attention_mask=torch.tensor(mask, device=device),
                    position_ids=torch.tensor(positions, device=device))
    return out.logits.float().cpu().numpy()


def _ours_logits(folder, ids, mask, dtype: str):
    module, params = load_pretrained(folder, dtype=dtype, param_dtype=dtype)
    logits = jax.jit(module.apply)({"params": params}, jnp.asarray(ids, jnp.int32), jnp.asarray(mask, jnp.int32))
    return np.asarray(jax.device_get(logits), np.float32)


def check_family(model_type: str, *, batch: int = 3, length: int = 16, seed: int = 0, **sizes) -> dict:
    """Parity record of one family: max |diff| on real tokens in float32 and bfloat16."""
    import torch
    from transformers import AutoModelForCausalLM

    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    config = family_config(model_type, window=max(2, length // 2), **sizes)
    module = CausalLM(config)
    params = random_params(module, seed)
    ids, mask = padded_batch(config.vocab_size, batch, length, config.pad_token_id or 0, seed)
    real = mask.astype(bool)
    with tempfile.TemporaryDirectory() as folder:
        save_pretrained(folder, module, jax.device_get(params))
        load = lambda dtype: AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(device).eval()
        hf_model = load(torch.float32)
        hf_class = type(hf_model).__name__
        hf32 = _torch_logits(hf_model, ids, mask, device)
        with highest_matmul_precision():
            ours32 = _ours_logits(folder, ids, mask, "float32")
        hf16 = _torch_logits(load(torch.bfloat16), ids, mask, device)
        ours16 = _ours_logits(folder, ids, mask, "bfloat16")
    worst = lambda a, b: float(np.abs(a - b)[real].max())
    scale = float(np.abs(hf32[real]).max())
    f32 = worst(ours32, hf32)
    ours_bf16_error, hf_bf16_error = worst(ours16, hf32), worst(hf16, hf32)
    bf16_bound = BF16_ERROR_RATIO * hf_bf16_error + BF16_SLACK * scale
    return dict(
        model_type=model_type, transformers_class=hf_class, torch_device=device, jax_device=str(jax.devices()[0]),
        max_abs_logit=scale, float32_max_abs_diff=f32, float32_tolerance=F32_TOLERANCE,
        float32_ok=bool(f32 <= F32_TOLERANCE),
        bfloat16_ours_vs_float32=ours_bf16_error, bfloat16_transformers_vs_float32=hf_bf16_error,
        bfloat16_ours_vs_transformers=worst(ours16, hf16), bfloat16_bound=bf16_bound,
        bfloat16_ok=bool(ours_bf16_error <= bf16_bound),
        config=dict(hidden_size=config.hidden_size, num_layers=config.num_layers, num_heads=config.num_heads,
                    num_kv_heads=config.kv_heads, vocab_size=config.vocab_size, batch=batch, length=length,
                    sliding_window=getattr(config, "sliding_window", None)),
    )


def check_all(families=MODEL_TYPES, **kwargs) -> list[dict]:
    """`check_family` for each family; a family that fails records its error instead."""
    out = []
    for family in families:
        try:
            out.append(check_family(family, **kwargs))
        except Exception as err:  # one family's failure must not hide the others
            out.append(dict(model_type=family, error=f"{type(err).__name__}: {err}"))
    return out


if __name__ == "__main__":
    for record in check_all():
        print(json.dumps(record), file=sys.stdout, flush=True)


__all__ = ["F32_TOLERANCE", "BF16_ERROR_RATIO", "BF16_SLACK", "family_config", "random_params",
           "padded_batch", "check_family", "check_all"]
