"""Typed configs of the pipeline stages: one dataclass tree per `rlhf-jax` subcommand.

Every stage config is loaded with `rlhf_jax.typed_config.load_config`, so an unknown key or
a value of the wrong type is a `ConfigError` naming the key and listing the valid ones. The
supervised stages (sft, reward, dpo) share `StageConfig`:

    output_dir, seed
    model       a Hugging Face folder (`path`) or the architecture of a fresh model (`init`)
    tokenizer   tokenizer folder (default: the model folder)
    data        files and lengths (`rlhf_jax.pipeline.data.DataConfig`)
    optim       optimizer (`rlhf_jax.training.optim.OptimizerConfig`); `total_steps` is set
                to the stage's `train.steps`, so the schedule always spans the run (the
                output folder's config.yaml records that value: `with_schedule_lengths`).
                `optim.nonfinite` says what a NaN/inf gradient does: "skip" (default) drops
                the update and counts it (`optim/nonfinite_skips` in the logs and progress
                line), and the run stops after `optim.max_consecutive_skips` (default 10)
                skips in a row; "halt" stops at the first non-finite metric; "none" does
                nothing. No checkpoint or exported model holding a NaN/inf is ever written.
    mesh        device mesh (`rlhf_jax.training.sharding.MeshConfig`); with no -1 entry the
                mesh uses the first data*fsdp*tensor devices
    train       length, batch size, micro-batching, `stop_after` (stop early to test resuming)
    eval        held-out evaluation during and after training
    checkpoint  interval and how many to keep
    logging     metrics rows, TensorBoard, progress bar

The RL stages (`PPOStageConfig`, `GRPOStageConfig`) share `RLStageConfig` (policy, reference,
tokenizer, reward, prompt data, optim, mesh, train, checkpoint, logging); PPO adds the value
model (`value`, `value_optim`), and each holds the algorithm's own frozen config
(`rlhf_jax.training.ppo.PPOConfig`, `rlhf_jax.training.grpo.GRPOConfig`) as its `ppo` / `grpo`
section. `eval` and `quickstart` have their own configs. `QuickstartConfig` holds one config per
stage plus the built-in task and the fresh model's architecture; the quickstart fills in the
paths that connect the stages.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import ClassVar, Literal

from rlhf_jax.models.config import ModelConfig
from rlhf_jax.models.lora import DEFAULT_TARGETS, check_lora_settings
from rlhf_jax.typed_config import ConfigError, config_source, load_config
from rlhf_jax.pipeline.data import DataConfig
from rlhf_jax.pipeline.tasks import split_task_section
from rlhf_jax.training.preference_step import PreferenceLossConfig
from rlhf_jax.training.grpo import GRPOConfig as GRPOAlgorithmConfig
from rlhf_jax.training.optim import OptimizerConfig
from rlhf_jax.training.ppo import PPOConfig as PPOAlgorithmConfig
from rlhf_jax.training.sharding import MeshConfig


# ----------------------------------------------------------------------------- shared sections


@dataclass
class ModelSection:
    """Where a stage's model comes from."""

    path: str | None = None  # Hugging Face folder (config.json + *.safetensors)
    init: ModelConfig | None = None  # architecture of a fresh random model (when path is None);
    # its vocab_size and bos/eos/pad ids are taken from the tokenizer
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"  # compute dtype
    save_dtype: Literal["source", "float32", "bfloat16", "float16"] = "source"  # storage dtype of
    # the exported `<output_dir>/model` (and config.json's `dtype`/`torch_dtype`); "source": the
    # loaded folder's config.json `dtype` (or `torch_dtype`), float32 for a fresh model or when
    # the folder names no floating dtype (training itself always keeps float32 parameters)
    remat: bool = False  # rematerialise blocks in the backward pass (saves memory)
    attention_impl: Literal["auto", "plain", "blockwise"] = "auto"  # `ModelConfig.attention_impl`
    # of the loaded or fresh model (replacing `init.attention_impl`): "plain" materialises the
    # [B, H, T, S] attention scores, "blockwise" runs `ops.blockwise_attention` (memory linear
    # in T), "auto" is blockwise when T > 1 and T * S > 512**2. In ppo / grpo `policy.attention_impl`
    # also applies to the value and reward models (the reference runs as the policy does).


