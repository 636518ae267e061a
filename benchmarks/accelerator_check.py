"""The accelerator check: parity, training MFU vs TRL, generation roofline and peak memory in one run.

Sections, run in this order, each under its own time budget (a section that runs out
records what it finished and skips the rest, naming why), each wrapped so that its failure
is recorded (type, message, traceback tail) and the next section still runs:

- `machine`: device kind, jax / jaxlib / CUDA plugin / torch versions, CUDA and driver
  (nvidia-smi), device memory limit, and an 8192^3 (dry run: 256^3) bfloat16 `jnp.dot` timed
  now: the in-run peak the MFU is also compared with.
- `parity`: `device_parity.check_all` on the device: logits of every family in
  `rlhf_jax.models.config.MODEL_TYPES` against transformers + torch on the same weights,
  float32 (`highest` matmul precision, <= 1e-4) and bfloat16 (tolerance in device_parity.py).
- `generation`: new tokens/s of `rlhf_jax.generate` vs transformers' `generate` (torch on
  CUDA when available) on the policy weights, batch 64, prompt 256, 256 new tokens,
  bfloat16 weights on both sides; the memory roofline of a decode step: bytes a step must
  read (weights + KV cache at the mean context) / measured time per new token, as a fraction
  of `--hbm-tbps` (H100 SXM: 3.35 TB/s). It runs before `training`, so a long training
  section cannot starve it.
- `training`: a Llama/Qwen-shaped model of 374M parameters (`vs_trl.py`'s preset `gpu-0.5b`:
  hidden 1024, 24 layers, 16 heads, MLP 2816, vocabulary 32000) in bfloat16: SFT step, DPO step, GRPO
  update and PPO iteration through `jax_runners` (ours) and `trl_runners` (TRL, when `trl`
  imports; otherwise each row records the reason), on the same weights and data. Each kind
  runs in its own process, so its peak device memory is its own (a dry run: all kinds in one
  process). Per row: tokens/s, model
  TFLOP/s, MFU = model FLOP/s / `--peak-tflops` (H100 SXM dense bf16: 989) and the same
  over the measured matmul, ours / TRL speed.
- `memory`: the peak device memory (`memory_stats()["peak_bytes_in_use"]`; on a CPU, the
  process's peak RSS) of each training kind's process, and the cases of
  `benchmarks/memory.py` when that file exists.

Writes `accelerator_check.json` (rewritten after every section, so a cut-off run keeps what
it finished) and `accelerator_check.md` (a RESULTS.md section, `## Accelerator (H100)` on an
H100) to `--out`; `--record that.md` puts the section into benchmarks/RESULTS.md.

    bash benchmarks/accelerator_check.sh --out "$OUT"         # on the accelerator (< 8 min)
    python benchmarks/accelerator_check.py --dry-run --out /tmp/check   # tiny shapes, CPU
    python benchmarks/accelerator_check.py --sections parity generation --out /tmp/check
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import pickle
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

# torch (transformers, TRL) shares the device with jax: jax must not take 75% of it up front.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

# Dry runs only: cheaper CPU compilation (same programs, less LLVM optimisation).
DRY_XLA_FLAGS = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
SECTIONS = ("machine", "parity", "generation", "training", "memory")
KINDS = ("dpo", "sft", "grpo", "ppo")
TARGETS = {  # issue 16's targets: (row, quantity, minimum)
    "DPO step MFU (bf16, dense peak)": ("dpo", "ours_mfu", 0.40),
    "SFT step MFU (bf16, dense peak)": ("sft", "ours_mfu", 0.40),
    "GRPO update MFU (bf16, dense peak)": ("grpo", "ours_mfu", 0.35),
    "DPO step tokens/s, ours / TRL": ("dpo", "speedup", 1.5),
    "generation new tokens/s, ours / transformers": ("generation", "speedup", 5.0),
}
PROFILES = {
    # ~0.5B model in bfloat16 on an accelerator: the budgets (seconds) add up to 420 s, the
    # run starts no work after `time_limit` seconds (the wrapper's hard stop is 470 s), and a
    # training kind starts only with `min_case_seconds` left.
    "full": dict(preset="gpu-0.5b", dtype="bfloat16", steps=5, ppo_steps=2, rounds=1, warmup=1,
                 sizes=dict(ppo_prompt_length=128, ppo_response_length=64),  # PPO / GRPO rollouts
                 grpo_group_size=8, parity=dict(batch=4, length=64),
                 generation=dict(batch=64, prompt_len=256, new_tokens=256, repeats=2),
                 matmul_size=8192, case_timeout=150, min_case_seconds=45, kinds_per_process=1, time_limit=420,
                 budgets=dict(machine=20, parity=60, generation=100, training=220, memory=20)),
    # tiny shapes: every code path in about 65 CPU-seconds (TRL included); generous budgets,
    # since a loaded machine must not turn the coverage check into skips
    "dry": dict(preset="tiny", dtype="bfloat16",
                sizes=dict(vocab_size=64, hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64,
                           batch_size=2, prompt_length=8, response_length=8, ppo_batch_size=4,
                           ppo_prompt_length=4, ppo_response_length=4), steps=1, ppo_steps=1, rounds=1, warmup=1,
                grpo_group_size=4, parity=dict(batch=2, length=8, hidden_size=32, num_layers=1, vocab_size=64),
                generation=dict(batch=4, prompt_len=8, new_tokens=8, repeats=1),
                matmul_size=256, case_timeout=300, min_case_seconds=10, kinds_per_process=len(KINDS),
                time_limit=900,
                budgets=dict(machine=60, parity=180, generation=120, training=480, memory=60)),
}


# -- bookkeeping --------------------------------------------------------------------------
class Budget:
    """Seconds left for a section: its own budget, capped by the run's overall deadline."""

    def __init__(self, seconds: float, deadline: float):
        self.end = min(time.monotonic() + seconds, deadline)

    def left(self) -> float:
        return self.end - time.monotonic()

    def expired(self, needed: float = 0.0) -> bool:
        return self.left() <= needed


