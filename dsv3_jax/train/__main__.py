"""python -m dsv3_jax.train --config=configs/tiny.py --workdir=runs/tiny [--config.train.steps=N ...]

A thin absl entry point over `dsv3_jax.train.loop.train_and_evaluate`. Several processes (hosts):
start one per host with `--coordinator_address=host0:port --num_processes=N --process_id=i` (or
`--distributed` on a cluster JAX detects), the same config and a shared --workdir. The config file's
`get_config(arg)` receives what follows a colon (`--config=configs/tiny.py:short`); any setting can be
overridden with `--config.<section>.<key>=value` (unknown keys are refused).
"""

import socket
import time

from absl import flags, logging
import jax
from ml_collections import config_flags

from dsv3_jax import cli
from dsv3_jax.train.loop import train_and_evaluate

_CONFIG = config_flags.DEFINE_config_file("config", None, "Run config file (configs/*.py).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics, tokenizer "
                               "and token store; a run resumes from it.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "Multi-process runs: host:port of "
                                   "process 0 (with --num_processes and --process_id). On SLURM, "
                                   "TPU pods and similar clusters, --distributed finds them itself.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Multi-process runs: how many.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "Multi-process runs: this one's index.")
_DISTRIBUTED = flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() with "
                                 "the cluster's own settings (implied by --coordinator_address).")
_DISTRIBUTED_TIMEOUT = flags.DEFINE_integer("distributed_timeout", 300, "Multi-process runs: seconds "
                                            "to wait for every process to join before giving up.")
flags.mark_flags_as_required(["config", "workdir"])


def _check_flags() -> None:
    """Refuses flag combinations that would run something other than what was meant."""
    if not _WORKDIR.value.strip():
        raise cli.UsageError("--workdir is empty; pass the directory the run writes to (and "
                             "resumes from), e.g. --workdir=runs/tiny.")
    multi = _NUM_PROCESSES.value is not None or _PROCESS_ID.value is not None
    if _COORDINATOR.value is not None:
        cli.check_host_port("--coordinator_address", _COORDINATOR.value)
        if _NUM_PROCESSES.value is None or _PROCESS_ID.value is None:
            raise cli.UsageError("--coordinator_address needs --num_processes and --process_id "
                                 "(this process's index); give all three.")
    elif multi and not _DISTRIBUTED.value:
        raise cli.UsageError("--num_processes/--process_id need --coordinator_address=host:port of "
                             "process 0 (or --distributed on a cluster JAX detects); without it "
                             "each process would train alone in the same workdir.")
    if _DISTRIBUTED_TIMEOUT.value < 1:
        raise cli.UsageError(f"--distributed_timeout={_DISTRIBUTED_TIMEOUT.value} must be >= 1 "
                             "(seconds).")
    if _NUM_PROCESSES.value is not None and _NUM_PROCESSES.value < 1:
        raise cli.UsageError(f"--num_processes={_NUM_PROCESSES.value} must be >= 1.")
    if _PROCESS_ID.value is not None and not (
            0 <= _PROCESS_ID.value < (_NUM_PROCESSES.value or _PROCESS_ID.value + 1)):
        raise cli.UsageError(f"--process_id={_PROCESS_ID.value} must be in [0, --num_processes="
                             f"{_NUM_PROCESSES.value}).")


def _wait_for_coordinator(address: str, process_id: int, timeout_s: int) -> None:
    """Fails cleanly where XLA's coordination client would abort the process: an address that does
    not resolve, or (for processes other than 0) a coordinator that does not answer in time."""
    host, _, port = address.rpartition(":")
    host = host.strip("[]")
    try:
        socket.getaddrinfo(host, int(port))
    except (socket.gaierror, UnicodeError) as e:
        raise ConnectionError(f"--coordinator_address={address}: the host {host!r} does not resolve "
                              f"({e}); give the address of process 0's host.") from None
    if process_id == 0:
        return
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection((host, int(port)), timeout=5):
                return
        except OSError as e:
            if time.monotonic() >= deadline:
                raise ConnectionError(
                    f"no coordinator answered at --coordinator_address={address} within "
                    f"{timeout_s} s ({e.strerror or e}); start process 0 with the same flags, or "
                    "raise --distributed_timeout.") from None
            time.sleep(1.0)


def _initialize_distributed() -> None:
    """jax.distributed.initialize from the flags (or the cluster environment) before any jax use."""
    if not (_DISTRIBUTED.value or _COORDINATOR.value):
        return
    # Collectives between processes on CPU hosts (tests, CPU clusters) go through gloo.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    logging.info("joining the multi-process run (coordinator %s, process %s of %s); waiting up to "
                 "%d s for every process (--distributed_timeout)", _COORDINATOR.value or "from the "
                 "cluster", _PROCESS_ID.value, _NUM_PROCESSES.value, _DISTRIBUTED_TIMEOUT.value)
    if _COORDINATOR.value:
        _wait_for_coordinator(_COORDINATOR.value, _PROCESS_ID.value, _DISTRIBUTED_TIMEOUT.value)
    try:
        jax.distributed.initialize(coordinator_address=_COORDINATOR.value,
                                   num_processes=_NUM_PROCESSES.value, process_id=_PROCESS_ID.value,
                                   initialization_timeout=_DISTRIBUTED_TIMEOUT.value)
    except Exception as e:  # noqa: BLE001 - a coordinator that is not there, or a refused address
        detail = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        raise ConnectionError(
            f"could not join the multi-process run (--coordinator_address={_COORDINATOR.value}, "
            f"--process_id={_PROCESS_ID.value} of --num_processes={_NUM_PROCESSES.value}): "
            f"{detail}. Check that process 0 runs with the same flags and that its address is "
            "reachable from this host.") from e
    logging.info("process %d of %d, %d local devices of %d", jax.process_index(),
                 jax.process_count(), jax.local_device_count(), jax.device_count())


def main(argv):
    if len(argv) > 1:
        raise cli.UsageError(f"unexpected arguments {argv[1:]}; every setting is a flag "
                             "(--config.<section>.<key>=value).")
    _check_flags()
    _initialize_distributed()
    result = train_and_evaluate(_CONFIG.value, _WORKDIR.value)
    logging.info("finished at step %d: train %s, eval %s", result["step"], result["train"],
                 result["eval"])
    if not result["train"]:
        print(f"nothing to train: {_WORKDIR.value} is already at step {result['step']} "
              f"(config.train.steps={_CONFIG.value.train.steps}); raise the steps or use a new --workdir.")
    elif result["eval"]:
        print(f"step {result['step']}: eval loss {result['eval']['eval_loss']:.4f}, "
              f"perplexity {result['eval']['eval_perplexity']:.2f}")


if __name__ == "__main__":
    cli.run(main)
