"""Non-finite training: skipped updates are counted in the metrics and the progress line, a
run stops after `max_consecutive_skips` skips in a row, and nothing non-finite is written.

The NaN is injected through the data: rows whose `scale` is NaN make the loss and every
gradient NaN from a chosen step on (the batches are in row order)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax.models.config import ModelConfig
from rlhf_jax.models.transformer import CausalLM
from rlhf_jax.pipeline.batching import BatchIterator
from rlhf_jax.pipeline.checkpoint import Checkpointer
from rlhf_jax.pipeline.data import DataStats, TokenizedData
from rlhf_jax.pipeline.errors import NonFiniteError
from rlhf_jax.pipeline.loop import checkpoint_dir, run_loop
from rlhf_jax.pipeline.metrics_log import read_metrics
from rlhf_jax.pipeline.stage_configs import CheckpointSection, LoggingSection
from rlhf_jax.pipeline.stages.stage_setup import export_model
from rlhf_jax.pipeline.stages.skeletons import nonfinite_options
from rlhf_jax.training.nonfinite import CONSECUTIVE_SKIPS, SKIPS, nonfinite_leaves, skip_counts
from rlhf_jax.training.optim import OptimizerConfig, make_optimizer
from rlhf_jax.training.state import create_train_state

BATCH = 2


def _data(nan_steps):
    """Rows for 8 steps of BATCH rows; the rows of the (1-based) steps in `nan_steps` have scale NaN."""
    rng = np.random.default_rng(0)
    rows = 8 * BATCH
    scale = np.ones(rows, np.float32)
    for step in nan_steps:
        scale[(step - 1) * BATCH : step * BATCH] = np.nan
    arrays = {"x": rng.normal(size=(rows, 3)).astype(np.float32),
              "y": rng.normal(size=(rows,)).astype(np.float32), "scale": scale}
    return TokenizedData("sft", arrays, {}, [("rows", i + 1) for i in range(rows)], DataStats(), 0)


def _loss(params, batch):
    return jnp.mean(batch["scale"] * (batch["x"] @ params["w"] + params["b"] - batch["y"]) ** 2)


@jax.jit
def _step(carry, batch):
    state = carry["state"]
    loss, grads = jax.value_and_grad(_loss)(state.params, batch)
    return {"state": state.apply_gradients(grads=grads)}, {"loss": loss}


def _run(tmp_path, nan_steps, *, num_steps=8, progress=False, **optim):
    config = OptimizerConfig(learning_rate=0.1, schedule="constant", **optim)
    params = {"w": jnp.zeros((3,)), "b": jnp.zeros(())}
    state = create_train_state(lambda p, x: x, params, make_optimizer(config))
    state = state.replace(step=jnp.zeros((), jnp.int32))
    return run_loop(
        output_dir=tmp_path, carry={"state": state}, step_fn=_step,
        batches=BatchIterator(_data(nan_steps), BATCH, shuffle=False),
        prepare_batch=lambda batch: {k: jnp.asarray(batch[k]) for k in ("x", "y", "scale")},
        num_steps=num_steps, checkpoint=CheckpointSection(interval=2, keep=None, async_save=False),
        logging=LoggingSection(every=1, tensorboard=False, progress=progress), description="toy",
        progress_keys=("loss",), **nonfinite_options(config))


def _checkpointed_params(tmp_path, step):
    with Checkpointer(checkpoint_dir(tmp_path), async_save=False) as checkpointer:
        state, meta = checkpointer.restore(step)
    return state["state"]["params"]


def test_loss_nan_from_step_k_skips_reports_and_stops_at_the_limit(tmp_path):
    k, limit = 3, 2
    with pytest.raises(NonFiniteError) as error:
        _run(tmp_path, nan_steps=range(k, 9), max_consecutive_skips=limit)
    message = str(error.value)
    assert message.startswith(f"toy: stopped at step {k + limit - 1}: {limit} optimizer updates in a row")
    assert "optim.max_consecutive_skips = 2" in message and "the latest checkpoint is step 2" in message
    rows = read_metrics(tmp_path)
    assert [row["step"] for row in rows] == [1, 2, 3, 4]  # the stopping step's row is logged
    assert [row[SKIPS] for row in rows] == [0, 0, 1, 2]
    assert [row[CONSECUTIVE_SKIPS] for row in rows] == [0, 0, 1, 2]
    assert np.isnan(rows[2]["loss"]) and np.isfinite(rows[1]["loss"])
    with Checkpointer(checkpoint_dir(tmp_path), async_save=False) as checkpointer:
        assert checkpointer.all_steps() == [2]  # step 4 was not written: step 2 stays the latest
    assert nonfinite_leaves(_checkpointed_params(tmp_path, 2)) == []


def test_an_isolated_nan_is_skipped_counted_and_shown_in_the_progress_line(tmp_path, capsys):
    result = _run(tmp_path, nan_steps=[3], max_consecutive_skips=2, progress=True)
    assert result.finished and result.step == 8
    rows = read_metrics(tmp_path)
    assert [row[SKIPS] for row in rows] == [0, 0, 1, 1, 1, 1, 1, 1]
    assert [row[CONSECUTIVE_SKIPS] for row in rows] == [0, 0, 1, 0, 0, 0, 0, 0]
    assert nonfinite_leaves(result.carry) == []
    assert f"{SKIPS}=1" in capsys.readouterr().err
    assert skip_counts(result.carry) == {SKIPS: 1, CONSECUTIVE_SKIPS: 0}


def test_without_skipping_a_nan_checkpoint_is_refused(tmp_path):
    with pytest.raises(NonFiniteError, match=r"^toy: refusing to write the checkpoint of step 4: NaN or inf in "
                                             r"state/params/b, state/params/w.*; the latest checkpoint stays step 2$"):
        _run(tmp_path, nan_steps=[3], nonfinite="none")
    with Checkpointer(checkpoint_dir(tmp_path), async_save=False) as checkpointer:
        assert checkpointer.all_steps() == [2]


def test_halt_stops_at_the_first_nonfinite_metric(tmp_path):
    with pytest.raises(NonFiniteError, match=r"non-finite values at step 3: loss=nan \(optim.nonfinite = halt\)"):
        _run(tmp_path, nan_steps=[3], nonfinite="halt")


def test_nonfinite_options_take_the_strictest_optimizer():
    skip5, skip3 = OptimizerConfig(max_consecutive_skips=5), OptimizerConfig(max_consecutive_skips=3)
    assert nonfinite_options(skip5, None, skip3) == {"max_consecutive_skips": 3, "halt_on_nonfinite": False}
    assert nonfinite_options(OptimizerConfig(nonfinite="halt"), skip5) == {"max_consecutive_skips": 5,
                                                                          "halt_on_nonfinite": True}
    assert nonfinite_options(OptimizerConfig(nonfinite="none")) == {"max_consecutive_skips": None,
                                                                     "halt_on_nonfinite": False}


def test_skip_counts_sum_totals_and_take_the_longest_run():
    optimizer = make_optimizer(OptimizerConfig(schedule="constant"))
    params = {"w": jnp.ones(2)}
    nan = {"w": jnp.full(2, jnp.nan)}
    a = create_train_state(lambda p, x: x, params, optimizer)
    b = create_train_state(lambda p, x: x, params, optimizer)
    a = a.apply_gradients(grads=nan).apply_gradients(grads=nan)
    b = b.apply_gradients(grads=nan).apply_gradients(grads=params)
    assert skip_counts({"policy": a, "value": b}) == {SKIPS: 3, CONSECUTIVE_SKIPS: 2}
    assert skip_counts({"w": jnp.ones(2)}) == {}


def test_nonfinite_leaves_names_float_leaves_only():
    tree = {"a": jnp.array([1.0, jnp.inf]), "b": {"c": jnp.ones(3), "d": np.array([np.nan])},
            "n": jnp.arange(3), "key": jax.random.key(0)}
    assert nonfinite_leaves(tree) == ["a", "b/d"]


def test_export_refuses_nonfinite_parameters(tmp_path):
    module = CausalLM(ModelConfig.llama(vocab_size=8, hidden_size=8, num_layers=1, num_heads=2,
                                        intermediate_size=8))
    params = module.init(jax.random.PRNGKey(0), jnp.zeros((1, 2), jnp.int32))["params"]
    params["lm_head"]["kernel"] = params["lm_head"]["kernel"].at[0, 0].set(jnp.nan)
    with pytest.raises(NonFiniteError, match=rf"refusing to export {tmp_path / 'model'}: NaN or inf in the "
                                             r"parameters lm_head/kernel$"):
        export_model(tmp_path, module, params, tokenizer=None)
    assert not (tmp_path / "model").exists()
