"""Independent runs spread over devices: each run its own process, each device one run at a time.

``compare --gpus`` starts every (variant, seed) as a ``python -m hybrid_lora train``
process that sees one GPU (CUDA_VISIBLE_DEVICES set to its id); when a run ends,
the next waiting run takes its GPU. A device listed twice takes two runs at once
(small models share a GPU well). Each run writes its own output folder and its
output goes to a log file; nothing passes between runs, so no process group is
needed. For one run over several GPUs, use torchrun instead (see ``distributed``).
"""

import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Job:
    name: str  # shown in progress lines
    argv: list  # arguments after ``python -m hybrid_lora``
    log: Path  # stdout and stderr of the run


def visible_gpus(environ=None, count=None):
    """The GPU ids runs may be given: CUDA_VISIBLE_DEVICES's entries when it is set, else 0..count-1.

    count: GPUs present (default: torch.cuda.device_count()).
    """
    environ = os.environ if environ is None else environ
    listed = environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return [item.strip() for item in listed.split(",") if item.strip() and item.strip() != "-1"]
    if count is None:
        import torch

        count = torch.cuda.device_count()
    return [str(i) for i in range(count)]


def start_job(job, device):
    """Start `job` as a subprocess that sees only GPU `device`; its output goes to job.log."""
    return _start(job, {**os.environ, "CUDA_VISIBLE_DEVICES": str(device)})


def start_here(job, slot):
    """Start `job` as a subprocess on the devices this process sees (`slot` only names its place in the pool)."""
    return _start(job, dict(os.environ))


def _start(job, env):
    job.log.parent.mkdir(parents=True, exist_ok=True)
    with open(job.log, "w", encoding="utf-8") as log:
        return subprocess.Popen([sys.executable, "-m", "hybrid_lora", *job.argv], env=env, stdout=log,
                                stderr=subprocess.STDOUT)


def run_on_devices(jobs, devices, start=start_job, poll_seconds=0.5, echo=None, describe="GPU {}".format):
    """Run every job, in order, at most one per entry of `devices` at a time; return {job.name: exit status}.

    start(job, device) returns a process with ``poll()`` (and ``terminate()``):
    ``start_job`` or a stand-in. A run that fails does not stop the others. If
    the caller is interrupted, the running processes are terminated. describe(device) names a device in
    the progress lines.
    """
    devices = [str(d) for d in devices]
    if not devices:
        raise ValueError("run_on_devices: no devices given; expected at least one GPU id")
    pending, free, running, codes = list(jobs), list(devices), [], {}
    try:
        while pending or running:
            while pending and free:
                job, device = pending.pop(0), free.pop(0)
                running.append((job, device, start(job, device)))
                if echo is not None:
                    echo(f"== {job.name}: started on {describe(device)} (log: {job.log})")
            still_running = []
            for job, device, process in running:
                code = process.poll()
                if code is None:
                    still_running.append((job, device, process))
                    continue
                codes[job.name] = code
                free.append(device)
                if echo is not None:
                    echo(f"== {job.name}: {'finished' if code == 0 else f'failed (exit status {code})'} "
                         f"on {describe(device)}")
            running = still_running
            if running and not (pending and free):
                time.sleep(poll_seconds)
    except BaseException:
        for _, _, process in running:
            process.terminate()
        raise
    return codes