def cpu_seconds() -> float:
    """CPU seconds used so far by this process and its finished child processes."""
    import resource

    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def error_record(err: BaseException) -> dict:
    return {"error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()[-3000:]}


def trl_status() -> tuple[object | None, str | None]:
    """(`trl_runners` module, None) when TRL and what its trainers use import, else (None,
    why not)."""
    if importlib.util.find_spec("trl") is None:
        return None, "trl is not installed (carry its wheel in benchmarks/wheels/)"
    try:
        import datasets  # noqa: F401
        import trl_runners
        from trl import DPOTrainer, SFTTrainer  # noqa: F401

        trl_runners.trl_version()
        return trl_runners, None
    except Exception as err:  # a broken TRL install is a skip, not a failure of ours
        return None, f"trl does not import: {type(err).__name__}: {err}"


def device_peak_memory() -> dict:
    """Peak memory so far: the device allocator's peak when the device reports one, else
    the process's peak resident set (a CPU's device memory is host memory)."""
    import resource

    import jax

    stats = jax.devices()[0].memory_stats() or {}
    out = {}
    if "peak_bytes_in_use" in stats:
        out.update(source="device memory_stats()", peak_bytes=int(stats["peak_bytes_in_use"]),
                   bytes_limit=int(stats.get("bytes_limit", 0)))
    else:
        scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
        out.update(source="process peak RSS (device reports no memory stats)",
                   peak_bytes=int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale))
    try:
        import torch

        if torch.cuda.is_available():
            out["torch_peak_bytes"] = int(torch.cuda.max_memory_allocated())
    except ImportError:
        pass
    return out


