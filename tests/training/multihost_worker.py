"""The program `test_multihost.py` runs as 1 process x 8 devices and as 2 processes x 4 devices.

`run(save_dir, restore_dir)` trains tiny Llama models through every phase and returns a flat
dict of NumPy arrays (final parameters, per-step metrics, evaluation sums):

- sft: 4 SFT steps on an FSDP mesh (parameters split over all 8 devices, so across processes);
  a checkpoint (state + data position) is saved after step 2 into `save_dir`;
- resume (with `restore_dir`): the step-2 checkpoint of ANOTHER run (other process count,
  so other shard owners) is restored onto this run's FSDP mesh and steps 3-4 are run again
  from its data position; it is also restored onto a data x fsdp = 4 x 2 mesh, whose values
  must be the same (resharding on restore);
- dpo: 3 DPO steps on a data x fsdp = 4 x 2 mesh with a frozen reference;
- ppo: 2 PPO iterations (sampled rollouts, a value model, adaptive KL) on a data mesh;
- checks: evaluation sums reduced across processes, and the error for parameters that differ
  between processes.

Every process feeds only its own rows of each global batch (`BatchIterator` with the process
index and count). As a script it starts the processes' runtime from the launcher's
environment and writes `<out>/process<i>.npz` on every process.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax.models.config import ModelConfig
from rlhf_jax.models.heads import ValueModel
from rlhf_jax.models.transformer import CausalLM
from rlhf_jax.pipeline.checkpoint import Checkpointer
from rlhf_jax.pipeline.batching import BatchIterator, DataPosition
from rlhf_jax.pipeline.data import DataStats, TokenizedData
from rlhf_jax.training import multihost
from rlhf_jax.training.batches import PreferenceBatch, SFTBatch
from rlhf_jax.training.preference_step import PreferenceLossConfig, preference_step
from rlhf_jax.training.optim import OptimizerConfig, make_optimizer
from rlhf_jax.training.ppo import PPOConfig, kl_controller, ppo_iteration
from rlhf_jax.training.rollout import SamplingConfig
from rlhf_jax.training.sft_step import sft_step
from rlhf_jax.training.sharding import MeshConfig, batch_sharding, make_mesh, param_shardings, replicated
from rlhf_jax.training.state import TrainState, create_train_state, train_state_shardings
from rlhf_jax.training.step_runner import make_train_step

MODEL = ModelConfig.llama(vocab_size=64, hidden_size=32, num_layers=1, num_heads=4, num_kv_heads=2,
                          intermediate_size=64)
OPTIMIZER = make_optimizer(OptimizerConfig(learning_rate=3e-3, schedule="constant", max_grad_norm=1.0))
BATCH, PROMPT, RESPONSE = 16, 6, 10  # global batch rows, prompt and response slots
SFT_STEPS, SAVE_STEP, DPO_STEPS, PPO_ITERATIONS = 4, 2, 3, 2
FSDP_MESH, DP_FSDP_MESH, DATA_MESH = MeshConfig(data=1, fsdp=-1), MeshConfig(data=-1, fsdp=2), MeshConfig()
PPO = PPOConfig(sampling=SamplingConfig(max_new_tokens=6, eos_token_id=1, pad_token_id=0),
                adaptive_kl=True, kl_coef=0.1, epochs=2, num_minibatches=2)
PAD = 0


def synthetic_data(kind: str, rows: int, seed: int) -> TokenizedData:
    """Left-padded prompts and right-padded responses (the LM layout) of random tokens."""
    rng = np.random.default_rng(seed)
    num = 2 if kind == "preference" else 1
    arrays = {"prompt_ids": np.full((rows, PROMPT), PAD, np.int32), "prompt_mask": np.zeros((rows, PROMPT), np.int32),
              "response_ids": np.full((rows, num, RESPONSE), PAD, np.int32),
              "response_mask": np.zeros((rows, num, RESPONSE), np.int32)}
    for row in range(rows):
        prompt = rng.integers(2, MODEL.vocab_size, rng.integers(2, PROMPT + 1))
        arrays["prompt_ids"][row, PROMPT - len(prompt):] = prompt
        arrays["prompt_mask"][row, PROMPT - len(prompt):] = 1
        for slot in range(num):
            response = np.append(rng.integers(2, MODEL.vocab_size, rng.integers(1, RESPONSE)), 1)
            arrays["response_ids"][row, slot, :len(response)] = response
            arrays["response_mask"][row, slot, :len(response)] = 1
    if kind == "sft":
        arrays["loss_mask"] = arrays["response_mask"].astype(np.float32)
    return TokenizedData(kind, arrays, {}, [("synthetic", row + 1) for row in range(rows)],
                         DataStats(num_rows=rows, num_used=rows), PAD)


def batches(kind: str, rows: int, seed: int, mesh, position=DataPosition()) -> BatchIterator:
    """This process's share of each global batch; checks it is the share the mesh expects."""
    iterator = BatchIterator(synthetic_data(kind, rows, seed), BATCH, seed=seed, position=position,
                             process_index=jax.process_index(), process_count=jax.process_count())
    share = BATCH // jax.process_count()
    expected = slice(jax.process_index() * share, (jax.process_index() + 1) * share)
    if multihost.process_batch_rows(mesh, BATCH) != expected:
        raise AssertionError(f"the mesh expects rows {multihost.process_batch_rows(mesh, BATCH)}, not {expected}")
    return iterator


