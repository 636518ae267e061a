"""`rlhf-jax dpo` with `dpo.kind: kto`: unpaired rows from pairs or labelled completions, the
mismatched completions of KTO's reference point, held-out metrics, and clear data errors.

Oracles: at step 1 the policy is its reference, so every log-ratio and the reference point are
0 and the loss is `w * (1 - sigmoid(0)) = 0.5` exactly when each row's precomputed reference
log-probs are its own; the unpaired rows are checked against the pair arrays by hand."""
from __future__ import annotations

import numpy as np
import pytest
from stage_helpers import preference_overrides, sft_overrides, tiny_task

from rlhf_jax.pipeline import cli
from rlhf_jax.pipeline.data import DataConfig, load_data
from rlhf_jax.pipeline.data_formats import DataError
from rlhf_jax.pipeline.metrics_log import read_metrics
from rlhf_jax.pipeline.stages import dpo, sft
from rlhf_jax.pipeline.stages.dpo import kto_eval_metrics
from rlhf_jax.pipeline.tasks import write_jsonl
from rlhf_jax.pipeline.unpaired import unpaired_data

LENGTHS = DataConfig(max_prompt_length=8, max_response_length=8)


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    return tiny_task(tmp_path_factory.mktemp("task"))


@pytest.fixture(scope="module")
def policy(task, tmp_path_factory):
    out = tmp_path_factory.mktemp("sft")
    sft.run(None, sft_overrides(task, out, steps=4))
    return out / "model"


def labelled_rows(count: int):
    """TRL's unpaired format: right sums desirable, wrong ones undesirable (3 of 4 right)."""
    rows = []
    for i in range(count):
        a, b = i % 10, (3 * i) % 10
        right = i % 4 != 3
        rows.append({"prompt": f"{a}+{b}=", "completion": str(a + b if right else a + b + 1), "label": right})
    return rows


def test_pairs_become_a_desirable_and_an_undesirable_row_with_another_pairs_completion(task):
    pairs = load_data(task.preferences, task.tokenizer_dir, LENGTHS, kind="preference")
    rows = unpaired_data(pairs)
    n = len(pairs)
    assert rows.kind == "kto" and len(rows) == 2 * n
    np.testing.assert_array_equal(rows.arrays["is_desirable"], np.tile([1.0, 0.0], n))
    for name in ("prompt_ids", "prompt_mask"):
        np.testing.assert_array_equal(rows.arrays[name][2 * 5 + 1], pairs.arrays[name][5])
    for name in ("response_ids", "response_mask"):
        kto, pair = rows.arrays[name], pairs.arrays[name]
        np.testing.assert_array_equal(kto[10, 0], pair[5, 0])  # pair 5's chosen
        np.testing.assert_array_equal(kto[11, 0], pair[5, 1])  # pair 5's rejected
        np.testing.assert_array_equal(kto[10, 1], pair[6, 0])  # mismatched: pair 6's chosen
        np.testing.assert_array_equal(kto[2 * n - 1, 1], pair[0, 1])  # the last wraps to the first
    assert rows.sources[11] == pairs.sources[5]


def test_labelled_completions_keep_their_label_and_pair_with_the_next_row(task, tmp_path):
    write_jsonl(tmp_path / "kto.jsonl", labelled_rows(8))
    completions = load_data(tmp_path / "kto.jsonl", task.tokenizer_dir, LENGTHS)
    rows = unpaired_data(completions)
    np.testing.assert_array_equal(rows.arrays["is_desirable"], [1, 1, 1, 0, 1, 1, 1, 0])
    np.testing.assert_array_equal(rows.arrays["response_ids"][2, 0], completions.arrays["response_ids"][2, 0])
    np.testing.assert_array_equal(rows.arrays["response_ids"][2, 1], completions.arrays["response_ids"][3, 0])
    np.testing.assert_array_equal(rows.arrays["response_ids"][7, 1], completions.arrays["response_ids"][0, 0])


