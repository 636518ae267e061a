"""Preference losses on equal budgets: every `dpo_loss` type, SimPO, CPO, ORPO and KTO.

From one SFT checkpoint and one set of preference pairs, each loss trains with the same
steps, batch, learning rate and schedule, for several seeds (the seed sets the data order and
the evaluation samples); every run is then evaluated on held-out prompts and pairs:

    pass@1            share of sampled responses (temperature 1) whose answer is exactly right
    gold reward       mean graded gold reward of the samples (share of right digits, -1 when a
                      response never stops); with a user's data: exact match of `answer`
                      (the tables and the plot say which)
    KL                mean over samples of sum_t log pi(y_t) - log pi_sft(y_t) (k1 sequence
                      estimate on the policy's own samples, nats)
    win rate          vs the SFT model's sample for the same prompt and PRNG key, by gold
                      reward, ties count half
    margin, accuracy  held-out pairs: mean of (log pi - log pi_sft)(chosen) - (same)(rejected)
                      in nats (no beta, so losses compare), and the share of pairs where it is > 0

Results: a markdown table (mean +- std over seeds), a beta sweep table for DPO (sigmoid), IPO
and hinge when `--sweep-betas` has values, and a plot of gold reward and pass@1 against KL (the
frontier). `--beta`, `--label-smoothing`, `--target-margin`, ... (one per `dpo.*` key) set a
loss option for every loss that reads it (`VALUE`) or for one (`LOSS=VALUE`); `--help` lists
them with their defaults. `--write` also records the run in benchmarks/RESULTS.md (built-in
task and model only).

Each run uses the library pieces end to end: reference log-probs computed once per dataset
(`rlhf_jax.pipeline.stages.dpo.dataset_logps`), `preference_step` compiled once per loss (and shared
by the seeds) driven by the pipeline's `run_loop`, sampling with `sample_policy` (KV-cache
`generate`), scoring with the built-in task's gold scorer. KTO trains on the same pairs cut
into unpaired examples (chosen = desirable, rejected = undesirable), so every step sees the
same 2 x batch sequences.

    python benchmarks/loss_variants.py                    # built-in task + quick SFT, all losses, 3 seeds
    python benchmarks/loss_variants.py --loss-types sigmoid ipo simpo kto --seeds 0 1 --steps 60
    python benchmarks/loss_variants.py --loss-types sigmoid simpo orpo --beta 0.2 simpo=2.5 --target-margin 1
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
from rlhf_jax.pipeline.stages.scoring import decode_until_eos, gold_scores  # noqa: E402
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
# The benchmark's settings where they differ from PreferenceLossConfig's defaults: SimPO's
# paper range is beta 2.0-2.5 (target_margin 0.5); robust DPO with eps = 0 is plain DPO
# (exo_pair's 0 means 1e-3 in `dpo_loss`).
LOSS_DEFAULTS = {"simpo": {"beta": 2.0}, "robust": {"label_smoothing": 0.1}}
# PreferenceLossConfig fields settable per loss (`--beta`, `--label-smoothing`, ...; the `dpo.*` keys)
OPTIONS = tuple(f.name for f in dataclasses.fields(PreferenceLossConfig) if f.name not in ("kind", "loss_type"))
SWEPT = ("sigmoid", "ipo", "hinge")
METRICS = ("pass@1", "gold_reward", "kl", "win_rate", "margin", "accuracy")
SCORE_LABELS = {"graded": "gold reward (graded)", "exact": "gold reward (exact match)"}


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
    sweep_betas: tuple[float, ...] = (0.03, 0.3)  # extra betas for SWEPT (each one's main beta is reused)
    loss_options: dict = dataclasses.field(default_factory=dict)  # loss -> {config field: value}; see loss_options
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

    def config(self, name: str, beta: float | None = None) -> PreferenceLossConfig:
        """The loss config of `name` with its options (`beta` replaces its beta where given)."""
        values = dict(self.loss_options.get(name, LOSS_DEFAULTS.get(name, {})))
        if beta is not None and reads(name, "beta", values):
            values["beta"] = beta
        return loss_config(name, **values)

    def beta(self, name: str) -> float:
        """The main (un-swept) beta of `name`."""
        return self.config(name).beta


def loss_config(name: str, **values) -> PreferenceLossConfig:
    """`PreferenceLossConfig` of loss `name` (a `dpo_loss` type or a kind) with `values` set."""
    if name in DPO_LOSS_TYPES:
        return PreferenceLossConfig(kind="dpo", loss_type=name, **values)
    return PreferenceLossConfig(kind=name, **values)


def reads(name: str, field: str, values: dict | None = None) -> bool:
    """Whether loss `name`, with its `divergence` from `values`, reads config `field`."""
    divergence = (values or {}).get("divergence") if name in DPO_LOSS_TYPES else None
    probe = loss_config(name, **({"divergence": divergence} if divergence else {}))
    return field in probe.used_settings()


def parse_option(field: str, entries, loss_types) -> tuple[dict[str, object], set[str]]:
    """`--<field>` entries (`VALUE`: every loss of `loss_types`; `LOSS=VALUE`: that one; later
    entries win) -> ({loss: value}, the losses named). Raises ValueError for a loss not run."""
    flag, kind = f"--{field.replace('_', '-')}", type(getattr(PreferenceLossConfig, field))
    values, named = {}, set()
    for entry in entries:
        name, _, text = entry.rpartition("=")
        if name and name not in loss_types:
            raise ValueError(f"{flag} {entry}: {name!r} is not among the losses run ({', '.join(loss_types)})")
        try:
            value = kind(text)
        except ValueError:
            raise ValueError(f"{flag} {entry}: {text!r} is not a {kind.__name__}") from None
        values.update({name: value} if name else dict.fromkeys(loss_types, value))
        named |= {name} if name else set()
    return values, named


def loss_options(loss_types, given: dict[str, list[str]]) -> dict[str, dict]:
    """Per loss, the config fields to set: `LOSS_DEFAULTS`, then each option of `given`
    ({field: entries}, see `parse_option`) where the loss reads it. Raises ValueError when a
    `LOSS=VALUE` names a loss that does not read the field, or no loss run reads an option."""
    options = {name: dict(LOSS_DEFAULTS.get(name, {})) for name in loss_types}
    for field in sorted(given, key=lambda f: f != "divergence"):  # divergence decides who reads alpha
        if not given[field]:
            continue
        values, named = parse_option(field, given[field], loss_types)
        flag = f"--{field.replace('_', '-')}"
        for name in named:
            if not reads(name, field, options[name]):
                raise ValueError(f"{flag}: {name} does not read `{field}`")
        readers = [name for name in values if reads(name, field, options[name])]
        if not readers:
            raise ValueError(f"{flag}: none of the losses run ({', '.join(loss_types)}) reads `{field}`")
        for name in readers:
            options[name][field] = values[name]
    return {name: values for name, values in options.items() if values}


def runs_to_do(settings: Settings) -> list[tuple[str, float]]:
    """(loss, beta) pairs: every loss at its main beta, plus the sweep betas of SWEPT."""
    runs = [(name, settings.beta(name)) for name in settings.loss_types]
    for name in SWEPT:
        if name in settings.loss_types:
            runs += [(name, beta) for beta in settings.sweep_betas if beta != settings.beta(name)]
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
    texts, ended = decode_until_eos(tokenizer, tokens, tokenizer.eos_token_id)
    return np.array([float(stop and text.strip() == answer.strip())
                     for text, answer, stop in zip(texts, answers, ended)], np.float32)


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
        self.answers, self.score = None, "graded"
        try:
            [parse_problem(text) for text in texts]
        except ValueError:
            answers = prompts.columns.get("answer")
            if answers is None or any(a is None for a in answers[:count]):
                raise ValueError(f"{settings.eval_prompts_file}: prompts that are not the built-in "
                                 "task need an `answer` column") from None
            self.answers = [str(a) for a in answers[:count] for _ in range(settings.num_samples)]
            self.score = "exact"
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
        out = {"score": self.score, "pass@1": float(samples["exact"].mean()),
               "gold_reward": float(samples["graded"].mean()),
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
    Returns one row per run (plus one "sft" row per seed) with the metrics of `Evaluator`,
    `main` (the loss's main beta, not a sweep) and `score` ("graded" or "exact")."""
    mesh = stage.stage_mesh(MeshConfig(data=1))
    tokenizer = stage.stage_tokenizer(settings.tokenizer_dir, settings.model_dir)
    module, sft_params = stage.load_folder(settings.model_dir, head="lm", key="model")
    lengths = DataConfig(max_prompt_length=settings.max_prompt_length, max_response_length=settings.max_response_length)
    data = load_data(settings.train_file, tokenizer, lengths, kind="preference")
    pair_logps = make_pair_logps(module.apply)
    ref_chosen, ref_rejected = dataset_logps(pair_logps, sft_params, data, 64, mesh)
    evaluator = Evaluator(module, sft_params, tokenizer, settings, mesh)
    configs = {run: settings.config(*run) for run in runs_to_do(settings)}  # checked before any training
    optim = with_schedule_length(OptimizerConfig(learning_rate=settings.learning_rate,
                                                 warmup_steps=settings.warmup_steps), settings.steps)
    optimizer = make_optimizer(optim)  # one object: the states' tree metadata must match across runs
    _, shardings = fresh_state(module, sft_params, optimizer, mesh)
    rows = []
    for seed in settings.seeds:
        rows.append({"loss": "sft", "beta": 0.0, "main": True, "seed": seed, **evaluator.evaluate(sft_params, seed)})
    for (name, beta), config in configs.items():
        step = make_train_step(preference_step, mesh=mesh, state_shardings=shardings, config=config)
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
            rows.append({"loss": name, "beta": beta, "main": beta == settings.beta(name), "seed": seed, **metrics,
                         "final_train_loss": float(result.last_metrics[loss_key]) if loss_key else float("nan"),
                         "seconds": round(time.perf_counter() - began, 2)})
            log(f"[{name} beta={beta:g} seed={seed}] " + "  ".join(
                f"{k} {rows[-1][k]:.3f}" for k in METRICS if k in rows[-1]) + f"  ({rows[-1]['seconds']:.1f}s)")
    return rows


