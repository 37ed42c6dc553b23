"""Two JAX processes on this machine (4 simulated CPU devices each, 8 global devices)
through ``jax.distributed``: a sharded LAG decode equal to one process's, and the CLI,
where process 0 alone writes the outputs. Launch scripts parse."""

from __future__ import annotations

import glob
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import multihost_worker as worker
import numpy as np
import pytest

from lag_jax.model.config import ModelConfig
from lag_jax.routing import KNOWLEDGE_MODULES, AdapterLibrary
from lag_jax.testing import tiny_adapters, tiny_checkpoint
from lag_jax.testing.libraries import random_lora

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT_S = 240  # a hung collective fails the test instead of CI
ATOL = 1e-5


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _child_env(**extra) -> dict[str, str]:
  """This process's environment with 4 simulated devices per process instead of 8."""
  env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_")}
  flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", env.get("XLA_FLAGS", ""))
  env["XLA_FLAGS"] = (flags + " --xla_force_host_platform_device_count=4").strip()
  env["JAX_PLATFORMS"] = "cpu"
  env["PYTHONPATH"] = os.pathsep.join(filter(None, [ROOT, env.get("PYTHONPATH")]))
  return {**env, **extra}


class Processes:
  """Child processes with their output in files (a full pipe would block a process
  that its peer then waits for in a collective), stopped on timeout or failure."""

  def __init__(self, folder):
    self.folder, self.procs = folder, []

  def start(self, args, **env):
    i = len(self.procs)
    log = open(os.path.join(self.folder, f"process_{i}.log"), "w")  # noqa: SIM115
    proc = subprocess.Popen(
      args, cwd=ROOT, env=_child_env(**env), stdout=log, stderr=subprocess.STDOUT, text=True
    )
    self.procs.append((proc, log))

  def log(self, i) -> str:
    with open(os.path.join(self.folder, f"process_{i}.log")) as f:
      return f.read()

  def wait(self, timeout_s=TIMEOUT_S) -> None:
    """Waits for all; fails with every process's log tail if one fails or hangs."""
    deadline = time.monotonic() + timeout_s
    failed = None
    while failed is None and any(p.poll() is None for p, _ in self.procs):
      failed = next((i for i, (p, _) in enumerate(self.procs) if p.poll()), None)
      if time.monotonic() > deadline:
        failed = "timeout"
      time.sleep(0.2)
    if failed is None:
      failed = next((i for i, (p, _) in enumerate(self.procs) if p.returncode), None)
    for p, log in self.procs:
      if p.poll() is None:
        p.send_signal(signal.SIGKILL)
      p.wait()
      log.close()
    if failed is not None:
      tails = "\n".join(
        f"--- process {i} (exit {p.returncode}) ---\n{self.log(i)[-3000:]}"
        for i, (p, _) in enumerate(self.procs)
      )
      what = f"timed out after {timeout_s}s" if failed == "timeout" else f"process {failed} failed"
      pytest.fail(f"{len(self.procs)} processes: {what}\n{tails}")


@pytest.fixture
def processes(tmp_path):
  procs = Processes(tmp_path)
  yield procs
  for p, log in procs.procs:  # a test that failed before wait()
    if p.poll() is None:
      p.kill()
      p.wait()
    log.close()


def _library(config: ModelConfig, n=20) -> AdapterLibrary:
  adapters = [
    random_lora(config, f"k{i:02d}", r=4, alpha=8, target_modules=KNOWLEDGE_MODULES, seed=i)
    for i in range(n)
  ]
  return AdapterLibrary.from_adapters(adapters, config, KNOWLEDGE_MODULES)