# -- sections -----------------------------------------------------------------------------
def section_machine(ctx) -> dict:
    import jax
    import jax.numpy as jnp

    import common
    from train_step import MatmulPeak

    device = jax.devices()[0]
    versions = {name: common.package_version(name) for name in (
        "jax", "jaxlib", "jax-cuda12-plugin", "jax-cuda13-plugin", "flax", "optax", "torch", "transformers",
        "trl", "datasets", "numpy")}
    out = dict(platform=device.platform, device_kind=device.device_kind, device_count=jax.device_count(),
               devices=[str(d) for d in jax.devices()], python=platform.python_version(), versions=versions,
               cpu=common.cpu_name(), cores=os.cpu_count(), host=platform.node())
    stats = device.memory_stats() or {}
    if "bytes_limit" in stats:
        out["device_memory_limit_bytes"] = int(stats["bytes_limit"])
    try:
        import torch

        out["torch_cuda"] = torch.version.cuda
        out["torch_cuda_available"] = bool(torch.cuda.is_available())
    except ImportError:
        out["torch_cuda"] = None
    if shutil.which("nvidia-smi"):
        query = ["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm", "--format=csv,noheader"]
        out["nvidia_smi"] = subprocess.run(query, capture_output=True, text=True, timeout=30).stdout.strip()
        header = subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=30).stdout.splitlines()
        out["cuda_driver"] = next((line.strip(" |") for line in header if "CUDA Version" in line), None)
    size = ctx.profile["matmul_size"]
    peak = MatmulPeak(size, jnp.bfloat16)
    flops, _ = peak.measure(repeats=10)
    out["matmul"] = dict(size=size, dtype="bfloat16", tflops=flops / 1e12,
                         fraction_of_peak=flops / 1e12 / ctx.args.peak_tflops)
    ctx.matmul_tflops = flops / 1e12
    return out


def section_parity(ctx) -> dict:
    import device_parity
    from rlhf_jax.models.config import MODEL_TYPES

    families, records = list(MODEL_TYPES), []
    for family in families:
        if ctx.budget.expired():
            records.append(dict(model_type=family, skipped="time budget of the section ran out"))
            continue
        records.extend(device_parity.check_all([family], **ctx.profile["parity"]))
    ok = [r for r in records if "error" not in r and "skipped" not in r]
    return dict(families=records, model_types=families,
                float32_tolerance=device_parity.F32_TOLERANCE,
                bfloat16_rule=f"ours_vs_float32 <= {device_parity.BF16_ERROR_RATIO} x "
                              f"transformers_vs_float32 + {device_parity.BF16_SLACK} x max|logit|",
                all_ok=bool(ok) and len(ok) == len(records) and all(r["float32_ok"] and r["bfloat16_ok"] for r in ok))


def build_setup(ctx):
    """The weights and data every training kind and the generation section share (vs_trl.py's
    `build_setup`; weights stored in the profile's dtype, read by both sides), written once
    under the work folder and pickled for the case processes."""
    if ctx.setup is not None:
        return ctx.setup
    import vs_trl

    p = ctx.profile
    sizes = profile_sizes(p)
    hp = hyperparameters(p)
    steps_needed = (p["warmup"] + max(p["steps"], p["ppo_steps"])) * p["rounds"] + 6
    ctx.setup = vs_trl.build_setup(ctx.workdir / "setup", sizes, hp, num_pairs=hp.batch_size * steps_needed,
                                   num_prompts=hp.ppo_batch_size * steps_needed, weights_dtype=p["dtype"])
    with open(ctx.workdir / "setup.pkl", "wb") as handle:
        pickle.dump(ctx.setup, handle)
    return ctx.setup


def profile_sizes(profile: dict) -> dict:
    """Model sizes and lengths: `vs_trl.PRESETS[profile["preset"]]`, updated by `sizes`."""
    import vs_trl

    return {**vs_trl.PRESETS[profile["preset"]], **profile.get("sizes", {})}


def hyperparameters(profile: dict):
    import vs_trl

    sizes = profile_sizes(profile)
    return vs_trl.Hyperparameters(batch_size=sizes["batch_size"], dtype=profile["dtype"],
                                  ppo_batch_size=sizes["ppo_batch_size"],
                                  ppo_response_length=sizes["ppo_response_length"],
                                  grpo_group_size=profile["grpo_group_size"])


