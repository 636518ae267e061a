"""`rlhf-jax quickstart`: the whole pipeline on a built-in task (`task.name`, default
`rlhf_jax.tasks.DEFAULT_TASK`), then a report.

    rlhf-jax quickstart                                  # the recipe of configs/quickstart.yaml
    rlhf-jax quickstart --config configs/quickstart.yaml sft.train.steps=500

Steps, each in `<output_dir>/<stage>`:

1. task     build the seeded task (tokenizer folder, noisy SFT demos, preference pairs judged by
            the gold scorer, prompts, held-out prompts and pairs) into `<output_dir>/task`;
2. sft      a fresh tiny model (`model`, vocabulary from the task tokenizer) on the demos;
3. reward   a reward model from the SFT model, on the preference pairs;
4. ppo      policy and reference = SFT, value model = the reward model, scored by the reward model
            (`ppo.reward.kind: gold` scores with the gold scorer);
5. dpo      policy and reference = SFT, on the preference pairs;
6. grpo     policy and reference = SFT, scored by the gold scorer (a verifiable reward, the
            setting GRPO is used in; `grpo.reward.kind: reward_model` uses the reward model);
7. eval     SFT, PPO, DPO and GRPO against the gold scorer (reference = SFT), then
            `<output_dir>/report.md` with tables, the pass@k curves and the training curves.

Stage sections of the config are full stage configs; the quickstart sets their `output_dir`,
`seed` (the top-level one; `task.seed` seeds the data), model/tokenizer/reference paths and
data files. `stages` picks a subset (a stage's inputs
must then exist from an earlier run). With `--resume` every stage continues from its latest
checkpoint (a finished stage only re-exports its model).
"""
from __future__ import annotations

import copy
import dataclasses
import json
import time
from pathlib import Path

import yaml

from rlhf_jax.typed_config import ConfigError, apply_overrides, from_dict
from rlhf_jax.pipeline.stage_configs import QuickstartConfig, check_stage_config
from rlhf_jax.pipeline.report import Section
from rlhf_jax.pipeline.stages import stage_setup
from rlhf_jax.pipeline.tasks import default_task_name, split_task_section, write_jsonl

replace = dataclasses.replace

_DATA = {"max_prompt_length": 8, "max_response_length": 8}
_LOG = {"every": 10}
_CKPT = {"keep": 1}
# The tuned recipe (configs/quickstart.yaml holds the same values, with comments). A config
# file and overrides are merged over it, so `rlhf-jax quickstart` needs no --config.
QUICKSTART_RECIPE = {
    "output_dir": "runs/quickstart",
    "seed": 0,
    "task": {"seed": 0, "min_digits": 1, "max_digits": 2, "num_sft": 8000, "num_preferences": 4000,
             "num_prompts": 2048, "num_eval_prompts": 256, "num_eval_preferences": 256,
             "sft_noise_rate": 0.5, "preference_noise_rate": 0.5, "corruptions": ["extra"]},
    "model": {"model_type": "llama", "vocab_size": 32, "hidden_size": 64, "num_layers": 2,
              "num_heads": 4, "intermediate_size": 256, "max_position_embeddings": 64},
    "sft": {"data": dict(_DATA), "logging": dict(_LOG), "checkpoint": {"interval": 500, **_CKPT},
            "eval": {"every": 250, "batch_size": 256},
            "train": {"steps": 1200, "batch_size": 64},
            "optim": {"learning_rate": 3e-3, "warmup_steps": 20, "schedule": "constant"}},
    "reward": {"data": dict(_DATA), "logging": dict(_LOG), "checkpoint": {"interval": 150, **_CKPT},
               "eval": {"every": 100, "batch_size": 256},
               "train": {"steps": 200, "batch_size": 64},
               "optim": {"learning_rate": 1e-3, "warmup_steps": 10, "end_lr_ratio": 0.1}},
    "ppo": {"data": dict(_DATA), "logging": {"every": 1}, "checkpoint": {"interval": 30, **_CKPT},
            "train": {"iterations": 60, "batch_size": 64},
            "optim": {"learning_rate": 3e-4, "warmup_steps": 10},
            "ppo": {"sampling": {"max_new_tokens": 6}, "kl_coef": 0.5, "missing_eos_score": -1.0,
                    "epochs": 4, "num_minibatches": 4}},
    "dpo": {"data": dict(_DATA), "logging": dict(_LOG), "checkpoint": {"interval": 100, **_CKPT},
            "eval": {"every": 100, "batch_size": 256},
            "train": {"steps": 200, "batch_size": 64},
            "optim": {"learning_rate": 3e-5, "warmup_steps": 10},
            "dpo": {"beta": 0.1}},
    "grpo": {"data": dict(_DATA), "logging": {"every": 1}, "checkpoint": {"interval": 30, **_CKPT},
             "train": {"iterations": 60, "batch_size": 16},
             "optim": {"learning_rate": 3e-4, "warmup_steps": 10},
             "grpo": {"sampling": {"max_new_tokens": 6}, "group_size": 8, "kl_coef": 0.04}},
    "eval": {"num_samples": 64, "max_new_tokens": 6, "batch_size": 4096, "max_prompt_length": 8},
}


