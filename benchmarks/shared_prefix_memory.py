"""XLA's compiled temporaries (and, optionally, CPU time) of a GRPO value-and-gradient whose
responses attend to a long prompt through blockwise attention.

Each prompt runs once for its N responses (`response_logprobs(prompt_once=True)`), and the
responses attend to the prompt's cached keys and values on the blockwise path
(`attention_impl="blockwise"`): `ops.blockwise_prefix_attention` reads them without a copy,
where the earlier layout repeated them N times per layer (and its backward pass kept the
repeated keys and values as residuals). The step is `jax.value_and_grad` of `grpo_loss` over
`response_logprobs` with respect to the parameters, compiled from abstract shapes only;
printed: `memory_analysis().temp_size_in_bytes` of it and of the forward log-probs alone, and
the bytes of one N-fold copy of the prompt's keys and values over all layers (float32) for
scale. `--library PATH` runs the script against another checkout (e.g. an older one).

Default model: Qwen3-0.6B's layer shapes (hidden 1,024, 16 query / 8 key-value heads of 128,
q/k norms, MLP 3,072, vocabulary 151,936, tied embeddings) with 4 layers, float32; batch: 1
prompt of 2,048 tokens, 16 responses of 256 tokens.

`--repeat R` also builds the arguments (random weights) and times R calls of the compiled step
after one warm-up call (median seconds): use it at a small shape only. `--time-attention R`
instead times the attention alone in one process, R interleaved calls of each layout:
`value_and_grad` of `sum(out ** 2)` for `ops.blockwise_prefix_attention` and for the layout
it replaced (the prefix repeated N times, concatenated, `ops.blockwise_attention`), at 1
prompt, 2 key-value heads x 2 groups, N = 4 continuations of 128 tokens, a prefix of 512, head
size 64, blocks of 128. E.g.

    python benchmarks/shared_prefix_memory.py                                   # compile only
    python benchmarks/shared_prefix_memory.py --library /path/to/older/checkout  # the same, before
    python benchmarks/shared_prefix_memory.py --hidden 128 --heads 4 --kv-heads 2 --head-dim 32 \\
        --mlp 256 --vocab 512 --layers 2 --prompt 256 --responses 4 --length 64 --block 64 --repeat 5
    python benchmarks/shared_prefix_memory.py --time-attention 20
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--mlp", type=int, default=3072)
    parser.add_argument("--vocab", type=int, default=151_936)
    parser.add_argument("--prompts", type=int, default=1)
    parser.add_argument("--prompt", type=int, default=2048, help="prompt length")
    parser.add_argument("--responses", type=int, default=16, help="responses per prompt (N)")
    parser.add_argument("--length", type=int, default=256, help="response length")
    parser.add_argument("--block", type=int, default=512, help="attention_block_size")
    parser.add_argument("--repeat", type=int, default=0, help="timed calls (0: compile only)")
    parser.add_argument("--time-attention", type=int, default=0,
                        help="time the attention layouts alone, this many interleaved calls each")
    parser.add_argument("--library", default=str(Path(__file__).resolve().parent.parent),
                        help="the checkout whose rlhf_jax to import (default: this script's)")
    args = parser.parse_args(argv)
    sys.path.insert(0, args.library)

    import jax
    import jax.numpy as jnp
    import numpy as np

    if args.time_attention > 0:
        print(json.dumps(time_attention(args.time_attention), indent=1))
        return

    import rlhf_jax
    from rlhf_jax.losses import grpo_loss
    from rlhf_jax.models import CausalLM, ModelConfig
    from rlhf_jax.training.logprobs import LMBatch, response_logprobs

    config = ModelConfig.qwen3(
        vocab_size=args.vocab, hidden_size=args.hidden, num_layers=args.layers, num_heads=args.heads,
        num_kv_heads=args.kv_heads, head_dim=args.head_dim, intermediate_size=args.mlp, tie_word_embeddings=True,
        attention_impl="blockwise", attention_block_size=args.block)
    model = CausalLM(config)
    rows, num, length = args.prompts, args.responses, args.length
    init = lambda: model.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]
    rng = np.random.default_rng(0)
    batch = LMBatch(prompt_ids=rng.integers(0, args.vocab, (rows, args.prompt)).astype(np.int32),
                    prompt_mask=np.ones((rows, args.prompt), np.int32),
                    response_ids=rng.integers(0, args.vocab, (rows, num, length)).astype(np.int32),
                    response_mask=np.ones((rows, num, length), np.int32))
    advantages = rng.normal(size=(rows, num, length)).astype(np.float32)
    old = np.full((rows, num, length), -5.0, np.float32)

    def loss(params, batch, advantages, old):
        out = response_logprobs(model.apply, params, batch)
        flat = lambda x: x.reshape(rows * num, length)
        value, _ = grpo_loss(flat(out.logprobs), flat(old), flat(old), flat(advantages), flat(out.mask))
        return value

    forward = lambda params, batch, advantages, old: response_logprobs(model.apply, params, batch).logprobs
    step = jax.jit(jax.value_and_grad(loss))
    to_shape = lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype)
    abstract = (jax.eval_shape(init), *jax.tree.map(to_shape, (batch, advantages, old)))
    compiled = step.lower(*abstract).compile()
    copy_bytes = args.layers * 2 * rows * num * args.kv_heads * args.head_dim * args.prompt * 4
    results = dict(library=str(Path(rlhf_jax.__file__).parent), layers=args.layers, prompt=args.prompt,
                   responses=num, length=length, block=args.block,
                   value_and_grad_temp_bytes=compiled.memory_analysis().temp_size_in_bytes,
                   forward_temp_bytes=jax.jit(forward).lower(*abstract).compile().memory_analysis().temp_size_in_bytes,
                   prefix_copy_bytes_all_layers=copy_bytes)
    if args.repeat > 0:
        params = init()
        jax.block_until_ready(compiled(params, batch, advantages, old))  # warm-up
        seconds = []
        for _ in range(args.repeat):
            start = time.perf_counter()
            jax.block_until_ready(compiled(params, batch, advantages, old))
            seconds.append(time.perf_counter() - start)
        results.update(median_seconds=statistics.median(seconds), seconds=[round(s, 4) for s in seconds])
    print(json.dumps(results, indent=1))


def time_attention(calls: int, num: int = 4, time_: int = 128, slots: int = 512, head_dim: int = 64,
                   block: int = 128) -> dict:
    """Median milliseconds of `calls` interleaved calls of each attention layout (module doc):
    `num` continuations of `time_` tokens after a prefix of `slots`, blocks of `block`."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from rlhf_jax.ops.blockwise_attention import blockwise_attention
    from rlhf_jax.ops.blockwise_prefix_attention import blockwise_prefix_attention

    rows, kv_heads, groups = 1, 2, 2
    rng = np.random.default_rng(0)
    normal = lambda *shape: jnp.asarray(rng.normal(size=shape).astype(np.float32))
    args = (normal(rows, kv_heads, num, groups, time_, head_dim), normal(rows, kv_heads, num, head_dim, time_),
            normal(rows, kv_heads, num, time_, head_dim), normal(rows, kv_heads, head_dim, slots),
            normal(rows, kv_heads, slots, head_dim))
    causal = np.tril(np.ones((time_, slots + time_), bool), slots)
    mask = jnp.asarray(np.broadcast_to(causal, (rows, num, time_, slots + time_)))

    def copying(q, k, v, prefix_k, prefix_v):
        flat = lambda x: jnp.swapaxes(x, 1, 2).reshape(rows * num, kv_heads, *x.shape[3:])
        keys = jnp.concatenate([jnp.repeat(prefix_k, num, 0), flat(k)], axis=-1)
        values = jnp.concatenate([jnp.repeat(prefix_v, num, 0), flat(v)], axis=-2)
        return blockwise_attention(flat(q), keys, values, mask.reshape(rows * num, time_, -1),
                                   block_q=block, block_k=block)

    copy_free = lambda *a: blockwise_prefix_attention(*a, mask, block_q=block, block_k=block)
    layouts = {"copying": copying, "copy_free": copy_free}
    compiled = {name: jax.jit(jax.value_and_grad(lambda *a, f=f: jnp.sum(f(*a) ** 2), argnums=range(5)))
                for name, f in layouts.items()}
    for fn in compiled.values():
        jax.block_until_ready(fn(*args))
    seconds = {name: [] for name in compiled}
    for _ in range(calls):
        for name, fn in compiled.items():
            start = time.perf_counter()
            jax.block_until_ready(fn(*args))
            seconds[name].append(time.perf_counter() - start)
    return {f"{name}_median_ms": 1e3 * statistics.median(s) for name, s in seconds.items()}


if __name__ == "__main__":
    main()