def add_rates(row: dict, peak_tflops: float, matmul_tflops: float | None) -> dict:
    """Model TFLOP/s and MFU of each side present in `row` (from `flops_per_step` and
    `<side>_seconds`)."""
    for side in ("ours", "trl"):
        if f"{side}_seconds" not in row:
            continue
        tflops = row["flops_per_step"] / row[f"{side}_seconds"] / 1e12
        row[f"{side}_tflops"] = tflops
        row[f"{side}_mfu"] = tflops / peak_tflops
        if matmul_tflops:
            row[f"{side}_fraction_of_matmul"] = tflops / matmul_tflops
    return row


def section_training(ctx) -> dict:
    setup = build_setup(ctx)
    c = setup.config
    hp = hyperparameters(ctx.profile)
    rows = {}
    out = dict(model=dict(preset=ctx.profile["preset"], sizes=profile_sizes(ctx.profile), dtype=hp.dtype,
                          vocab_size=c.vocab_size, hidden_size=c.hidden_size, num_layers=c.num_layers,
                          num_heads=c.num_heads, intermediate_size=c.intermediate_size,
                          parameters=count_parameters(c)),
               hyperparameters=dataclasses.asdict(hp), steps=ctx.profile["steps"], ppo_steps=ctx.profile["ppo_steps"],
               rounds=ctx.profile["rounds"], peak_tflops=ctx.args.peak_tflops, matmul_tflops=ctx.matmul_tflops,
               rows=rows)
    size = ctx.profile["kinds_per_process"]
    for group in [list(KINDS[i:i + size]) for i in range(0, len(KINDS), size)]:
        if ctx.budget.expired(ctx.profile["min_case_seconds"]):
            rows.update({kind: dict(skipped="time budget of the section ran out") for kind in group})
            continue
        timeout = max(10.0, min(ctx.budget.left(), ctx.profile["case_timeout"] * len(group)))
        for kind, record in run_case_process(ctx, group, timeout).items():
            if "flops_per_step" in record:
                add_rates(record, ctx.args.peak_tflops, ctx.matmul_tflops)
            rows[kind] = record
            print(f"[training] {kind}: {json.dumps(record, default=str)[:400]}", flush=True)
        ctx.save_partial("training", out)
    ctx.case_memory = {kind: row.get("memory") for kind, row in rows.items() if row.get("memory")}
    return out


def count_parameters(config) -> int:
    import jax_runners

    embedding = config.vocab_size * config.hidden_size
    return int(jax_runners.matmul_params(config, lm_head=not config.tie_word_embeddings) + embedding)


def run_case_process(ctx, kinds: list[str], timeout: float) -> dict:
    """Training kinds in one fresh process (`--case`): `{kind: record}`. The full run gives each
    kind its own process, so its peak memory is its own; a dry run groups them (fewer imports).
    The process writes its file after every kind, so a time-out keeps the finished ones."""
    result_file = ctx.workdir / f"case_{'_'.join(kinds)}.json"
    result_file.unlink(missing_ok=True)
    command = [sys.executable, str(Path(__file__).resolve()), "--case", ",".join(kinds), "--workdir",
               str(ctx.workdir), "--case-result", str(result_file), "--profile", ctx.profile_name]
    started = time.monotonic()
    failure = None
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=case_environment(ctx))
        if done.returncode != 0:
            failure = dict(error=f"case process exited with {done.returncode}", stderr_tail=done.stderr[-3000:])
    except subprocess.TimeoutExpired as err:
        tail = err.stderr[-2000:] if err.stderr else b""
        failure = dict(error=f"timed out after {timeout:.0f} s (the section's time budget)",
                       stderr_tail=tail.decode(errors="replace") if isinstance(tail, bytes) else tail)
    records = json.loads(result_file.read_text()) if result_file.exists() else {}
    for kind in kinds:
        if kind not in records:
            records[kind] = dict(failure or dict(error="the case process wrote no result"))
        records[kind]["process_seconds"] = time.monotonic() - started
    return records


def case_environment(ctx) -> dict:
    env = dict(os.environ)
    if ctx.args.dry_run:
        env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} {DRY_XLA_FLAGS}".strip()
    return env