def summarise(rows: list[dict]) -> list[dict]:
    """Mean and std over seeds of every metric, per (loss, beta), in first-seen order (with the
    rows' `main` and `score`)."""
    groups: dict[tuple[str, float], list[dict]] = {}
    for row in rows:
        groups.setdefault((row["loss"], row["beta"]), []).append(row)
    summary = []
    for (name, beta), members in groups.items():
        entry = {"loss": name, "beta": beta, "seeds": len(members), "main": members[0]["main"],
                 "score": members[0]["score"]}
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


def beta_cell(entry: dict) -> str:
    """The beta column: "-" for the SFT row and for losses that do not read beta (ORPO)."""
    if entry["loss"] == "sft" or not reads(entry["loss"], "beta"):
        return "-"
    return f"{entry['beta']:g}"


def markdown_tables(summary: list[dict]) -> tuple[str, str]:
    """(main table: each loss at its main beta + the SFT row; beta sweep table, "" when no loss
    of SWEPT ran at more than one beta)."""
    header = ["loss", "beta", "pass@1", SCORE_LABELS[summary[0]["score"]], "KL (nats)", "win rate vs SFT",
              "held-out margin", "held-out acc."]
    def row(e):
        cells = [_cell(e, k, 2 if k in ("kl", "margin") else 3) for k in METRICS]
        if e["loss"] == "sft":  # the reference itself: no margin to speak of
            cells[-2:] = ["-", "-"]
        return [e["loss"], beta_cell(e), *cells]
    main = common.markdown_table(header, [row(e) for e in summary if e["main"]], "lrrrrrrr")
    swept = [name for name in SWEPT if sum(e["loss"] == name for e in summary) > 1]
    lines = sorted((e for e in summary if e["loss"] in swept), key=lambda e: (SWEPT.index(e["loss"]), e["beta"]))
    sweep = common.markdown_table(header, [row(e) for e in lines], "lrrrrrrr") if lines else ""
    return main, sweep


