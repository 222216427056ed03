"""launch/: each script's dry run prints the expected commands, a real run (against stand-ins for
gcloud, xpk and srun) hands hs2p exactly the intended arguments, and shellcheck finds nothing."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH = os.path.join(REPO, "launch")
SCRIPTS = ["tpu_vm.sh", "xpk.sh", "slurm.sbatch"]
CONFIG = "configs/paper/llama-3.1-70b/regression_helpfulness.yaml"
OUT = "/mnt/shared/runs/regression 70b"  # a space, to check the quoting
HS2P = f"-m hs2p_jax train-rm --config {CONFIG} --out"
CACHE = ["--set", f"dist.compile_cache={OUT}/compile_cache"]  # the launchers' compilation cache

# A stand-in for a launcher (gcloud, xpk, srun) or for python: appends its arguments, one per
# line, and a blank line, to $CALLS.
RECORDER = '#!/usr/bin/env bash\nprintf "%s\\n" "$(basename "$0")" "$@" "" >> "$CALLS"\n'
# srun's stand-in runs its command as task 1 of 2 after recording the call.
SRUN = RECORDER + 'while [[ $1 == --* ]]; do shift; done\nSLURM_NTASKS=2 SLURM_PROCID=1 exec "$@"\n'


def launch(script: str, *args: str, env: dict | None = None, path: str | None = None) -> subprocess.CompletedProcess:
  base = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "TPU_", "DRY_RUN"))}
  if path:
    base["PATH"] = path + os.pathsep + base["PATH"]
  return subprocess.run(["bash", os.path.join(LAUNCH, script), *args], capture_output=True, text=True,
                        env={**base, **(env or {})}, cwd=REPO, timeout=60)


def calls(path) -> list[list[str]]:
  """The recorded calls: [program, arg, ...] each."""
  out, cur = [], []
  for line in open(path).read().split("\n")[:-1]:
    if line == "" and cur:
      out.append(cur)
      cur = []
    else:
      cur.append(line)
  return out


@pytest.fixture
def fakes(tmp_path):
  """A bin/ directory of stand-ins, and the file they record to."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  for name, body in (("gcloud", RECORDER), ("xpk", RECORDER), ("srun", SRUN), ("python3", RECORDER)):
    (bin_dir / name).write_text(body)
    (bin_dir / name).chmod(0o755)
  return str(bin_dir), tmp_path / "calls.txt"


TPU_ENV = {"TPU_NAME": "my-v5p", "ZONE": "us-east5-a", "REPO_URL": "https://example.com/org/hs2p-jax.git"}
XPK_ENV = {"CLUSTER": "my-cluster", "TPU_TYPE": "v5p-128"}


def test_tpu_vm_dry_run_prints_install_and_run_on_every_worker():
  proc = launch("tpu_vm.sh", "--dry-run", CONFIG, OUT, "--set", "train.steps=3", env={**TPU_ENV, "PROJECT": "p1"})
  assert proc.returncode == 0, proc.stderr
  install, run = proc.stdout.strip().split("\n")
  for line in (install, run):
    assert line.startswith("gcloud compute tpus tpu-vm ssh my-v5p --zone us-east5-a --worker=all --project p1 ")
  assert "git clone --quiet https://example.com/org/hs2p-jax.git hs2p-jax" in install and '"jax[tpu]"' in install
  assert "cd hs2p-jax && { n=0; while true; do python3 " in run and "--set train.steps=3" in run
  # The printed line is a shell command: it splits back into the same arguments, the hs2p call among them.
  remote = shlex.split(shlex.split(run)[-1])
  start = remote.index("python3")
  assert remote[:start] == ["cd", "hs2p-jax", "&&", "{", "n=0;", "while", "true;", "do"]
  assert remote[start:start + 11] == ["python3", *HS2P.split(), OUT, "--set", "train.steps=3", *CACHE[:1]]


def test_tpu_vm_runs_hs2p_with_the_arguments_given(fakes, tmp_path):
  bin_dir, record = fakes
  env = {**TPU_ENV, "SKIP_INSTALL": "1", "CALLS": str(record)}
  proc = launch("tpu_vm.sh", CONFIG, OUT, "--set", "model.reward_weights=it's", env=env, path=bin_dir)
  assert proc.returncode == 0, proc.stderr
  [gcloud] = calls(record)
  assert gcloud[:7] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "my-v5p", "--zone"]
  (tmp_path / "hs2p-jax").mkdir()  # what the worker's shell does with the remote command
  subprocess.run(["bash", "-c", gcloud[-1]], cwd=tmp_path, check=True,
                 env={**os.environ, "PATH": bin_dir + os.pathsep + os.environ["PATH"], "CALLS": str(record)})
  assert calls(record)[-1] == ["python3", *HS2P.split(), OUT, "--set", "model.reward_weights=it's", *CACHE]


def test_xpk_dry_run_creates_a_workload():
  proc = launch("xpk.sh", CONFIG, OUT, env={**XPK_ENV, "DRY_RUN": "1", "ZONE": "us-east5-a", "WORKLOAD": "rm70b"})
  assert proc.returncode == 0, proc.stderr
  line = proc.stdout.strip()
  assert line.startswith("xpk workload create --cluster my-cluster --workload rm70b --tpu-type v5p-128 --num-slices 1 "
                         "--max-restarts 3")
  assert f"--base-docker-image python:3.11 --script-dir {REPO}" in line and "--zone us-east5-a" in line
  command = shlex.split(shlex.split(line)[-1])
  assert command[:10] == ["python3", "-m", "pip", "install", "--quiet", "-e", ".", "jax[tpu]", "&&", "{"]
  assert f"python3 {HS2P}" in shlex.split(line)[-1]