def run_case(kind: str, workdir: Path, profile: dict) -> dict:
    """In the case process: our side (and TRL's, when it imports) of one training kind."""
    import vs_trl

    with open(workdir / "setup.pkl", "rb") as handle:
        setup = pickle.load(handle)
    hp = hyperparameters(profile)
    args = argparse.Namespace(steps=profile["steps"], ppo_steps=profile["ppo_steps"], rounds=profile["rounds"],
                              warmup=profile["warmup"])
    trl_runners, trl_reason = trl_status()
    if kind == "grpo":
        trl_runners, trl_reason = None, ("not compared: TRL's GRPOTrainer step includes its own generation, "
                                         "so it does not time the update alone")
    memory = {}
    if kind == "grpo":
        import jax_runners

        session = jax_runners.GRPOSession(setup, hp)
        memory["ours"] = device_peak_memory()
        result = vs_trl.run_rounds(kind, lambda: session.run(args.steps), None, args.rounds)
        result.update(ours_loss0=session.loss0, compile_seconds=session.compile_seconds,
                      tokens_per_step=session.tokens_per_step, flops_per_step=session.flops_per_step,
                      ours_tokens_per_s=session.tokens_per_step / result["ours_seconds"])
    else:
        compare = vs_trl.compare_ppo if kind == "ppo" else (lambda *a: vs_trl.compare_training(kind, *a))
        try:
            result = compare(setup, hp, args, trl_runners)
        except Exception as err:
            if trl_runners is None:
                raise
            # TRL's side failed: ours alone (compiled again), with TRL's error recorded
            trl_error = error_record(err)
            trl_runners, trl_reason = None, "TRL failed: " + trl_error["error"]
            result = compare(setup, hp, args, None)
            result["trl_traceback"] = trl_error["traceback"]
    memory["end_of_case"] = device_peak_memory()  # ours (jax allocator) and TRL (torch allocator)
    result["memory"] = memory
    if trl_reason:
        result["trl_skipped"] = trl_reason
    elif trl_runners is not None:
        result["trl_version"] = trl_runners.trl_version()
    return result


def section_generation(ctx) -> dict:
    import generate as generation

    setup = build_setup(ctx)
    g = ctx.profile["generation"]
    result = generation.compare_generation(setup.policy_dir, dtype=ctx.profile["dtype"], **g)
    config = result.pop("config")
    width = 2 if ctx.profile["dtype"] == "bfloat16" else 4
    context = g["prompt_len"] + g["new_tokens"] / 2
    needed = generation.decode_bytes_per_step(config, g["batch"], context, width, width)
    roofline = {}
    for side, seconds in result["median_seconds"].items():
        step = seconds / g["new_tokens"]  # the prefill is included: an upper bound on the step time
        roofline[side] = dict(seconds_per_step=step, bytes_per_step=needed["total"],
                              achieved_tbps=needed["total"] / step / 1e12,
                              fraction_of_hbm=needed["total"] / step / 1e12 / ctx.args.hbm_tbps)
    result.update(bytes_per_step=needed, hbm_tbps=ctx.args.hbm_tbps, roofline=roofline,
                  roofline_seconds_per_step=needed["total"] / (ctx.args.hbm_tbps * 1e12))
    release_torch_memory()
    return result


def release_torch_memory() -> None:
    """Give torch's cached device memory back before the training processes start."""
    import gc

    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:
        pass


MEMORY_ENTRY = """
import inspect, json, sys
sys.path.insert(0, sys.argv[1])
import memory
entry = next(getattr(memory, name) for name in ("accelerator_cases", "run") if hasattr(memory, name))
wanted = dict(dry_run=sys.argv[2] == "1")
accepted = inspect.signature(entry).parameters
result = entry(**{key: value for key, value in wanted.items() if key in accepted})
print(json.dumps(dict(function=entry.__name__, result=result), default=str))
"""