def test_two_processes_decode_like_one(tmp_path, processes):
  """20 adapters padded to 24: 3 per device over 8 devices (adapter8), 5 per device
  over 4 (data2_adapter4); each process must get the whole batch's results."""
  from lag_jax.checkpoints.safetensors_loader import load_model

  checkpoint = tiny_checkpoint()  # into the cache before the children look for it
  library = _library(ModelConfig.from_file(checkpoint))
  library.save(tmp_path / "library")
  port = _free_port()
  outs = [tmp_path / f"out_{i}.npz" for i in range(worker.NUM_PROCESSES)]
  for i, out in enumerate(outs):
    script = os.path.join(ROOT, "tests", "multihost_worker.py")
    processes.start([sys.executable, script, str(port), str(i), str(tmp_path / "library"), out])
  # The reference, on one device of this process, while the children run.
  reference = worker.decode(load_model(checkpoint), library)
  processes.wait()
  assert reference["tokens"].shape == (len(worker.PROMPTS), worker.MAX_NEW_TOKENS)
  routed_ids = reference["routing_gate_proj"]
  assert ((routed_ids >= 0) & (routed_ids < 20)).any() and routed_ids.max() < 20
  for i, out in enumerate(outs):
    got = np.load(out)
    for mesh in worker.MESHES:
      for key, want in reference.items():
        msg = f"process {i}, mesh {mesh}: {key}"
        if key.startswith("logits"):
          np.testing.assert_allclose(got[f"{mesh}/{key}"], want, atol=ATOL, rtol=0, err_msg=msg)
        else:
          np.testing.assert_array_equal(got[f"{mesh}/{key}"], want, err_msg=msg)


def test_cli_two_processes_only_process_zero_writes(tmp_path, processes):
  """The generate job over 2 processes (process 0 configured by flags, process 1 by
  the environment), each with its own workdir: only process 0's gets outputs.
  (That they equal one process's is the test above.)"""
  run = [
    sys.executable,
    "-m",
    "lag_jax.run",
    "--config=configs/generate.py:tiny_lag",
    "--config.task_library=",  # the knowledge library alone: a shorter compile
    "--config.mesh.adapter=-1",
    "--config.generation.max_new_tokens=3",
  ]
  # Into the cache before the children look for them.
  tiny_checkpoint()
  tiny_adapters("knowledge")
  port = _free_port()
  processes.start(
    [
      *run,
      f"--coordinator_address=localhost:{port}",
      "--num_processes=2",
      "--process_id=0",
      f"--workdir={tmp_path / 'w0'}",
    ]
  )
  processes.start(
    [*run, f"--workdir={tmp_path / 'w1'}"],
    JAX_COORDINATOR_ADDRESS=f"localhost:{port}",
    JAX_NUM_PROCESSES="2",
    JAX_PROCESS_ID="1",
  )
  processes.wait()
  log0, log1 = processes.log(0), processes.log(1)
  assert "Process 0 of 2" in log0 and "Process 1 of 2" in log1
  assert "sharded over 8 devices" in log0
  assert "process 0 writes the outputs" in log1
  assert sorted(os.listdir(tmp_path / "w0")) == ["generations.json", "routing.npz"]
  assert os.listdir(tmp_path / "w1") == []  # created by run.py, never written
  results = json.loads((tmp_path / "w0" / "generations.json").read_text())
  assert len(results) == 2 and all(r["num_tokens"] > 0 for r in results)
  ids = np.load(tmp_path / "w0" / "routing.npz")["lib0/gate_proj"]
  assert ((ids >= 0) & (ids < 8)).any() and ids.max() < 8  # never a padding id
  assert ">>> What is the capital of France?" in log0
  assert ">>>" not in log1  # only process 0 prints the completions


def test_initialize_is_a_no_op_for_one_process(monkeypatch):
  from lag_jax import distributed

  for name in distributed.ENV.values():
    monkeypatch.delenv(name, raising=False)
  assert distributed.initialize("auto") is False
  assert distributed.initialize("off", "localhost:1", 2, 0) is False
  with pytest.raises(ValueError, match="unknown"):
    distributed.initialize("sometimes")
  monkeypatch.setenv("JAX_NUM_PROCESSES", "two")
  with pytest.raises(ValueError, match="JAX_NUM_PROCESSES='two'"):
    distributed.initialize("auto")


# --- launch/ ---------------------------------------------------------------------------

SCRIPTS = sorted(glob.glob(os.path.join(ROOT, "launch", "*.sh")))