@dataclass
class LoRASection:
    """LoRA (Hu et al. 2021, arXiv:2106.09685): train low-rank adapters `W + (alpha/r) A B` on
    the `targets` layers of the frozen model, instead of every weight (`rlhf_jax.models.lora`).
    Only the adapters (and a reward/value model's `score` head) are trained and hold optimizer
    state; the frozen reference policy is the base model with the adapters disabled. A finished
    run writes the adapter as a PEFT folder (`<output_dir>/adapter`) and the merged model
    (`<output_dir>/model`). Absent (the default): full fine-tuning.

    Learning rate: `optim.learning_rate` applies to the adapters, which need a larger rate
    than full fine-tuning, about 3-10x (more for small ranks: the update of `W` is
    `(alpha/r) A dB`, and B starts at 0). On the quick start's DPO the full model trains at
    3e-5; rank 2 at 3e-4 and rank 8 at 1e-4 match it, while the full rate leaves the adapters
    almost untrained (benchmarks/RESULTS.md, "LoRA DPO")."""

    rank: int = 8  # r
    alpha: float = 16.0  # the adapter output is scaled by alpha / r (alpha = 2 r: scale 2)
    dropout: float = 0.0  # dropout on the adapter input during training (must be 0 in ppo/grpo)
    targets: list[str] = field(default_factory=lambda: list(DEFAULT_TARGETS))  # layer names;
    # default: every linear layer the model has, q_proj k_proj v_proj o_proj gate_proj up_proj
    # down_proj (GPT-2: qkv_proj o_proj fc_in fc_out); names the model lacks are skipped
    path: str | None = None  # a PEFT adapter folder to continue training; its r, lora_alpha and
    # target layers replace rank, alpha and targets

    def __post_init__(self):
        check_lora_settings(self.rank, self.alpha, self.dropout, tuple(self.targets), prefix="lora.")


@dataclass
class TrainSection:
    """How long and on what batches a stage trains."""

    steps: int = 1000  # optimizer steps (also the learning-rate schedule's length)
    batch_size: int = 32  # global batch: rows (sft) or pairs (reward, dpo) per step
    num_microbatches: int = 1  # gradient accumulation inside one compiled step
    stop_after: int | None = None  # debugging: end this run after that many steps WITHOUT a final
    # checkpoint, as if it were killed; `--resume` continues it


@dataclass
class EvalSection:
    """Held-out evaluation on `data.eval_files` (metrics logged as `eval/...`)."""

    every: int = 0  # also evaluate every N steps (0: only at the end)
    batch_size: int = 64
    max_batches: int | None = None  # cap on held-out batches per evaluation (None: all)


@dataclass
class CheckpointSection:
    interval: int = 100  # save every N steps (0: only at the end); the end is always saved
    keep: int | None = 2  # newest checkpoints kept (None: all)
    async_save: bool = True  # write in a background thread


@dataclass
class LoggingSection:
    every: int = 1  # a metrics.jsonl row every N steps
    tensorboard: bool = True  # TensorBoard event files in <output_dir>/tensorboard
    progress: bool | None = None  # progress bar; None: when stderr is a terminal
    wandb: bool = False  # also log to Weights & Biases (pip install "rlhf_jax[wandb]"; WANDB_* env vars apply)
    wandb_project: str | None = None  # None: $WANDB_PROJECT, else "rlhf-jax"
    wandb_name: str | None = None  # the W&B run's name; None: the output folder's name

    def wandb_options(self) -> dict | None:
        """`MetricsLogger(wandb=...)`: None when W&B logging is off."""
        return {"project": self.wandb_project, "name": self.wandb_name} if self.wandb else None


