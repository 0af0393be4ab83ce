"""Several JAX processes on this machine (``jax.distributed`` on 127.0.0.1, the CPU collectives):
the launcher against one device, a taken port, and the README's several-processes snippet on two
processes: a run, a run whose process 1 is killed mid-run, and the rerun that resumes it
bit-identically.

Every run is a set of subprocesses bounded in time (``experiments.data_parallel.launch``, or
``subprocess.run(timeout=...)``); nothing leaves the loopback address.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from experiments.data_parallel import free_port, launch

ROOT = pathlib.Path(__file__).resolve().parents[1]
LAUNCHER = [sys.executable, "-m", "experiments.data_parallel", "--processes", "2",
            "--devices-per-process", "2"]
SNIPPET = next(code for code in re.findall(r"```python\n(.*?)```",
                                           (ROOT / "README.md").read_text(), re.DOTALL)
               if "jax.distributed.initialize" in code)
# Prepended to process 1's copy of the snippet: SIGKILL (no clean-up) once the checkpoint of
# epoch 1 is in place, that is mid-run for the others, which are then in epoch 2.
DIE_AFTER_EPOCH_1 = """
import os, signal
from jaxbn import training
_save = training.save_train_state
def _save_then_die(path, state, *args, **kwargs):
    _save(path, state, *args, **kwargs)  # returns once process 0 has written the file
    if state.epoch == 1:
        os.kill(os.getpid(), signal.SIGKILL)
training.save_train_state = _save_then_die
"""


def _run(command, timeout):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env=env,
                          timeout=timeout, check=False)


def _ours(stdout):
    """A process's output without the lines the CPU collectives' library prints on connecting
    ("[Gloo] Rank 0 is connected to 3 peer ranks. ...", whose head another write may split off
    from its tail, down to a lone newline)."""
    return "".join(line for line in stdout.splitlines(True)
                   if line.strip() and not line.startswith("[Gloo]")
                   and "connected peer ranks" not in line)


def _snippet_on_two_processes(cwd, *, kill=False):
    port = str(free_port())
    envs = [{"NUM_PROCESSES": "2", "PROCESS_ID": str(i), "PORT": port, "PYTHONPATH": str(ROOT)}
            for i in range(2)]
    codes = [SNIPPET, (DIE_AFTER_EPOCH_1 if kill else "") + SNIPPET]
    return launch([[sys.executable, "-c", code] for code in codes], envs=envs, cwd=str(cwd),
                  timeout=150, grace=60)


def _checkpoint(path):
    with np.load(path, allow_pickle=False) as archive:
        arrays = {k: archive[k] for k in archive.files if k != "__meta__.json"}
        return arrays, json.loads(archive["__meta__.json"].tobytes())["metadata"]


def test_launcher_trains_on_two_processes_like_one_device():
    proc = _run([*LAUNCHER, "--timeout=240"], timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert re.search(r"step +1 device +4 devices", proc.stdout), proc.stdout
    curve = re.findall(r"^ +\d+ +([\d.]+) +([\d.]+)$", proc.stdout, re.MULTILINE)
    assert len(curve) == 10 and float(curve[-1][0]) < 0.5 * float(curve[0][0])  # it learns
    diff = re.search(r"largest loss difference over 40 steps: (\S+)", proc.stdout)
    assert diff and float(diff[1]) <= 1e-5, proc.stdout


def test_launcher_refuses_a_taken_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        start = time.monotonic()
        proc = _run([*LAUNCHER, f"--port={port}"], timeout=60)
    assert proc.returncode == 2 and time.monotonic() - start < 30  # before any JAX process
    assert f"port {port} on 127.0.0.1 is taken" in proc.stderr and "--port" in proc.stderr


@pytest.mark.slow
def test_readme_snippet_on_two_processes_survives_a_killed_process_and_resumes(tmp_path):
    uninterrupted, crashed = tmp_path / "uninterrupted", tmp_path / "crashed"
    uninterrupted.mkdir(), crashed.mkdir()
    first, second = _snippet_on_two_processes(uninterrupted)
    assert (first.returncode, second.returncode) == (0, 0), first.stderr[-3000:]
    ours = [_ours(f.stdout) for f in (first, second)]
    assert re.fullmatch(r"2 process\(es\), 4 devices: final loss \d+\.\d+\n", ours[0]), ours
    assert ours[1] == ""  # prints come from process 0 only
    assert [p.name for p in uninterrupted.iterdir()] == ["run.ckpt"]  # one writer, no temporary

    survivor, killed = _snippet_on_two_processes(crashed, kill=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert survivor.returncode not in (0, None), survivor.stderr[-3000:]  # stopped on its own
    assert "process 0 of 2 lost contact with the others in epoch 2" in survivor.stderr
    assert "resume='run.ckpt'" in survivor.stderr
    assert survivor.seconds - killed.seconds < 45  # the snippet's heartbeat timeout is 10 s
    assert _checkpoint(crashed / "run.ckpt")[1]["epoch"] == 1

    first, second = _snippet_on_two_processes(crashed)  # the same command again: it resumes
    assert (first.returncode, second.returncode) == (0, 0), first.stderr[-3000:]
    assert _ours(first.stdout) == ours[0]
    (resumed, resumed_meta), (reference, reference_meta) = (
        _checkpoint(d / "run.ckpt") for d in (crashed, uninterrupted))
    assert resumed.keys() == reference.keys() and len(reference) > 20
    for name in reference:
        np.testing.assert_array_equal(resumed[name], reference[name], err_msg=name)
    assert resumed_meta == reference_meta and reference_meta["devices"] == 4
