"""`rlhf-jax eval`: score policies on held-out prompts with a task's gold scorer (`task`, the
rows' `answer` column as reference) or with reward functions (`reward.functions`).

    rlhf-jax eval --config configs/eval.yaml policies.sft=runs/sft/model policies.ppo=runs/ppo/model

For each policy, `num_samples` responses per prompt are sampled (temperature `temperature`,
fixed-shape chunks of `batch_size` sequences, one compilation per architecture); a sample
ends at the tokenizer's EOS or at any other EOS id of the policy folder's
`generation_config.json` (a chat model's end-of-turn token), as transformers' `generate` stops. The same PRNG
keys are used for every policy (common random numbers), so differences between policies are
not sampling noise of different draws, and a policy compared with itself ties exactly. Metrics
per policy (`results.json`):

    pass@1, pass@k        unbiased estimator (Chen et al. 2021) for k = 1, 2, 4, ..., num_samples
    gold_reward           mean exact-match gold reward (= pass@1) and `gold_graded` (partial credit)
    win_rate              vs the reference's sample with the same prompt and key, graded gold
                          reward, ties count half
    kl_to_reference       mean over samples of sum_t (log pi(y_t) - log pi_ref(y_t)) (k1, nats)
    response_length, eos_rate, distinct_1, distinct_2, repetition_4
    unique_responses      distinct responses among a prompt's samples / num_samples, averaged
                          over prompts (collapse onto one answer -> 1 / num_samples)
    reward_model_score    mean reward-model score of the samples (compare with the gold reward:
                          a score that rises while the gold reward does not is reward hacking)
    reward, reward/<name>/mean|std
                          with `reward.functions`: the mean weighted sum of the reward functions
                          (on the host, given the prompt file's columns) and each one's mean and
                          standard deviation; the functions then replace the gold scorer: a
                          sample passes (pass@k, gold_reward) when its reward exceeds
                          `reward.pass_threshold`, and the win rate compares rewards

and the reward model's accuracy on held-out pairs (`preferences_file`). Without
`reward.functions` every prompt row needs its `answer` (a RewardError naming the file
otherwise, rather than the task's scorer grading prompts of another kind); the start-up lines
say which scorer is used. With `report: true` a
markdown report with tables and plots is written (`stages/eval_report.py`).
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax.models.generation import GENERATE_STATIC_ARGNAMES, generate
from rlhf_jax.pipeline import eval_metrics
from rlhf_jax.pipeline.data import DataConfig, load_data
from rlhf_jax.pipeline.generation_config import stop_ids
from rlhf_jax.pipeline.stage_configs import EvalConfig, load_stage_config
from rlhf_jax.pipeline.stages import stage_setup
from rlhf_jax.pipeline.stages.companion_models import check_vocabulary
from rlhf_jax.pipeline.stages.scoring import NOT_PASSED, gold_scores, reward_functions
from rlhf_jax.pipeline.tokenizer import pad_id
from rlhf_jax.pipeline.tasks import load_task
from rlhf_jax.rewards import RewardError, RewardScorer
from rlhf_jax.rewards.loading import check_columns, check_trainer_arguments
from rlhf_jax.training.logprobs import response_logprobs
from rlhf_jax.training.rollout import sampled_batch

_generate = jax.jit(generate, static_argnames=GENERATE_STATIC_ARGNAMES)
logger = logging.getLogger(__name__)


def pass_at_k_ks(num_samples: int) -> list[int]:
    """1, 2, 4, ... up to num_samples (and num_samples itself)."""
    ks, k = [], 1
    while k < num_samples:
        ks.append(k)
        k *= 2
    return ks + [num_samples]


class _Scorers:
    """Jitted forward passes, one compilation per module architecture."""

    def __init__(self):
        self._cache = {}

    def logps(self, module):
        key = ("logp", module)
        if key not in self._cache:
            self._cache[key] = jax.jit(lambda params, ids, mask, response_mask: response_logprobs(
                module.apply, params, sampled_batch(ids, mask, response_mask)).sequence_sum()[:, 0])
        return self._cache[key]

    def rewards(self, module):
        key = ("reward", module)
        if key not in self._cache:
            self._cache[key] = jax.jit(lambda params, ids, mask: module.apply({"params": params}, ids, mask))
        return self._cache[key]


def sample_policy(module, params, prompt_ids, prompt_mask, config: EvalConfig, tokenizer, stops=None):
    """Samples for every row of `prompt_ids` [M, P] in chunks of `batch_size` rows; a sample
    ends at any of the ids `stops` (None: the tokenizer's EOS).

    Returns a dict of host arrays: `tokens`, `mask` [M, N] and `finished` [M]. Chunk c uses
    the key `fold_in(seed, c)` whatever the policy.
    """
    total = prompt_ids.shape[0]
    size = min(config.batch_size, total)
    outputs = {"tokens": [], "mask": [], "finished": []}
    for chunk, start in enumerate(range(0, total, size)):
        rows = np.arange(start, start + size) % total  # the last chunk wraps: same shape
        out = _generate(module, params, jnp.asarray(prompt_ids[rows]), jnp.asarray(prompt_mask[rows]),
                        stage_setup.rng_key(config.seed, 2, chunk), max_new_tokens=config.max_new_tokens,
                        temperature=config.temperature,
                        eos_token_id=tokenizer.eos_token_id if stops is None else stops,
                        pad_token_id=pad_id(tokenizer))
        keep = min(size, total - start)
        for name in outputs:
            outputs[name].append(np.asarray(getattr(out, name))[:keep])
    return {name: np.concatenate(parts) for name, parts in outputs.items()}


def _chunked(fn, arrays, size: int) -> np.ndarray:
    """`fn(*chunk)` over fixed-size row chunks of host arrays, concatenated (last chunk wraps)."""
    total = arrays[0].shape[0]
    size = min(size, total)
    parts = []
    for start in range(0, total, size):
        rows = np.arange(start, start + size) % total
        parts.append(np.asarray(fn(*(jnp.asarray(a[rows]) for a in arrays)))[: min(size, total - start)])
    return np.concatenate(parts)


def policy_metrics(samples, gold, graded, num_prompts: int, num_samples: int, stops) -> dict:
    """The sample metrics of one policy (module docstring); `stops`: its stop ids."""
    correct = gold.reshape(num_prompts, num_samples) > 0.5
    ks, values = eval_metrics.pass_at_k_curve(correct, pass_at_k_ks(num_samples))
    mask = samples["mask"]
    responses = np.where(mask > 0, samples["tokens"], -1).reshape(num_prompts, num_samples, -1)
    unique = np.mean([len(np.unique(rows, axis=0)) for rows in responses]) / num_samples
    return {
        "pass@1": float(values[0]),
        "pass@k": {int(k): float(v) for k, v in zip(ks, values)},
        "gold_reward": float(gold.mean()),
        "gold_graded": float(graded.mean()),
        "response_length": eval_metrics.mean_length(mask),
        "eos_rate": eval_metrics.eos_rate(samples["tokens"], mask, stops),
        "distinct_1": eval_metrics.distinct_n(samples["tokens"], 1, mask=mask),
        "distinct_2": eval_metrics.distinct_n(samples["tokens"], 2, mask=mask),
        "repetition_4": eval_metrics.repetition_rate(samples["tokens"], 4, mask=mask),
        "unique_responses": float(unique),
    }


def check_gold_answers(answers, config: EvalConfig) -> None:
    """Without `reward.functions` the task's gold scorer compares the responses with the rows'
    `answer` column: prompts without it are a RewardError naming the file (and the fix),
    instead of the scorer silently grading other prompts by its own task."""
    missing = None if answers is None else next((n for n, a in enumerate(answers, 1) if a is None), None)
    if answers is not None and missing is None:
        return
    where = "has no `answer` column" if answers is None else f"row {missing} has no `answer`"
    raise RewardError(
        f"`prompts_file`: {config.prompts_file} {where}, which the gold scorer of the "
        f"{load_task(config.task).name} task (`task`) compares the responses with when `reward.functions` is "
        f"not set; give every row its `answer`, or set `reward.functions` to score these prompts with "
        f"your own reward functions")


def print_eval_start(config: EvalConfig, functions, count: int, rows: int) -> None:
    """The block a user sees when evaluation starts: the prompts used and what scores the samples."""
    if jax.process_index() != 0:
        return
    if functions:
        scoring = "; ".join(f"{f.name} (weight {f.weight:g})" for f in functions)
        scoring += f" (a sample passes when its weighted reward exceeds {config.reward.pass_threshold:g})"
    else:
        scoring = f"gold scorer of the {load_task(config.task).name} task against the `answer` column"
    print(f"[eval] prompts: {count} of the {rows} rows of {config.prompts_file}, "
          f"{config.num_samples} samples each\n[eval] scored by: {scoring}", flush=True)


def evaluate_policies(config: EvalConfig) -> dict:
    """Sample, score and compare every policy of `config`; returns the results dict."""
    stage_setup.require(config.policies, "policies", "name at least one policy folder (name: path)")
    stage_setup.require(config.prompts_file, "prompts_file", "held-out prompts (e.g. the task's eval_prompts.jsonl)")
    if config.preferences_file and not config.reward_model:
        logger.warning("`preferences_file` gives the reward model's held-out accuracy and is not read without "
                       "`reward_model`; a DPO policy's held-out preference accuracy is its training run's "
                       "eval/dpo/accuracy (data.eval_files)")
    first_name = next(iter(config.policies))
    first_folder = config.reference or config.policies[first_name]
    tokenizer = stage_setup.stage_tokenizer(config.tokenizer, first_folder,
                                            model_key="reference" if config.reference else f"policies.{first_name}")
    data_config = DataConfig(max_prompt_length=config.max_prompt_length, max_response_length=1,
                             chat_template_kwargs=config.chat_template_kwargs)
    prompts = load_data(config.prompts_file, tokenizer, data_config, kind="prompt")
    count = len(prompts) if config.max_prompts is None else min(config.max_prompts, len(prompts))
    prompt_ids = np.repeat(prompts.arrays["prompt_ids"][:count], config.num_samples, axis=0)
    prompt_mask = np.repeat(prompts.arrays["prompt_mask"][:count], config.num_samples, axis=0)
    functions = reward_functions(config.reward.functions)
    check_trainer_arguments(functions, (), "rlhf-jax eval")
    check_columns(functions, {name: values[:count] for name, values in prompts.columns.items()
                              if name not in NOT_PASSED},
                  config.prompts_file, [f"{file} row {number}" for file, number in prompts.sources[:count]])
    function_scorer = RewardScorer(functions, tokenizer) if functions else None
    prompt_column = prompts.columns.get("prompt") or prompts.columns["prompt_text"]
    function_inputs = dict(
        prompts=prompt_column[:count],
        columns={name: values[:count] for name, values in prompts.columns.items() if name not in NOT_PASSED},
        repeat=config.num_samples,
        row_names=[f"{file} row {number}" for file, number in prompts.sources[:count]])
    answers = prompts.columns.get("answer")
    if function_scorer is None:
        check_gold_answers(answers, config)
    print_eval_start(config, functions, count, len(prompts))
    gold_inputs = {"task": config.task,
                   "answers": None if answers is None else np.repeat(np.asarray(answers[:count], object),
                                                                     config.num_samples)}
    scorers = _Scorers()
    # every model reads the ids of one tokenizer: a folder with another vocabulary is refused
    source = (f"`tokenizer` ({config.tokenizer})" if config.tokenizer else
              f"the tokenizer of `reference` ({config.reference})" if config.reference else
              f"the tokenizer of `policies.{first_name}` ({first_folder})")
    for name, folder in config.policies.items():
        check_vocabulary(folder, tokenizer, f"policies.{name}", "policy", source)
    reward = (stage_setup.load_reward_model(config.reward_model, tokenizer, "reward_model", source=source)
              if config.reward_model else None)
    reference = None
    if config.reference:
        reference = stage_setup.load_folder(config.reference, head="lm", key="reference")
        check_vocabulary(config.reference, tokenizer, "reference", "reference", source)
    results = {"num_prompts": count, "num_samples": config.num_samples, "policies": {}}

    samples_by_folder, graded_by_folder = {}, {}
    names = list(config.policies)
    if config.reference and config.reference not in config.policies.values():
        names.append(None)  # the reference is sampled too, for the win rate
    for name in names:
        began = time.perf_counter()
        folder = config.reference if name is None else config.policies[name]
        module, params = (reference if name is None else
                          stage_setup.load_folder(folder, head="lm", key=f"policies.{name}"))
        stops = stop_ids(tokenizer, folder)  # the tokenizer's EOS + the folder's generation_config.json
        samples = sample_policy(module, params, prompt_ids, prompt_mask, config, tokenizer, stops)
        if function_scorer is None:
            gold = gold_scores(tokenizer, prompt_ids, samples["tokens"], kind="exact", eos_token_id=stops,
                               **gold_inputs)
            graded = gold_scores(tokenizer, prompt_ids, samples["tokens"], kind="graded", eos_token_id=stops,
                                 **gold_inputs)
        else:  # the reward functions replace the gold scorer: pass = reward above the threshold
            graded, reward_metrics = function_scorer(samples["tokens"], samples["mask"], **function_inputs)
            gold = (graded > config.reward.pass_threshold).astype(np.float32)
        samples_by_folder[folder], graded_by_folder[folder] = samples, graded
        if name is None:
            continue
        metrics = policy_metrics(samples, gold, graded, count, config.num_samples, stops)
        if function_scorer is not None:
            metrics["reward"] = float(graded.mean())
            metrics.update(reward_metrics)
        ids = np.concatenate([prompt_ids, samples["tokens"]], axis=1)
        mask = np.concatenate([prompt_mask, samples["mask"]], axis=1)
        if reference is not None:
            logp = _chunked(lambda i, m, r: scorers.logps(module)(params, i, m, r),
                            (ids, mask, samples["mask"]), config.batch_size)
            ref_module, ref_params = reference
            ref_logp = _chunked(lambda i, m, r: scorers.logps(ref_module)(ref_params, i, m, r),
                                (ids, mask, samples["mask"]), config.batch_size)
            metrics["kl_to_reference"] = float(np.mean(logp - ref_logp))
        if reward is not None:
            reward_module, reward_params = reward
            scores = _chunked(lambda i, m: scorers.rewards(reward_module)(reward_params, i, m),
                              (ids, mask), config.batch_size)
            metrics["reward_model_score"] = float(scores.mean())
        metrics["seconds"] = round(time.perf_counter() - began, 2)
        results["policies"][name] = metrics
    if config.reference:
        reference_graded = graded_by_folder[config.reference]
        for name, folder in config.policies.items():
            results["policies"][name]["win_rate"] = eval_metrics.win_rate(graded_by_folder[folder], reference_graded)
    if reward is not None and config.preferences_file:
        results["reward_model_accuracy"] = reward_model_accuracy(reward, config, tokenizer, scorers)
    return results


def reward_model_accuracy(reward, config: EvalConfig, tokenizer, scorers) -> float:
    """Share of held-out pairs the reward model orders like the preference labels."""
    pairs = load_data(config.preferences_file, tokenizer,
                      DataConfig(max_prompt_length=config.max_prompt_length,
                                 max_response_length=config.max_new_tokens), kind="preference")
    module, params = reward
    score = lambda i, m: scorers.rewards(module)(params, i, m)
    # each response after its prompt: [rows, P + R] (left padding, prompt, response, right padding)
    joined = [tuple(np.concatenate([pairs.arrays[f"prompt_{name}"], pairs.arrays[f"response_{name}"][:, side]], 1)
                    for name in ("ids", "mask")) for side in (0, 1)]
    chosen, rejected = (_chunked(score, arrays, 1024) for arrays in joined)
    return float(np.mean(chosen > rejected))


def run_eval(config: EvalConfig, *, extra_sections=()) -> dict:
    output_dir = stage_setup.prepare_output_dir(config)
    began = time.perf_counter()
    results = evaluate_policies(config)
    results["seconds"] = round(time.perf_counter() - began, 2)
    if jax.process_index() != 0:  # every process evaluates alike; one writes and reports
        return results
    (Path(output_dir) / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    if config.report:
        from rlhf_jax.pipeline.stages.eval_report import write_eval_report

        results["report"] = str(write_eval_report(output_dir, results, config.runs, extra_sections))
    for name, metrics in results["policies"].items():
        print(f"[eval] {name}: pass@1 {metrics['pass@1']:.3f}  pass@{config.num_samples} "
              f"{metrics['pass@k'][config.num_samples]:.3f}  win rate {metrics.get('win_rate', float('nan')):.3f}  "
              f"KL {metrics.get('kl_to_reference', float('nan')):.3f}", flush=True)
    return results


def run(config_path=None, overrides=(), *, resume: bool = False) -> dict:
    """The `rlhf-jax eval` entry point (`resume` has no effect: evaluation is not resumable)."""
    del resume
    return run_eval(load_stage_config(EvalConfig, config_path, overrides))
