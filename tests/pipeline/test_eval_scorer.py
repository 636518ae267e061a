"""`rlhf-jax eval` says what scores the samples, and prompts without the `answer` the task's
gold scorer compares with are an error naming the file (before any model is loaded)."""
import pytest

from rlhf_jax.pipeline import cli
from rlhf_jax.pipeline.stage_configs import EvalConfig, EvalRewardSection
from rlhf_jax.pipeline.stages.evaluate import print_eval_start
from rlhf_jax.pipeline.stages.scoring import reward_functions
from rlhf_jax.pipeline.stage_configs import RewardFunctionSpec
from rlhf_jax.pipeline.tokenizer import build_tokenizer


@pytest.fixture(scope="module")
def policy(tmp_path_factory):
    folder = tmp_path_factory.mktemp("eval") / "policy"
    build_tokenizer(folder, "0123456789+=")
    return folder


@pytest.mark.parametrize("rows,where", [
    ('{"prompt": "1+2="}\n{"prompt": "2+2="}\n', "has no `answer` column"),
    ('{"prompt": "1+2=", "answer": "3"}\n{"prompt": "2+2="}\n', "row 2 has no `answer`"),
])
def test_prompts_without_answers_need_reward_functions(policy, tmp_path, capsys, rows, where):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(rows)
    capsys.readouterr()
    code = cli.main(["eval", f"output_dir={tmp_path / 'out'}", f"policies.a={policy}", f"prompts_file={prompts}",
                     "task=countdown"])
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and "Traceback" not in captured.err, captured.err
    assert lines[0].startswith("rlhf-jax eval: reward error: `prompts_file`: "), lines[0]
    for part in (str(prompts), where, "gold scorer of the countdown task", "set `reward.functions`"):
        assert part in lines[0], (part, lines[0])
    assert "[eval] scored by:" not in captured.out


def test_start_lines_name_the_scorer(capsys):
    config = EvalConfig(prompts_file="p.jsonl", num_samples=4)
    print_eval_start(config, [], 3, 5)
    out = capsys.readouterr().out
    assert "[eval] prompts: 3 of the 5 rows of p.jsonl, 4 samples each" in out
    assert "[eval] scored by: gold scorer of the arithmetic task against the `answer` column" in out
    specs = [RewardFunctionSpec(function="rlhf_jax.rewards:think_format", weight=0.5)]
    config = EvalConfig(prompts_file="p.jsonl", reward=EvalRewardSection(functions=specs, pass_threshold=0.25))
    print_eval_start(config, reward_functions(specs), 3, 3)
    out = capsys.readouterr().out
    assert "[eval] scored by: think_format (weight 0.5) (a sample passes when its weighted reward exceeds 0.25)" in out