def test_launch_scripts_parse():
  names = {os.path.basename(s) for s in SCRIPTS}
  assert {"local.sh", "local_multiprocess.sh", "tpu_vm.sh", "tpu_pod.sh"} <= names
  for script in SCRIPTS:
    proc = subprocess.run(["bash", "-n", script], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, f"{script}: {proc.stderr}"
    with open(script) as f:
      text = f.read()
    assert text.startswith("#!/usr/bin/env bash\n") and "set -euo pipefail" in text, script
    assert "python -m lag_jax.run" in text, f"{script}: no exact command in its comments"
    assert os.access(script, os.X_OK), f"{script} is not executable"


def test_local_launcher_fails_with_the_processes_logs(tmp_path):
  """Both processes reject a misspelt override: the launcher exits non-zero and shows
  process 1's log (process 0 prints to the terminal)."""
  proc = subprocess.run(
    [
      os.path.join(ROOT, "launch", "local_multiprocess.sh"),
      "2",
      "configs/tiny.py",
      "--config.generation.max_new_tokenz=3",
      f"--workdir={tmp_path / 'w'}",
    ],
    capture_output=True,
    text=True,
    timeout=120,
    env=_child_env(PYTHON=sys.executable, LOG_DIR=str(tmp_path / "logs")),
  )
  assert proc.returncode != 0
  assert "a process failed" in proc.stderr and "--- process 1" in proc.stderr, proc.stderr
  assert "max_new_tokenz" in proc.stderr.split("--- process 1")[1], proc.stderr
  assert not (tmp_path / "w" / "generations.json").exists()


def test_tpu_pod_script_runs_the_job_on_every_worker():
  """DRY_RUN prints the gcloud command: every worker, the same commit, the job
  through tpu_vm.sh with --distributed=on and the flags quoted for the remote shell."""
  proc = subprocess.run(
    [
      "bash",
      os.path.join(ROOT, "launch", "tpu_pod.sh"),
      "my-v4-32",
      "us-central2-b",
      "configs/generate.py",
      "--config.prompts=What is LAG?",
      "--workdir=/tmp/run",
    ],
    capture_output=True,
    text=True,
    timeout=30,
    env={**os.environ, "DRY_RUN": "1", "REPO": "https://example.com/lag_jax.git", "REV": "abc1"},
  )
  assert proc.returncode == 0, proc.stderr
  words = _shell_words(proc.stdout)
  assert words[:7] == [
    "gcloud",
    "compute",
    "tpus",
    "tpu-vm",
    "ssh",
    "my-v4-32",
    "--zone=us-central2-b",
  ]
  assert "--worker=all" in words
  remote = next(w for w in words if w.startswith("--command=")).removeprefix("--command=")
  assert "git checkout -q abc1" in remote
  job = _shell_words(remote.rsplit(";", 1)[1])
  assert job == [
    "launch/tpu_vm.sh",
    "configs/generate.py",
    "--distributed=on",
    "--config.prompts=What is LAG?",
    "--workdir=/tmp/run",
  ]


def _shell_words(text: str) -> list[str]:
  import shlex

  return shlex.split(text)


def test_n1000_launch_runs_each_step_once_in_order(tmp_path):
  """launch/n1000.sh: build -> tune -> test -> the curve sizes -> routing analysis ->
  sketch -> calibrated sketch (recall, then the test half), each step once (a rerun
  after an interruption skips finished steps), each sketch's setting read from the
  analysis' measured recall, results re-rendered and copied out; steps named on the
  command line run alone; a step another copy is running is waited for, then skipped.
  `python -m` is a recorder here (each step's own job is tested by its config's tiny
  variant); `python -` (the launcher's own snippet) runs."""
  bin_dir, log = tmp_path / "bin", tmp_path / "calls.txt"
  bin_dir.mkdir()
  fake = bin_dir / "python"
  index = {
    "k": 20,
    "sizes": {
      "1000": {
        "rows": {
          "exact": {"recall": 1.0, "arrows_read": 1000},
          "sketch 32:80": {"recall": 0.97, "arrows_read": 120},
          "sketch 64:160": {"recall": 0.995, "arrows_read": 230},
          "sketch 128:320": {"recall": 0.999, "arrows_read": 440},
          "sketch 32:80 cal": {"recall": 0.992, "arrows_read": 120},
          "sketch 64:320 cal": {"recall": 0.999, "arrows_read": 380},
        }
      }
    },
  }
  fake.write_text(
    "#!/usr/bin/env bash\n"
    f'[ "$1" = - ] && exec {sys.executable} "$@"\n'
    f'echo "$*" >> {log}\n'
    'for a in "$@"; do case $a in --workdir=*|--out=*) d=${a#*=};; esac; done\n'
    'mkdir -p "$d" && for f in results.json results.md scale.json scale.md scale.png m.png; do '
    'echo x > "$d/$f"; done\n'
    f"echo '{json.dumps(index)}' > \"$d/index_effect.json\"\n"
  )
  fake.chmod(0o755)
  root = tmp_path / "root"
  env = {
    **os.environ,
    "PATH": f"{bin_dir}:{os.environ['PATH']}",
    "ROOT": str(root),
    "OUT": str(tmp_path / "out"),
  }
  script = os.path.join(ROOT, "launch", "n1000.sh")

  def run(*steps, wait=True):
    cmd = ["bash", script, *steps]
    if not wait:
      return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)

  def calls():
    return log.read_text().splitlines() if log.exists() else []

  def steps():
    out = []
    for c in calls():
      if "--workdir=" in c and "lag_jax.eval.report" not in c:
        out.append(c.split("--workdir=")[1].split()[0].rsplit("/", 1)[1])
      elif "lag_jax.eval.curve" in c:
        out.append("curve")
    return out

  proc = run("test_n16", "build")  # these steps alone, in the script's order; no gathering
  assert proc.returncode == 0, proc.stderr
  assert steps() == ["build", "test_n16"] and not (tmp_path / "out").exists()
  proc = run()
  assert proc.returncode == 0, proc.stderr
  order = [
    *("build", "tune", "test", "test_n250", "test_n64", "test_n16"),
    *("scale_tune", "test_sketch", "scale_cal", "test_sketch_cal", "scale_cal10", "curve"),
  ]
  assert steps() == ["build", "test_n16", *order[1:5], *order[6:]]
  # The cheapest sketch with >= 99% recall of the exact top 20.
  sketch_call = next(c for c in calls() if "/test_sketch " in c + " ")
  assert "LAG+sketch(k=20;pool=160;sketch=64;index_prefill=1)" in sketch_call
  assert "finalists=5;pool=160;sketch=64;index_prefill=1)" in sketch_call
  assert "sketch_calibration" not in sketch_call
  # The calibrated sketch's run: the cheapest calibrated setting with >= 99% recall.
  cal_call = next(c for c in calls() if "/test_sketch_cal " in c + " ")
  assert "LAG+sketch(k=20;pool=80;sketch=32;index_prefill=1)" in cal_call
  assert "--config.sketch_calibration=generic" in cal_call
  assert "--config.sketch_ridge=0.001" in cal_call
  scale_cal = next(c for c in calls() if "/scale_cal " in c + " ")
  assert (
    "64:320:cal" in scale_cal
    and "--config.sketch_ridge=0.001" in scale_cal
    and "--config.synthetic.split=tune" in scale_cal
  )
  cal10 = next(c for c in calls() if "/scale_cal10 " in c + " ")
  assert "64:320:cal" in cal10 and "sketch_ridge" not in cal10  # the default ridge
  assert (tmp_path / "out" / "scale_cal10" / "index_effect.json").exists()
  rerendered = [c for c in calls() if "lag_jax.eval.report" in c]
  assert len(rerendered) == 4 and all("--avg_families=QA,Slot" in c for c in rerendered)
  assert "--avg_families=QA,Slot" in calls()[-1]
  assert (tmp_path / "out" / "test" / "results.json").exists()
  assert (tmp_path / "out" / "test" / "m.png").exists()
  assert (tmp_path / "out" / "scale_tune" / "scale.png").exists()
  n = len(steps())
  (root / "tune.done").unlink()
  assert run().returncode == 0
  assert steps()[n:] == ["tune", "curve"]  # only the unfinished step, then the gather
  # Another copy holds the tune step: this one waits for it, then finds it done.
  (root / "tune.done").unlink()
  import fcntl

  with open(root / "tune.lock", "w") as held:
    fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
    proc = run(wait=False)
    time.sleep(2)
    assert proc.poll() is None and steps()[n + 2 :] == []
    (root / "tune.done").touch()
  assert proc.wait(timeout=60) == 0
  assert steps()[n + 2 :] == ["curve"]
  wall = (root / "wall.log").read_text()
  assert "start build" in wall and "done all" in wall and "pool=160;sketch=64" in wall
