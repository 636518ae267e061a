"""Multi-process training: 2 processes x 4 CPU devices against 1 process x 8 devices.

The module fixture runs `multihost_worker.run` in this process (1 x 8 devices: pytest's
conftest gives 8 fake devices), launches the same worker as 2 local processes x 4 devices
(real cross-process collectives over gloo), then resumes the 2-process run's checkpoint here,
and finally runs SFT on a single device. The tests compare what each run wrote.
"""
import importlib.util
import io
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from rlhf_jax.training import multihost
from rlhf_jax.training.launch import LaunchError, free_port, launch, main, process_env
from rlhf_jax.training.sharding import MeshConfig, make_mesh, param_shardings

WORKER_PATH = Path(__file__).with_name("multihost_worker.py")
_spec = importlib.util.spec_from_file_location("multihost_worker", WORKER_PATH)
worker = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(worker)

ATOL = 1e-5
# the tests that read the runs: one module fixture, about 2 CPU minutes in all
slow = pytest.mark.slow


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("multihost")
    single = worker.run(save_dir=str(root / "ckpt_1x8"))
    output = io.StringIO()
    launch([sys.executable, str(WORKER_PATH), "--out", str(root / "out"), "--save-dir", str(root / "ckpt_2x4"),
            "--restore-dir", str(root / "ckpt_1x8")],
           num_processes=2, devices_per_process=4, timeout=600, output=output)
    multi = [dict(np.load(root / "out" / f"process{i}.npz")) for i in range(2)]
    resumed = worker.run(restore_dir=str(root / "ckpt_2x4"), phases=())
    plain = worker.run(devices=jax.devices()[:1], phases=("sft",))
    return {"single": single, "multi": multi, "resumed": resumed, "plain": plain, "log": output.getvalue()}


def assert_close(actual: dict, expected: dict, prefix: str, *, expected_prefix=None, rows=slice(None)):
    """Every `prefix.params:*` / `prefix.metrics:*` entry of `actual` equals the matching
    `expected_prefix.*` entry of `expected` (metrics: the steps `rows` of it)."""
    expected_prefix = expected_prefix or prefix
    keys = sorted(key for key in actual if key.startswith((prefix + ".params:", prefix + ".metrics:")))
    assert keys, f"no {prefix}.* results"
    for key in keys:
        want = expected[expected_prefix + key[len(prefix):]]
        want = want[rows] if ".metrics:" in key else want
        np.testing.assert_allclose(actual[key], want, atol=ATOL, rtol=ATOL, err_msg=key)


# ----------------------------------------------------------------------------- the launched runs


@slow
def test_launched_processes_form_one_job(runs):
    for process, results in enumerate(runs["multi"]):
        assert int(results["process_count"]) == 2 and int(results["device_count"]) == 8
        assert f"[process {process}]" in runs["log"]
    assert int(runs["single"]["process_count"]) == 1 and int(runs["single"]["device_count"]) == 8


@slow
@pytest.mark.parametrize("phase", ["sft", "dpo", "ppo"])
def test_two_processes_match_one_process(runs, phase):
    for results in runs["multi"]:
        assert_close(results, runs["single"], phase)
    # training moved the parameters (the comparison is not between two initial states)
    moved = [key for key in runs["single"] if key.startswith(f"{phase}.params:")]
    start = worker.params_as_dict(worker.initial_params())
    assert max(np.max(np.abs(runs["single"][key] - start[key.split(":", 1)[1]])) for key in moved) > 1e-3


@slow
def test_every_process_holds_the_same_results(runs):
    first, second = runs["multi"]
    assert first.keys() == second.keys()
    for key in first:
        np.testing.assert_array_equal(first[key], second[key], err_msg=key)


@slow
def test_single_device_matches_eight_devices(runs):
    assert_close(runs["plain"], runs["single"], "sft")


@slow
def test_ppo_rollouts_are_scored_and_kl_adapts(runs):
    results = runs["multi"][0]
    assert results["ppo.metrics:rollout/response_length"].min() > 0
    assert results["ppo.metrics:objective/kl_coef"][0] == pytest.approx(0.1)
    assert results["ppo.kl_coef"] != pytest.approx(0.1)
    assert any(key.startswith("ppo.value_params:") for key in results)


# ----------------------------------------------------------------------------- checkpoints


