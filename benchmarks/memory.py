"""Peak memory of SFT, DPO and GRPO training steps against tokens per step: full vs chunked LM
head, full fine-tuning vs LoRA, plain vs blockwise attention.

Each case (step x head x model x tokens x fine-tuning x attention) runs in a fresh Python
process (at `nice 19`), so one case's buffers and compilation caches never count towards
another's. The step is compiled first (from abstract shapes), then, if its XLA estimate is
under `--execute-limit-gb` (default 2.5 GB: the machine is shared), the arguments are built
(random weights, Adam state) and two steps run with the state donated. Measures:

- **XLA estimate**: from the compiled step (`jit(step).lower(...).compile().memory_analysis()`):
  `arguments + outputs - aliased (donated) + temporaries`, the bytes XLA's buffer assignment
  needs for one step. Computed from abstract shapes only (nothing allocated, nothing run), so
  it exists for cases too large to run here, and it is what carries over to an accelerator
  (whose runtime allocates exactly these buffers). `temp` alone is listed too.
- **Step peak RSS**: the resident high-water mark of the case's process from just after
  compilation to the end of the two steps: after compiling, the process returns freed heap
  pages to the kernel (`malloc_trim(0)`) and resets the kernel's counter by writing "5" to
  `/proc/self/clear_refs`; `VmHWM` from `/proc/self/status` after the steps is the peak. It
  covers everything resident while a step runs: the Python interpreter, JAX and the loaded
  executable (~0.3 GB, the next column), the parameters, Adam moments, batch and the step's
  temporaries -- but not the compiler's own peak. This is the "peak host memory of a step".
- **RSS before step**: the resident set at that reset (interpreter + JAX + executable).
- **Process peak RSS**: `getrusage(RUSAGE_SELF).ru_maxrss` at the end: the process's lifetime
  maximum, compilation included. For "compile only" cases it is the compiler's peak.

Models (random weights; Llama layout, untied head unless said):

- probe: vocabulary 151,936, hidden 256, 2 layers, 4 heads, MLP 768, untied head, batch 4 rows;
- probe-tied: the same with tied embeddings (as the small Qwen models), SFT only;
- qwen3-0.6b-shape: Qwen3-0.6B's dimensions (28 layers, hidden 1024, 16 query / 8 key-value
  heads of 128, MLP 3072, vocabulary 151,936, tied embeddings) without its q/k norms (a few
  thousand parameters), float32 parameters, batch 4 rows. Compile only (~12 GB with Adam).

Tokens per step = all tokens through the model; half of them are scored: each of the 4 rows
has a prompt of `L / 2` tokens and responses of `L / 2` tokens in all (`L = tokens / 4`):
SFT 1 response of `L / 2`, DPO 2 of `L / 4` (chosen, rejected; reference log-probs computed
in the step), GRPO 4 of `L / 8` (old and reference log-probs are inputs, as computed at
rollout). Each prompt runs once for its responses (`response_logprobs(prompt_once=True)`).
AdamW with global-norm clipping. The steps are built here from the library's pieces
(`response_logprobs` with `head_chunk_size=None` (full) or `default_chunk_size(V)`
(chunked), `sft_loss_from_logprobs`, `dpo_loss`, `grpo_loss`, `TrainState.apply_gradients`),
the same computations as the library's steps.

Fine-tuning: "full" trains every parameter (DPO's reference is a second parameter copy);
"lora" trains rank-16 adapters (alpha 32) on q, k, v, o of the frozen base
(`create_lora_train_state`: gradients and Adam state of the adapters only; DPO's reference
is the base with the adapters disabled, no second copy).

Attention (`ModelConfig.attention_impl`): "auto" (the default: blockwise attention,
`ops.blockwise_attention`, once a layer's queries x keys exceed one 512 x 512 block) or
"plain" (`[B, H, T, S]` float32 scores). At batch 4 rows the probe's sequences are 256 /
512 / 1,024 tokens at 1,024 / 2,048 / 4,096 tokens per step.

    python benchmarks/memory.py --write            # every case; updates RESULTS.md "## Memory"
    python benchmarks/memory.py --models probe --heads chunked --attentions plain auto
    python benchmarks/memory.py --models probe --steps sft dpo --finetunes full lora
    python benchmarks/memory.py --case sft chunked probe 4096 full auto   # one case, its JSON
    python benchmarks/memory.py --collect LOG...   # the section from earlier runs' JSON lines
"""
from __future__ import annotations