def frontier_figure(summary: list[dict]):
    """The figure of `frontier_plot`: one panel per quality metric against KL."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(17, 7))
    points = [e for e in summary if e["main"]]
    colors, markers = plt.get_cmap("tab10"), "osD^vP<>Xh"
    styles = [(colors(i % 10), "*" if e["loss"] == "sft" else markers[(i // 10) % len(markers)])
              for i, e in enumerate(points)]  # a distinct (colour, marker) per point
    for axis, key, label in ((axes[0], "gold_reward", "mean " + SCORE_LABELS[summary[0]["score"]]),
                             (axes[1], "pass@1", "pass@1")):
        for index, (entry, (color, marker)) in enumerate(zip(points, styles)):
            (x, x_err), (y, y_err) = entry["kl"], entry[key]
            axis.errorbar(x, y, xerr=x_err, yerr=y_err, fmt=marker, color=color,
                          markersize=12 if marker == "*" else 6, capsize=2, alpha=0.85, label=entry["loss"])
            # fanned out around the point; the leader line ties each label to its own point
            angle = 2 * np.pi * index / max(len(points), 1)
            offset = (28 * np.cos(angle), 18 * np.sin(angle))
            axis.annotate(entry["loss"], (x, y), xytext=offset, textcoords="offset points", fontsize=7,
                          ha="left" if offset[0] >= 0 else "right", va="center", color=color,
                          arrowprops=dict(arrowstyle="-", color=color, linewidth=0.6, shrinkA=0, shrinkB=2))
        for name, style in zip(SWEPT, ("-", "--", ":")):
            line = sorted((e for e in summary if e["loss"] == name), key=lambda e: e["beta"])
            if len(line) > 1:
                axis.plot([e["kl"][0] for e in line], [e[key][0] for e in line], style, color="black", marker="x",
                          linewidth=1, label=f"{name}: beta " + ", ".join(f"{e['beta']:g}" for e in line))
        axis.set_xscale("symlog", linthresh=0.1)
        axis.set_xlabel("KL to the SFT reference (nats per response, k1 on samples; symlog axis)")
        axis.set_ylabel(label)
        axis.grid(alpha=0.3)
    axes[1].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    figure.suptitle("Preference losses on equal budgets: quality against KL (mean ± std over seeds)")
    figure.tight_layout()
    return figure


def frontier_plot(summary: list[dict], path: Path) -> Path:
    """Gold reward and pass@1 against KL (symmetric-log KL axis, so far-off losses stay on the
    page): one point per loss with std bars over seeds, each labelled with a leader line and
    listed in the legend, lines through the beta sweeps. Writes `path`."""
    import matplotlib.pyplot as plt

    figure = frontier_figure(summary)
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


def loss_settings_text(settings: Settings) -> str:
    """What each loss read, losses with the same settings grouped: "sigmoid, ipo: beta 0.1,
    divergence reverse_kl; orpo: odds_ratio_coef 0.1"."""
    groups: dict[str, list[str]] = {}
    for name in settings.loss_types:
        config = settings.config(name)
        used = [f for f in OPTIONS if f in config.used_settings()]
        groups.setdefault(", ".join(f"{f} {getattr(config, f):g}" if isinstance(getattr(config, f), float)
                                    else f"{f} {getattr(config, f)}" for f in used), []).append(name)
    return "; ".join(f"{', '.join(names)}: {values}" for values, names in groups.items())


