"""The TRL side of `vs_trl.py`: SFT, DPO, reward-model and PPO training with TRL's trainers.

Each runner loads the Hugging Face folders that `vs_trl.py` wrote with our
`save_pretrained` (through `transformers.AutoModel*`), trains for `steps` steps with TRL's own
`train()` loop and returns the wall time of every step (from one `on_step_end` to the next,
so data loading and the trainer's bookkeeping are included, as a user would see them) and the
loss of the first batch (file rows 0..B-1) before any update, computed by the trainer's own
`compute_loss`.

`setup` and `hp` are the `Setup` and `Hyperparameters` objects of `vs_trl.py` (read by
attribute). PPO is `trl.experimental.ppo.PPOTrainer` (TRL 1.10-1.12; TRL < 1.10 exports it
from `trl`; TRL >= 1.13 no longer has PPO).
"""
from __future__ import annotations

import time

import torch


def _device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _step_clock():
    from transformers import TrainerCallback

    class StepClock(TrainerCallback):
        """Wall-clock and process CPU time at the start of training and after every step."""

        def __init__(self):
            self.marks = []

        def on_train_begin(self, args, state, control, **kwargs):
            self.marks = [(time.perf_counter(), time.process_time())]

        def on_step_end(self, args, state, control, **kwargs):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.marks.append((time.perf_counter(), time.process_time()))

        def seconds(self) -> dict:
            pairs = list(zip(self.marks, self.marks[1:]))
            return {"step_seconds": [b[0] - a[0] for a, b in pairs],
                    "step_cpu_seconds": [b[1] - a[1] for a, b in pairs]}

    return StepClock()


def _common_args(hp, steps: int, output_dir) -> dict:
    """TrainingArguments shared by every TRL trainer here (the values `vs_trl.py` gives ours)."""
    return dict(
        output_dir=str(output_dir), per_device_train_batch_size=hp.batch_size, max_steps=steps,
        learning_rate=hp.learning_rate, lr_scheduler_type="linear", warmup_steps=0, weight_decay=0.0,
        adam_epsilon=hp.adam_eps, max_grad_norm=hp.max_grad_norm, bf16=hp.dtype == "bfloat16",
        fp16=False, gradient_checkpointing=False, logging_steps=steps, save_strategy="no",
        report_to="none", use_cpu=_device() == "cpu", disable_tqdm=True, dataloader_num_workers=0,
        seed=hp.seed,
    )


def _tokenizer(setup):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(setup.tokenizer_dir))


def _first_batch_loss(trainer, batch_size: int) -> float:
    rows = [trainer.train_dataset[i] for i in range(batch_size)]
    batch = {name: value.to(trainer.model.device) if hasattr(value, "to") else value
             for name, value in trainer.data_collator(rows).items()}
    with torch.no_grad():
        return float(trainer.compute_loss(trainer.model, batch))


def trl_sft(setup, hp, steps: int, output_dir) -> dict:
    """TRL SFTTrainer on prompt/completion rows: loss on the completion tokens only, no packing."""
    import datasets
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig, SFTTrainer

    model = AutoModelForCausalLM.from_pretrained(str(setup.policy_dir), dtype=torch.float32)
    data = datasets.load_dataset("json", data_files=str(setup.sft_file), split="train")
    args = SFTConfig(**_common_args(hp, steps, output_dir), max_length=None, packing=False,
                     completion_only_loss=True)
    clock = _step_clock()
    trainer = SFTTrainer(model=model, args=args, train_dataset=data, processing_class=_tokenizer(setup),
                         callbacks=[clock])
    first = trainer.train_dataset[0]
    loss0 = _first_batch_loss(trainer, hp.batch_size)
    trainer.train()
    return {**clock.seconds(), "loss0": loss0, "first_chosen_ids": list(first["input_ids"])}