def _merge(base: dict, update: dict) -> dict:
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        else:
            base[key] = value
    return base


def load_quickstart_config(path=None, overrides=()) -> QuickstartConfig:
    """`QUICKSTART_RECIPE`, with the YAML file `path` and `key.sub=value` overrides merged over
    it; unknown keys and wrong types are ConfigErrors naming the key (and the file)."""
    data = copy.deepcopy(QUICKSTART_RECIPE)
    source = f"{path}: " if path is not None else ""
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML: {err}") from err
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping, got {type(loaded).__name__}")
        if isinstance(loaded.get("task"), dict) and loaded["task"].get("name") not in (None, default_task_name()):
            data["task"] = {}  # another task: the recipe's task keys (the default task's) do not apply
        _merge(data, loaded)
    try:
        config = from_dict(QuickstartConfig, apply_overrides(data, overrides))
    except ConfigError as err:
        raise ConfigError(f"{source}{err}") from None
    except (ValueError, TypeError) as err:
        raise ConfigError(f"{source}{err}") from None
    check_stage_config(config, path)
    return config


def _data(section, train, eval_files=()):
    return replace(section, train_files=[str(train)], eval_files=[str(f) for f in eval_files])


def stage_configs(config: QuickstartConfig, task, task_name: str | None = None) -> dict:
    """Each stage's config with the quickstart's paths filled in (`task`: the `TaskFiles`;
    `task_name`: the task whose scorer the gold reward and evaluation use)."""
    out = Path(config.output_dir)
    model_of = lambda stage: str(out / stage / stage_setup.MODEL_DIR)
    tokenizer = str(task.tokenizer_dir)
    sft_model = model_of("sft")
    eval_sft = out / "task" / "eval_sft.jsonl"
    seed = config.seed
    configs = {
        "sft": replace(config.sft, output_dir=str(out / "sft"), seed=seed, tokenizer=tokenizer,
                       model=replace(config.sft.model, path=None, init=config.model),
                       data=_data(config.sft.data, task.sft, [eval_sft])),
        "reward": replace(config.reward, output_dir=str(out / "reward"), seed=seed, tokenizer=None,
                          model=replace(config.reward.model, path=sft_model, init=None),
                          data=_data(config.reward.data, task.preferences, [task.eval_preferences])),
        "ppo": replace(config.ppo, output_dir=str(out / "ppo"), seed=seed, tokenizer=None, reference=sft_model,
                       policy=replace(config.ppo.policy, path=sft_model, init=None),
                       value=model_of("reward"),
                       reward=replace(config.ppo.reward, task=task_name, path=model_of("reward")
                                      if config.ppo.reward.kind != "gold" else None),
                       data=_data(config.ppo.data, task.prompts)),
        "dpo": replace(config.dpo, output_dir=str(out / "dpo"), seed=seed, tokenizer=None, reference=sft_model,
                       model=replace(config.dpo.model, path=sft_model, init=None),
                       data=_data(config.dpo.data, task.preferences, [task.eval_preferences])),
        "grpo": replace(config.grpo, output_dir=str(out / "grpo"), seed=seed, tokenizer=None, reference=sft_model,
                        policy=replace(config.grpo.policy, path=sft_model, init=None),
                        reward=replace(config.grpo.reward, task=task_name, path=model_of("reward")
                                       if config.grpo.reward.kind == "reward_model" else None),
                        data=_data(config.grpo.data, task.prompts)),
    }
    trained = [name for name in ("sft", "ppo", "dpo", "grpo") if name in config.stages or
               (out / name / stage_setup.MODEL_DIR).is_dir()]
    configs["eval"] = replace(
        config.eval, output_dir=str(out), seed=config.seed, tokenizer=tokenizer, task=task_name,
        policies={name: model_of(name) for name in trained}, reference=sft_model,
        reward_model=model_of("reward"), prompts_file=str(task.eval_prompts),
        preferences_file=str(task.eval_preferences) if model_of("reward") else None,
        runs={name: str(out / name) for name in ("sft", "reward", "ppo", "dpo", "grpo")})
    return configs


def write_eval_sft(task, path: Path) -> None:
    """Held-out demonstrations with the right answers (the SFT stage's held-out loss)."""
    rows = [json.loads(line) for line in Path(task.eval_prompts).read_text().splitlines() if line.strip()]
    write_jsonl(path, [{"prompt": row["prompt"], "completion": row["answer"]} for row in rows])