def section_memory(ctx) -> dict:
    """Per-case peaks from the training processes; `benchmarks/memory.py`'s `accelerator_cases`
    (or `run`) in its own process, within the section's time, when that file exists."""
    out = {"training_cases": getattr(ctx, "case_memory", {}) or {}}
    if not out["training_cases"]:
        out["training_cases_note"] = "the training section recorded no case (see its status)"
    if not (HERE / "memory.py").exists():
        out["memory_benchmark"] = "benchmarks/memory.py is not in this tree"
        return out
    command = [sys.executable, "-c", MEMORY_ENTRY, str(HERE), "1" if ctx.args.dry_run else "0"]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=max(1.0, ctx.budget.left()))
        if done.returncode == 0 and done.stdout.strip():
            out["memory_benchmark"] = json.loads(done.stdout.strip().splitlines()[-1])
        else:
            out["memory_benchmark"] = dict(error=f"exited with {done.returncode}", stderr_tail=done.stderr[-3000:])
    except subprocess.TimeoutExpired:
        out["memory_benchmark"] = dict(error=f"timed out after {ctx.budget.left():.0f} s (the section's budget)")
    return out


SECTION_FUNCTIONS = {"machine": section_machine, "parity": section_parity, "training": section_training,
                     "generation": section_generation, "memory": section_memory}


# -- report -------------------------------------------------------------------------------
def targets(results: dict) -> list[dict]:
    rows = results.get("training", {}).get("rows", {})
    sources = {**rows, "generation": results.get("generation", {})}
    out = []
    for name, (row, key, minimum) in TARGETS.items():
        value = sources.get(row, {}).get(key)
        out.append(dict(target=name, minimum=minimum, value=value,
                        met=None if value is None else bool(value >= minimum)))
    return out


def _fmt(value, spec=".3g") -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    return format(value, spec) if isinstance(value, (int, float)) else str(value)


def _gigabytes(record: dict | None, key: str = "peak_bytes") -> str:
    value = (record or {}).get(key)
    return "-" if value is None else f"{value / 1e9:.2f}"