@slow
def test_checkpoint_of_two_processes_resumes_in_one(runs):
    resumed, uninterrupted = runs["resumed"], runs["single"]
    assert int(resumed["resume.step"]) == worker.SFT_STEPS
    assert float(resumed["resume.reshard_max_diff"]) == 0.0
    assert_close(resumed, uninterrupted, "resume", expected_prefix="sft", rows=slice(worker.SAVE_STEP, None))
    assert_close(resumed, runs["multi"][0], "resume", expected_prefix="sft", rows=slice(worker.SAVE_STEP, None))


@slow
def test_checkpoint_of_one_process_resumes_in_two(runs):
    for results in runs["multi"]:
        assert int(results["resume.step"]) == worker.SFT_STEPS
        assert float(results["resume.reshard_max_diff"]) == 0.0
        assert_close(results, runs["single"], "resume", expected_prefix="sft",
                     rows=slice(worker.SAVE_STEP, None))


# ----------------------------------------------------------------------------- cross-process checks


@slow
def test_evaluation_sums_are_reduced_across_processes(runs):
    single = runs["single"]
    for results in runs["multi"]:
        assert float(results["eval.tokens"]) == float(single["eval.tokens"])
        assert float(results["eval.mean_tokens"]) == pytest.approx(float(single["eval.mean_tokens"]))


@slow
def test_parameters_that_differ_between_processes_are_refused(runs):
    message = str(runs["multi"][0]["check.inconsistent_params"])
    assert "'layer/kernel'" in message and "process(es) [1]" in message
    assert str(runs["multi"][1]["check.inconsistent_params"]) == message
    assert str(runs["single"]["check.inconsistent_params"]) == "no error"


# ----------------------------------------------------------------------------- helpers, one process


def test_process_batch_rows_and_global_batch():
    mesh = make_mesh(MeshConfig(data=4, fsdp=2))
    assert multihost.process_batch_rows(mesh, 16) == slice(0, 16)
    with pytest.raises(ValueError, match="multiple of the 8 batch shards"):
        multihost.process_batch_rows(mesh, 12)
    local = {"ids": np.arange(32, dtype=np.int32).reshape(16, 2), "mask": np.ones(16, np.float32)}
    batch = multihost.global_batch(local, mesh)
    assert batch["ids"].sharding.spec == P(("data", "fsdp"))
    np.testing.assert_array_equal(np.asarray(batch["ids"]), local["ids"])
    with pytest.raises(ValueError, match=r"rows \[0, 16\)"):
        multihost.global_batch({"ids": local["ids"], "short": np.ones(8)}, mesh)
    with pytest.raises(ValueError, match="multiple"):
        multihost.global_batch({"ids": local["ids"][:12]}, mesh)


def test_global_params_fetch_and_reductions_in_one_process():
    mesh = make_mesh(MeshConfig(data=1, fsdp=8))
    params = {"w": np.arange(128, dtype=np.float32).reshape(16, 8), "b": np.ones(8, np.float32)}
    shardings = param_shardings(params, mesh, min_size=64)
    placed = multihost.global_params(params, shardings)
    assert placed["w"].sharding.spec == P("fsdp") and placed["b"].sharding.spec == P()
    fetched = multihost.fetch({"params": placed, "count": 3})
    np.testing.assert_array_equal(fetched["params"]["w"], params["w"])
    assert fetched["count"] == 3
    one = multihost.global_params(params, NamedSharding(mesh, P()))
    assert one["w"].sharding.spec == P()
    multihost.assert_same_across_processes(params)
    sums = multihost.process_sum({"a": np.float32(2.5), "n": np.array([1, 2], np.int32), "flag": True})
    assert sums["a"] == 2.5 and sums["n"].dtype == np.int64 and sums["flag"] == 1
    assert multihost.process_mean(np.array([1.0, 3.0]))[1] == 3.0
    assert multihost.process_mean(np.float64(4.0), weight=10) == pytest.approx(4.0)
    scores, metrics = multihost.from_main_process((np.array([0.25, 1.5], np.float32), {"mean": 0.875}))
    assert scores.dtype == np.float32 and scores.tolist() == [0.25, 1.5] and float(metrics["mean"]) == 0.875
    assert multihost.is_main_process()
    multihost.barrier("single")


def test_distributed_config_from_env():
    env = {"JAX_COORDINATOR_ADDRESS": "127.0.0.1:1234", "RLHF_JAX_NUM_PROCESSES": "2", "RLHF_JAX_PROCESS_ID": "1"}
    config = multihost.distributed_config_from_env(env, initialization_timeout=7)
    assert (config.coordinator_address, config.num_processes, config.process_id) == ("127.0.0.1:1234", 2, 1)
    assert config.initialization_timeout == 7
    empty = multihost.distributed_config_from_env({})
    assert (empty.coordinator_address, empty.num_processes, empty.process_id) == (None, None, None)
    with pytest.raises(ValueError, match="RLHF_JAX_PROCESS_ID must be an integer"):
        multihost.distributed_config_from_env({**env, "RLHF_JAX_PROCESS_ID": "one"})