import argparse
import itertools
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
LORA_RANK = 16
FINETUNES = ("full", "lora")
ATTENTIONS = ("plain", "auto")


def build_case(step_name: str, head: str, model_name: str, tokens: int, finetune: str = "full",
               attention: str = "auto"):
    """`(step, make_args)`: the jitted step and a function building its arguments, as shapes
    (`abstract=True`) or real arrays (random weights and data). `finetune`: "full" (every
    parameter trained) or "lora" (rank-16 adapters on q, k, v, o; the base frozen); `attention`:
    the model's `attention_impl` ("auto": blockwise for long sequences, "plain": [T, S] scores)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from rlhf_jax.losses import dpo_loss, grpo_loss, sft_loss_from_logprobs
    from rlhf_jax.models import CausalLM, ModelConfig
    from rlhf_jax.models.lora import LoRAConfig, LoRAModel, init_adapters
    from rlhf_jax.ops.chunked_head import default_chunk_size
    from rlhf_jax.training.logprobs import LMBatch, response_logprobs
    from rlhf_jax.training.optim import OptimizerConfig, make_optimizer
    from rlhf_jax.training.lora_state import create_lora_train_state, disabled_adapters
    from rlhf_jax.training.state import TrainState

    config = ModelConfig.llama(**MODELS[model_name], attention_impl=attention)
    model = CausalLM(config)
    length = tokens // ROWS
    num = RESPONSES[step_name]
    prompt, response = length // 2, length // 2 // num
    chunk = None if head == "full" else default_chunk_size(config.vocab_size)  # blocks even where "auto" would not
    optimizer = make_optimizer(OptimizerConfig(learning_rate=1e-5, schedule="constant"))

    lora = LoRAConfig(rank=LORA_RANK, alpha=2.0 * LORA_RANK, targets=("q_proj", "k_proj", "v_proj", "o_proj"))

    def logprobs(apply_fn, params, batch, **kwargs):
        return response_logprobs(apply_fn, params, batch, head_chunk_size=chunk, **kwargs)

    def sft(apply_fn, params, batch, extras):
        out = logprobs(apply_fn, params, batch, with_vocab_stats=True)
        return sft_loss_from_logprobs(out.logprobs, out.mask, mean_logprobs=out.mean_logprob,
                                      correct=out.is_argmax, label_smoothing=0.1)

    def dpo(apply_fn, params, batch, extras):
        policy = logprobs(apply_fn, params, batch).sequence_sum()
        # Full fine-tuning: a second parameter copy; LoRA: the base with the adapters disabled.
        reference_params = disabled_adapters() if finetune == "lora" else extras["ref_params"]
        reference = jax.lax.stop_gradient(logprobs(apply_fn, reference_params, batch).sequence_sum())
        return dpo_loss(policy[:, 0], policy[:, 1], reference[:, 0], reference[:, 1], beta=0.1)

    def grpo(apply_fn, params, batch, extras):
        out = logprobs(apply_fn, params, batch)
        flat = lambda x: x.reshape(ROWS * num, response)  # one row per sampled response
        advantages = jnp.broadcast_to(extras["advantages"][..., None], out.mask.shape)
        return grpo_loss(flat(out.logprobs), flat(extras["old_logp"]), flat(extras["ref_logp"]), flat(advantages),
                         flat(out.mask))

    loss_fn = {"sft": sft, "dpo": dpo, "grpo": grpo}[step_name]

    def step(state, batch, extras):
        loss_of_params = lambda params: loss_fn(state.apply_fn, params, batch, extras)
        (loss, _), grads = jax.value_and_grad(loss_of_params, has_aux=True)(state.params)
        return state.apply_gradients(grads=grads), loss

    jitted = jax.jit(step, donate_argnums=0)

    def make_args(abstract: bool):
        def init():
            params = model.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]
            if finetune == "lora":
                adapters = init_adapters(params, lora, jax.random.key(1))
                state, _ = create_lora_train_state(LoRAModel(model, lora), params, {"lora": adapters}, optimizer)
                return params, state
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
        if step_name == "dpo" and finetune == "full":
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


def _proc_status_kb(field: str) -> int:
    """A `kB` field of /proc/self/status (VmRSS, VmHWM) of this process."""
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def reset_peak_rss() -> int:
    """Return the heap's freed pages to the kernel (`malloc_trim(0)`), then reset this process's
    resident high-water mark (VmHWM) to its current resident set by writing "5" to
    /proc/self/clear_refs (Linux >= 4.0). Returns the resident set (kB) it starts from."""
    import ctypes

    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")
    return _proc_status_kb("VmRSS")


def run_case(step_name, head, model_name, tokens, execute_limit_gb, finetune="full", attention="auto") -> dict:
    """Compile (and, under the limit, run) one case in this process; the result as a dict.

    A run case resets the resident high-water mark after compiling, so `step_peak_kb` is the
    peak of building the arguments and running two steps, without the compiler's peak."""
    import jax

    step, make_args = build_case(step_name, head, model_name, int(tokens), finetune, attention)
    compiled = step.lower(*make_args(abstract=True)).compile()
    memory = compiled.memory_analysis()
    estimate = (memory.argument_size_in_bytes + memory.output_size_in_bytes - memory.alias_size_in_bytes
                + memory.temp_size_in_bytes)
    result = dict(step=step_name, head=head, model=model_name, tokens=int(tokens), finetune=finetune,
                  attention=attention,
                  xla_estimate_gb=estimate / GB, temp_gb=memory.temp_size_in_bytes / GB,
                  arguments_gb=memory.argument_size_in_bytes / GB, executed=False)
    if estimate / GB <= execute_limit_gb:
        result["baseline_kb"] = reset_peak_rss()
        state, batch, extras = make_args(abstract=False)
        for _ in range(2):  # the executable compiled above: no second compilation
            state, loss = compiled(state, batch, extras)
        result.update(executed=True, loss=float(jax.block_until_ready(loss)),
                      step_peak_kb=_proc_status_kb("VmHWM"))
    return result


