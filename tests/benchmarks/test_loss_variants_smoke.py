"""Smoke tests of the benchmark scripts on tiny models.

`benchmarks/loss_variants.py`: the core function (`train_and_evaluate`) with one seed and two
losses (a paired one and KTO) on a tiny random model and a tiny built-in task, then the
table and the plot. `benchmarks/vs_trl.py` (only where TRL is installed): the step-0 DPO
and reward losses of rlhf_jax and TRL agree on shared weights and data.
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import loss_variants  # noqa: E402

from rlhf_jax.models.checkpoint_io import save_pretrained  # noqa: E402
from rlhf_jax.models.config import ModelConfig  # noqa: E402
from rlhf_jax.models.transformer import CausalLM  # noqa: E402
from rlhf_jax.tasks.arithmetic import TaskConfig, build_task  # noqa: E402
from rlhf_jax.pipeline.tokenizer import load_tokenizer  # noqa: E402


@pytest.fixture(scope="module")
def tiny_task(tmp_path_factory):
    """The built-in task (small splits) and a random 1-layer Llama saved as a HF folder."""
    root = tmp_path_factory.mktemp("loss_variants")
    task = build_task(root / "task", TaskConfig(max_digits=1, num_sft=16, num_preferences=64, num_prompts=0,
                                                num_eval_prompts=8, num_eval_preferences=8))
    tokenizer = load_tokenizer(task.tokenizer_dir)
    config = ModelConfig.llama(vocab_size=len(tokenizer), hidden_size=16, num_layers=1, num_heads=2,
                               intermediate_size=32, max_position_embeddings=32,
                               eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                               bos_token_id=tokenizer.bos_token_id)
    module = CausalLM(config)
    params = module.init(jax.random.PRNGKey(0), np.zeros((1, 2), np.int32))["params"]
    model = save_pretrained(root / "model", module, jax.device_get(params), pad_token_id=tokenizer.pad_token_id)
    tokenizer.save_pretrained(str(model))
    return root, task, model


def test_runs_to_do_and_kto_batch():
    settings = loss_variants.Settings(model_dir="m", train_file="t", eval_prompts_file="p", eval_pairs_file=None,
                                      output_dir="o", loss_types=("sigmoid", "simpo", "kto"),
                                      sweep_betas=(0.03, 0.1, 0.3))
    assert loss_variants.runs_to_do(settings) == [("sigmoid", 0.1), ("simpo", 2.0), ("kto", 0.1),
                                                  ("sigmoid", 0.03), ("sigmoid", 0.3)]
    assert settings.config("sigmoid", 0.3).beta == 0.3 and settings.config("simpo").beta == 2.0
    assert loss_variants.loss_config("ipo", beta=0.3).loss_type == "ipo"
    assert loss_variants.loss_config("orpo").kind == "orpo"

    from rlhf_jax.training.batches import PreferenceBatch

    prompts = np.arange(8).reshape(2, 4)
    responses = np.stack([prompts + 100, prompts + 200], axis=1)  # [2, 2, 4]: chosen, rejected
    response_mask = np.stack([np.ones_like(prompts), 2 * np.ones_like(prompts)], axis=1)
    pairs = PreferenceBatch(prompts, np.ones_like(prompts), responses, response_mask,
                            ref_logps=np.array([[1.0, 3.0], [2.0, 4.0]]))
    kto = loss_variants.kto_batch(pairs)
    np.testing.assert_array_equal(kto.prompt_ids, [prompts[0], prompts[0], prompts[1], prompts[1]])
    np.testing.assert_array_equal(kto.response_ids[:, 0], [prompts[0] + 100, prompts[0] + 200,
                                                          prompts[1] + 100, prompts[1] + 200])
    np.testing.assert_array_equal(kto.response_mask[1, 0], 2 * np.ones(4))
    np.testing.assert_array_equal(kto.is_desirable, [1, 0, 1, 0])
    np.testing.assert_array_equal(kto.ref_logps, [1, 3, 2, 4])
    kto.validate()


def test_train_and_evaluate_smoke(tiny_task, tmp_path):
    root, task, model = tiny_task
    settings = loss_variants.Settings(
        model_dir=str(model), train_file=str(task.preferences), eval_prompts_file=str(task.eval_prompts),
        eval_pairs_file=str(task.eval_preferences), output_dir=str(tmp_path), loss_types=("sigmoid", "kto"),
        seeds=(0,), sweep_betas=(), steps=3, batch_size=8, warmup_steps=1, max_prompt_length=6,
        max_response_length=4, num_eval_prompts=8, num_samples=2, max_new_tokens=4)
    rows = loss_variants.train_and_evaluate(settings, log=lambda line: None)
    assert [(row["loss"], row["seed"]) for row in rows] == [("sft", 0), ("sigmoid", 0), ("kto", 0)]
    sft = rows[0]
    assert sft["kl"] == pytest.approx(0.0, abs=1e-5) and sft["win_rate"] == 0.5 and sft["margin"] == 0.0
    for row in rows:
        for key in loss_variants.METRICS:
            assert math.isfinite(row[key]), (row["loss"], key)
        assert 0.0 <= row["pass@1"] <= 1.0 and 0.0 <= row["win_rate"] <= 1.0
    for row in rows[1:]:
        assert row["margin"] != 0.0  # three updates moved the policy away from the SFT model
        assert (tmp_path / "runs" / f"{row['loss']}_beta0.1" / "seed0" / "metrics.jsonl").exists()

    assert all(row["score"] == "graded" and row["main"] for row in rows)
    summary = loss_variants.summarise(rows)
    main, sweep = loss_variants.markdown_tables(summary)
    assert "| sigmoid | 0.1 |" in main and "| kto | 0.1 |" in main and "| sft | - |" in main
    assert "gold reward (graded)" in main
    assert sweep == ""  # no sweep betas: no sweep table
    plot = loss_variants.frontier_plot(summary, tmp_path / "frontier.png")
    assert plot.stat().st_size > 0
    json.dumps(rows)  # results.json must be writable


def test_vs_trl_step0_losses_agree(tmp_path):
    pytest.importorskip("trl")
    pytest.importorskip("torch")
    import jax_runners
    import trl_runners
    import vs_trl

    sizes = dict(vs_trl.PRESETS["tiny"], num_layers=1, prompt_length=8, response_length=8)
    hp = vs_trl.Hyperparameters(batch_size=2, ppo_batch_size=4, ppo_response_length=4)
    setup = vs_trl.build_setup(tmp_path, sizes, hp, num_pairs=8, num_prompts=8)
    for kind, run in (("dpo", trl_runners.trl_dpo), ("reward", trl_runners.trl_reward)):
        ours = jax_runners.TrainingSession(kind, setup, hp)
        theirs = run(setup, hp, 1, tmp_path / f"trl_{kind}")
        assert theirs["first_chosen_ids"] == ours.first_chosen_ids()
        assert abs(ours.loss0 - theirs["loss0"]) < 1e-4, kind
        assert abs(ours.loss0 - math.log(2)) > 1e-4  # a real check: policy and reference differ


def test_exact_answers_need_the_eos_and_ignore_special_tokens(tmp_path):
    """A conversational model ends its answer with the chat template's end-of-turn token
    (a special token other than EOS) before the EOS: the answer still counts."""
    from rlhf_jax.pipeline.tokenizer import build_tokenizer

    tokenizer = build_tokenizer(tmp_path, "0123456789")
    end_of_turn = tokenizer.convert_tokens_to_ids("<|assistant|>")  # a special token standing in for <|end|>
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    digit = lambda d: tokenizer.convert_tokens_to_ids(d)
    tokens = np.array([
        [digit("1"), digit("3"), end_of_turn, eos, pad],   # right, with end-of-turn: 1
        [digit("1"), digit("3"), pad, pad, pad],           # never ends (no EOS): 0
        [digit("1"), digit("4"), eos, pad, pad],           # wrong: 0
        [digit("1"), digit("3"), eos, digit("9"), digit("9")],  # text after the EOS is not read: 1
    ])
    np.testing.assert_array_equal(loss_variants.exact_answers(tokenizer, tokens, ["13", "13", "13", " 13"]),
                                  [1.0, 0.0, 0.0, 1.0])


def test_main_on_a_given_model_with_loss_options(tiny_task, tmp_path, monkeypatch):
    """The command line end to end: options reach the runs, the text says what ran, and
    RESULTS.md is left alone (no --write)."""
    root, task, model = tiny_task
    monkeypatch.setattr(loss_variants.common, "write_section", lambda *a, **k: pytest.fail("RESULTS.md written"))
    out = tmp_path / "out"
    result = loss_variants.main([
        "--model", str(model), "--train-data", str(task.preferences), "--eval-prompts", str(task.eval_prompts),
        "--loss-types", "sigmoid", "orpo", "--beta", "sigmoid=0.2", "--odds-ratio-coef", "0.3", "--sweep-betas",
        "--seeds", "0", "--steps", "2", "--warmup-steps", "1", "--batch-size", "8", "--max-prompt-length", "6",
        "--max-response-length", "4", "--num-eval-prompts", "4", "--num-samples", "1", "--max-new-tokens", "2",
        "--out", str(out)])
    assert [(row["loss"], row["beta"]) for row in result["rows"]] == [("sft", 0.0), ("sigmoid", 0.2), ("orpo", 0.1)]
    table = (out / "table.md").read_text()
    assert "| sigmoid | 0.2 |" in table and "| orpo | - |" in table and "Beta sweep" not in table
    assert "sigmoid: beta 0.2, label_smoothing 0, divergence reverse_kl; orpo: odds_ratio_coef 0.3" in table
    assert "warmup 1, cosine" in table and "gold reward (graded)" in table
    saved = json.loads((out / "results.json").read_text())["settings"]
    assert saved["loss_options"] == {"sigmoid": {"beta": 0.2}, "orpo": {"odds_ratio_coef": 0.3}}
