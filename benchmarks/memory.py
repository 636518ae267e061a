"""Peak memory of SFT, DPO and GRPO training steps against tokens per step: full vs chunked LM head.

Each case (step x head x model x tokens) runs in a fresh Python process, so one case's
buffers and compilation caches never count towards another's. For every case we report:

- **XLA estimate**: from the compiled step (`jit(step).lower(...).compile().memory_analysis()`):
  `arguments + outputs - aliased (donated) + temporaries`, the bytes XLA's buffer assignment
  needs for one step. It is computed from abstract shapes only (nothing allocated, nothing
  run), so it is available for cases too large to run here, and it is what carries over to an
  accelerator (whose runtime allocates exactly these buffers). `temp` alone is listed too: the
  `[tokens, V]` logits, their gradient and the softmax temporaries live there.
- **Peak RSS**: the case process's maximum resident set (`getrusage(RUSAGE_SELF).ru_maxrss`),
  measured only for cases whose XLA estimate is below `--execute-limit-gb` (default 2.5 GB:
  the machine is shared). Those cases are executed (two steps, state donated); it includes the
  Python/JAX runtime (~0.4 GB) and the compiler. Other cases say "compile only".

Models (random weights; Llama layout, untied head unless said):

- probe: vocabulary 151,936, hidden 256, 2 layers, 4 heads, MLP 768, untied head, batch 4 rows;
- probe-tied: the same with tied embeddings (as the small Qwen models), SFT only;
- qwen3-0.6b-shape: Qwen3-0.6B's dimensions (28 layers, hidden 1024, 16 query / 8 key-value
  heads of 128, MLP 3072, vocabulary 151,936, tied embeddings) without its q/k norms (a few
  thousand parameters), float32 parameters, batch 4 rows. Compile only (~10 GB with Adam).

Tokens per step = all tokens through the model; half of them are scored: each of the 4 rows
has a prompt of `L / 2` tokens and responses of `L / 2` tokens in all (`L = tokens / 4`):
SFT 1 response of `L / 2`, DPO 2 of `L / 4` (chosen, rejected; reference log-probs computed
in the step from a second parameter copy), GRPO 4 of `L / 8` (old and reference log-probs
are inputs, as computed at rollout). Each prompt runs once for its responses
(`response_logprobs(prompt_once=True)`). Adam (AdamW, global-norm clipping) updates every
parameter. The steps are built here from the library's pieces (`response_logprobs` with
`head_chunk_size=None` (full) or `default_chunk_size(V)` (chunked), `sft_loss_from_logprobs`, `dpo_loss`,
`grpo_loss`, `TrainState.apply_gradients`), the same computations as the library's steps.

LoRA vs full fine-tuning: not measured (no LoRA API in `rlhf_jax.models` when this was run;
the column says so).

    python benchmarks/memory.py                    # every case; updates RESULTS.md "## Memory"
    python benchmarks/memory.py --models probe --no-write
    python benchmarks/memory.py --case sft full probe 1024   # one case, prints its JSON
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import common  # noqa: E402

STEPS = ("sft", "dpo", "grpo")
HEADS = ("full", "chunked")
RESPONSES = {"sft": 1, "dpo": 2, "grpo": 4}
ROWS = 4
MODELS = {
    "probe": dict(vocab_size=151_936, hidden_size=256, num_layers=2, num_heads=4, intermediate_size=768),
    "probe-tied": dict(vocab_size=151_936, hidden_size=256, num_layers=2, num_heads=4, intermediate_size=768,
                       tie_word_embeddings=True),
    "qwen3-0.6b-shape": dict(vocab_size=151_936, hidden_size=1024, num_layers=28, num_heads=16,
                             num_kv_heads=8, head_dim=128, intermediate_size=3072, tie_word_embeddings=True,
                             rope_theta=1e6),
}
TOKENS = {"probe": (1024, 2048, 4096), "probe-tied": (1024, 4096), "qwen3-0.6b-shape": (256, 1024)}
MODEL_STEPS = {"probe-tied": ("sft",)}  # the other models run every step
GB = 1e9


def build_case(step_name: str, head: str, model_name: str, tokens: int):
    """`(step, abstract_args, make_args)`: the jitted step, its arguments as shapes, and a
    function building real arguments (random weights and data)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from rlhf_jax.losses import dpo_loss, grpo_loss, sft_loss_from_logprobs
    from rlhf_jax.models import CausalLM, ModelConfig
    from rlhf_jax.ops.chunked_head import default_chunk_size
    from rlhf_jax.training.logprobs import LMBatch, response_logprobs
    from rlhf_jax.training.optim import OptimizerConfig, make_optimizer
    from rlhf_jax.training.state import TrainState

    config = ModelConfig.llama(**MODELS[model_name])
    model = CausalLM(config)
    length = tokens // ROWS
    num = RESPONSES[step_name]
    prompt, response = length // 2, length // 2 // num
    chunk = None if head == "full" else default_chunk_size(config.vocab_size)  # blocks even where "auto" would not
    optimizer = make_optimizer(OptimizerConfig(learning_rate=1e-5, schedule="constant"))

    def logprobs(params, batch, **kwargs):
        return response_logprobs(model.apply, params, batch, head_chunk_size=chunk, **kwargs)

    def sft(params, batch, extras):
        out = logprobs(params, batch, with_vocab_stats=True)
        return sft_loss_from_logprobs(out.logprobs, out.mask, mean_logprobs=out.mean_logprob,
                                      correct=out.is_argmax, label_smoothing=0.1)

    def dpo(params, batch, extras):
        policy = logprobs(params, batch).sequence_sum()
        reference = jax.lax.stop_gradient(logprobs(extras["ref_params"], batch).sequence_sum())
        return dpo_loss(policy[:, 0], policy[:, 1], reference[:, 0], reference[:, 1], beta=0.1)

    def grpo(params, batch, extras):
        out = logprobs(params, batch)
        flat = lambda x: x.reshape(ROWS * num, response)  # one row per sampled response
        advantages = jnp.broadcast_to(extras["advantages"][..., None], out.mask.shape)
        return grpo_loss(flat(out.logprobs), flat(extras["old_logp"]), flat(extras["ref_logp"]), flat(advantages),
                         flat(out.mask))

    loss_fn = {"sft": sft, "dpo": dpo, "grpo": grpo}[step_name]

    def step(state, batch, extras):
        (loss, _), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, batch, extras)
        return state.apply_gradients(grads=grads), loss

    jitted = jax.jit(step, donate_argnums=0)

    def make_args(abstract: bool):
        def init():
            params = model.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]
            return params, TrainState.create(apply_fn=model.apply, params=params, tx=optimizer)

        params, state = jax.eval_shape(init) if abstract else init()
        rng = np.random.default_rng(0)
        batch = LMBatch(
            prompt_ids=rng.integers(0, config.vocab_size, (ROWS, prompt)).astype(np.int32),
            prompt_mask=np.ones((ROWS, prompt), np.int32),
            response_ids=rng.integers(0, config.vocab_size, (ROWS, num, response)).astype(np.int32),
            response_mask=np.ones((ROWS, num, response), np.int32),
        )
        extras = {}
        if step_name == "dpo":
            extras["ref_params"] = params if abstract else jax.tree.map(jnp.copy, params)
        if step_name == "grpo":
            extras["advantages"] = rng.normal(size=(ROWS, num)).astype(np.float32)
            extras["old_logp"] = np.full((ROWS, num, response), -12.0, np.float32)
            extras["ref_logp"] = np.full((ROWS, num, response), -12.0, np.float32)
        if abstract:
            to_shape = lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype)
            batch, extras = jax.tree.map(to_shape, batch), jax.tree.map(to_shape, extras)
        return state, batch, extras

    return jitted, make_args