def accelerator_cases(dry_run: bool = False) -> list[dict]:
    """XLA estimates of the probe SFT step, full vs chunked head, at 4,096 tokens (1,024 in a
    dry run), compiled for the default device, in this process (for `accelerator_check.py`)."""
    tokens = 1024 if dry_run else 4096
    return [run_case("sft", head, "probe", tokens, execute_limit_gb=0.0) for head in HEADS]


def run_in_child(case, execute_limit_gb) -> dict:
    """One case in a fresh interpreter (at the lowest CPU priority, `nice 19`); its memory
    measures are that process's own (see the module docstring), converted to GB here."""
    command = ["nice", "-n", "19", sys.executable, __file__, "--case", *map(str, case),
               "--execute-limit-gb", str(execute_limit_gb)]
    process = subprocess.run(command, capture_output=True, text=True, cwd=HERE.parent)
    if process.returncode:
        raise RuntimeError(f"case {case} failed:\n{process.stderr[-3000:]}")
    return with_gb(json.loads(process.stdout.strip().splitlines()[-1]))


def with_gb(result: dict) -> dict:
    """The child's kB counters as GB: `process_peak_gb` (ru_maxrss), and for run cases
    `step_peak_gb` (VmHWM after the reset) and `baseline_gb` (resident set at the reset)."""
    for key in ("process_peak", "step_peak", "baseline"):
        if f"{key}_kb" in result:
            result[f"{key}_gb"] = result.pop(f"{key}_kb") * 1024 / GB
    if "self_peak_rss_kb" in result:  # logs of runs before the step peak was recorded
        result["process_peak_gb"] = result.pop("self_peak_rss_kb") * 1024 / GB
    result.setdefault("finetune", "full")
    result.setdefault("attention", "plain")  # runs before the attention choice had plain attention only
    return result


def table(results) -> str:
    rows = []
    for r in results:
        if r["executed"] and "step_peak_gb" in r:
            step, baseline = f"{r['step_peak_gb']:.2f}", f"{r['baseline_gb']:.2f}"
        else:
            step = baseline = "compile only" if not r["executed"] else "not recorded"
        rows.append([r["model"], r["step"], r["tokens"], r["head"], r["finetune"], r["attention"],
                     f"{r['xla_estimate_gb']:.2f}",
                     f"{r['temp_gb']:.2f}", step, baseline, f"{r['process_peak_gb']:.2f}"])
    return common.markdown_table(
        ["model", "step", "tokens / step", "head", "fine-tuning", "attention", "XLA estimate GB", "of which temp GB",
         "step peak RSS GB", "RSS before step GB", "process peak RSS GB"], rows)