def markdown(results: dict, command: str) -> str:
    import common

    machine = results.get("machine", {})
    kind = machine.get("device_kind", "unknown device")
    title = "## Accelerator (H100)" if "H100" in str(kind) else f"## Accelerator ({kind})"
    lines = [title, "", f"Command: `{command}` ({results['started']}, {results['seconds']:.0f} s in all"
             + (", dry run: tiny shapes" if results["dry_run"] else "") + ")", ""]
    if machine.get("versions") and machine.get("matmul"):
        v, mm = machine["versions"], machine["matmul"]
        lines += [f"Device: {kind} x{machine['device_count']} ({machine.get('nvidia_smi') or machine['platform']}; "
                  f"{machine.get('cuda_driver') or 'no nvidia-smi'}); jax {v['jax']}, jaxlib {v['jaxlib']}, "
                  f"torch {v['torch']} (CUDA {machine.get('torch_cuda')}), transformers {v['transformers']}, "
                  f"trl {v['trl']}. bf16 {mm['size']}^3 matmul: {mm['tflops']:.1f} TFLOP/s "
                  f"({mm['fraction_of_peak']:.0%} of {results['peak_tflops']:.0f}).", ""]
    status = {name: results.get(name, {}).get("status", "not run") for name in SECTIONS}
    lines += ["Sections: " + ", ".join(f"{name} {state}" for name, state in status.items()), ""]
    parity = results.get("parity", {})
    if parity.get("families"):
        lines += ["### Parity with transformers on the device", "", common.markdown_table(
            ["family", "float32 max diff", "ok", "bf16 ours vs f32", "bf16 transformers vs f32", "bf16 ok"],
            [[r["model_type"], _fmt(r.get("float32_max_abs_diff")), _fmt(r.get("float32_ok")),
              _fmt(r.get("bfloat16_ours_vs_float32")), _fmt(r.get("bfloat16_transformers_vs_float32")),
              _fmt(r.get("bfloat16_ok", r.get("error", r.get("skipped"))))] for r in parity["families"]]), ""]
    training = results.get("training", {})
    if training.get("rows") and training.get("model"):
        m = training["model"]
        lines += ["### Training steps", "",
                  f"Model: {m['parameters']:,} parameters (hidden {m['hidden_size']}, {m['num_layers']} layers, "
                  f"vocabulary {m['vocab_size']}), {m['dtype']}. MFU against {results['peak_tflops']:.0f} TFLOP/s; "
                  "'of matmul' against the bf16 matmul above.", "", common.markdown_table(
                      ["row", "ours tok/s", "ours MFU", "ours of matmul", "TRL tok/s", "TRL MFU", "ours / TRL",
                       "peak memory ours / TRL (GB)", "compile (s)"],
                      [[name, _fmt(r.get("ours_tokens_per_s"), ".0f"), _fmt(r.get("ours_mfu"), ".1%"),
                        _fmt(r.get("ours_fraction_of_matmul"), ".1%"),
                        _fmt(r.get("trl_tokens_per_s"), ".0f") if "trl_tokens_per_s" in r else "skipped",
                        _fmt(r.get("trl_mfu"), ".1%"), _fmt(r.get("speedup"), ".2f"),
                        _gigabytes(r.get("memory", {}).get("ours") or r.get("memory", {}).get("end_of_case")) + " / "
                        + _gigabytes(r.get("memory", {}).get("end_of_case"), "torch_peak_bytes"),
                        _fmt(r.get("compile_seconds"), ".0f")] if "error" not in r and "skipped" not in r
                       else [name, r.get("error", r.get("skipped"))] + ["-"] * 7
                       for name, r in training["rows"].items()]), ""]
        skipped = {r.get("trl_skipped") for r in training["rows"].values() if r.get("trl_skipped")}
        lines += [f"TRL skipped: {reason}" for reason in sorted(skipped)] + ([""] if skipped else [])
    gen = results.get("generation", {})
    if gen.get("tokens_per_s") and gen.get("roofline"):
        lines += ["### Generation", "",
                  f"Batch {gen['batch']}, prompt {gen['prompt_len']}, {gen['new_tokens']} new tokens, {gen['dtype']}, "
                  f"median of {gen['repeats']} runs; our compile {gen['compile_seconds']:.0f} s.", "",
                  common.markdown_table(["side", "new tokens/s", "s per new token", "bytes per step (GB)",
                                         f"HBM fraction of {gen['hbm_tbps']} TB/s"],
                                        [[side, _fmt(gen["tokens_per_s"][side], ".0f"),
                                          _fmt(gen["roofline"][side]["seconds_per_step"], ".3g"),
                                          _fmt(gen["bytes_per_step"]["total"] / 1e9, ".3f"),
                                          _fmt(gen["roofline"][side]["fraction_of_hbm"], ".1%")]
                                         for side in gen["tokens_per_s"]]),
                  "", f"Ours / transformers: **{gen['speedup']:.2f}x**.", ""]
    lines += ["### Targets", "", common.markdown_table(
        ["target", "minimum", "measured", "met"],
        [[t["target"], _fmt(t["minimum"], ".0%" if "MFU" in t["target"] else ".1f"),
          _fmt(t["value"], ".1%" if "MFU" in t["target"] else ".2f"), _fmt(t["met"])]
         for t in results["targets"]]), ""]
    failed = [name for name, state in status.items() if state == "error"]
    if failed:
        lines += ["Failed sections: " + "; ".join(f"{name}: {results[name]['error']}" for name in failed), ""]
    return "\n".join(lines)


# -- driver -------------------------------------------------------------------------------
class Context:
    """What the sections share: options, profile, work folder, the setup, the measured matmul,
    and `save_partial` to write a section's results so far (a cut-off run keeps them)."""

    def __init__(self, args, profile_name: str, workdir: Path, save_partial=None):
        self.args, self.profile_name, self.profile = args, profile_name, PROFILES[profile_name]
        self.workdir = workdir
        self.setup = None
        self.matmul_tflops = None
        self.case_memory = {}
        self.budget = None
        self.save_partial = save_partial or (lambda name, record: None)


