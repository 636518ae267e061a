"""Start N processes of one command on this machine as one multi-process JAX job.

    python -m rlhf_jax.training.launch --num-processes 2 --devices-per-process 4 -- \\
        python train.py --config configs/sft.yaml

Process i runs the command with these environment variables (read by
`rlhf_jax.training.multihost.initialize_from_env`; JAX itself reads the first):

    JAX_COORDINATOR_ADDRESS   127.0.0.1:<free port>   (process 0 serves it)
    RLHF_JAX_NUM_PROCESSES    N
    RLHF_JAX_PROCESS_ID       i

and, with `platform="cpu"` (the default), `JAX_PLATFORMS=cpu`, `XLA_FLAGS` with
`--xla_force_host_platform_device_count=<devices per process>` (replacing any count already
there) and `JAX_CPU_COLLECTIVES_IMPLEMENTATION=gloo`: N processes with fake CPU devices and
real cross-process collectives, which is how multi-host code is tested without a cluster.
With `platform="gpu"` process i sees GPUs `i*d .. i*d + d - 1` (`CUDA_VISIBLE_DEVICES`); with
`platform="native"` nothing but the three variables above is set.

Every output line is prefixed with `[process i]`. When one process fails the others are
stopped (they would wait forever in a collective) and `launch` raises `LaunchError` naming
the failed processes and their exit codes; the command line exits with the first failure's
code. On a cluster use its own launcher instead (srun, mpirun, a TPU pod's per-host
command; see docs/multihost.md): JAX reads the process layout from its environment.
"""
from __future__ import annotations

import argparse
import os
import re
import socket
import subprocess
import sys
import threading
import time
from typing import Mapping, Sequence, TextIO

from rlhf_jax.training.multihost import ENV_COORDINATOR_ADDRESS, ENV_NUM_PROCESSES, ENV_PROCESS_ID

PLATFORMS = ("cpu", "gpu", "native")
_DEVICE_COUNT_FLAG = re.compile(r"--xla_force_host_platform_device_count=\S*")


