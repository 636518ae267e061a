"""Tiny random Hugging Face models as oracles: GPT-2, Llama with GQA, Qwen2 with QKV bias, and
Qwen3 / Mistral / Gemma 2 / Gemma 3 text with sliding windows shorter than the test sequences.

Each model is built with transformers' own config class, every parameter is redrawn (so
biases and norm scales are not at their trivial init values) and the model is saved with
`save_pretrained` to a session temp folder that the tests load with our `load_pretrained`.
"""
import numpy as np
import torch
from transformers import (
    Gemma2Config, Gemma2ForCausalLM, Gemma3ForCausalLM, Gemma3TextConfig, GPT2Config,
    GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM,
    Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM,
)

VOCAB = 128
PAD_ID = 0
WINDOW = 4  # sliding window of the new families: shorter than every test sequence
HF_LM_CLASSES = {
    "gpt2": GPT2LMHeadModel, "llama": LlamaForCausalLM, "qwen2": Qwen2ForCausalLM,
    "qwen3": Qwen3ForCausalLM, "mistral": MistralForCausalLM, "gemma2": Gemma2ForCausalLM,
    "gemma3_text": Gemma3ForCausalLM,
}
NEW_FAMILIES = ["qwen3", "mistral", "gemma2", "gemma3_text"]


def hf_config(family: str, **changes):
    """Tiny configs: GPT-2 (learned positions, tied); Llama (GQA 4/2, untied, theta 500);
    Qwen2 (GQA 4/2, QKV bias, tied); Qwen3 (head_dim 16 != 32/4, windows on layers 1-2 of 3);
    Mistral (window on both layers); Gemma 2 (3 layers sliding/full/sliding, query scalar 12,
    both soft caps small enough to bite); Gemma 3 text (4 layers with one full, RoPE bases 50
    local / 1000 global with linear scaling on the global layers, final soft cap)."""
    common = dict(vocab_size=VOCAB, pad_token_id=PAD_ID, bos_token_id=1, eos_token_id=2)
    if family == "gpt2":
        return GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=64, resid_pdrop=0.0,
                          embd_pdrop=0.0, attn_pdrop=0.0, **{**common, **changes})
    llama_like = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    if family == "llama":
        return LlamaConfig(**{**llama_like, **common, "rope_theta": 500.0,
                              "tie_word_embeddings": False, **changes})
    if family == "qwen2":
        return Qwen2Config(**{**llama_like, **common, "rope_theta": 20000.0,
                              "tie_word_embeddings": True, **changes})
    if family == "qwen3":
        return Qwen3Config(**{**llama_like, **common, "num_hidden_layers": 3, "head_dim": 16,
                              "use_sliding_window": True, "sliding_window": WINDOW,
                              "max_window_layers": 1, "tie_word_embeddings": False, **changes})
    if family == "mistral":
        return MistralConfig(**{**llama_like, **common, "sliding_window": WINDOW,
                                "rope_theta": 3000.0, **changes})
    gemma_like = dict(head_dim=16, sliding_window=WINDOW, attn_implementation="eager")
    if family == "gemma2":
        return Gemma2Config(**{**llama_like, **common, **gemma_like, "num_hidden_layers": 3,
                               "query_pre_attn_scalar": 12, "attn_logit_softcapping": 2.0,
                               "final_logit_softcapping": 3.0, **changes})
    if family == "gemma3_text":
        rope = {"sliding_attention": {"rope_type": "default", "rope_theta": 50.0},
                "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1000.0}}
        types = ["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"]
        return Gemma3TextConfig(**{**llama_like, **common, **gemma_like, "num_hidden_layers": 4,
                                   "layer_types": types, "rope_parameters": rope,
                                   "query_pre_attn_scalar": 20, "final_logit_softcapping": 4.0,
                                   **changes})
    raise ValueError(family)


def randomize_(model: torch.nn.Module, seed: int, std: float = 0.15) -> torch.nn.Module:
    """Redraw every parameter: norm scales around 1, everything else N(0, std)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            is_norm = "norm" in name or ".ln_" in name
            param.copy_(1.0 + 0.1 * noise if is_norm and name.endswith("weight") else std * noise)
    return model.eval()


def build_hf_model(family: str, folder, seed: int = 0, model_class=None, **changes):
    torch.manual_seed(seed)
    model_class = model_class or HF_LM_CLASSES[family]
    model = randomize_(model_class(hf_config(family, **changes)), seed)
    model.save_pretrained(folder)
    return model




def padded_batch(seed: int, batch: int = 3, time: int = 10, side: str = "left"):
    """Random ids and a mask with rows of different lengths; pads hold PAD_ID."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, VOCAB, size=(batch, time))
    lengths = np.linspace(time, max(2, time // 3), batch).astype(int)
    mask = np.zeros((batch, time), np.int64)
    for row, length in enumerate(lengths):
        if side == "left":
            mask[row, time - length:] = 1
        else:
            mask[row, :length] = 1
    return np.where(mask == 1, ids, PAD_ID), mask


def torch_logits(model, ids, mask):
    """Reference logits with position ids from the mask, as Hugging Face generate uses."""
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    with torch.no_grad():
        out = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                    position_ids=torch.tensor(positions))
    return out.logits.float().numpy()