def write_outputs(results: dict, out: Path, command: str) -> None:
    results["targets"] = targets(results)
    (out / "accelerator_check.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    (out / "accelerator_check.md").write_text(markdown(results, command) + "\n")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT") or "accelerator_check_out",
                        help="folder for accelerator_check.json and .md (default: $OUT)")
    parser.add_argument("--dry-run", action="store_true", help="tiny shapes, 1 repeat: every code path on a CPU")
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak (H100 SXM: 989)")
    parser.add_argument("--hbm-tbps", type=float, default=3.35, help="memory bandwidth (H100 SXM: 3.35 TB/s)")
    parser.add_argument("--time-limit", type=float, default=None,
                        help="seconds for all sections together (default: 420, dry run 900)")
    parser.add_argument("--workdir", default=None, help="weights and data (default: a temp folder)")
    parser.add_argument("--record", metavar="MD", default=None,
                        help="only put a finished run's accelerator_check.md into benchmarks/RESULTS.md "
                             "(replacing the section of the same heading)")
    # internal: training kinds in a process of their own
    parser.add_argument("--case", help=argparse.SUPPRESS)  # comma-separated KINDS
    parser.add_argument("--case-result", help=argparse.SUPPRESS)
    parser.add_argument("--profile", choices=sorted(PROFILES), help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv=None) -> dict | None:
    args = parse_args(argv)
    if args.record:
        import common

        body = Path(args.record).read_text()
        common.write_section(body.splitlines()[0].strip(), body)
        print(f"wrote {body.splitlines()[0].strip()!r} into {common.RESULTS}")
        return None
    if args.case:
        records = {}
        for kind in args.case.split(","):
            try:
                records[kind] = run_case(kind, Path(args.workdir), PROFILES[args.profile])
            except Exception as err:
                records[kind] = error_record(err)
            Path(args.case_result).write_text(json.dumps(records, default=str))
        return None
    profile_name = "dry" if args.dry_run else "full"
    if args.dry_run and "jax" not in sys.modules:  # before jax starts (a script run)
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {DRY_XLA_FLAGS}".strip()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    command = "python benchmarks/accelerator_check.py " + " ".join(sys.argv[1:] if argv is None else argv)
    start = time.monotonic()
    limit = PROFILES[profile_name]["time_limit"] if args.time_limit is None else args.time_limit
    deadline = start + limit
    results = dict(started=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), dry_run=args.dry_run,
                   profile=profile_name, peak_tflops=args.peak_tflops, hbm_tbps=args.hbm_tbps,
                   command=command.strip(), seconds=0.0)
    with tempfile.TemporaryDirectory(prefix="accelerator_check_") as scratch:
        def save_partial(name: str, record: dict) -> None:
            results[name] = dict(status="running", **record)
            write_outputs(results, out, command.strip())

        ctx = Context(args, profile_name, Path(args.workdir or scratch), save_partial)
        ctx.workdir.mkdir(parents=True, exist_ok=True)
        for name in args.sections:
            section_start, cpu_start = time.monotonic(), cpu_seconds()
            ctx.budget = Budget(PROFILES[profile_name]["budgets"][name], deadline)
            print(f"[{name}] start ({ctx.budget.left():.0f} s budget)", flush=True)
            try:
                if ctx.budget.expired():
                    record = dict(status="skipped", skipped="the run's time limit ran out")
                else:
                    record = dict(status="ok", **SECTION_FUNCTIONS[name](ctx))
            except (Exception, SystemExit) as err:  # record and go on with the next section
                record = dict(status="error", **error_record(err))
            record["seconds"] = time.monotonic() - section_start
            record["cpu_seconds"] = cpu_seconds() - cpu_start  # this process and its case processes
            results[name] = record
            results["seconds"] = time.monotonic() - start
            write_outputs(results, out, command.strip())
            print(f"[{name}] {record['status']} in {record['seconds']:.1f} s", flush=True)
    print((out / "accelerator_check.md").read_text())
    return results


if __name__ == "__main__":
    main()