_INITIAL = {}


def initial_params():
    """Host copies of the policy's initial parameters: the same on every process (one seed),
    computed once per process and shared by every phase."""
    if "params" not in _INITIAL:
        tokens = jnp.zeros((1, PROMPT + RESPONSE), jnp.int32)
        params = jax.jit(CausalLM(MODEL).init)(jax.random.key(0), tokens)["params"]
        _INITIAL["params"] = jax.tree.map(np.asarray, params)
    return _INITIAL["params"]


def value_params(policy_params):
    """A value model on the policy's decoder with a zero score head."""
    return {"decoder": policy_params["decoder"],
            "score": {"kernel": np.zeros((MODEL.hidden_size, 1), np.float32), "bias": np.zeros(1, np.float32)}}


def mesh_of(config: MeshConfig, devices):
    """`config`'s mesh over `devices` (all devices when None; one device: a plain mesh)."""
    return make_mesh(MeshConfig() if devices is not None and len(devices) == 1 else config, devices)


def sharded_state(module, host_params, mesh, *, fsdp: bool):
    shardings = param_shardings(host_params, mesh, fsdp=fsdp, min_size=64)
    state = create_train_state(module, multihost.global_params(host_params, shardings), OPTIMIZER,
                               param_shardings=shardings)
    return state, train_state_shardings(state, shardings), shardings


def params_as_dict(params) -> dict:
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    return {"/".join(str(getattr(k, "key", k)) for k in path): leaf for path, leaf in flat}


def record(results: dict, prefix: str, params, metrics_per_step: list[dict]):
    for name, value in multihost.fetch(params_as_dict(params)).items():
        results[f"{prefix}.params:{name}"] = value
    for name in metrics_per_step[0]:
        results[f"{prefix}.metrics:{name}"] = np.stack([np.asarray(m[name]) for m in metrics_per_step])


_SFT = {}  # per device list: the SFT mesh, compiled step and shardings, reused when resuming


def sft_setup(devices):
    key = None if devices is None else tuple(device.id for device in devices)
    if key not in _SFT:
        mesh = mesh_of(FSDP_MESH, devices)
        module = CausalLM(MODEL)
        state, state_shardings, _ = sharded_state(module, initial_params(), mesh, fsdp=True)
        step = make_train_step(sft_step, mesh=mesh, state_shardings=state_shardings)
        _SFT[key] = dict(mesh=mesh, module=module, initial_state=state, step=step)
    return _SFT[key]


