"""Preference losses on equal budgets: every `dpo_loss` type, SimPO, CPO, ORPO and KTO.

From one SFT checkpoint and one set of preference pairs, each loss trains with the same
steps, batch, learning rate and schedule, for several seeds (the seed sets the data order and
the evaluation samples); every run is then evaluated on held-out prompts and pairs:

    pass@1            share of sampled responses (temperature 1) whose answer is exactly right
    gold reward       mean graded gold reward of the samples (share of right digits, -1 when a
                      response never stops); with a user's data: exact match of `answer`
    KL                mean over samples of sum_t log pi(y_t) - log pi_sft(y_t) (k1 sequence
                      estimate on the policy's own samples, nats)
    win rate          vs the SFT model's sample for the same prompt and PRNG key, by graded
                      gold reward, ties count half
    margin, accuracy  held-out pairs: mean of (log pi - log pi_sft)(chosen) - (same)(rejected)
                      in nats (no beta, so losses compare), and the share of pairs where it is > 0

Results: a markdown table (mean +- std over seeds), a beta sweep table for DPO (sigmoid), IPO
and hinge, and a plot of gold reward and pass@1 against KL (the frontier).

Each run uses the library pieces end to end: reference log-probs computed once per dataset
(`rlhf_jax.pipeline.stages.dpo.dataset_logps`), `preference_step` compiled once per loss (and shared
by the seeds) driven by the pipeline's `run_loop`, sampling with `sample_policy` (KV-cache
`generate`), scoring with the built-in task's gold scorer. KTO trains on the same pairs cut
into unpaired examples (chosen = desirable, rejected = undesirable), so every step sees the
same 2 x batch sequences.

    python benchmarks/loss_variants.py                    # built-in task + quick SFT, all losses, 3 seeds
    python benchmarks/loss_variants.py --loss-types sigmoid ipo simpo kto --seeds 0 1 --steps 60
    python benchmarks/loss_variants.py --model my_sft_folder --train-data pairs.jsonl \\
        --eval-prompts prompts_with_answers.jsonl --eval-pairs heldout_pairs.jsonl \\
        --max-prompt-length 256 --max-response-length 128
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

from rlhf_jax.losses.preference import DPO_LOSS_TYPES  # noqa: E402
from rlhf_jax.models.config import ModelConfig  # noqa: E402
from rlhf_jax.pipeline import eval_metrics  # noqa: E402
from rlhf_jax.pipeline.batching import BatchIterator  # noqa: E402
from rlhf_jax.pipeline.data import DataConfig, load_data  # noqa: E402
from rlhf_jax.pipeline.loop import run_loop  # noqa: E402
from rlhf_jax.pipeline.stage_configs import (  # noqa: E402
    CheckpointSection, EvalConfig, LoggingSection, ModelSection, SFTConfig, TrainSection, with_schedule_length,
)
from rlhf_jax.pipeline.stages.scoring import decode_rows, gold_scores  # noqa: E402
from rlhf_jax.pipeline.stages import stage_setup as stage  # noqa: E402
from rlhf_jax.pipeline.stages.dpo import dataset_logps, make_pair_logps, with_reference  # noqa: E402
from rlhf_jax.pipeline.stages.evaluate import sample_policy  # noqa: E402
from rlhf_jax.pipeline.stages.sft import train_sft  # noqa: E402
from rlhf_jax.tasks.arithmetic import TaskConfig, build_task, parse_problem  # noqa: E402
from rlhf_jax.training.batches import KTOBatch  # noqa: E402
from rlhf_jax.training.preference_step import PreferenceLossConfig, preference_step  # noqa: E402
from rlhf_jax.training import sharding  # noqa: E402
from rlhf_jax.training.optim import OptimizerConfig, make_optimizer  # noqa: E402
from rlhf_jax.training.logprobs import response_logprobs  # noqa: E402
from rlhf_jax.training.rollout import sampled_batch  # noqa: E402
from rlhf_jax.training.sharding import MeshConfig  # noqa: E402
from rlhf_jax.training.state import create_train_state, train_state_shardings  # noqa: E402
from rlhf_jax.training.step_runner import make_train_step  # noqa: E402

SECTION = "## Loss variants"
REFERENCE_FREE = ("simpo", "cpo", "orpo")
VARIANTS = DPO_LOSS_TYPES + REFERENCE_FREE + ("kto",)
DEFAULT_BETA = {"simpo": 2.0}  # SimPO's paper range is 2.0-2.5 (target_margin 0.5); every other loss 0.1
LABEL_SMOOTHING = {"robust": 0.1}  # robust DPO with eps = 0 is plain DPO (exo_pair defaults to 1e-3)
SWEPT = ("sigmoid", "ipo", "hinge")
METRICS = ("pass@1", "gold_reward", "kl", "win_rate", "margin", "accuracy")


@dataclasses.dataclass
class Settings:
    """One benchmark: data, model and the shared training / evaluation budget."""

    model_dir: str  # SFT checkpoint (Hugging Face folder); also the frozen reference
    train_file: str  # preference pairs
    eval_prompts_file: str  # held-out prompts (built-in task, or with an `answer` column)
    eval_pairs_file: str | None  # held-out pairs for margins (None: skip)
    output_dir: str
    tokenizer_dir: str | None = None  # None: the model folder
    loss_types: tuple[str, ...] = VARIANTS
    seeds: tuple[int, ...] = (0, 1, 2)
    sweep_betas: tuple[float, ...] = (0.03, 0.3)  # extra betas for SWEPT (the default 0.1 is reused)
    steps: int = 60
    batch_size: int = 32  # pairs per step (KTO: 2 x this many unpaired rows)
    learning_rate: float = 3e-4
    warmup_steps: int = 5
    max_prompt_length: int = 8
    max_response_length: int = 8
    num_eval_prompts: int = 128
    num_samples: int = 4  # samples per eval prompt
    max_new_tokens: int = 8
    temperature: float = 1.0


def loss_config(name: str, beta: float) -> PreferenceLossConfig:
    if name in DPO_LOSS_TYPES:
        return PreferenceLossConfig(kind="dpo", loss_type=name, beta=beta,
                                    label_smoothing=LABEL_SMOOTHING.get(name, 0.0))
    return PreferenceLossConfig(kind=name, beta=beta)


def runs_to_do(settings: Settings) -> list[tuple[str, float]]:
    """(loss, beta) pairs: every loss at its default beta, plus the sweep betas of SWEPT."""
    runs = [(name, DEFAULT_BETA.get(name, 0.1)) for name in settings.loss_types]
    for name in SWEPT:
        if name in settings.loss_types:
            runs += [(name, beta) for beta in settings.sweep_betas if beta != DEFAULT_BETA.get(name, 0.1)]
    return runs


def kto_batch(batch) -> KTOBatch:
    """Pairs -> unpaired rows (chosen desirable, rejected undesirable), interleaved: each
    prompt twice, with one response each."""
    prompt = lambda x: np.repeat(np.asarray(x), 2, axis=0)  # [2B, P]
    unpair = lambda x: np.asarray(x).reshape(-1, 1, np.shape(x)[-1])  # [B, 2, R] -> [2B, 1, R]
    return KTOBatch(
        prompt_ids=prompt(batch.prompt_ids), prompt_mask=prompt(batch.prompt_mask),
        response_ids=unpair(batch.response_ids), response_mask=unpair(batch.response_mask),
        is_desirable=np.tile(np.array([1.0, 0.0], np.float32), batch.batch_size),
        ref_logps=np.asarray(batch.ref_logps).reshape(-1),
    )


def exact_answers(tokenizer, tokens, answers) -> np.ndarray:
    """`[M]` 1.0 where sampled response `tokens[i]` ends (holds the EOS) and its text before
    the EOS, decoded without special tokens (so a chat template's end-of-turn token goes too),
    is `answers[i]` (whitespace stripped), else 0.0."""
    eos = tokenizer.eos_token_id
    tokens = np.asarray(tokens)
    after_eos = np.cumsum(tokens == eos, axis=1) > 0
    texts = decode_rows(tokenizer, np.where(after_eos, eos, tokens), skip_special_tokens=True)
    return np.array([float(ended and text.strip() == answer.strip())
                     for text, answer, ended in zip(texts, answers, after_eos[:, -1])], np.float32)


class Evaluator:
    """Samples, gold scores, KL and held-out margins of a policy; SFT samples per seed."""

    def __init__(self, module, sft_params, tokenizer, settings: Settings, mesh):
        self.module, self.sft_params, self.tokenizer, self.settings, self.mesh = (
            module, sft_params, tokenizer, settings, mesh)
        lengths = DataConfig(max_prompt_length=settings.max_prompt_length, max_response_length=1)
        prompts = load_data(settings.eval_prompts_file, tokenizer, lengths, kind="prompt")
        count = min(settings.num_eval_prompts, len(prompts))
        repeat = lambda name: np.repeat(prompts.arrays[name][:count], settings.num_samples, axis=0)
        self.prompt_ids, self.prompt_mask = repeat("prompt_ids"), repeat("prompt_mask")
        texts = prompts.columns["prompt_text"][:count]
        self.answers = None
        try:
            [parse_problem(text) for text in texts]
        except ValueError:
            answers = prompts.columns.get("answer")
            if answers is None or any(a is None for a in answers[:count]):
                raise ValueError(f"{settings.eval_prompts_file}: prompts that are not the built-in "
                                 "task need an `answer` column") from None
            self.answers = [str(a) for a in answers[:count] for _ in range(settings.num_samples)]
        self.logps = jax.jit(lambda params, ids, mask, response_mask: response_logprobs(
                module.apply, params, sampled_batch(ids, mask, response_mask)).sequence_sum()[:, 0])
        self.pair_logps = make_pair_logps(module.apply)
        self.pairs = self.reference_pairs = None
        if settings.eval_pairs_file:
            pair_lengths = DataConfig(max_prompt_length=settings.max_prompt_length,
                                      max_response_length=settings.max_response_length)
            self.pairs = load_data(settings.eval_pairs_file, tokenizer, pair_lengths, kind="preference")
            self.reference_pairs = self._pair_logps(sft_params)
        self._sft_samples = {}

    def _pair_logps(self, params):
        return dataset_logps(self.pair_logps, params, self.pairs, 64, self.mesh)

    def _scores(self, tokens):
        """(exact, graded) rewards of sampled response tokens [M, N]."""
        if self.answers is None:
            return tuple(gold_scores(self.tokenizer, self.prompt_ids, tokens, kind=kind)
                         for kind in ("exact", "graded"))
        exact = exact_answers(self.tokenizer, tokens, self.answers)
        return exact, exact

    def sample(self, params, seed: int) -> dict:
        config = EvalConfig(seed=seed, num_samples=self.settings.num_samples, batch_size=len(self.prompt_ids),
                            max_new_tokens=self.settings.max_new_tokens, temperature=self.settings.temperature)
        samples = sample_policy(self.module, params, self.prompt_ids, self.prompt_mask, config, self.tokenizer)
        samples["exact"], samples["graded"] = self._scores(samples["tokens"])
        return samples

    def sft_samples(self, seed: int) -> dict:
        if seed not in self._sft_samples:
            self._sft_samples[seed] = self.sample(self.sft_params, seed)
        return self._sft_samples[seed]

    def evaluate(self, params, seed: int) -> dict:
        samples, reference = self.sample(params, seed), self.sft_samples(seed)
        ids = jnp.asarray(np.concatenate([self.prompt_ids, samples["tokens"]], axis=1))
        mask = jnp.asarray(np.concatenate([self.prompt_mask, samples["mask"]], axis=1))
        response_mask = jnp.asarray(samples["mask"])
        kl = np.asarray(self.logps(params, ids, mask, response_mask) - self.logps(self.sft_params, ids, mask, response_mask))
        out = {"pass@1": float(samples["exact"].mean()), "gold_reward": float(samples["graded"].mean()),
               "kl": float(kl.mean()), "win_rate": eval_metrics.win_rate(samples["graded"], reference["graded"]),
               "eos_rate": float(samples["finished"].mean()),
               "response_length": eval_metrics.mean_length(samples["mask"])}
        if self.pairs is not None:
            chosen, rejected = self._pair_logps(params)
            margins = (chosen - self.reference_pairs[0]) - (rejected - self.reference_pairs[1])
            out.update(margin=float(margins.mean()), accuracy=float(np.mean(margins > 0)))
        return out


def fresh_state(module, params, optimizer, mesh):
    """A train state on a copy of `params` (`stage.make_state` with a given optimizer object, so
    that states of different runs share one compiled step) and its shardings."""
    param_shardings = sharding.param_shardings(params, mesh)
    state = create_train_state(module, jax.tree.map(jnp.copy, params), optimizer, param_shardings=param_shardings)
    state = state.replace(step=jax.device_put(jnp.zeros((), jnp.int32), sharding.replicated(mesh)))
    return state, train_state_shardings(state, param_shardings)


def train_and_evaluate(settings: Settings, log=print) -> list[dict]:
    """Every (loss, beta) x seed of `settings`: train from the SFT checkpoint, evaluate.
    Returns one row per run (plus one "sft" row per seed) with the metrics of `Evaluator`."""
    mesh = stage.stage_mesh(MeshConfig(data=1))
    tokenizer = stage.stage_tokenizer(settings.tokenizer_dir, settings.model_dir)
    module, sft_params = stage.load_folder(settings.model_dir, head="lm", key="model")
    lengths = DataConfig(max_prompt_length=settings.max_prompt_length, max_response_length=settings.max_response_length)
    data = load_data(settings.train_file, tokenizer, lengths, kind="preference")
    pair_logps = make_pair_logps(module.apply)
    ref_chosen, ref_rejected = dataset_logps(pair_logps, sft_params, data, 64, mesh)
    evaluator = Evaluator(module, sft_params, tokenizer, settings, mesh)
    optim = with_schedule_length(OptimizerConfig(learning_rate=settings.learning_rate,
                                                 warmup_steps=settings.warmup_steps), settings.steps)
    optimizer = make_optimizer(optim)  # one object: the states' tree metadata must match across runs
    _, shardings = fresh_state(module, sft_params, optimizer, mesh)
    rows = []
    for seed in settings.seeds:
        rows.append({"loss": "sft", "beta": 0.0, "seed": seed, **evaluator.evaluate(sft_params, seed)})
    for name, beta in runs_to_do(settings):
        step = make_train_step(preference_step, mesh=mesh, state_shardings=shardings, config=loss_config(name, beta))
        for seed in settings.seeds:
            began = time.perf_counter()
            state, _ = fresh_state(module, sft_params, optimizer, mesh)
            batches = BatchIterator(data, settings.batch_size, seed=seed)

            def prepare(batch):
                pairs = with_reference(batch, ref_chosen, ref_rejected)
                return stage.place(kto_batch(pairs) if name == "kto" else pairs, mesh)

            def step_fn(carry, batch):
                new_state, metrics = step(carry["state"], batch)
                return {"state": new_state}, metrics

            result = run_loop(
                output_dir=Path(settings.output_dir) / "runs" / f"{name}_beta{beta:g}" / f"seed{seed}",
                carry={"state": state}, step_fn=step_fn, batches=batches, prepare_batch=prepare,
                num_steps=settings.steps, checkpoint=CheckpointSection(interval=0, keep=1, async_save=False),
                logging=LoggingSection(every=max(1, settings.steps // 10), tensorboard=False, progress=False),
                description=name, compiled=(step,))
            metrics = evaluator.evaluate(result.carry["state"].params, seed)
            loss_key = next((k for k in result.last_metrics if k.endswith("/loss")), None)
            rows.append({"loss": name, "beta": beta, "seed": seed, **metrics,
                         "final_train_loss": float(result.last_metrics[loss_key]) if loss_key else float("nan"),
                         "seconds": round(time.perf_counter() - began, 2)})
            log(f"[{name} beta={beta:g} seed={seed}] " + "  ".join(
                f"{k} {rows[-1][k]:.3f}" for k in METRICS if k in rows[-1]) + f"  ({rows[-1]['seconds']:.1f}s)")
    return rows


def summarise(rows: list[dict]) -> list[dict]:
    """Mean and std over seeds of every metric, per (loss, beta), in first-seen order."""
    groups: dict[tuple[str, float], list[dict]] = {}
    for row in rows:
        groups.setdefault((row["loss"], row["beta"]), []).append(row)
    summary = []
    for (name, beta), members in groups.items():
        entry = {"loss": name, "beta": beta, "seeds": len(members)}
        for key in METRICS:
            if key in members[0]:
                entry[key] = common.mean_std([m[key] for m in members])
        summary.append(entry)
    return summary


def _cell(entry: dict, key: str, digits: int = 3) -> str:
    if key not in entry:
        return "-"
    mean, std = entry[key]
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def markdown_tables(summary: list[dict]) -> tuple[str, str]:
    """(main table at each loss's default beta + the SFT row, beta sweep table)."""
    header = ["loss", "beta", "pass@1", "gold reward", "KL (nats)", "win rate vs SFT", "held-out margin",
              "held-out acc."]
    def row(e):
        cells = [_cell(e, k, 2 if k in ("kl", "margin") else 3) for k in METRICS]
        if e["loss"] == "sft":  # the reference itself: no margin to speak of
            cells[-2:] = ["-", "-"]
        return [e["loss"], "-" if e["loss"] == "sft" else f"{e['beta']:g}", *cells]
    defaults = [e for e in summary if e["loss"] == "sft" or e["beta"] == DEFAULT_BETA.get(e["loss"], 0.1)]
    main = common.markdown_table(header, [row(e) for e in defaults], "lrrrrrrr")
    swept = sorted((e for e in summary if e["loss"] in SWEPT), key=lambda e: (SWEPT.index(e["loss"]), e["beta"]))
    sweep = common.markdown_table(header, [row(e) for e in swept], "lrrrrrrr") if swept else ""
    return main, sweep


def frontier_plot(summary: list[dict], path: Path) -> Path:
    """Gold reward and pass@1 against KL (symmetric-log KL axis, so far-off losses stay on the
    page): one point per loss with std bars over seeds, lines through the beta sweeps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(16, 7))
    points = [e for e in summary if e["loss"] == "sft" or e["beta"] == DEFAULT_BETA.get(e["loss"], 0.1)]
    offsets = [(4, 4), (4, -9), (-4, 6), (6, 0), (-6, -8)]
    colors = plt.get_cmap("tab20")
    for axis, key, label in ((axes[0], "gold_reward", "mean gold reward (graded)"), (axes[1], "pass@1", "pass@1")):
        for index, entry in enumerate(points):
            (x, x_err), (y, y_err) = entry["kl"], entry[key]
            is_sft = entry["loss"] == "sft"
            axis.errorbar(x, y, xerr=x_err, yerr=y_err, fmt="*" if is_sft else "o", color=colors(index % 20),
                          markersize=12 if is_sft else 5, capsize=2, alpha=0.85)
            axis.annotate(entry["loss"], (x, y), fontsize=7, xytext=offsets[index % len(offsets)],
                          textcoords="offset points", ha="right" if offsets[index % len(offsets)][0] < 0 else "left")
        for name, style in zip(SWEPT, ("-", "--", ":")):
            line = sorted((e for e in summary if e["loss"] == name), key=lambda e: e["beta"])
            if len(line) > 1:
                axis.plot([e["kl"][0] for e in line], [e[key][0] for e in line], style, color="black", marker="x",
                          linewidth=1, label=f"{name}: beta " + ", ".join(f"{e['beta']:g}" for e in line))
        axis.set_xscale("symlog", linthresh=0.1)
        axis.set_xlabel("KL to the SFT reference (nats per response, k1 on samples; symlog axis)")
        axis.set_ylabel(label)
        axis.grid(alpha=0.3)
        if axis.get_legend_handles_labels()[0]:
            axis.legend(fontsize=8, loc="best")
    figure.suptitle("Preference losses on equal budgets: quality against KL (mean ± std over seeds)")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def default_model(out: Path, sft_steps: int, log=print) -> tuple[str, str, str, str]:
    """Build the built-in task (two-digit sums) and run a quick SFT of a tiny Llama on it.
    Returns (model folder, train pairs, eval prompts, eval pairs)."""
    task = build_task(out / "task", TaskConfig(
        seed=0, min_digits=1, max_digits=2, num_sft=8000, num_preferences=4000, num_prompts=0,
        num_eval_prompts=256, num_eval_preferences=256, sft_noise_rate=0.2, preference_noise_rate=0.5))
    sft_dir = out / f"sft_{sft_steps}_steps"
    model = sft_dir / stage.MODEL_DIR
    if not (model / "config.json").exists():  # reused when it exists (same task and steps)
        config = SFTConfig(
            output_dir=str(sft_dir), tokenizer=str(task.tokenizer_dir),
            model=ModelSection(init=ModelConfig.llama(vocab_size=32, hidden_size=64, num_layers=2, num_heads=4,
                                                      intermediate_size=256, max_position_embeddings=64)),
            data=DataConfig(train_files=[str(task.sft)], max_prompt_length=8, max_response_length=8),
            optim=OptimizerConfig(learning_rate=3e-3, warmup_steps=20, end_lr_ratio=0.1),
            train=TrainSection(steps=sft_steps, batch_size=64),
            checkpoint=CheckpointSection(interval=0, keep=1, async_save=False),
            logging=LoggingSection(every=100, tensorboard=False, progress=False))
        log(f"[sft] {sft_steps} steps on {task.sft}")
        train_sft(config)
    return str(model), str(task.preferences), str(task.eval_prompts), str(task.eval_preferences)


def results_section(settings: Settings, summary: list[dict], command: str, info: list[str], minutes: float,
                    plot_link: str, provenance: str = "") -> str:
    main, sweep = markdown_tables(summary)
    s = settings
    return (
        f"{SECTION}\n\n"
        f"Command: `{command}` ({common.utc_stamp()}, {minutes:.1f} min in all)\n\n"
        "```\n" + "\n".join(info) + "\n```\n\n"
        + (provenance + " " if provenance else "")
        + f"Every loss trains from the same SFT checkpoint on the same pairs with the same budget: "
        f"{s.steps} steps of {s.batch_size} pairs, AdamW lr {s.learning_rate:g} (warmup {s.warmup_steps}, cosine), "
        f"seeds {', '.join(map(str, s.seeds))} (data order and evaluation samples). Evaluation: "
        f"{s.num_eval_prompts} held-out prompts x {s.num_samples} samples at temperature {s.temperature:g}, "
        f"up to {s.max_new_tokens} new tokens; held-out pairs for the margins. Beta: 0.1, SimPO 2.0 "
        "(target_margin 0.5); ORPO's odds_ratio_coef 0.1 is fixed (its beta is unused); robust DPO with label smoothing 0.1, EXO "
        "with 1e-3. Mean ± std over seeds.\n\n"
        + main + "\n\n"
        + (f"Beta sweep (DPO = sigmoid, IPO, hinge):\n\n{sweep}\n\n" if sweep else "")
        + f"![gold reward and pass@1 against KL]({plot_link})\n"
    )


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="SFT checkpoint (Hugging Face folder with its tokenizer); default: "
                        "build the built-in task and run a quick SFT")
    parser.add_argument("--tokenizer", help="tokenizer folder (default: the model folder)")
    parser.add_argument("--train-data", help="preference pairs (prompt/chosen/rejected JSONL/JSON/parquet)")
    parser.add_argument("--eval-prompts", help="held-out prompts: the built-in task's, or with an `answer` column")
    parser.add_argument("--eval-pairs", help="held-out pairs for the margins (optional)")
    parser.add_argument("--loss-types", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--sweep-betas", nargs="*", type=float, default=[0.03, 0.3],
                        help="extra betas for sigmoid, ipo, hinge (their default 0.1 is always run)")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--learning-rate", type=float, default=3e-4)
    parser.add_argument("--sft-steps", type=int, default=3000, help="the quick SFT (built-in task only)")
    parser.add_argument("--max-prompt-length", type=int, default=8)
    parser.add_argument("--max-response-length", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--num-eval-prompts", type=int, default=128)
    parser.add_argument("--num-samples", type=int, default=4)
    parser.add_argument("--out", default="runs/loss_variants", help="runs, results.json, table.md, frontier.png")
    parser.add_argument("--write-results", action="store_true",
                        help="also update benchmarks/RESULTS.md and benchmarks/results/loss_variants_frontier.png")
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    started = time.time()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    info = common.machine_info()
    print("\n".join(info), flush=True)
    if args.model:
        if not (args.train_data and args.eval_prompts):
            raise SystemExit("--model needs --train-data and --eval-prompts")
        model, train, prompts, pairs = args.model, args.train_data, args.eval_prompts, args.eval_pairs
    else:
        model, train, prompts, pairs = default_model(out, args.sft_steps)
    provenance = "" if args.model else (
        f"Model: the built-in task (sums of 1-2 digit numbers, 4000 training pairs whose chosen answer is "
        f"right), a tiny Llama (hidden 64, 2 layers, 4 heads) after {args.sft_steps} SFT steps of 64 noisy "
        "demonstrations (lr 3e-3); it is also the frozen reference.")
    settings = Settings(
        model_dir=model, train_file=train, eval_prompts_file=prompts, eval_pairs_file=pairs,
        output_dir=str(out), tokenizer_dir=args.tokenizer, loss_types=tuple(args.loss_types),
        seeds=tuple(args.seeds), sweep_betas=tuple(args.sweep_betas), steps=args.steps,
        batch_size=args.batch_size, learning_rate=args.learning_rate,
        max_prompt_length=args.max_prompt_length, max_response_length=args.max_response_length,
        num_eval_prompts=args.num_eval_prompts, num_samples=args.num_samples, max_new_tokens=args.max_new_tokens)
    rows = train_and_evaluate(settings, log=lambda line: print(line, flush=True))
    summary = summarise(rows)
    (out / "results.json").write_text(json.dumps({"settings": dataclasses.asdict(settings), "runs": rows},
                                                 indent=1) + "\n")
    plot = frontier_plot(summary, out / "frontier.png")
    info[2] = f"load average (1/5/15 min) at the end: {common.load_average()}"
    command = "python benchmarks/loss_variants.py " + " ".join(sys.argv[1:] if argv is None else argv)
    minutes = (time.time() - started) / 60
    section = results_section(settings, summary, command.strip(), info, minutes, "frontier.png", provenance)
    (out / "table.md").write_text(section)
    if args.write_results:
        target = common.RESULTS.parent / "results" / "loss_variants_frontier.png"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(plot, target)
        common.write_section(SECTION, results_section(settings, summary, command.strip(), info, minutes,
                                                      "results/loss_variants_frontier.png", provenance))
    print(section, flush=True)
    return {"rows": rows, "summary": summary, "plot": str(plot)}


if __name__ == "__main__":
    main()