class LaunchError(RuntimeError):
    """One or more launched processes failed or timed out."""

    def __init__(self, message: str, returncodes: list[int | None]):
        super().__init__(message)
        self.returncodes = returncodes


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on `host` that nothing listens on (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def process_env(process_id: int, num_processes: int, *, coordinator_address: str,
                devices_per_process: int = 1, platform: str = "cpu",
                base_env: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of process `process_id` (module docstring)."""
    env = dict(os.environ if base_env is None else base_env)
    env[ENV_COORDINATOR_ADDRESS] = coordinator_address
    env[ENV_NUM_PROCESSES] = str(num_processes)
    env[ENV_PROCESS_ID] = str(process_id)
    env["PYTHONUNBUFFERED"] = "1"
    if platform == "cpu":
        flags = _DEVICE_COUNT_FLAG.sub("", env.get("XLA_FLAGS", "")).split()
        flags.append(f"--xla_force_host_platform_device_count={devices_per_process}")
        env["XLA_FLAGS"] = " ".join(flags)
        env["JAX_PLATFORMS"] = "cpu"
        env["JAX_CPU_COLLECTIVES_IMPLEMENTATION"] = "gloo"
    elif platform == "gpu":
        first = process_id * devices_per_process
        env["CUDA_VISIBLE_DEVICES"] = ",".join(str(first + k) for k in range(devices_per_process))
    return env


def _pump(stream, prefix: str, out: TextIO, lock: threading.Lock, tail: list[str]) -> None:
    for line in iter(stream.readline, ""):
        tail.append(line)
        del tail[:-40]
        with lock:
            out.write(prefix + line)
            out.flush()
    stream.close()


def launch(
    command: Sequence[str],
    *,
    num_processes: int,
    devices_per_process: int = 1,
    platform: str = "cpu",
    port: int | None = None,
    env: Mapping[str, str] | None = None,
    timeout: float | None = None,
    output: TextIO | None = None,
    cwd: str | None = None,
) -> list[int]:
    """Run `command` as processes 0..num_processes-1 of one job; return their exit codes (all 0).

    Args:
      command: the program and its arguments (the same for every process).
      num_processes: how many processes to start (>= 1).
      devices_per_process: fake CPU devices (platform "cpu") or GPUs (platform "gpu") each.
      platform: "cpu" | "gpu" | "native" (module docstring).
      port: the coordinator's port on 127.0.0.1 (default: a free one).
      env: base environment (default: this process's).
      timeout: seconds before every process is killed and LaunchError raised (None: no limit).
      output: where the prefixed lines go (default: sys.stdout).
      cwd: working directory of the processes.

    Raises:
      ValueError for bad arguments; OSError if the command cannot be started; LaunchError if
      a process fails or the time runs out (the message holds the last lines of the first
      failed process's output).
    """
    if not command:
        raise ValueError("`command` is empty: give the program to run after `--`")
    if num_processes < 1:
        raise ValueError(f"`num_processes` must be >= 1, got {num_processes}")
    if devices_per_process < 1:
        raise ValueError(f"`devices_per_process` must be >= 1, got {devices_per_process}")
    if platform not in PLATFORMS:
        raise ValueError(f"`platform` must be one of {PLATFORMS}, got {platform!r}")
    output = sys.stdout if output is None else output
    address = f"127.0.0.1:{free_port() if port is None else port}"
    lock = threading.Lock()
    processes, pumps, tails = [], [], []
    for process_id in range(num_processes):
        try:
            process = subprocess.Popen(
                list(command), cwd=cwd, text=True, errors="replace", bufsize=1,
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                env=process_env(process_id, num_processes, coordinator_address=address,
                                devices_per_process=devices_per_process, platform=platform,
                                base_env=env),
            )
        except OSError:
            _stop(processes)  # the ones already started would wait for this one forever
            raise
        tail: list[str] = []
        pump = threading.Thread(target=_pump, args=(process.stdout, f"[process {process_id}] ",
                                                    output, lock, tail), daemon=True)
        pump.start()
        processes.append(process)
        pumps.append(pump)
        tails.append(tail)

    deadline = None if timeout is None else time.monotonic() + timeout
    failure = None
    while True:
        codes = [process.poll() for process in processes]  # poll every process, every time
        if all(code is not None for code in codes):
            break
        if any(code not in (None, 0) for code in codes):
            failure = "failed"
            break
        if deadline is not None and time.monotonic() > deadline:
            failure = f"timed out after {timeout} s"
            break
        time.sleep(0.05)
    if failure is not None:
        _stop(processes)
    for pump in pumps:
        pump.join(timeout=5)
    codes = [process.returncode for process in processes]
    if failure is None and all(code == 0 for code in codes):
        return codes
    failed = [i for i, code in enumerate(codes) if code != 0]
    first = next((i for i, code in enumerate(codes) if code not in (0, None, -15, -9)), failed[0])
    detail = "".join(tails[first][-20:])
    reason = failure if failure and failure.startswith("timed out") else "failed"
    raise LaunchError(
        f"{reason}: process(es) {failed} of {num_processes} ended with exit codes "
        f"{[codes[i] for i in failed]} (command {' '.join(command)!r}); last output of process "
        f"{first}:\n{detail}",
        codes,
    )


def _stop(processes, grace: float = 5.0) -> None:
    for process in processes:
        if process.poll() is None:
            process.terminate()
    end = time.monotonic() + grace
    for process in processes:
        try:
            process.wait(timeout=max(0.0, end - time.monotonic()))
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--" in argv:
        split = argv.index("--")
        argv, command = argv[:split], argv[split + 1:]
    else:
        command = []
    parser = argparse.ArgumentParser(
        prog="python -m rlhf_jax.training.launch",
        description="Run a command as N local processes of one multi-process JAX job.",
        usage="%(prog)s --num-processes N [--devices-per-process D] [options] -- command ...",
    )
    parser.add_argument("--num-processes", type=int, required=True)
    parser.add_argument("--devices-per-process", type=int, default=1)
    parser.add_argument("--platform", choices=PLATFORMS, default="cpu")
    parser.add_argument("--port", type=int, default=None, help="coordinator port (default: free)")
    parser.add_argument("--timeout", type=float, default=None, help="seconds before all are killed")
    args = parser.parse_args(argv)
    if not command:
        parser.error("give the command to run after `--`")
    try:
        launch(command, num_processes=args.num_processes, devices_per_process=args.devices_per_process,
               platform=args.platform, port=args.port, timeout=args.timeout)
    except LaunchError as error:
        print(f"launch: {error}", file=sys.stderr)
        return next((code for code in error.returncodes if code is not None and code > 0), 1)
    except ValueError as error:
        parser.error(str(error))
    return 0


if __name__ == "__main__":
    sys.exit(main())
