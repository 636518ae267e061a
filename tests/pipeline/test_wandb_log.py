"""`logging.wandb: true`: every metrics.jsonl row reaches one Weights & Biases run (offline
mode, read back from W&B's own run files), with the run's config; a killed and resumed stage
continues the same run; without the package, one config-error line."""
from __future__ import annotations

import json
import struct
import sys

import pytest
from stage_helpers import sft_overrides, tiny_task
from wandb.proto import wandb_internal_pb2

from rlhf_jax.pipeline import cli
from rlhf_jax.pipeline.metrics_log import MetricsLogger, read_metrics
from rlhf_jax.pipeline.stages import sft
from rlhf_jax.pipeline.wandb_log import RUN_ID_FILE
from rlhf_jax.typed_config import ConfigError


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    return tiny_task(tmp_path_factory.mktemp("task"))


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_PROJECT", raising=False)


def wandb_records(path):
    """The protobuf records of a `.wandb` run file: a 7-byte header (":W&B", magic, version),
    then LevelDB-log records (crc32, length, type: 1 full, 2 first, 3 middle, 4 last) in
    32 KiB blocks."""
    data = path.read_bytes()
    assert data[:4] == b":W&B"
    block, position, parts = 32768, 7, b""
    while position + 7 <= len(data):
        if block - position % block < 7:  # a block's tail too short for a header is padding
            position += block - position % block
            continue
        _, length, kind = struct.unpack("<IHB", data[position:position + 7])
        if length == 0 and kind == 0:
            break
        chunk, position = data[position + 7:position + 7 + length], position + 7 + length
        parts = chunk if kind in (1, 2) else parts + chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(parts)
            yield record


def logged(run_dir):
    """(runs: [(id, project, name, config)], history rows by step: the last logged row of each
    step, W&B's own `_` keys left out) of every offline W&B run in `run_dir`."""
    runs, rows = [], {}
    for path in sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb")):
        for record in wandb_records(path):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                config = {item.key: json.loads(item.value_json) for item in record.run.config.update}
                runs.append((record.run.run_id, record.run.project, record.run.display_name, config))
            elif kind == "history":
                row = {item.key or "/".join(item.nested_key): json.loads(item.value_json)
                       for item in record.history.item}  # "a/b" keys arrive as nested keys
                row = {key: value for key, value in row.items() if not key.startswith("_")}
                assert "step" in row, row
                rows[row["step"]] = row
    return runs, [rows[step] for step in sorted(rows)]


def test_a_killed_and_resumed_stage_logs_every_row_to_one_run(task, tmp_path):
    run_dir = tmp_path / "sft-run"
    overrides = sft_overrides(task, run_dir, steps=6, extra=("logging.wandb=true",))
    assert not sft.run(None, overrides + ["train.stop_after=5"])["finished"]
    first_id = (run_dir / RUN_ID_FILE).read_text().strip()
    assert sft.run(None, overrides, resume=True)["finished"]
    assert (run_dir / RUN_ID_FILE).read_text().strip() == first_id
    runs, history = logged(run_dir)
    assert len(runs) == 2 and {run[0] for run in runs} == {first_id}  # the resume continued the run
    _, project, name, config = runs[-1]
    assert (project, name) == ("rlhf-jax", "sft-run")
    assert config["train"]["steps"] == 6 and config["logging"]["wandb"] is True
    expected = read_metrics(run_dir)
    assert [row["step"] for row in expected] == [1, 2, 3, 4, 5, 6]
    assert len(history) == len(expected)
    for got, want in zip(history, expected):
        assert got.keys() == want.keys(), (got, want)
        for key, value in want.items():
            assert got[key] == pytest.approx(value, rel=1e-12, abs=0), (key, got, want)


def test_project_and_name_keys_and_a_fresh_run_gets_a_new_id(task, tmp_path):
    run_dir = tmp_path / "run"
    extra = ("logging.wandb=true", "logging.wandb_project=my-project", "logging.wandb_name=trial 1")
    sft.run(None, sft_overrides(task, run_dir, steps=1, extra=extra))
    first = (run_dir / RUN_ID_FILE).read_text().strip()
    sft.run(None, sft_overrides(task, run_dir, steps=1, extra=extra))  # not --resume: a new run
    runs, _ = logged(run_dir)
    assert [(project, name) for _, project, name, _ in runs] == [("my-project", "trial 1")] * 2
    assert runs[0][0] == first and runs[1][0] != first


def test_without_the_package_one_config_error_line(task, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` raises ImportError
    code = cli.main(["sft", *sft_overrides(task, tmp_path / "run", steps=1, extra=("logging.wandb=true",))])
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1, lines
    assert lines[0].startswith("rlhf-jax sft: config error: `logging.wandb` is true but the wandb package is not "
                               "installed: pip install \"rlhf_jax[wandb]\""), lines[0]


def test_a_failed_wandb_start_closes_the_tensorboard_writer(tmp_path, monkeypatch):
    """Nothing is left open (Python 3.12 prints a traceback at exit for a writer left running)."""
    import tensorboardX

    writers = []

    class RecordingWriter(tensorboardX.SummaryWriter):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.closed = False
            writers.append(self)

        def close(self):
            self.closed = True
            super().close()

    monkeypatch.setattr(tensorboardX, "SummaryWriter", RecordingWriter)
    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.raises(ConfigError, match="wandb package is not installed"):
        MetricsLogger(tmp_path, wandb={})
    assert len(writers) == 1 and writers[0].closed