SCORE_TEXT = {
    "graded": "Gold reward: the built-in task's graded score (share of right digits, -1 when a response never "
              "ends); the win rate compares it.",
    "exact": "Gold reward: exact match of the response with the prompt's `answer` (so it equals pass@1); the "
             "win rate compares it.",
}


def results_section(settings: Settings, summary: list[dict], command: str, info: list[str], minutes: float,
                    plot_link: str, provenance: str = "") -> str:
    main, sweep = markdown_tables(summary)
    s = settings
    sweep_note = (f" Beta sweep: {', '.join(map('{:g}'.format, s.sweep_betas))} for "
                  f"{', '.join(n for n in SWEPT if n in s.loss_types)}." if sweep else "")
    return (
        f"{SECTION}\n\n"
        f"Command: `{command}` ({common.utc_stamp()}, {minutes:.1f} min in all)\n\n"
        "```\n" + "\n".join(info) + "\n```\n\n"
        + (provenance + " " if provenance else "")
        + f"Every loss trains from the same SFT checkpoint on the same pairs with the same budget: "
        f"{s.steps} steps of {s.batch_size} pairs, AdamW lr {s.learning_rate:g} (warmup {s.warmup_steps}, cosine), "
        f"seeds {', '.join(map(str, s.seeds))} (data order and evaluation samples). Evaluation: "
        f"{s.num_eval_prompts} held-out prompts x {s.num_samples} samples at temperature {s.temperature:g}, "
        f"up to {s.max_new_tokens} new tokens"
        + ("; held-out pairs for the margins" if s.eval_pairs_file else "; no held-out pairs (no margins)")
        + f". Loss settings: {loss_settings_text(s)} (`dpo_loss` uses label smoothing 1e-3 for exo_pair's 0)."
        f"{sweep_note} {SCORE_TEXT[summary[0]['score']]} Mean ± std over seeds.\n\n"
        + main + "\n\n"
        + (f"Beta sweep (DPO = sigmoid, IPO, hinge):\n\n{sweep}\n\n" if sweep else "")
        + f"![{SCORE_LABELS[summary[0]['score']]} and pass@1 against KL]({plot_link})\n"
    )


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows "(default: ...)" except where the help text says the default itself."""

    def _get_help_string(self, action):
        return action.help if "default" in action.help else super()._get_help_string(action)


def option_help(field: str) -> str:
    default = getattr(PreferenceLossConfig, field)
    special = "; ".join(f"{name} {values[field]}" for name, values in LOSS_DEFAULTS.items() if field in values)
    return (f"`dpo.{field}` of the losses that read it: VALUE for all of them, LOSS=VALUE for one "
            f"(default: {default}" + (f"; {special}" if special else "") + ")")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=HelpFormatter)
    parser.add_argument("--model", help="SFT checkpoint (Hugging Face folder with its tokenizer); default: "
                        "build the built-in task and run a quick SFT")
    parser.add_argument("--tokenizer", help="tokenizer folder (with --model; default: the model folder)")
    parser.add_argument("--train-data", help="preference pairs (prompt/chosen/rejected JSONL/JSON/parquet; "
                        "with --model)")
    parser.add_argument("--eval-prompts", help="held-out prompts: the built-in task's, or with an `answer` column "
                        "(with --model)")
    parser.add_argument("--eval-pairs", help="held-out pairs for the margins (with --model; optional)")
    parser.add_argument("--loss-types", nargs="+", choices=VARIANTS, default=list(VARIANTS), metavar="LOSS",
                        help=f"losses to train (default: all of them): {' '.join(VARIANTS)}")
    for field in OPTIONS:
        parser.add_argument(f"--{field.replace('_', '-')}", nargs="+", default=None, metavar="[LOSS=]VALUE",
                            help=option_help(field))
    parser.add_argument("--sweep-betas", nargs="*", type=float, default=[0.03, 0.3],
                        help=f"extra betas for {', '.join(SWEPT)} (each one's main beta is always run)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="one run per seed and loss")
    parser.add_argument("--steps", type=int, default=60, help="training steps of every run")
    parser.add_argument("--batch-size", type=int, default=32, help="pairs per step (KTO: twice as many rows)")
    parser.add_argument("--learning-rate", type=float, default=3e-4, help="AdamW peak learning rate")
    parser.add_argument("--warmup-steps", type=int, default=5, help="linear warm-up, then cosine decay")
    parser.add_argument("--sft-steps", type=int, default=3000, help="the quick SFT (built-in task only)")
    parser.add_argument("--max-prompt-length", type=int, default=8, help="prompt tokens (training and evaluation)")
    parser.add_argument("--max-response-length", type=int, default=8, help="response tokens of the pairs")
    parser.add_argument("--max-new-tokens", type=int, default=8, help="sampled tokens per evaluation response")
    parser.add_argument("--temperature", type=float, default=1.0, help="evaluation sampling temperature")
    parser.add_argument("--num-eval-prompts", type=int, default=128, help="held-out prompts evaluated")
    parser.add_argument("--num-samples", type=int, default=4, help="samples per held-out prompt")
    parser.add_argument("--out", default="runs/loss_variants", help="runs, results.json, table.md, frontier.png")
    common.add_write_flags(parser, "--write-results",
                           target="benchmarks/RESULTS.md and the plot in benchmarks/results/", note="; refused with --model, whose results stay in --out")
    args = parser.parse_args(argv)
    own = [flag for flag in ("train_data", "eval_prompts", "eval_pairs", "tokenizer") if getattr(args, flag)]
    if args.model and not (args.train_data and args.eval_prompts):
        parser.error("--model needs --train-data and --eval-prompts")
    if own and not args.model:
        parser.error(f"--{own[0].replace('_', '-')} needs --model (without it the built-in task is used)")
    if args.write and args.model:
        parser.error("--write records the built-in benchmark (built-in task and model) in benchmarks/RESULTS.md; "
                     f"a run on your own model and data keeps its results in --out ({args.out}: table.md, "
                     "frontier.png, results.json)")
    try:
        args.loss_options = loss_options(tuple(args.loss_types), {f: getattr(args, f) for f in OPTIONS})
        settings_check = Settings("", "", "", None, "", loss_types=tuple(args.loss_types),
                                  sweep_betas=tuple(args.sweep_betas), loss_options=args.loss_options)
        for run in runs_to_do(settings_check):
            settings_check.config(*run)
    except ValueError as error:
        parser.error(str(error))
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    started = time.time()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    info = common.machine_info()
    print("\n".join(info), flush=True)
    if args.model:
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
        seeds=tuple(args.seeds), sweep_betas=tuple(args.sweep_betas), loss_options=args.loss_options,
        steps=args.steps, batch_size=args.batch_size, learning_rate=args.learning_rate,
        warmup_steps=args.warmup_steps, max_prompt_length=args.max_prompt_length,
        max_response_length=args.max_response_length, num_eval_prompts=args.num_eval_prompts,
        num_samples=args.num_samples, max_new_tokens=args.max_new_tokens, temperature=args.temperature)
    rows = train_and_evaluate(settings, log=lambda line: print(line, flush=True))
    summary = summarise(rows)
    (out / "results.json").write_text(json.dumps({"settings": dataclasses.asdict(settings), "runs": rows},
                                                 indent=1) + "\n")
    plot = frontier_plot(summary, out / "frontier.png")
    info[2] = f"load average (1/5/15 min) at the end: {common.load_average()}"
    command = common.command_line("loss_variants.py", argv)
    minutes = (time.time() - started) / 60
    section = results_section(settings, summary, command, info, minutes, "frontier.png", provenance)
    (out / "table.md").write_text(section)
    if args.write:
        target = common.RESULTS.parent / "results" / "loss_variants_frontier.png"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(plot, target)
        common.write_section(SECTION, results_section(settings, summary, command, info, minutes,
                                                      "results/loss_variants_frontier.png", provenance))
    print(section, flush=True)
    return {"rows": rows, "summary": summary, "plot": str(plot)}


if __name__ == "__main__":
    main()