def train_sft(results: dict, save_dir: str | None, devices=None) -> None:
    setup = sft_setup(devices)
    mesh, step, state = setup["mesh"], setup["step"], setup.pop("initial_state")
    data = batches("sft", 40, 1, mesh)
    checkpointer = Checkpointer(save_dir) if save_dir else None
    metrics = []
    for number in range(1, SFT_STEPS + 1):
        state, step_metrics = step(state, SFTBatch.from_arrays(multihost.global_batch(next(data), mesh)))
        metrics.append(multihost.fetch(step_metrics))
        if checkpointer and number == SAVE_STEP:
            position = data.position
            checkpointer.save(number, state, {"epoch": position.epoch, "index": position.index}, force=True)
    if checkpointer:
        checkpointer.close()  # waits for the background write
    record(results, "sft", state.params, metrics)
    # evaluation: token counts of each process's rows, reduced across processes
    eval_rows = next(data)
    results["eval.tokens"] = multihost.process_sum(np.sum(eval_rows["loss_mask"]))
    results["eval.mean_tokens"] = multihost.process_mean(np.mean(eval_rows["loss_mask"].sum((1, 2))),
                                                         weight=len(eval_rows["loss_mask"]))


def restore(directory: str, module, mesh, *, fsdp: bool):
    """The step-2 train state of `directory`, placed for `mesh`, and its metadata."""
    abstract_params = jax.eval_shape(
        lambda: module.init(jax.random.key(0), jnp.zeros((1, PROMPT + RESPONSE), jnp.int32))["params"])
    shardings = param_shardings(abstract_params, mesh, fsdp=fsdp, min_size=64)
    target = jax.eval_shape(lambda p: TrainState.create(apply_fn=module.apply, params=p, tx=OPTIMIZER),
                            abstract_params)
    checkpointer = Checkpointer(directory, create=False, async_save=False)
    try:
        return checkpointer.restore(SAVE_STEP, target=target, shardings=train_state_shardings(target, shardings))
    finally:
        checkpointer.close()


def resume_sft(results: dict, restore_dir: str, devices=None) -> None:
    """Restore another run's step-2 checkpoint and finish its SFT run; also restore it onto
    a differently shaped mesh and check that the values are the same."""
    setup = sft_setup(devices)
    mesh, step = setup["mesh"], setup["step"]
    state, meta = restore(restore_dir, setup["module"], mesh, fsdp=True)
    restored = multihost.fetch(params_as_dict(state.params))
    other_mesh = mesh_of(DP_FSDP_MESH, devices) if len(mesh.devices.flat) > 1 else mesh
    other, _ = restore(restore_dir, setup["module"], other_mesh, fsdp=True)
    other = multihost.fetch(params_as_dict(other.params))
    results["resume.reshard_max_diff"] = np.max([np.max(np.abs(restored[k] - other[k])) for k in restored])
    data = batches("sft", 40, 1, mesh, position=DataPosition(meta["epoch"], meta["index"]))
    metrics = []
    for _ in range(SAVE_STEP + 1, SFT_STEPS + 1):
        state, step_metrics = step(state, SFTBatch.from_arrays(multihost.global_batch(next(data), mesh)))
        metrics.append(multihost.fetch(step_metrics))
    results["resume.step"] = np.asarray(multihost.fetch(state.step))
    record(results, "resume", state.params, metrics)


def train_dpo(results: dict, devices=None) -> None:
    mesh = mesh_of(DP_FSDP_MESH, devices)
    module = CausalLM(MODEL)
    host_params = initial_params()
    state, state_shardings, shardings = sharded_state(module, host_params, mesh, fsdp=True)
    reference = multihost.global_params(host_params, shardings)
    step = make_train_step(preference_step, mesh=mesh, state_shardings=state_shardings,
                           reference_shardings=shardings, config=PreferenceLossConfig(beta=0.5))
    data = batches("preference", 32, 3, mesh)
    metrics = []
    for _ in range(DPO_STEPS):
        batch = PreferenceBatch.from_arrays(multihost.global_batch(next(data), mesh))
        state, step_metrics = step(state, batch, reference)
        metrics.append(multihost.fetch(step_metrics))
    record(results, "dpo", state.params, metrics)