def trl_dpo(setup, hp, steps: int, output_dir) -> dict:
    """TRL DPOTrainer: sigmoid loss, beta `hp.beta`, reference forward in every step."""
    import datasets
    from transformers import AutoModelForCausalLM
    from trl import DPOConfig, DPOTrainer

    model = AutoModelForCausalLM.from_pretrained(str(setup.policy_dir), dtype=torch.float32)
    reference = AutoModelForCausalLM.from_pretrained(str(setup.reference_dir), dtype=torch.float32)
    data = datasets.load_dataset("json", data_files=str(setup.pairs_file), split="train")
    args = DPOConfig(**_common_args(hp, steps, output_dir), beta=hp.beta, loss_type=["sigmoid"],
                     max_length=None, precompute_ref_log_probs=False)
    clock = _step_clock()
    trainer = DPOTrainer(model=model, ref_model=reference, args=args, train_dataset=data,
                         processing_class=_tokenizer(setup), callbacks=[clock])
    first = trainer.train_dataset[0]
    loss0 = _first_batch_loss(trainer, hp.batch_size)
    trainer.train()
    return {**clock.seconds(), "loss0": loss0,
            "first_chosen_ids": list(first["prompt_ids"]) + list(first["chosen_ids"])}


def trl_reward(setup, hp, steps: int, output_dir) -> dict:
    """TRL RewardTrainer on `AutoModelForSequenceClassification` (one label), Bradley-Terry."""
    import datasets
    from transformers import AutoModelForSequenceClassification
    from trl import RewardConfig, RewardTrainer

    model = AutoModelForSequenceClassification.from_pretrained(str(setup.reward_dir), num_labels=1,
                                                               dtype=torch.float32)
    data = datasets.load_dataset("json", data_files=str(setup.pairs_file), split="train")
    args = RewardConfig(**_common_args(hp, steps, output_dir), max_length=None,
                        center_rewards_coefficient=None)
    clock = _step_clock()
    trainer = RewardTrainer(model=model, args=args, train_dataset=data, processing_class=_tokenizer(setup),
                            callbacks=[clock])
    loss0 = _first_batch_loss(trainer, hp.batch_size)
    trainer.train()
    return {**clock.seconds(), "loss0": loss0,
            "first_chosen_ids": list(trainer.train_dataset[0]["chosen_ids"])}


def _ppo_classes():
    try:
        from trl.experimental.ppo import PPOConfig, PPOTrainer
    except ImportError:
        try:
            from trl import PPOConfig, PPOTrainer
        except ImportError as err:
            raise ImportError("this TRL has no PPOTrainer (removed in TRL 1.13); install "
                              "`trl>=0.20,<1.13` for the PPO comparison") from err
    return PPOConfig, PPOTrainer


def trl_ppo(setup, hp, iterations: int, output_dir) -> dict:
    """TRL PPOTrainer: policy, frozen reference, reward model and value model (the reward
    folder with its score head set to zero); one `on_step_end` per PPO iteration."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    PPOConfig, PPOTrainer = _ppo_classes()
    load_lm = lambda folder: AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    load_scorer = lambda: AutoModelForSequenceClassification.from_pretrained(
        str(setup.reward_dir), num_labels=1, dtype=torch.float32)
    policy, reference, reward, value = load_lm(setup.policy_dir), load_lm(setup.reference_dir), load_scorer(), load_scorer()
    with torch.no_grad():
        value.score.weight.zero_()
    prompts = Dataset.from_dict({"input_ids": [list(map(int, row)) for row in setup.ppo_prompt_ids]})
    common = _common_args(hp, iterations, output_dir)
    common.update(per_device_train_batch_size=hp.ppo_batch_size, max_steps=-1, logging_steps=1)
    args = PPOConfig(
        **common, gradient_accumulation_steps=1, num_mini_batches=hp.ppo_minibatches,
        num_ppo_epochs=hp.ppo_epochs, response_length=hp.ppo_response_length, temperature=1.0,
        stop_token="eos", kl_coef=hp.kl_coef, kl_estimator="k1", cliprange=0.2, vf_coef=0.1,
        cliprange_value=0.2, gamma=1.0, lam=0.95, whiten_rewards=False, missing_eos_penalty=None,
        total_episodes=hp.ppo_batch_size * iterations, num_sample_generations=0,
        local_rollout_forward_batch_size=hp.ppo_batch_size, sft_model_path=str(setup.policy_dir),
        reward_model_path=str(setup.reward_dir),
    )
    clock = _step_clock()
    trainer = PPOTrainer(args=args, processing_class=_tokenizer(setup), model=policy, ref_model=reference,
                         reward_model=reward, train_dataset=prompts, value_model=value,
                         eval_dataset=prompts.select(range(hp.ppo_batch_size)), callbacks=[clock])
    trainer.train()
    return clock.seconds()


def trl_version() -> str:
    import trl

    return trl.__version__


__all__ = ["trl_sft", "trl_dpo", "trl_reward", "trl_ppo", "trl_version"]
