"""XLA's compiled temporaries of the kept-set log-probs of top-k / top-p rollouts.

`policy_logprobs(kept_threshold=...)` is what PPO and GRPO call on every rollout scoring pass
and every update minibatch when top-k or top-p sampling is on (kept-set replay). This script
compiles, from abstract shapes only (nothing is allocated or run), its forward pass and the
value-and-gradient of `sum(logprobs) + 0.01 * sum(entropy)` with respect to the parameters,
and prints `memory_analysis().temp_size_in_bytes` of each, for:

- `policy`: `policy_logprobs` as the library has it (`--library PATH` runs the script
  against another checkout, e.g. an older one, where only this row is computed);
- `full`: `response_logprobs(head_chunk_size=None, kept_threshold=...)`, full `[B, N, R, V]`
  logits through `kept_set_logits` (what `policy_logprobs` did before it used the blocks);
- `blocks`: `response_logprobs(kept_threshold=...)` with the default `"auto"` head.

Model: the probe of benchmarks/memory.py (Llama layout, vocabulary 151,936, hidden 256, 2
layers, 4 heads, MLP 768, untied head), float32; batch: 2 prompts of 64 tokens, 8 responses
of 64 tokens each (1,024 scored positions).

    python benchmarks/kept_set_memory.py [--prompts 2] [--responses 8] [--length 64] [--library PATH]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

PROBE = dict(vocab_size=151_936, hidden_size=256, num_layers=2, num_heads=4, intermediate_size=768)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=2)
    parser.add_argument("--responses", type=int, default=8)
    parser.add_argument("--length", type=int, default=64, help="prompt and response length")
    parser.add_argument("--library", default=str(Path(__file__).resolve().parent.parent),
                        help="the checkout whose rlhf_jax to import (default: this script's)")
    args = parser.parse_args(argv)
    sys.path.insert(0, args.library)

    import jax
    import jax.numpy as jnp

    import rlhf_jax
    from rlhf_jax.models import CausalLM, ModelConfig
    from rlhf_jax.training.logprobs import LMBatch, response_logprobs
    from rlhf_jax.training.rollout import policy_logprobs

    model = CausalLM(ModelConfig.llama(**PROBE))
    params = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"])
    rows, num, length = args.prompts, args.responses, args.length
    shape = lambda *s, dtype=jnp.int32: jax.ShapeDtypeStruct(s, dtype)
    batch = LMBatch(shape(rows, length), shape(rows, length), shape(rows, num, length), shape(rows, num, length))
    thresholds = shape(rows, num, length, dtype=jnp.float32)

    paths = {
        "policy": lambda p, b, t: policy_logprobs(model.apply, p, b, temperature=0.7, kept_threshold=t,
                                                  with_entropy=True),
        "full": lambda p, b, t: response_logprobs(model.apply, p, b, temperature=0.7, kept_threshold=t,
                                                  with_entropy=True, head_chunk_size=None),
        "blocks": lambda p, b, t: response_logprobs(model.apply, p, b, temperature=0.7, kept_threshold=t,
                                                    with_entropy=True),
    }
    try:  # an older checkout's response_logprobs has no kept_threshold
        jax.eval_shape(paths["blocks"], params, batch, thresholds)
    except TypeError:
        paths = {"policy": paths["policy"]}

    def temp_bytes(fn):
        return jax.jit(fn).lower(params, batch, thresholds).compile().memory_analysis().temp_size_in_bytes

    results = dict(library=str(Path(rlhf_jax.__file__).parent), positions=rows * num * length,
                   logits_bytes=rows * num * length * PROBE["vocab_size"] * 4)
    for name, path in paths.items():
        def loss(p, b, t, path=path):
            out = path(p, b, t)
            return jnp.sum(out.logprobs) + 0.01 * jnp.sum(out.entropy)

        results[name] = dict(forward_temp_bytes=temp_bytes(lambda p, b, t, path=path: path(p, b, t).logprobs),
                             value_and_grad_temp_bytes=temp_bytes(jax.value_and_grad(loss)))
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