def count_score(prompt_ids, response_ids, response_mask):
    """A verifiable reward: the fraction of response tokens below 16."""
    hits = (response_ids < 16) * response_mask
    return jnp.sum(hits, axis=1) / jnp.maximum(jnp.sum(response_mask, axis=1), 1)


def train_ppo(results: dict, devices=None) -> None:
    mesh = mesh_of(DATA_MESH, devices)
    policy = CausalLM(MODEL)
    policy_params = initial_params()
    policy_state, policy_shardings, shardings = sharded_state(policy, policy_params, mesh, fsdp=False)
    value_state, value_shardings, _ = sharded_state(ValueModel(MODEL), value_params(policy_params), mesh,
                                                    fsdp=False)
    reference = multihost.global_params(policy_params, shardings)
    kl_state = multihost.global_params(jax.tree.map(np.asarray, kl_controller(PPO).init()), replicated(mesh))
    rep, rows = replicated(mesh), batch_sharding(mesh)
    iteration = jax.jit(
        lambda *args: ppo_iteration(*args, config=PPO, score_fn=count_score),
        in_shardings=(policy_shardings, value_shardings, rep, shardings, rows, rows, rep),
        out_shardings=(policy_shardings, value_shardings, rep, rep), donate_argnums=(0, 1))
    data = batches("prompt", 32, 6, mesh)
    metrics = []
    for number in range(PPO_ITERATIONS):
        prompts = multihost.global_batch(next(data), mesh)
        key = multihost.global_params(np.asarray(jax.random.PRNGKey(100 + number)), rep)
        policy_state, value_state, kl_state, step_metrics = iteration(
            policy_state, value_state, kl_state, reference, prompts["prompt_ids"], prompts["prompt_mask"], key)
        metrics.append(multihost.fetch(step_metrics))
    record(results, "ppo", policy_state.params, metrics)
    for name, value in multihost.fetch(params_as_dict(value_state.params)).items():
        results[f"ppo.value_params:{name}"] = value
    results["ppo.kl_coef"] = multihost.fetch(kl_state.coef)


def check_inconsistent_params(results: dict) -> None:
    """Parameters that differ between processes are refused, naming the leaf."""
    mesh = make_mesh(DATA_MESH)
    params = {"layer": {"kernel": np.full((4, 4), jax.process_index(), np.float32), "bias": np.zeros(4, np.float32)}}
    try:
        multihost.global_params(params, jax.tree.map(lambda _: replicated(mesh), params))
        message = "no error"
    except ValueError as error:
        message = str(error)
    results["check.inconsistent_params"] = np.asarray(message)


def run(save_dir: str | None = None, restore_dir: str | None = None, *, devices=None,
        phases=("sft", "dpo", "ppo")) -> dict:
    """Every phase in order (module docstring); `devices` restricts the meshes (e.g. one device)."""
    results = {"process_count": np.asarray(jax.process_count()), "device_count": np.asarray(jax.device_count())}
    steps = [("sft", lambda: train_sft(results, save_dir, devices)),
             ("resume", lambda: resume_sft(results, restore_dir, devices)),
             ("dpo", lambda: train_dpo(results, devices)),
             ("ppo", lambda: train_ppo(results, devices)),
             ("check", lambda: check_inconsistent_params(results))]
    for name, phase in steps:
        if name in phases or (name == "resume" and restore_dir) or name == "check":
            start, cpu_start = time.perf_counter(), time.process_time()
            phase()
            print(f"{name}: {time.perf_counter() - start:.1f} s, {time.process_time() - cpu_start:.1f} "
                  f"CPU s on process {jax.process_index()}", flush=True)
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="folder for process<i>.npz")
    parser.add_argument("--save-dir", default=None)
    parser.add_argument("--restore-dir", default=None)
    args = parser.parse_args(argv)
    multihost.initialize_from_env()
    results = run(args.save_dir, args.restore_dir)
    os.makedirs(args.out, exist_ok=True)
    np.savez(os.path.join(args.out, f"process{jax.process_index()}.npz"), **results)
    multihost.barrier("written")
    if multihost.is_main_process():
        print(f"wrote {len(results)} arrays per process to {args.out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
