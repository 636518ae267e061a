"""MetricsLogger (JSONL + TensorBoard), resume truncation, read_metrics, progress bar."""
import glob
import io
import json
import os
import struct

import jax.numpy as jnp
import numpy as np
import pytest
from tensorboardX.proto import event_pb2

from rlhf_jax.pipeline.metrics_log import MetricsLogger, progress, read_metrics


def _tensorboard_scalars(log_dir):
    """(tag, step, value) from every event file under log_dir: TFRecord framing read by hand."""
    found = []
    for path in sorted(glob.glob(os.path.join(log_dir, "**", "events.out.tfevents.*"), recursive=True)):
        with open(path, "rb") as f:
            data = f.read()
        offset = 0
        while offset < len(data):
            (length,) = struct.unpack("<Q", data[offset:offset + 8])
            payload = data[offset + 12: offset + 12 + length]
            offset += 12 + length + 4
            event = event_pb2.Event.FromString(payload)
            for value in event.summary.value:
                found.append((value.tag, event.step, value.simple_value))
            if event.HasField("session_log") and event.session_log.status == event.session_log.START:
                found.append(("<purge>", event.step, None))
    return found


def _run(out_dir, steps, resume_step=None):
    with MetricsLogger(out_dir, resume_step=resume_step) as logger:
        for step in steps:
            logger.log(step, {"loss": jnp.float32(1.0 / step), "reward/mean": np.float64(step * 0.5),
                              "tokens": 3 * step, "phase": "train"})


def test_jsonl_rows_and_types(tmp_path):
    with MetricsLogger(tmp_path, tensorboard=False) as logger:
        row = logger.log(1, {"loss": jnp.array(0.25), "acc": np.float32(0.5), "n": np.int64(4),
                             "ok": True, "name": "x", "one_element": jnp.ones((1,))})
    assert row == {"step": 1, "loss": 0.25, "acc": 0.5, "n": 4.0, "ok": True, "name": "x",
                   "one_element": 1.0}
    with open(tmp_path / "metrics.jsonl") as f:
        lines = f.read().splitlines()
    assert len(lines) == 1 and json.loads(lines[0]) == row
    assert type(json.loads(lines[0])["loss"]) is float
    assert read_metrics(tmp_path) == read_metrics(tmp_path / "metrics.jsonl") == [row]
    assert not (tmp_path / "tensorboard").exists()


def test_tensorboard_events(tmp_path):
    _run(tmp_path, [1, 2, 3])
    scalars = _tensorboard_scalars(tmp_path / "tensorboard")
    losses = sorted((step, value) for tag, step, value in scalars if tag == "loss")
    assert losses == [(1, pytest.approx(1.0)), (2, pytest.approx(0.5)), (3, pytest.approx(1 / 3))]
    assert sorted(step for tag, step, _ in scalars if tag == "reward/mean") == [1, 2, 3]
    assert not any(tag == "phase" for tag, _, _ in scalars)  # strings stay in the JSONL only


def test_resume_truncates_to_an_uninterrupted_log(tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    _run(straight, range(1, 9))
    _run(resumed, range(1, 7))  # killed after step 6; last checkpoint at step 4
    _run(resumed, range(5, 9), resume_step=4)
    assert read_metrics(resumed) == read_metrics(straight)
    assert [row["step"] for row in read_metrics(resumed)] == list(range(1, 9))
    # TensorBoard is told to purge events from step 5 on in the older file.
    scalars = _tensorboard_scalars(resumed / "tensorboard")
    assert {step for tag, step, _ in scalars if tag == "loss"} == set(range(1, 9))
    assert [step for tag, step, _ in scalars if tag == "<purge>"] == [5]


def test_fresh_run_overwrites_and_resume_without_file(tmp_path):
    _run(tmp_path, [1, 2])
    _run(tmp_path, [1])
    assert [row["step"] for row in read_metrics(tmp_path)] == [1]
    _run(tmp_path / "new", [3], resume_step=2)  # resuming with no earlier log is fine
    assert [row["step"] for row in read_metrics(tmp_path / "new")] == [3]


def test_cut_off_last_line_is_ignored_and_bad_lines_are_named(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 1.0}\n{"step": 2, "loss": 0.5}\n{"step": 3, "lo')
    assert [row["step"] for row in read_metrics(path)] == [1, 2]
    with MetricsLogger(tmp_path, resume_step=5, tensorboard=False) as logger:
        logger.log(3, {"loss": 0.25})
    assert [row["step"] for row in read_metrics(path)] == [1, 2, 3]
    path.write_text('{"step": 1}\nnot json\n')
    with pytest.raises(ValueError, match=r"metrics\.jsonl:2"):
        read_metrics(path)
    path.write_text('[1, 2]\n')
    with pytest.raises(ValueError, match=r"metrics\.jsonl:1: expected a JSON object"):
        read_metrics(path)
    with pytest.raises(FileNotFoundError, match="missing"):
        read_metrics(tmp_path / "missing")


def test_bad_metrics_and_closed_logger(tmp_path):
    logger = MetricsLogger(tmp_path, tensorboard=False)
    with pytest.raises(ValueError, match="`loss` must be a scalar"):
        logger.log(1, {"loss": jnp.ones(3)})
    with pytest.raises(ValueError, match="reserved"):
        logger.log(1, {"step": 2})
    logger.close()
    with pytest.raises(RuntimeError, match="closed"):
        logger.log(2, {"loss": 1.0})


def test_non_main_process_writes_nothing(tmp_path):
    out = tmp_path / "run"
    with MetricsLogger(out, is_main_process=False) as logger:
        assert logger.log(1, {"loss": 1.0}) is None
    assert not out.exists()


def test_progress_bar(monkeypatch):
    stream = io.StringIO()
    monkeypatch.setattr("sys.stderr", stream)
    with progress(10, "ppo", enabled=True, keys=("loss",)) as bar:
        assert bar.enabled
        bar.update(4, {"loss": jnp.float32(0.123456), "hidden": 9.0})
    text = stream.getvalue()
    assert "ppo" in text and "4/10" in text and "loss=0.1235" in text and "hidden" not in text
    assert "<" in text  # tqdm's elapsed<remaining (ETA) field

    stream.truncate(0)
    with progress(10, "quiet", enabled=True, is_main_process=False) as bar:
        bar.update(1, {"loss": 1.0})
        assert not bar.enabled
    with progress(10, "auto") as bar:  # StringIO is not a tty: off by default
        assert not bar.enabled
    assert stream.getvalue() == ""

    with progress(10, "resumed", enabled=True, initial=6) as bar:
        bar.update(1)
    assert "7/10" in stream.getvalue()


def test_log_line_shows_the_chosen_scalars():
    from rlhf_jax.pipeline.loop import log_line

    row = {"a/loss": np.float32(0.123456), "b": 2, "text": "x", "reward/c/mean": 0.5}
    assert log_line("grpo", 3, 10, row, ("a/loss", "missing", "reward/c/mean")) == \
        "[grpo] step 3/10  a/loss 0.1235  reward/c/mean 0.5"
    assert log_line("sft", 1, 1, {"text": "x", "b": 2}, None) == "[sft] step 1/1  b 2"
