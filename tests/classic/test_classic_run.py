"""The `run_classic` driver: chunked progress, outputs on disk, the module's command line."""
import json

import numpy as np
import pytest

from rlhf_jax.classic.run import main, run_classic, smoothed_returns, windowed_returns
from rlhf_jax.typed_config import ConfigError

# 5 updates in chunks of 2 exercises the shorter final chunk (same compiled function).
TINY = ["env_name=Acrobot-v1", "num_envs=4", "num_steps=16", "total_timesteps=320",
        "epochs=1", "num_minibatches=2", "seeds=[0, 1]", "log_every=2"]


def test_run_classic_writes_metrics_and_curve(tmp_path, capsys):
    results = run_classic(None, TINY + [f"output_dir={tmp_path}"])
    lines = capsys.readouterr().out.splitlines()
    progress = [line for line in lines if line.startswith("update")]
    assert [line.split("|")[0].split()[1] for line in progress] == ["2/5", "4/5", "5/5"]
    assert "env steps       320" in progress[-1]
    assert (tmp_path / "learning_curve.png").stat().st_size > 1000
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["config"]["env_name"] == "Acrobot-v1"
    assert saved["env_steps"] == [64, 128, 192, 256, 320]
    assert len(saved["episode_return"]) == 2 and len(saved["episode_return"][0]) == 5
    assert np.asarray(saved["metrics"]["loss/total"]).shape == (2, 5)
    assert np.asarray(saved["metrics"]["episode/count"]).shape == (2, 5)
    assert saved["compile_seconds"] > 0 and saved["train_seconds"] > 0
    assert results["runner_state"].update_count.tolist() == [5, 5]
    assert len(results["final_return"]) == 2


def test_module_command_line_and_resume_refused(tmp_path):
    results = main(TINY + [f"output_dir={tmp_path}", "algorithm=reinforce", "baseline=false",
                           "log_every=10"])
    assert results["runner_state"].critic_state is None
    assert (tmp_path / "metrics.json").exists()
    with pytest.raises(ConfigError, match="resume"):
        run_classic(None, TINY, resume=True)
    with pytest.raises(ConfigError, match="num_env"):
        main(["num_env=3"])


def test_window_means_count_episodes_not_updates():
    sums = np.array([[10.0, 0.0, 90.0]])
    counts = np.array([[1.0, 0.0, 3.0]])
    np.testing.assert_allclose(windowed_returns(sums, counts), [25.0])
    np.testing.assert_allclose(smoothed_returns(sums, counts, 2), [[10.0, 10.0, 30.0]])
    assert np.isnan(windowed_returns(np.zeros((1, 2)), np.zeros((1, 2))))[0]