def test_xpk_with_an_image_only_runs_hs2p(fakes):
  bin_dir, record = fakes
  env = {**XPK_ENV, "DOCKER_IMAGE": "gcr.io/p/hs2p:1", "NUM_SLICES": "2", "CALLS": str(record)}
  proc = launch("xpk.sh", CONFIG, OUT, env=env, path=bin_dir)
  assert proc.returncode == 0, proc.stderr
  [xpk] = calls(record)
  assert xpk[:3] == ["xpk", "workload", "create"] and xpk[xpk.index("--num-slices") + 1] == "2"
  assert xpk[xpk.index("--docker-image") + 1] == "gcr.io/p/hs2p:1" and "--base-docker-image" not in xpk
  subprocess.run(["bash", "-c", xpk[-1]], check=True,  # what the container's shell does with the command
                 env={**os.environ, "PATH": bin_dir + os.pathsep + os.environ["PATH"], "CALLS": str(record)})
  assert calls(record)[-1] == ["python3", *HS2P.split(), OUT, *CACHE]


def test_slurm_dry_run_passes_the_dist_keys():
  proc = launch("slurm.sbatch", "--dry-run", CONFIG, OUT, env={"SLURM_JOB_ID": "123"})
  assert proc.returncode == 0, proc.stderr
  line = proc.stdout.strip()
  assert line.startswith("srun --kill-on-bad-exit=1 bash -c ")
  for piece in (f"python3 {HS2P}", "--set dist.coordinator=", ":20123 dist.num_processes=$SLURM_NTASKS",
                "dist.process_id=$SLURM_PROCID"):
    assert piece in line
  auto = launch("slurm.sbatch", "--dry-run", CONFIG, OUT, env={"DIST": "auto"}).stdout
  assert f"python3 {HS2P}" in auto and "dist.coordinator" not in auto and "dist.process_id" not in auto


@pytest.mark.parametrize("procs", ["gpu", "node"])
def test_slurm_tasks_get_their_process_ids(fakes, procs):
  bin_dir, record = fakes
  env = {"CALLS": str(record), "PROCS": procs, "GPUS_PER_NODE": "4", "PORT": "4321"}
  proc = launch("slurm.sbatch", CONFIG, OUT, "--set", "train.steps=3", env=env, path=bin_dir)
  assert proc.returncode == 0, proc.stderr
  srun, python = calls(record)
  assert srun[:2] == ["srun", "--kill-on-bad-exit=1"] and ("--ntasks-per-node=1" in srun) == (procs == "node")
  host = subprocess.run(["hostname"], capture_output=True, text=True).stdout.strip()
  dist = [f"dist.coordinator={host}:4321", "dist.num_processes=2", "dist.process_id=1"]
  if procs == "node":
    dist.append("dist.local_device_ids=[0,1,2,3]")
  assert python == ["python3", *HS2P.split(), OUT, "--set", "train.steps=3", *CACHE, "--set", *dist]


# A python3 stand-in that records its call and exits 75 ("resume me") until it has been called $RESUMES times.
RESUMING = RECORDER + ('n=$(grep -c "^python3$" "$CALLS")\n'
                       'if [ "$n" -le "${RESUMES:-0}" ]; then exit 75; fi\n')


@pytest.mark.parametrize("script", SCRIPTS)
@pytest.mark.parametrize("max_resumes", [3, 1])
def test_every_launcher_relaunches_on_the_resume_status(fakes, tmp_path, script, max_resumes):
  bin_dir, record = fakes
  (tmp_path / "bin" / "python3").write_text(RESUMING)
  env = {"CALLS": str(record), "RESUMES": "2", "MAX_RESUMES": str(max_resumes), "PORT": "4321",
         **(TPU_ENV if script == "tpu_vm.sh" else XPK_ENV if script == "xpk.sh" else {}),
         "SKIP_INSTALL": "1", "DOCKER_IMAGE": "img"}
  proc = launch(script, CONFIG, OUT, env=env, path=bin_dir)
  if script != "slurm.sbatch":  # run the remote / container command as the host's shell would
    (tmp_path / "hs2p-jax").mkdir(exist_ok=True)
    proc = subprocess.run(["bash", "-c", calls(record)[-1][-1]], cwd=tmp_path, capture_output=True, text=True,
                          env={**os.environ, **env, "PATH": bin_dir + os.pathsep + os.environ["PATH"]})
  runs = [c for c in calls(record) if c[0] == "python3"]
  assert len(runs) == min(3, max_resumes + 1) and proc.returncode == (0 if max_resumes >= 2 else 75), proc.stderr
  assert "hs2p exited 75 (resume me): relaunch 1 of" in proc.stderr


def test_missing_settings_are_named():
  proc = launch("tpu_vm.sh", "--dry-run", CONFIG, OUT, env={"ZONE": "z"})
  assert proc.returncode == 2 and "set TPU_NAME" in proc.stderr
  proc = launch("xpk.sh", "--dry-run", CONFIG, env=XPK_ENV)
  assert proc.returncode == 2 and "usage:" in proc.stderr
  proc = launch("slurm.sbatch", "--dry-run", CONFIG, OUT, env={"PROCS": "node", "DIST": "auto"})
  assert proc.returncode == 2 and "PROCS=node needs DIST=explicit" in proc.stderr


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck not installed (apt-get install shellcheck)")
def test_shellcheck_is_clean():
  proc = subprocess.run(["shellcheck", "-x", *SCRIPTS, "common.sh"], capture_output=True, text=True, cwd=LAUNCH)
  assert proc.returncode == 0, proc.stdout + proc.stderr