@pytest.mark.parametrize("change, message", [
    (lambda row: row.pop("label"), r"kto.jsonl: KTO rows of prompt/completion need a bool `label`"),
    (lambda row: row.update(label="yes"), r"kto.jsonl row 3: `label` must be true \(desirable\) or false"),
    (lambda row: row.update(label=1), r"kto.jsonl row 3: `label` must be true"),
])
def test_a_missing_or_non_bool_label_names_the_row(task, tmp_path, change, message):
    rows = labelled_rows(4)
    for row in rows if "need a bool" in message else rows[2:3]:
        change(row)
    write_jsonl(tmp_path / "kto.jsonl", rows)
    with pytest.raises(DataError, match=message):
        unpaired_data(load_data(tmp_path / "kto.jsonl", task.tokenizer_dir, LENGTHS))


def test_prompt_only_data_is_refused(task):
    with pytest.raises(DataError, match=r"KTO \(dpo.kind: kto\) takes preference pairs .* got prompt data"):
        unpaired_data(load_data(task.prompts, task.tokenizer_dir, LENGTHS))


def test_held_out_metrics_match_a_hand_computation():
    logps = np.array([0.5, -0.2, -1.0, 0.3])  # policy minus reference, per row
    metrics = kto_eval_metrics(logps, np.array([0.1, -0.4, 0.2, 0.3]), np.array([1.0, 1.0, 0.0, 0.0]), beta=0.1)
    assert metrics["eval/kto/accuracy"] == 0.5  # row 0 (+, desirable) and row 2 (-, undesirable)
    np.testing.assert_allclose(metrics["eval/kto/rewards_chosen"], 0.1 * (0.5 - 0.2) / 2)
    np.testing.assert_allclose(metrics["eval/kto/rewards_rejected"], 0.1 * (-1.0 + 0.3) / 2)
    np.testing.assert_allclose(metrics["eval/kto/margin"], 0.015 + 0.035)
    np.testing.assert_allclose(metrics["eval/kto/kl"], 0.05)


def test_kto_from_pairs_starts_at_half_and_reports_held_out_metrics(task, policy, tmp_path, capsys):
    out = tmp_path / "kto"
    result = dpo.run(None, preference_overrides(task, out, policy, steps=3, extra=("dpo.kind=kto", "eval.every=3")))
    assert result["finished"]
    rows = read_metrics(out)
    assert rows[0]["kto/loss"] == pytest.approx(0.5, abs=1e-6) and rows[0]["kto/kl"] == pytest.approx(0.0, abs=1e-6)
    assert rows[0]["kto/fraction_desirable"] == 0.5
    assert {"eval/kto/accuracy", "eval/kto/margin", "eval/kto/kl"} <= set(rows[2])
    assert rows[2]["kto/loss"] != rows[0]["kto/loss"]
    out_text = capsys.readouterr().out
    assert "[dpo] data: 64 rows of 64 (0 skipped, 0 truncated) -> 128 KTO rows (64 desirable, 64 undesirable)" in out_text
    assert "(desirable)" in out_text.split("first example as the model sees it:")[1].splitlines()[0]


def test_kto_on_labelled_completions_through_the_cli_warns_about_the_balance(task, policy, tmp_path, capsys,
                                                                              monkeypatch):
    """`data.format: preference` (configs/dpo.yaml's) does not stop a KTO file: KTO tells the
    layouts apart by their columns."""
    monkeypatch.chdir(tmp_path)
    write_jsonl(tmp_path / "kto.jsonl", labelled_rows(16))
    args = [o for o in preference_overrides(task, tmp_path / "out", policy, steps=2) if not o.startswith("data.")]
    args += ["data.train_files=[kto.jsonl]", "data.eval_files=[kto.jsonl]", "data.max_prompt_length=8",
             "data.max_response_length=8", "data.format=preference", "dpo.kind=kto"]
    assert cli.main(["dpo", *args]) == 0
    err = capsys.readouterr().err
    # 12 desirable, 4 undesirable: 1 * 12 / (1 * 4) = 3 > 4/3; weight 4/12 brings it to 1
    assert ("warning: KTO: desirable_weight * 12 desirable / (undesirable_weight * 4 undesirable) = 3, outside "
            "the paper's [1, 4/3]; e.g. dpo.desirable_weight=0.333") in err, err
    rows = read_metrics(tmp_path / "out")
    assert rows[0]["kto/loss"] == pytest.approx(0.5, abs=1e-6) and "eval/kto/accuracy" in rows[-1]