def growth_lines(results) -> list[str]:
    """Growth of each measure from 1,024 to 4,096 tokens on the probe models."""
    lines = []
    for model_name in ("probe", "probe-tied"):
        for step_name in STEPS:
            for head in HEADS:
                for finetune, attention in itertools.product(FINETUNES, ATTENTIONS):
                    picked = {r["tokens"]: r for r in results
                              if (r["model"], r["step"], r["head"], r["finetune"], r["attention"]) ==
                              (model_name, step_name, head, finetune, attention)}
                    if 1024 not in picked or 4096 not in picked:
                        continue
                    for key, label in (("xla_estimate_gb", "XLA estimate"), ("step_peak_gb", "step peak RSS")):
                        if not all(key in picked[t] for t in (1024, 4096)):
                            continue
                        low, high = picked[1024][key], picked[4096][key]
                        lines.append(f"- {model_name} {step_name}, {head} head, {finetune} fine-tuning, "
                                     f"{attention} attention, {label}: "
                                     f"{low:.2f} GB at 1,024 tokens -> {high:.2f} GB at 4,096 "
                                     f"({100 * (high / low - 1):+.0f}%)")
    return lines


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", nargs="+", metavar="STEP HEAD MODEL TOKENS [FINETUNE [ATTENTION]]",
                        help="run one case in this process and print its JSON")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--steps", nargs="+", default=list(STEPS), choices=list(STEPS))
    parser.add_argument("--heads", nargs="+", default=list(HEADS), choices=list(HEADS))
    parser.add_argument("--finetunes", nargs="+", default=["full"], choices=list(FINETUNES))
    parser.add_argument("--attentions", nargs="+", default=["auto"], choices=list(ATTENTIONS))
    parser.add_argument("--tokens", nargs="+", type=int, help="only these tokens per step (default: per model)")
    parser.add_argument("--execute-limit-gb", type=float, default=2.5)
    common.add_write_flags(parser)
    parser.add_argument("--collect", nargs="+", metavar="LOG",
                        help="build the section from the JSON lines of earlier runs' output instead of running")
    args = parser.parse_args(argv)
    if args.case:
        import resource

        if len(args.case) not in (4, 5, 6):
            parser.error("--case takes STEP HEAD MODEL TOKENS [FINETUNE [ATTENTION]]")
        result = run_case(*args.case[:4], args.execute_limit_gb, *args.case[4:])
        result["process_peak_kb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print(json.dumps(result))
        return
    results = []
    if args.collect:
        latest = {}  # one result per case: the last one logged
        for log in args.collect:
            for line in Path(log).read_text().splitlines():
                if line.startswith("{"):
                    result = with_gb(json.loads(line))
                    latest[(result["model"], result["step"], result["head"], result["tokens"],
                            result["finetune"], result["attention"])] = result
        order = {name: i for i, name in enumerate(MODELS)}
        results = sorted(latest.values(), key=lambda r: (
            order[r["model"]], r["tokens"], STEPS.index(r["step"]), FINETUNES.index(r["finetune"]),
            ATTENTIONS.index(r["attention"]), HEADS.index(r["head"])))
        args.models = list(dict.fromkeys(r["model"] for r in results))
    for model_name in [] if args.collect else args.models:
        for tokens in [t for t in TOKENS[model_name] if not args.tokens or t in args.tokens]:
            for step_name in [s for s in args.steps if s in MODEL_STEPS.get(model_name, STEPS)]:
                for finetune, attention, head in itertools.product(args.finetunes, args.attentions, args.heads):
                    case = (step_name, head, model_name, tokens, finetune, attention)
                    result = run_in_child(case, args.execute_limit_gb)
                    print(json.dumps(result), flush=True)
                    results.append(result)
    source = (f"the cases logged in {', '.join(args.collect)}; models {', '.join(args.models)}" if args.collect else
              f"models {', '.join(args.models)}; cases under {args.execute_limit_gb} GB XLA estimate executed")
    body = "\n".join([
        "## Memory", "",
        f"Run {common.utc_stamp()}: `{common.command_line('memory.py', argv)}` ({source}). "
        "See the script's docstring for the "
        "models, steps and measures: \"XLA estimate\" is compiled-program bytes (no execution); \"step peak "
        "RSS\" the resident high-water mark of the case's process from after compilation through building the "
        "arguments and two steps; \"RSS before step\" its resident set when that count starts (Python, JAX, "
        "the loaded executable); \"process peak RSS\" the process's lifetime maximum (`ru_maxrss`, "
        "compilation included).", "",
        *[f"    {line}" for line in common.machine_info()], "",
        table(results), "",
        *growth_lines(results), "",
    ])
    print(body)
    if args.write:
        common.write_section("## Memory", body)


if __name__ == "__main__":
    main()
