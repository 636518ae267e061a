"""KV-cache memory of sliding-window models in generation: full slots vs window (ring) slots.

`generate` keeps, for each sliding-window layer, only its last `sliding_window` tokens' keys
and values (`init_cache(..., window_slots=True)`, rlhf_jax/models/kv_cache.py). This script
reports, for the families' published layouts (random weights are never built: the sizes come
from `jax.eval_shape`, exact to the byte):

1. the cache bytes of a rollout batch (`--batch` rows of `--prompt` + `--new` tokens, bfloat16)
   with every layer holding all slots vs the sliding layers holding their window;
2. for a scaled-down Gemma 3 layout (the same 5:1 sliding pattern and window / length ratio,
   small enough to run here), one compiled decode step (`forward_with_cache`, one token per
   row, the cache donated as in `generate`'s loop) with either cache: XLA's buffer sizes
   (arguments, temporaries) and its median wall time over `--repeats` alternating runs, with
   the logits of the two compared.

    python benchmarks/window_cache.py            # prints the tables
    python benchmarks/window_cache.py --write    # also updates benchmarks/RESULTS.md
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

from rlhf_jax.models.config import SLIDING_ATTENTION, ModelConfig  # noqa: E402
from rlhf_jax.models.kv_cache import init_cache  # noqa: E402
from rlhf_jax.models.transformer import CausalLM  # noqa: E402

SECTION = "## Sliding-window KV cache"
# Published layouts (config.json of each model): layers, kv heads, head size, window, pattern.
FAMILIES = {
    "Gemma 3 1B": dict(family="gemma3_text", num_layers=26, num_heads=4, num_kv_heads=1, head_dim=256,
                       hidden_size=1152, sliding_window=512, period=6),
    "Gemma 3 4B": dict(family="gemma3_text", num_layers=34, num_heads=8, num_kv_heads=4, head_dim=256,
                       hidden_size=2560, sliding_window=1024, period=6),
    "Gemma 2 2B": dict(family="gemma2", num_layers=26, num_heads=8, num_kv_heads=4, head_dim=256,
                       hidden_size=2304, sliding_window=4096, period=2),
    "Mistral 7B v0.1": dict(family="mistral", num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128,
                            hidden_size=4096, sliding_window=4096, period=None),
}


def layout(spec: dict, vocab_size: int = 256) -> ModelConfig:
    """A `ModelConfig` with the attention layout of `spec` (the MLP and vocabulary do not
    touch the cache and are kept small)."""
    from rlhf_jax.models.config import alternating_layer_types
    fields = dict(vocab_size=vocab_size, hidden_size=spec["hidden_size"], num_layers=spec["num_layers"],
                  num_heads=spec["num_heads"], num_kv_heads=spec["num_kv_heads"], head_dim=spec["head_dim"],
                  intermediate_size=64, max_position_embeddings=131_072, sliding_window=spec["sliding_window"],
                  dtype="bfloat16")
    if spec["period"] is not None:
        fields["layer_types"] = alternating_layer_types(spec["num_layers"], spec["period"])
    builder = {"gemma3_text": ModelConfig.gemma3_text, "gemma2": ModelConfig.gemma2,
               "mistral": ModelConfig.mistral}[spec["family"]]
    return builder(**fields)


def cache_bytes(config: ModelConfig, batch: int, length: int, window_slots: bool) -> int:
    shapes = jax.eval_shape(lambda: init_cache(config, batch, length, window_slots=window_slots))
    return sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(shapes))


def family_table(batch: int, length: int) -> list[str]:
    rows = ["| model | sliding layers | window | full slots (GiB) | window slots (GiB) | ratio |",
            "|---|---:|---:|---:|---:|---:|"]
    for name, spec in FAMILIES.items():
        config = layout(spec)
        sliding = sum(config.layer_type(i) == SLIDING_ATTENTION for i in range(config.num_layers))
        full, ring = (cache_bytes(config, batch, length, flag) / 2**30 for flag in (False, True))
        rows.append(f"| {name} | {sliding} of {config.num_layers} | {spec['sliding_window']} | {full:.2f} | "
                    f"{ring:.2f} | {full / ring:.2f}x |")
    return rows


def copy(tree):
    return jax.tree.map(jnp.copy, tree)


def decode_step_rows(batch: int, length: int, window: int, repeats: int) -> tuple[list[str], float]:
    """A 6-layer Gemma 3 layout (5 sliding + 1 full, hidden 256, 2 kv heads of 64), float32:
    one decode step after `length - 1` cached tokens, with either cache."""
    config = ModelConfig.gemma3_text(vocab_size=512, hidden_size=256, num_layers=6, num_heads=4, num_kv_heads=2,
                                     head_dim=64, intermediate_size=512, max_position_embeddings=length,
                                     sliding_window=window, query_pre_attn_scalar=64)
    module = CausalLM(config)
    params = module.init(jax.random.PRNGKey(0), jnp.zeros((1, 2), jnp.int32))["params"]
    rng = np.random.default_rng(0)
    prompt = jnp.asarray(rng.integers(3, 512, size=(batch, length - 1)), jnp.int32)
    token = jnp.asarray(rng.integers(3, 512, size=(batch, 1)), jnp.int32)
    # the cache is donated, as in `generate`'s loop, so the step updates it in place
    step = jax.jit(lambda p, i, m, c: module.apply({"params": p}, i, m, cache=c, method="forward_with_cache"),
                   donate_argnums=3)
    caches, compiled, logits = {}, {}, {}
    for name, flag in (("full slots", False), ("window slots", True)):
        cache = init_cache(config, batch, length, window_slots=flag)
        _, cache = step(params, prompt, jnp.ones_like(prompt), cache)  # the prefill fills it
        caches[name] = cache
        compiled[name] = step.lower(params, token, jnp.ones_like(token), cache).compile()
        logits[name] = np.asarray(compiled[name](params, token, jnp.ones_like(token), copy(cache))[0])
    times = {name: [] for name in caches}
    ones = jnp.ones_like(token)
    for _ in range(repeats):
        for name in caches:
            fresh = jax.block_until_ready(copy(caches[name]))  # donated by the timed call
            wall, _ = common.time_calls(lambda: compiled[name](params, token, ones, fresh), jax.block_until_ready, 1)
            times[name] += wall
    rows = ["| cache | cache bytes (MiB) | XLA arguments (MiB) | XLA temporaries (MiB) | decode step (ms, median) |",
            "|---|---:|---:|---:|---:|"]
    for name in caches:
        memory = compiled[name].memory_analysis()
        size = sum(x.nbytes for x in jax.tree.leaves(caches[name])) / 2**20
        rows.append(f"| {name} | {size:.1f} | {memory.argument_size_in_bytes / 2**20:.1f} | "
                    f"{memory.temp_size_in_bytes / 2**20:.1f} | {1e3 * common.median(times[name]):.2f} |")
    difference = float(np.abs(logits["full slots"] - logits["window slots"]).max())
    return rows, difference


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64, help="rollout rows (family table)")
    parser.add_argument("--prompt", type=int, default=512)
    parser.add_argument("--new", type=int, default=4096, help="new tokens per row (family table)")
    parser.add_argument("--step-batch", type=int, default=8, help="rows of the measured decode step")
    parser.add_argument("--step-length", type=int, default=2048, help="cached tokens + 1 of the measured step")
    parser.add_argument("--step-window", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=15)
    common.add_write_flags(parser)
    args = parser.parse_args(argv)

    length = args.prompt + args.new
    families = family_table(args.batch, length)
    steps, difference = decode_step_rows(args.step_batch, args.step_length, args.step_window, args.repeats)
    lines = [SECTION, "",
             f"`{common.command_line('window_cache.py', argv)}` ({common.utc_stamp()}).", "",
             *common.machine_info(), "",
             f"KV cache of a rollout of {args.batch} rows x {length} tokens ({args.prompt} prompt + {args.new} new), "
             f"bfloat16, per the models' published attention layouts (exact sizes from `jax.eval_shape`; "
             f"the cache's int32 mask and positions included):", "", *families, "",
             f"One decode step after {args.step_length - 1} cached tokens, {args.step_batch} rows, a 6-layer Gemma 3 "
             f"layout (5 sliding layers, window {args.step_window}, 1 full; hidden 256, 2 kv heads of 64), float32, "
             f"medians of {args.repeats} alternating runs; largest logit difference between the two caches: "
             f"{difference:.1e}:", "", *steps, ""]
    text = "\n".join(lines)
    print(text)
    if args.write:
        common.write_section(SECTION, text)


if __name__ == "__main__":
    main()