def run_case(step_name, head, model_name, tokens, execute_limit_gb) -> dict:
    """Compile (and, under the limit, run) one case in this process; the result as a dict."""
    import jax

    step, make_args = build_case(step_name, head, model_name, int(tokens))
    compiled = step.lower(*make_args(abstract=True)).compile()
    memory = compiled.memory_analysis()
    estimate = (memory.argument_size_in_bytes + memory.output_size_in_bytes - memory.alias_size_in_bytes
                + memory.temp_size_in_bytes)
    result = dict(step=step_name, head=head, model=model_name, tokens=int(tokens),
                  xla_estimate_gb=estimate / GB, temp_gb=memory.temp_size_in_bytes / GB,
                  arguments_gb=memory.argument_size_in_bytes / GB, executed=False)
    if estimate / GB <= execute_limit_gb:
        state, batch, extras = make_args(abstract=False)
        for _ in range(2):  # the executable compiled above: no second compilation
            state, loss = compiled(state, batch, extras)
        result.update(executed=True, loss=float(jax.block_until_ready(loss)))
    return result


def accelerator_cases(dry_run: bool = False) -> list[dict]:
    """XLA estimates of the probe SFT step, full vs chunked head, at 4,096 tokens (1,024 in a
    dry run), compiled for the default device, in this process (for `accelerator_check.py`)."""
    tokens = 1024 if dry_run else 4096
    return [run_case("sft", head, "probe", tokens, execute_limit_gb=0.0) for head in HEADS]