def _runner(stage: str):
    if stage == "sft":
        from rlhf_jax.pipeline.stages.sft import train_sft as runner
    elif stage == "reward":
        from rlhf_jax.pipeline.stages.reward import train_reward as runner
    elif stage == "ppo":
        from rlhf_jax.pipeline.stages.ppo import train_ppo as runner
    elif stage == "dpo":
        from rlhf_jax.pipeline.stages.dpo import train_dpo as runner
    else:
        from rlhf_jax.pipeline.stages.grpo import train_grpo as runner
    return runner


def target_checks(results: dict) -> list[dict]:
    """The quickstart's claims, checked on the evaluation results."""
    policies = results["policies"]
    sft = policies.get("sft", {}).get("pass@1")
    rows = []

    def check(claim, value, ok):
        rows.append({"claim": claim, "measured": value, "holds": "yes" if ok else "NO"})

    if sft is not None:
        if "ppo" in policies:
            ratio = policies["ppo"]["pass@1"] / max(sft, 1e-9)
            check("PPO pass@1 >= 1.5 x SFT pass@1", round(ratio, 2), ratio >= 1.5)
        for name in ("dpo", "grpo"):
            if name in policies:
                check(f"{name.upper()} pass@1 > SFT pass@1",
                      f"{policies[name]['pass@1']:.3f} vs {sft:.3f}", policies[name]["pass@1"] > sft)
    if "reward_model_accuracy" in results:
        accuracy = results["reward_model_accuracy"]
        check("reward model held-out accuracy >= 0.8", round(accuracy, 3), accuracy >= 0.8)
    return rows


def run_quickstart(config: QuickstartConfig, *, resume: bool = False) -> dict:
    began = time.perf_counter()
    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    stage_setup.prepare_output_dir(config)
    timings = []
    start = time.perf_counter()
    task_plugin, task_config = split_task_section(config.task)
    task = task_plugin.build(out / "task", task_config)
    write_eval_sft(task, out / "task" / "eval_sft.jsonl")
    timings.append({"stage": "task", "seconds": round(time.perf_counter() - start, 1)})
    configs = stage_configs(config, task, task_plugin.name)
    summaries = {}
    for stage in ("sft", "reward", "ppo", "dpo", "grpo"):
        if stage not in config.stages:
            continue
        start = time.perf_counter()
        summaries[stage] = _runner(stage)(configs[stage], resume=resume)
        timings.append({"stage": stage, "seconds": round(time.perf_counter() - start, 1),
                        "steps": summaries[stage]["steps"]})
    results = None
    if "eval" in config.stages:
        from rlhf_jax.pipeline.stages.evaluate import evaluate_policies
        from rlhf_jax.pipeline.stages.eval_report import write_eval_report

        start = time.perf_counter()
        eval_config = configs["eval"]
        results = evaluate_policies(eval_config)
        timings.append({"stage": "eval", "seconds": round(time.perf_counter() - start, 1)})
        timings.append({"stage": "total", "seconds": round(time.perf_counter() - began, 1)})
        checks = target_checks(results)
        sections = [Section("Quick start", _intro(config, task_plugin.describe(task_config)),
                            tables=[timings, checks])]
        results["timings"] = timings
        results["checks"] = checks
        (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
        report = write_eval_report(out, results, eval_config.runs, sections,
                                   title="rlhf_jax quick start: SFT -> reward model -> PPO / DPO / GRPO")
        results["report"] = str(report)
        for name, metrics in results["policies"].items():
            print(f"[quickstart] {name:5s} pass@1 {metrics['pass@1']:.3f}  "
                  f"pass@{results['num_samples']} {metrics['pass@k'][results['num_samples']]:.3f}", flush=True)
        for row in checks:
            print(f"[quickstart] {row['claim']}: {row['measured']} ({row['holds']})", flush=True)
        print(f"[quickstart] report: {report.resolve()}", flush=True)
    total = round(time.perf_counter() - began, 1)
    print(f"[quickstart] finished in {total}s", flush=True)
    return {"stages": summaries, "results": results, "timings": timings, "seconds": total}


def _intro(config: QuickstartConfig, task_description: str) -> str:
    model = config.model
    return (f"{task_description} "
            f"Model: a fresh {model.num_layers}-layer, d_model {model.hidden_size} {model.model_type} "
            f"transformer. PPO is scored by the reward model, GRPO by the "
            f"{'reward model' if config.grpo.reward.kind == 'reward_model' else 'gold scorer'}. Times are "
            f"wall-clock seconds on this machine, compilation included.")


def run(config_path=None, overrides=(), *, resume: bool = False) -> dict:
    """The `rlhf-jax quickstart` entry point."""
    return run_quickstart(load_quickstart_config(config_path, overrides), resume=resume)
