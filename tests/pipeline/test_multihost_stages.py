"""The RL stages with reward functions on the host across processes: GRPO (with dynamic
sampling and `mask_truncated`) and PPO run as 2 launched processes x 4 CPU devices write the
metrics and model of the same stages run in this process on 8 devices. Every process gathers
the rollout and the prompts' data rows; process 0's scores are the ones all use."""
import io
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file
from stage_helpers import TINY_MODEL, tiny_task

from rlhf_jax.pipeline import cli
from rlhf_jax.pipeline.metrics_log import read_metrics
from rlhf_jax.pipeline.tasks import write_jsonl
from rlhf_jax.training.launch import launch

WORKER = Path(__file__).with_name("multihost_stages_worker.py")
REWARD = '''
def near_target(completions, target, **kwargs):
    """A fractional score that depends on each prompt's own `target` column."""
    return [1.0 / (1.0 + abs(len(text) - goal)) for text, goal in zip(completions, target)]
'''


def stage_commands(task, root: Path, output: Path) -> list[list[str]]:
    """GRPO from a fresh tiny policy; PPO from the model the one-process GRPO run exported
    (policy and value)."""
    common = [f"tokenizer={task.tokenizer_dir}", f"data.train_files=[{root / 'prompts.jsonl'}]", "data.max_prompt_length=8", "train.iterations=2", "train.batch_size=8", "logging.progress=false",
              "logging.tensorboard=false", "checkpoint.interval=0", "mesh.data=8",
              f"reward.functions=[{{function: {root / 'my_reward.py'}:near_target}}]"]
    grpo = ["grpo", f"output_dir={output / 'grpo'}", f"policy.init={TINY_MODEL}", *common, "grpo.group_size=2",
            "grpo.sampling.max_new_tokens=4",
            "dynamic_sampling.enabled=true", "mask_truncated=true", "grpo.kl_coef=0.05"]
    policy = root / "one" / "grpo" / "model"
    ppo = ["ppo", f"output_dir={output / 'ppo'}", f"policy.path={policy}", f"value={policy}", *common,
           "ppo.sampling.max_new_tokens=4", "ppo.num_minibatches=2"]
    return [grpo, ppo]


@pytest.mark.slow
def test_two_processes_match_one(tmp_path):
    task = tiny_task(tmp_path / "task")
    targets = [{"prompt": f"{a}+{b}=", "target": (a * 7 + b) % 5} for a in range(4) for b in range(4)]
    write_jsonl(tmp_path / "prompts.jsonl", targets)
    (tmp_path / "my_reward.py").write_text(REWARD)
    for command in stage_commands(task, tmp_path, tmp_path / "one"):
        assert cli.main(command) == 0
    worker_args = [arg for command in stage_commands(task, tmp_path, tmp_path / "two") for arg in [*command, "--"]]
    log = io.StringIO()
    launch([sys.executable, str(WORKER), *worker_args[:-1]], num_processes=2, devices_per_process=4,
           timeout=600, output=log)
    for stage in ("grpo", "ppo"):
        one, two = read_metrics(tmp_path / "one" / stage), read_metrics(tmp_path / "two" / stage)
        assert len(one) == len(two) == 2
        assert one[0].keys() == two[0].keys()
        assert any(row["reward/near_target/mean"] not in (0.0, 1.0) for row in one)  # fractional scores
        for a, b in zip(one, two):
            for key in a:
                np.testing.assert_allclose(b[key], a[key], atol=1e-5, rtol=1e-5, err_msg=f"{stage} {key}")
        weights = [load_file(str(tmp_path / run / stage / "model" / "model.safetensors")) for run in ("one", "two")]
        for name in weights[0]:
            np.testing.assert_allclose(weights[1][name], weights[0][name], atol=1e-5, err_msg=f"{stage} {name}")
    assert "dynamic_sampling/refills" in read_metrics(tmp_path / "two" / "grpo")[0]