def run_in_child(case, execute_limit_gb) -> dict:
    """One case in a fresh interpreter; its peak RSS is the kernel's `ru_maxrss` of that
    process (`RUSAGE_SELF`, read by the child at its end: this process's own, no other's)."""
    command = [sys.executable, __file__, "--case", *map(str, case), "--execute-limit-gb", str(execute_limit_gb)]
    process = subprocess.run(command, capture_output=True, text=True, cwd=HERE.parent)
    if process.returncode:
        raise RuntimeError(f"case {case} failed:\n{process.stderr[-3000:]}")
    result = json.loads(process.stdout.strip().splitlines()[-1])
    result["peak_rss_gb"] = result.pop("self_peak_rss_kb") * 1024 / GB
    return result


def table(results) -> str:
    rows = []
    for r in results:
        rss = f"{r['peak_rss_gb']:.2f}" if r["executed"] else f"compile only ({r['peak_rss_gb']:.2f} to compile)"
        rows.append([r["model"], r["step"], r["tokens"], r["head"], f"{r['xla_estimate_gb']:.2f}",
                     f"{r['temp_gb']:.2f}", rss, "not measured (no LoRA API)"])
    return common.markdown_table(
        ["model", "step", "tokens / step", "head", "XLA estimate GB", "of which temp GB", "peak RSS GB",
         "LoRA"], rows)


def growth_lines(results) -> list[str]:
    """Growth of each measure from 1,024 to 4,096 tokens on the probe models."""
    lines = []
    for model_name in ("probe", "probe-tied"):
        for step_name in STEPS:
            for head in HEADS:
                picked = {r["tokens"]: r for r in results
                          if (r["model"], r["step"], r["head"]) == (model_name, step_name, head)}
                if 1024 not in picked or 4096 not in picked:
                    continue
                for key, label in (("xla_estimate_gb", "XLA estimate"), ("peak_rss_gb", "peak RSS")):
                    if key == "peak_rss_gb" and not (picked[1024]["executed"] and picked[4096]["executed"]):
                        continue
                    low, high = picked[1024][key], picked[4096][key]
                    lines.append(f"- {model_name} {step_name}, {head} head, {label}: {low:.2f} GB at 1,024 tokens "
                                 f"-> {high:.2f} GB at 4,096 (+{100 * (high / low - 1):.0f}%)")
    return lines


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", nargs=4, metavar=("STEP", "HEAD", "MODEL", "TOKENS"))
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--steps", nargs="+", default=list(STEPS), choices=list(STEPS))
    parser.add_argument("--tokens", nargs="+", type=int, help="only these tokens per step (default: per model)")
    parser.add_argument("--execute-limit-gb", type=float, default=2.5)
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--collect", nargs="+", metavar="LOG",
                        help="build the section from the JSON lines of earlier runs' output instead of running")
    args = parser.parse_args(argv)
    if args.case:
        import resource

        result = run_case(*args.case, args.execute_limit_gb)
        result["self_peak_rss_kb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print(json.dumps(result))
        return
    results = []
    if args.collect:
        latest = {}  # one result per case: the last one logged
        for log in args.collect:
            for line in Path(log).read_text().splitlines():
                if line.startswith("{"):
                    result = json.loads(line)
                    latest[(result["model"], result["step"], result["head"], result["tokens"])] = result
        order = {name: i for i, name in enumerate(MODELS)}
        results = sorted(latest.values(), key=lambda r: (order[r["model"]], r["tokens"], STEPS.index(r["step"]),
                                                         HEADS.index(r["head"])))
        args.models = list(dict.fromkeys(r["model"] for r in results))
    for model_name in [] if args.collect else args.models:
        for tokens in [t for t in TOKENS[model_name] if not args.tokens or t in args.tokens]:
            for step_name in [s for s in args.steps if s in MODEL_STEPS.get(model_name, STEPS)]:
                for head in HEADS:
                    result = run_in_child((step_name, head, model_name, tokens), args.execute_limit_gb)
                    print(json.dumps(result), flush=True)
                    results.append(result)
    body = "\n".join([
        "## Memory", "",
        f"Run {common.utc_stamp()}: `python benchmarks/memory.py` ({' '.join(args.models)}; "
        f"cases under {args.execute_limit_gb} GB XLA estimate executed). See the script's docstring for the "
        "models, steps and the two measures; \"XLA estimate\" is compiled-program bytes (no execution), "
        "\"peak RSS\" the measured maximum resident set of the case's own process.", "",
        *[f"    {line}" for line in common.machine_info()], "",
        table(results), "",
        *growth_lines(results), "",
    ])
    print(body)
    if not args.no_write:
        common.write_section("## Memory", body)


if __name__ == "__main__":
    main()