@dataclass
class StageConfig:
    """Fields every supervised stage shares (see the module docstring)."""

    output_dir: str = "runs/stage"
    seed: int = 0
    model: ModelSection = field(default_factory=ModelSection)
    tokenizer: str | None = None  # tokenizer folder; None: model.path
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimizerConfig = field(default_factory=OptimizerConfig)  # incl. nonfinite, max_consecutive_skips
    mesh: MeshConfig = field(default_factory=MeshConfig)
    train: TrainSection = field(default_factory=TrainSection)
    eval: EvalSection = field(default_factory=EvalSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    logging: LoggingSection = field(default_factory=LoggingSection)
    lora: LoRASection | None = None  # LoRA adapters instead of full fine-tuning (None: off)


# ----------------------------------------------------------------------------- supervised stages


@dataclass
class SFTOptions:
    label_smoothing: float = 0.0


@dataclass
class SFTConfig(StageConfig):
    output_dir: str = "runs/sft"
    sft: SFTOptions = field(default_factory=SFTOptions)


@dataclass
class RewardOptions:
    center_coef: float = 0.0  # weight of mean((r_w + r_l)^2), keeps scores near 0


@dataclass
class RewardConfig(StageConfig):
    """A reward model: the decoder of `model` plus a fresh scalar head (or the folder's head)."""

    output_dir: str = "runs/reward"
    reward: RewardOptions = field(default_factory=RewardOptions)


@dataclass
class DPOConfig(StageConfig):
    """Preference optimisation (DPO, IPO, ... SimPO, CPO, ORPO) of `model` on pairs."""

    output_dir: str = "runs/dpo"
    reference: str | None = None  # frozen reference policy folder; None: model.path
    dpo: PreferenceLossConfig = field(default_factory=PreferenceLossConfig)


# ----------------------------------------------------------------------------- RL stages


@dataclass
class RewardFunctionSpec:
    """One reward function of `reward.functions` (see `rlhf_jax.rewards`); a plain string in
    the list stands for `{function: <string>, weight: 1.0}`."""

    SHORTHAND_FIELD: ClassVar[str] = "function"
    function: str = ""  # path/to/file.py:name (relative to the working directory) or package.module:name
    weight: float = 1.0  # its weight in the weighted sum


@dataclass
class RewardSource:
    """What scores a response: reward functions, a reward-model folder, both, or the built-in
    task's gold scorer.

    With `functions`, the score is `sum_f weight_f * f(...)` (a None left out of its row's
    sum), plus `model_weight * reward model` when `path` is set; `kind` is then not used.
    Without `functions`, `kind` picks the reward model (`path`) or the gold scorer; `auto`
    (the default) is the reward model when `path` is set, else the gold scorer, so setting
    another key (`task`, `gold_kind`) never changes which one scores. Reward functions and
    the gold scorer run on the host between the jitted generate and update phases of each
    iteration; a reward model alone scores inside the compiled iteration.
    """

    kind: Literal["auto", "reward_model", "gold"] = "auto"  # auto: reward_model if `path`, else gold
    task: str | None = None  # the task whose scorer is `gold` (None: the default task)
    path: str | None = None  # reward-model folder (kind = reward_model, or next to functions)
    gold_kind: Literal["exact", "graded"] = "exact"  # the gold scorer's variant (kind = gold)
    functions: list[RewardFunctionSpec] = field(default_factory=list)
    model_weight: float = 1.0  # weight of the reward model's score next to `functions`

    @property
    def scorer(self) -> Literal["reward_model", "gold"]:
        """The scorer `kind` names without functions (`auto` resolved by `path`)."""
        if self.kind != "auto":
            return self.kind
        return "reward_model" if self.path is not None else "gold"

    @property
    def uses_model(self) -> bool:
        return self.path is not None if self.functions else self.scorer == "reward_model"

    @property
    def uses_gold(self) -> bool:
        return not self.functions and self.scorer == "gold"


@dataclass
class DynamicSamplingSection:
    """DAPO's dynamic sampling (Yu et al. 2025, arXiv:2503.14476): drop prompt groups whose
    rewards all tie (zero advantage, no gradient) and refill the batch with groups of further
    prompts, at most `max_refills` extra generate calls per iteration; a batch still short
    after that is completed with tied groups (logged as `dynamic_sampling/filled_fraction`)."""

    enabled: bool = False
    max_refills: int = 4


@dataclass
class RLTrainSection:
    iterations: int = 100  # rollout + update rounds
    batch_size: int = 64  # prompts per rollout
    stop_after: int | None = None  # debugging: end this run early without a final checkpoint


@dataclass
class RLStageConfig:
    """Fields the RL stages share: the policy, its frozen reference, what scores a response,
    prompt data, the policy optimizer, mesh, rollout rounds, checkpoints and logging."""

    output_dir: str = "runs/rl"
    seed: int = 0
    policy: ModelSection = field(default_factory=ModelSection)
    reference: str | None = None  # reference policy folder; None: policy.path
    tokenizer: str | None = None  # None: policy.path
    reward: RewardSource = field(default_factory=RewardSource)
    data: DataConfig = field(default_factory=DataConfig)  # prompt files
    optim: OptimizerConfig = field(default_factory=OptimizerConfig)  # policy optimizer (nonfinite,
    # max_consecutive_skips: see the module docstring; PPO stops at the smaller limit of optim/value_optim)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    train: RLTrainSection = field(default_factory=RLTrainSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    logging: LoggingSection = field(default_factory=LoggingSection)
    lora: LoRASection | None = None  # LoRA adapters on the policy (and PPO's value model); None: off


@dataclass
class PPOStageConfig(RLStageConfig):
    """KL-regularised PPO: policy, value model (from the reward model), frozen reference.

    `ppo` is `rlhf_jax.training.ppo.PPOConfig` (its `sampling` section sets the response
    length and temperature; `sampling.eos_token_id` unset (null, the default) stops at the
    tokenizer's EOS and the other EOS ids of the policy folder's generation_config.json,
    `pad_token_id` unset is the tokenizer's pad; set ids (the stop ids: one or a list) must be
    of its vocabulary and replace them; the output folder's config.yaml records the ids used).
    """

    output_dir: str = "runs/ppo"
    value: str | None = None  # value-model folder; None: reward.path, else the policy's folder
    value_optim: OptimizerConfig | None = None  # None: the policy's
    ppo: PPOAlgorithmConfig = field(default_factory=PPOAlgorithmConfig)


@dataclass
class GRPOStageConfig(RLStageConfig):
    """GRPO / RLOO: `grpo.group_size` samples per prompt, group baselines, no value model.

    `grpo` is `rlhf_jax.training.grpo.GRPOConfig` (`grpo.sampling` as in PPO, EOS and pad ids
    included). `train.batch_size` counts prompts: a rollout has
    `batch_size * group_size` responses, and `grpo.num_minibatches` must divide
    `train.batch_size` (minibatches hold whole prompt groups).
    """

    output_dir: str = "runs/grpo"
    reward: RewardSource = field(default_factory=RewardSource)  # auto: gold without a path
    grpo: GRPOAlgorithmConfig = field(default_factory=GRPOAlgorithmConfig)
    dynamic_sampling: DynamicSamplingSection = field(default_factory=DynamicSamplingSection)
    mask_truncated: bool = False  # responses without EOS count no token in the loss


# ----------------------------------------------------------------------------- evaluation


@dataclass
class EvalRewardSection:
    """Reward functions scored on every policy's samples (`reward/<name>/mean` per policy); when
    given they replace the built-in task's gold scorer (see `stages/evaluate.py`)."""

    functions: list[RewardFunctionSpec] = field(default_factory=list)
    pass_threshold: float = 0.5  # with functions: a sample passes when its weighted reward exceeds this


@dataclass
class EvalConfig:
    """Evaluate policies with the built-in task's gold scorer (see `stages/evaluate.py`)."""

    output_dir: str = "runs/eval"
    seed: int = 0
    policies: dict[str, str] = field(default_factory=dict)  # name -> policy folder
    reference: str | None = None  # reference policy folder (win rate, KL); None: no comparison
    reward_model: str | None = None  # reward-model folder (held-out accuracy); None: skip
    tokenizer: str | None = None  # None: the reference's (or the first policy's) folder
    prompts_file: str = ""  # prompt rows with an `answer` column (the task's eval_prompts.jsonl)
    task: str | None = None  # the task whose scorer gives pass@k without reward.functions (None: default)
    reward: EvalRewardSection = field(default_factory=lambda: EvalRewardSection())  # reward functions
    preferences_file: str | None = None  # held-out pairs for reward-model accuracy
    max_prompts: int | None = None  # evaluate on the first N prompts (None: all)
    num_samples: int = 64  # samples per prompt (pass@k for k <= num_samples)
    max_new_tokens: int = 16
    temperature: float = 1.0
    batch_size: int = 4096  # sequences per generation call
    max_prompt_length: int = 64
    chat_template_kwargs: dict = field(default_factory=dict)  # as data.chat_template_kwargs of the training stages
    report: bool = True  # write report.md with tables and plots
    runs: dict[str, str] = field(default_factory=dict)  # run name -> output dir: curves; one stage's runs compared


# ----------------------------------------------------------------------------- quickstart


@dataclass
class QuickstartConfig:
    """The whole pipeline on the built-in task: task -> SFT -> reward -> PPO / DPO / GRPO -> eval.

    Each stage section is that stage's full config; the quickstart fills in `output_dir`,
    the model/tokenizer/reference paths and the data files (values set there are replaced).
    Loaded with `load_quickstart_config`, whose defaults are `QUICKSTART_RECIPE` (the values
    of configs/quickstart.yaml), not the plain stage defaults.
    """

    output_dir: str = "runs/quickstart"
    seed: int = 0
    task: dict = field(default_factory=dict)  # `name` (a task of rlhf_jax.tasks) + the task's config
    model: ModelConfig = field(default_factory=ModelConfig)  # the fresh policy's architecture
    stages: list[str] = field(default_factory=lambda: list(QUICKSTART_STAGES))
    sft: SFTConfig = field(default_factory=SFTConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    ppo: PPOStageConfig = field(default_factory=PPOStageConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)
    grpo: GRPOStageConfig = field(default_factory=GRPOStageConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


QUICKSTART_STAGES = ("sft", "reward", "ppo", "dpo", "grpo", "eval")


def load_stage_config(cls, path, overrides):
    """`load_config(cls, path, overrides)` where a value a config's own checks reject
    (e.g. `optim.schedule: cosin`) is a ConfigError too, naming the file."""
    def file_alone():
        check_stage_config(load_config(cls, path, []), path)

    try:
        config = load_config(cls, path, overrides)
    except ConfigError:
        raise
    except (ValueError, TypeError) as err:
        raise ConfigError(f"{config_source(path, overrides, file_alone)}{err}") from None
    try:
        check_stage_config(config, None)
    except ConfigError as err:
        raise ConfigError(f"{config_source(path, overrides, file_alone)}{err}") from None
    return config


def _positive(config, names: tuple[str, ...], path) -> None:
    for name in names:
        node = config
        for part in name.split("."):
            node = getattr(node, part)
        if node is not None and node < 1:
            source = f"{path}: " if path is not None else ""
            raise ConfigError(f"{source}`{name}` must be >= 1, got {node}")


def check_stage_config(config, path=None) -> None:
    """Range checks the dataclasses themselves do not make (raises ConfigError)."""
    if isinstance(config, StageConfig):
        _positive(config, ("train.steps", "train.batch_size", "train.num_microbatches",
                           "train.stop_after", "eval.batch_size", "logging.every"), path)
    if isinstance(config, RLStageConfig):
        _positive(config, ("train.iterations", "train.stop_after", "train.batch_size", "logging.every"), path)
        _check_functions(config.reward.functions, "reward.functions", path)
        if config.lora is not None and config.lora.dropout > 0:
            source = f"{path}: " if path is not None else ""
            raise ConfigError(f"{source}`lora.dropout` must be 0 in the RL stages: the rollout's log-probs and "
                              f"the update's must come from the same deterministic policy")
    if isinstance(config, GRPOStageConfig) and config.dynamic_sampling.max_refills < 0:
        raise ConfigError(f"{path + ': ' if path else ''}`dynamic_sampling.max_refills` must be >= 0, "
                          f"got {config.dynamic_sampling.max_refills}")
    if isinstance(config, EvalConfig):
        _check_functions(config.reward.functions, "reward.functions", path)
    if isinstance(config, EvalConfig):
        _positive(config, ("num_samples", "max_new_tokens", "batch_size"), path)
    if isinstance(config, QuickstartConfig):
        split_task_section(config.task)  # an unknown task or task key is a ConfigError
        unknown = [name for name in config.stages if name not in QUICKSTART_STAGES]
        if unknown:
            raise ConfigError(f"unknown quickstart stage {unknown[0]!r} in `stages`; valid stages: "
                              f"{', '.join(QUICKSTART_STAGES)}")
        for name in QUICKSTART_STAGES:
            check_stage_config(getattr(config, name), path)


def _check_functions(functions, key: str, path) -> None:
    for index, spec in enumerate(functions):
        if not spec.function:
            source = f"{path}: " if path is not None else ""
            raise ConfigError(f"{source}`{key}[{index}].function` is empty; expected "
                              "'path/to/file.py:name' or 'package.module:name'")


def with_schedule_length(optim: OptimizerConfig, steps: int) -> OptimizerConfig:
    """`optim` with `total_steps = steps` (warmup capped below it), so the schedule spans the run."""
    warmup = min(optim.warmup_steps, max(steps - 1, 0))
    return dataclasses.replace(optim, total_steps=max(steps, warmup + 1), warmup_steps=warmup)


def schedule_length(config: StageConfig | RLStageConfig) -> int:
    """The optimizer updates a stage's run makes: `train.steps` (sft, reward, dpo), or
    `train.iterations x epochs x num_minibatches` of the `ppo` / `grpo` section."""
    if isinstance(config, StageConfig):
        return config.train.steps
    algorithm = config.ppo if isinstance(config, PPOStageConfig) else config.grpo
    return config.train.iterations * algorithm.epochs * algorithm.num_minibatches


def with_schedule_lengths(config):
    """`config` with the optimizer schedules its stage trains with: `optim` (and PPO's
    `value_optim` when set) through `with_schedule_length(..., schedule_length(config))`, so
    `optim.total_steps` is the run's length, not the dataclass default; a quickstart config's
    stage sections each so; other configs as they are. The output folder's config.yaml and
    `--print-config` show this."""
    if isinstance(config, QuickstartConfig):
        return dataclasses.replace(config, **{name: with_schedule_lengths(getattr(config, name))
                                              for name in QUICKSTART_STAGES if name != "eval"})
    if not isinstance(config, (StageConfig, RLStageConfig)):
        return config
    steps = schedule_length(config)
    config = dataclasses.replace(config, optim=with_schedule_length(config.optim, steps))
    if isinstance(config, PPOStageConfig) and config.value_optim is not None:
        config = dataclasses.replace(config, value_optim=with_schedule_length(config.value_optim, steps))
    return config


__all__ = [
    "ModelSection", "LoRASection", "TrainSection", "EvalSection", "CheckpointSection", "LoggingSection",
    "StageConfig", "SFTOptions", "SFTConfig", "RewardOptions", "RewardConfig", "DPOConfig",
    "RewardFunctionSpec", "RewardSource", "DynamicSamplingSection", "EvalRewardSection", "RLTrainSection", "RLStageConfig", "PPOStageConfig", "GRPOStageConfig", "EvalConfig",
    "QuickstartConfig", "QUICKSTART_STAGES", "load_stage_config",
    "check_stage_config", "with_schedule_length", "schedule_length", "with_schedule_lengths",
]