@pytest.mark.parametrize(
    "changes, message",
    [({"RLHF_JAX_PROCESS_ID": "2"}, "smaller than"),
     ({"RLHF_JAX_NUM_PROCESSES": "0"}, "num_processes"),
     ({"JAX_COORDINATOR_ADDRESS": "localhost"}, "host:port"),
     ({"JAX_COORDINATOR_ADDRESS": ""}, "not coordinator_address")],
)
def test_inconsistent_environment_fails_before_connecting(monkeypatch, changes, message):
    from rlhf_jax.training import distributed

    calls = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kwargs: calls.append(kwargs))
    monkeypatch.setattr(distributed, "detect_cluster", lambda: None)
    env = {"JAX_COORDINATOR_ADDRESS": "127.0.0.1:1234", "RLHF_JAX_NUM_PROCESSES": "2",
           "RLHF_JAX_PROCESS_ID": "1", **changes}
    with pytest.raises(ValueError, match=message):
        multihost.initialize_from_env(env)
    assert calls == []
    assert multihost.initialize_from_env({}) is False  # nothing set: one process


# ----------------------------------------------------------------------------- the launcher


def test_process_env():
    base = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8 --xla_other=1", "KEEP": "x"}
    env = process_env(1, 2, coordinator_address="127.0.0.1:99", devices_per_process=4, base_env=base)
    assert env["XLA_FLAGS"].split() == ["--xla_other=1", "--xla_force_host_platform_device_count=4"]
    assert (env["JAX_COORDINATOR_ADDRESS"], env["RLHF_JAX_NUM_PROCESSES"], env["RLHF_JAX_PROCESS_ID"]) == (
        "127.0.0.1:99", "2", "1")
    assert env["JAX_PLATFORMS"] == "cpu" and env["KEEP"] == "x"
    gpu = process_env(1, 2, coordinator_address="h:1", devices_per_process=2, platform="gpu", base_env={})
    assert gpu["CUDA_VISIBLE_DEVICES"] == "2,3" and "XLA_FLAGS" not in gpu
    assert 0 < free_port() < 65536


def test_launch_prefixes_output_and_returns_exit_codes():
    output = io.StringIO()
    code = "import os; print('id', os.environ['RLHF_JAX_PROCESS_ID'], os.environ['RLHF_JAX_NUM_PROCESSES'])"
    assert launch([sys.executable, "-c", code], num_processes=3, output=output) == [0, 0, 0]
    lines = set(output.getvalue().splitlines())
    assert {"[process 0] id 0 3", "[process 1] id 1 3", "[process 2] id 2 3"} <= lines


def test_launch_fails_when_one_process_fails_and_stops_the_others():
    code = ("import os, sys, time\n"
            "if os.environ['RLHF_JAX_PROCESS_ID'] == '1':\n"
            "    print('broken config'); sys.exit(3)\n"
            "time.sleep(60)\n")
    with pytest.raises(LaunchError, match=r"(?s)process\(es\) \[0, 1\].*broken config") as error:
        launch([sys.executable, "-c", code], num_processes=2, output=io.StringIO(), timeout=50)
    assert error.value.returncodes[1] == 3 and error.value.returncodes[0] != 0
    with pytest.raises(LaunchError, match="timed out"):
        launch([sys.executable, "-c", "import time; time.sleep(30)"], num_processes=1,
               output=io.StringIO(), timeout=0.5)


def test_launch_arguments_and_command_line(capsys):
    with pytest.raises(ValueError, match="num_processes"):
        launch(["true"], num_processes=0)
    with pytest.raises(ValueError, match="empty"):
        launch([], num_processes=1)
    with pytest.raises(ValueError, match="platform"):
        launch(["true"], num_processes=1, platform="tpu")
    with pytest.raises(OSError):
        launch(["/nonexistent/program"], num_processes=2, output=io.StringIO())
    assert main(["--num-processes", "2", "--", sys.executable, "-c", "print('hello')"]) == 0
    assert "[process 1] hello" in capsys.readouterr().out
    assert main(["--num-processes", "1", "--", sys.executable, "-c", "raise SystemExit(5)"]) == 5
    with pytest.raises(SystemExit):
        main(["--num-processes", "2"])  # no command
