"""Side by side with TRL: DPO and reward-model training throughput, PPO iteration time.

Both sides start from the same weights, read the same data and use the same
hyperparameters, in one run:

- Weights: a small random Llama (default hidden 256, 4 layers, 4 heads, MLP 704, vocabulary
  1024) built here and saved ONCE with our `save_pretrained`: policy, a second random init as
  the DPO/PPO reference, and a `LlamaForSequenceClassification` reward model. TRL loads them
  with `transformers.AutoModelFor*`; we load them with `load_pretrained`.
- Data: a character tokenizer (one token per character, `rlhf_jax.pipeline.tokenizer`) and
  random texts: preference pairs with prompts and responses of 3/4..1 x the set lengths, and
  PPO prompts of exactly the set length. Both sides tokenise the same JSONL file; the script
  checks that they get the same token ids.
- Numerics: float32, sigmoid DPO with beta 0.1 on summed log-probs, the reference forward
  inside every DPO step (TRL's default), Bradley-Terry reward loss, AdamW (eps 1e-5,
  gradient clipping 1.0, linear decay), PPO with 4 epochs x 4 minibatches, k1 KL penalty
  0.05, clip 0.2, value clip 0.2, vf_coef 0.1, gamma 1, lambda 0.95, temperature 1.

Measured: the seconds of every step after warm-up, on both sides in alternating rounds
(ours, TRL, ours, TRL, ...) so that a change of machine load hits both; medians over all
rounds. Ours is one jitted call per step (batch preparation included); its compilation is
the first call, reported separately. TRL's step time runs from one `on_step_end` to the
next (its data loading included). tokens/s = real (non-padding) tokens per step, the same
number on both sides, / median step seconds. The step-0 loss is the loss of the first batch
(rows 0..B-1 of the file) before any update, on each side.

    pip install -e ".[bench]"          # trl (with PPO: trl<1.13) and torch pinned to the CPU wheel
    python benchmarks/vs_trl.py --write               # all three, updates benchmarks/RESULTS.md
    python benchmarks/vs_trl.py --only dpo reward --rounds 2   # print only
    python benchmarks/vs_trl.py --preset gpu-0.5b --dtype bfloat16 --peak-tflops 989 --only dpo ppo  # H100
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import jax_runners  # noqa: E402

from rlhf_jax.models.checkpoint_io import save_pretrained  # noqa: E402
from rlhf_jax.models.config import ModelConfig  # noqa: E402
from rlhf_jax.models.heads import RewardModel  # noqa: E402
from rlhf_jax.models.transformer import CausalLM  # noqa: E402

SECTION = "## vs TRL"
GPU_SECTION = "## vs TRL on GPU"  # written instead of SECTION when jax runs on an accelerator
GPU_COMMAND = ("python benchmarks/vs_trl.py --preset gpu-0.5b --dtype bfloat16 --peak-tflops 989 "
               "--only dpo ppo")
PRESETS = {  # model sizes and lengths
    "cpu": dict(vocab_size=1024, hidden_size=256, num_layers=4, num_heads=4, intermediate_size=704,
                batch_size=8, prompt_length=64, response_length=64,
                ppo_batch_size=16, ppo_prompt_length=32, ppo_response_length=32),
    # a few seconds per side: for trying the script out
    "tiny": dict(vocab_size=256, hidden_size=64, num_layers=2, num_heads=2, intermediate_size=128,
                 batch_size=4, prompt_length=16, response_length=16,
                 ppo_batch_size=8, ppo_prompt_length=8, ppo_response_length=8),
    # ~0.5B parameters (Qwen2-0.5B-like body, Llama layout), for an accelerator.
    "gpu-0.5b": dict(vocab_size=32000, hidden_size=1024, num_layers=24, num_heads=16, intermediate_size=2816,
                     batch_size=8, prompt_length=256, response_length=256,
                     ppo_batch_size=64, ppo_prompt_length=128, ppo_response_length=128),
}


@dataclasses.dataclass
class Hyperparameters:
    """What both sides train with."""

    batch_size: int = 8  # DPO / reward pairs per step
    learning_rate: float = 1e-5
    beta: float = 0.1
    adam_eps: float = 1e-5
    max_grad_norm: float = 1.0
    dtype: str = "float32"  # compute dtype; "bfloat16": TRL bf16 autocast, ours dtype=bfloat16
    seed: int = 0
    ppo_batch_size: int = 16  # prompts per rollout
    ppo_minibatches: int = 4
    ppo_epochs: int = 4
    ppo_response_length: int = 32
    kl_coef: float = 0.05
    grpo_group_size: int = 4  # GRPO samples per prompt (prompts = ppo_batch_size // G)


@dataclasses.dataclass
class Setup:
    """The folders and files both sides read."""

    folder: Path
    config: ModelConfig
    tokenizer_dir: Path
    policy_dir: Path
    reference_dir: Path
    reward_dir: Path
    pairs_file: Path
    sft_file: Path  # prompt/completion rows: the pairs' prompts and chosen responses
    prompt_length: int  # longest prompt in characters
    response_length: int  # longest response in characters
    ppo_prompt_ids: np.ndarray  # [N, P] token ids of the PPO prompts (BOS first, no padding)


def build_setup(folder: Path, sizes: dict, hp: Hyperparameters, num_pairs: int, num_prompts: int,
                weights_dtype: str = "float32") -> Setup:
    """Random policy, reference and reward folders (weights stored in `weights_dtype`; both
    sides read the same files), the tokenizer, the pairs / SFT files and the PPO prompts."""
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = common.build_character_tokenizer(folder / "tokenizer", sizes["vocab_size"])
    special = dict(pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                   bos_token_id=tokenizer.bos_token_id)
    longest = 1 + sizes["prompt_length"] + sizes["response_length"] + 1
    config = ModelConfig.llama(
        vocab_size=len(tokenizer), hidden_size=sizes["hidden_size"], num_layers=sizes["num_layers"],
        num_heads=sizes["num_heads"], intermediate_size=sizes["intermediate_size"],
        max_position_embeddings=max(longest, 1 + sizes["ppo_prompt_length"] + sizes["ppo_response_length"]),
        **special)
    dummy = jnp.zeros((1, 2), jnp.int32)
    dirs = {}
    for name, module, seed in (("policy", CausalLM(config), 0), ("reference", CausalLM(config), 1),
                               ("reward", RewardModel(config), 2)):
        params = module.init(jax.random.PRNGKey(seed), dummy)["params"]
        dirs[name] = save_pretrained(folder / name, module, jax.device_get(params), dtype=weights_dtype, **special)
        tokenizer.save_pretrained(str(dirs[name]))
    rng = np.random.default_rng(hp.seed)
    alphabet = common.character_alphabet(sizes["vocab_size"] - common.NUM_SPECIAL_TOKENS)
    prompt, response = sizes["prompt_length"], sizes["response_length"]
    pairs_file, sft_file = folder / "pairs.jsonl", folder / "sft.jsonl"
    with open(pairs_file, "w", encoding="utf-8") as pairs, open(sft_file, "w", encoding="utf-8") as sft:
        for _ in range(num_pairs):
            row = {"prompt": common.random_text(rng, alphabet, 3 * prompt // 4, prompt),
                   "chosen": common.random_text(rng, alphabet, 3 * response // 4, response),
                   "rejected": common.random_text(rng, alphabet, 3 * response // 4, response)}
            pairs.write(json.dumps(row, ensure_ascii=False) + "\n")
            sft.write(json.dumps({"prompt": row["prompt"], "completion": row["chosen"]}, ensure_ascii=False) + "\n")
    ppo_prompt_ids = np.concatenate([
        np.full((num_prompts, 1), tokenizer.bos_token_id),
        rng.integers(common.NUM_SPECIAL_TOKENS, len(tokenizer), (num_prompts, sizes["ppo_prompt_length"])),
    ], axis=1).astype(np.int32)
    return Setup(folder, config, folder / "tokenizer", dirs["policy"], dirs["reference"], dirs["reward"],
                 pairs_file, sft_file, prompt, response, ppo_prompt_ids)


def run_rounds(name: str, ours_block, trl_block, rounds: int) -> dict:
    """Alternate `ours_block()` and `trl_block()` `rounds` times; each returns (wall seconds,
    CPU seconds) per step. Medians over all rounds. `trl_block=None`: ours alone (no TRL keys,
    no speed-ups)."""
    blocks = [("ours", ours_block)] + ([("trl", trl_block)] if trl_block is not None else [])
    pooled = {side: ([], []) for side, _ in blocks}
    loads = []
    for index in range(rounds):
        loads.append(common.load_average_1min())
        for side, block in blocks:
            wall, cpu = block()
            pooled[side][0].extend(wall)
            pooled[side][1].extend(cpu)
        print(f"[{name}] round {index + 1}/{rounds}: " + ", ".join(
            f"{side} {1e3 * common.median(pooled[side][0]):.1f} ms" for side in pooled)
            + f" (medians so far), load {loads[-1]:.1f}", flush=True)
    result = {"steps": {side: len(wall) for side, (wall, _) in pooled.items()}, "load": float(np.mean(loads))}
    for side, (wall, cpu) in pooled.items():
        result[f"{side}_seconds"] = common.median(wall)
        result[f"{side}_cpu_seconds"] = common.median(cpu)
    if trl_block is not None:
        result["speedup"] = result["trl_seconds"] / result["ours_seconds"]
        result["cpu_speedup"] = result["trl_cpu_seconds"] / result["ours_cpu_seconds"]
    return result


def trl_timed(run, setup, hp, args, kind: str, steps: int):
    """A TRL block: `warmup + steps` steps in a fresh trainer, the warm-up ones dropped."""
    out = run(setup, hp, args.warmup + steps, setup.folder / f"trl_{kind}")
    return out["step_seconds"][args.warmup:], out["step_cpu_seconds"][args.warmup:]


def choose_torch_threads(setup: Setup, hp: Hyperparameters, args, trl_runners) -> dict:
    """`--torch-threads auto`: a short TRL DPO run with torch's default thread count and with
    one thread; TRL then runs with the faster (on a loaded machine torch's spinning worker
    threads can make the default many times slower)."""
    import torch

    default = torch.get_num_threads()
    if torch.cuda.is_available():  # host threads hardly matter on an accelerator
        return {"threads": default, "probe": {}}
    if args.torch_threads != "auto":
        torch.set_num_threads(int(args.torch_threads))
        return {"threads": int(args.torch_threads), "probe": {}}
    probe = {}
    for threads in sorted({default, 1}, reverse=True):
        torch.set_num_threads(threads)
        out = trl_runners.trl_dpo(setup, hp, 3, setup.folder / "trl_probe")
        probe[threads] = common.median(out["step_seconds"][1:])
        print(f"[threads] TRL DPO with torch.set_num_threads({threads}): {1e3 * probe[threads]:.0f} ms/step", flush=True)
    best = min(probe, key=probe.get)
    torch.set_num_threads(best)
    return {"threads": best, "probe": probe}


TRL_RUNNERS = {"sft": "trl_sft", "dpo": "trl_dpo", "reward": "trl_reward"}


def compare_training(kind: str, setup: Setup, hp: Hyperparameters, args, trl_runners) -> dict:
    """SFT, DPO or reward model: step-0 losses, then timed rounds (`trl_runners=None`: ours alone)."""
    session = jax_runners.TrainingSession(kind, setup, hp)
    tokens = session.tokens_per_step
    base = dict(ours_loss0=session.loss0, compile_seconds=session.compile_seconds, tokens_per_step=tokens,
                flops_per_step=session.flops_per_step)
    if trl_runners is None:
        result = run_rounds(kind, lambda: session.run(args.steps), None, args.rounds)
        return {**result, **base, "ours_tokens_per_s": tokens / result["ours_seconds"]}
    run = getattr(trl_runners, TRL_RUNNERS[kind])
    first = run(setup, hp, 1, setup.folder / f"trl_{kind}")
    if first["first_chosen_ids"] != session.first_chosen_ids():
        raise RuntimeError(f"{kind}: TRL and rlhf_jax tokenised the first row differently")
    result = run_rounds(kind, lambda: session.run(args.steps), lambda: trl_timed(run, setup, hp, args, kind, args.steps),
                        args.rounds)
    result.update(base, trl_loss0=first["loss0"], ours_tokens_per_s=tokens / result["ours_seconds"],
                  trl_tokens_per_s=tokens / result["trl_seconds"])
    result["loss_difference"] = abs(result["ours_loss0"] - result["trl_loss0"])
    return result


def compare_ppo(setup: Setup, hp: Hyperparameters, args, trl_runners) -> dict:
    """PPO iterations, timed rounds (`trl_runners=None`: ours alone)."""
    session = jax_runners.PPOSession(setup, hp)
    trl_block = None if trl_runners is None else (
        lambda: trl_timed(trl_runners.trl_ppo, setup, hp, args, "ppo", args.ppo_steps))
    result = run_rounds("ppo", lambda: session.run(args.ppo_steps), trl_block, args.rounds)
    result.update(compile_seconds=session.compile_seconds, flops_per_step=session.flops_per_step,
                  tokens_per_step=session.tokens_per_step,
                  ours_tokens_per_s=session.tokens_per_step / result["ours_seconds"])
    if trl_runners is not None:
        result["trl_tokens_per_s"] = session.tokens_per_step / result["trl_seconds"]
    return result


ROW_LABELS = {"sft": "SFT step (prompt + completion, loss on the completion)",
              "dpo": "DPO step (sigmoid, beta 0.1, reference forward in the step)",
              "reward": "reward-model step (Bradley-Terry)",
              "grpo": "GRPO update (one pass over a rollout of G samples per prompt)",
              "ppo": "PPO iteration (rollout + scoring + 4 epochs x 4 minibatches)"}


def model_sentence(kinds, hp: Hyperparameters, setup: Setup, args) -> str:
    """The model, and the settings and timed rounds of the rows in `kinds` only."""
    c = setup.config
    pair_kinds = [name for name, kind in (("DPO", "dpo"), ("reward", "reward")) if kind in kinds]
    text = (f"Model: random Llama, vocabulary {c.vocab_size}, hidden {c.hidden_size}, {c.num_layers} layers, "
            f"{c.num_heads} heads, MLP {c.intermediate_size}, {hp.dtype}.")
    timed = []
    if pair_kinds:
        text += (f" {' / '.join(pair_kinds)}: {hp.batch_size} pairs per step, prompts of "
                 f"{3 * setup.prompt_length // 4}-{setup.prompt_length} and responses of "
                 f"{3 * setup.response_length // 4}-{setup.response_length} tokens (+ BOS, EOS).")
        timed.append(f"{args.steps} timed steps")
    if "ppo" in kinds:
        text += (f" PPO: {hp.ppo_batch_size} prompts of {setup.ppo_prompt_ids.shape[1]} tokens, "
                 f"{hp.ppo_response_length} new tokens, {hp.ppo_epochs} epochs x {hp.ppo_minibatches} minibatches.")
        timed.append(f"{args.ppo_steps} timed PPO iterations")
    return (text + f" {args.rounds} alternating rounds of {' and '.join(timed)} per side (TRL: after "
            f"{args.warmup} warm-up step(s) in each fresh trainer).")


def report(results: dict, info: list[str], command: str, hp: Hyperparameters, setup: Setup, args,
           threads: dict, minutes: float) -> str:
    rows = []
    for kind, r in results.items():
        if kind == "ppo":
            ours_cell, trl_cell = f"{r['ours_seconds']:.2f} s/iteration", f"{r['trl_seconds']:.2f} s/iteration"
            loss = "-"
        else:
            ours_cell = f"{r['ours_tokens_per_s']:.0f} tok/s ({1e3 * r['ours_seconds']:.0f} ms)"
            trl_cell = f"{r['trl_tokens_per_s']:.0f} tok/s ({1e3 * r['trl_seconds']:.0f} ms)"
            loss = f"{r['ours_loss0']:.6f} / {r['trl_loss0']:.6f} (diff {r['loss_difference']:.1e})"
        rows.append([ROW_LABELS[kind], ours_cell, trl_cell, f"**{r['speedup']:.2f}x**",
                     f"{r['ours_cpu_seconds']:.3g} / {r['trl_cpu_seconds']:.3g} ({r['cpu_speedup']:.2f}x)",
                     loss, f"{r['compile_seconds']:.1f}", f"{r['load']:.1f}"])
    table = common.markdown_table(
        ["row", "rlhf_jax (median)", "TRL (median)", "speed ours / TRL", "CPU s per step ours / TRL",
         "step-0 loss ours / TRL", "our compile (s)", "load avg"], rows, "lrrrrrrr")
    if args.peak_tflops:
        mfu_rows = [[ROW_LABELS[kind], side,
                     f"{r['flops_per_step'] / r[side + '_seconds'] / 1e12:.2f}",
                     f"{r['flops_per_step'] / r[side + '_seconds'] / 1e12 / args.peak_tflops:.1%}"]
                    for kind, r in results.items() for side in ("ours", "trl")]
        table += "\n\n" + common.markdown_table(["row", "side", "model TFLOP/s", "MFU"], mfu_rows, "llrr")
    probe = ", ".join(f"{n} thread(s) {1e3 * s:.0f} ms" for n, s in threads["probe"].items())
    on_cpu = jax.default_backend() == "cpu"
    reading = (
        "Reading it: speed = TRL's median step time / ours (above 1: rlhf_jax is faster); CPU s per step = "
        "process CPU time of all threads per step, the work each side does, less sensitive to the load of a "
        "shared machine than wall time. Compare ratios within one run. The step-0 losses are computed on "
        "the same first batch before any update by each side's own code.\n")
    gpu = (
        "\nOn an accelerator: section `## Accelerator (H100)` (`benchmarks/accelerator_check.sh`: SFT, DPO, "
        "GRPO and PPO on a ~0.5B-parameter model in bfloat16 beside TRL), or, for this comparison alone, "
        f"`{GPU_COMMAND}`, which writes `{GPU_SECTION}`.\n") if on_cpu else ""
    return (
        f"{SECTION if on_cpu else GPU_SECTION}\n\n"
        f"Command: `{command}` ({common.utc_stamp()}, {minutes:.1f} min in all; TRL {args.trl_version}, "
        f"torch {common.package_version('torch')}, transformers {common.package_version('transformers')})\n\n"
        "```\n" + "\n".join(info) + "\n```\n\n"
        + model_sentence(list(results), hp, setup, args) + " "
        f"TRL ran with torch.set_num_threads({threads['threads']})"
        + (f" (probe, TRL DPO step: {probe})" if probe else "") + "; rlhf_jax with XLA's default threads.\n\n"
        + table + "\n\n" + reading + gpu
    )


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", choices=("dpo", "reward", "ppo"), default=["dpo", "reward", "ppo"],
                        help="rows (our DPO and reward steps run each pair's prompt once; TRL runs it twice)")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--steps", type=int, default=8, help="timed DPO / reward steps per side per round")
    parser.add_argument("--ppo-steps", type=int, default=4, help="timed PPO iterations per side per round")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds (ours, TRL)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps at the start of each TRL run")
    parser.add_argument("--torch-threads", default="auto",
                        help="torch threads for TRL: a number, or auto (probe the default and 1)")
    parser.add_argument("--peak-tflops", type=float, default=0.0, help="accelerator peak for MFU (H100 bf16: 989)")
    parser.add_argument("--workdir", default=None, help="where the weights and data go (default: a temp dir)")
    common.add_write_flags(parser)
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    import trl_runners

    args.trl_version = trl_runners.trl_version()
    sizes = PRESETS[args.preset]
    hp = Hyperparameters(batch_size=sizes["batch_size"], dtype=args.dtype, ppo_batch_size=sizes["ppo_batch_size"],
                         ppo_response_length=sizes["ppo_response_length"])
    started = time.time()
    info = common.machine_info(("jax", "flax", "optax", "torch", "transformers", "trl"))
    print("\n".join(info), flush=True)
    steps_needed = (args.warmup + max(args.steps, args.ppo_steps)) * max(args.rounds, 1) + 4
    with tempfile.TemporaryDirectory() as scratch:
        setup = build_setup(Path(args.workdir or scratch), sizes, hp, num_pairs=hp.batch_size * steps_needed,
                            num_prompts=hp.ppo_batch_size * steps_needed)
        threads = choose_torch_threads(setup, hp, args, trl_runners)
        results = {}
        for kind in args.only:
            compare = compare_ppo if kind == "ppo" else lambda *a: compare_training(kind, *a)
            results[kind] = compare(setup, hp, args, trl_runners)
            print(f"[{kind}] {json.dumps(results[kind], default=float)}", flush=True)
        info[2] = f"load average (1/5/15 min) at the end: {common.load_average()}"
        command = common.command_line("vs_trl.py", argv)
        section = report(results, info, command, hp, setup, args, threads, (time.time() - started) / 60)
    print(section)
    if args.write:
        common.write_section(SECTION if jax.default_backend() == "cpu" else GPU_SECTION, section)
    return results


if __name__ == "__main__":
    main()
