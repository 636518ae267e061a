"""Flax causal LMs (GPT-2, Llama, Qwen2, Qwen3, Mistral, Gemma 2 and Gemma 3 text), value and
reward heads, Hugging Face checkpoints in and out, jit-compiled sampling with a KV cache, and
LoRA adapters (`LoRAModel`) with PEFT folders in and out."""
from rlhf_jax.models.checkpoint_io import load_pretrained, save_pretrained
from rlhf_jax.models.config import ModelConfig
from rlhf_jax.models.generation import GENERATE_STATIC_ARGNAMES, GenerationOutput, generate, jitted_generate
from rlhf_jax.models.heads import RewardModel, ValueModel
from rlhf_jax.models.kv_cache import init_cache
from rlhf_jax.models.lora import LoRAConfig, LoRAModel, init_adapters, merge_adapters
from rlhf_jax.models.peft_io import load_peft_adapter, save_peft_adapter
from rlhf_jax.models.sampling import sample_tokens
from rlhf_jax.models.transformer import CausalLM, Decoder

__all__ = [
    "GENERATE_STATIC_ARGNAMES", "CausalLM", "Decoder", "GenerationOutput", "LoRAConfig", "LoRAModel", "ModelConfig",
    "RewardModel", "ValueModel", "generate", "init_adapters", "init_cache", "jitted_generate", "load_peft_adapter",
    "load_pretrained", "merge_adapters", "sample_tokens", "save_peft_adapter", "save_pretrained",
]
