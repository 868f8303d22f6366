"""``dori --processes N <verb> ...``: the verb run by N processes that share its work, started through
``accelerate launch`` (the verbs split their evaluations, attacks and NeMo's localisation among the
processes, :class:`dori.runs.Processes`).

On CPU each process gets an equal share of the cores as torch threads: at the testbed's small batches
two single-threaded processes do more work than one process with two threads (docs/results.md).
"""

from __future__ import annotations

import os
import sys

from ..errors import DoriError

LAUNCHED = "DORI_LAUNCHED"
"""Set in the environment of the processes that ``--processes`` starts (they must not start their own)."""


def launched() -> bool:
    """Whether this process is one of several started by a launcher (``--processes`` or ``accelerate launch``)."""
    return bool(os.environ.get(LAUNCHED)) or int(os.environ.get("WORLD_SIZE", "1")) > 1


def is_main() -> bool:
    """Whether this process is the one that talks to the terminal (rank 0, or the only one)."""
    return os.environ.get("RANK", "0") == "0"


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def launch_command(processes: int, args: list[str]) -> tuple[list[str], dict[str, str]]:
    """The ``accelerate launch`` command line and environment that run ``dori <args>`` in ``processes``
    processes on this machine; ``OMP_NUM_THREADS`` (unless set) gives each an equal share of the cores."""
    if processes < 1:
        raise DoriError(f"processes: must be >= 1, got {processes}")
    env = {**os.environ, LAUNCHED: "1", "PYTHONUNBUFFERED": "1"}
    env.setdefault("OMP_NUM_THREADS", str(max(1, usable_cores() // processes)))
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "dori", *args]
    return command, env


def strip_processes(argv: list[str]) -> list[str]:
    """``argv`` without its ``--processes N`` / ``--processes=N`` (given before the verb)."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--processes":
            skip = True
        elif not arg.startswith("--processes="):
            out.append(arg)
    return out


def relaunch(processes: int, argv: list[str]) -> None:
    """Replace this process by ``processes`` launched ones running the same command (nothing happens for
    one process or inside a launched one)."""
    if processes <= 1 or launched():
        return
    command, env = launch_command(processes, strip_processes(argv))
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, command, env)
