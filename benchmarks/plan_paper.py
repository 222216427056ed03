"""Compiles the paper configs for the pods their headers name and prints one JSON object.

Every config in configs/paper/ and configs/helpsteer3/ that names its target in a header line
  # target: CHIP x N (mesh data=D fsdp=F tensor=T)
is planned with `hs2p plan --chip CHIP --devices N --compile tpu` (TPU targets; needs the [tpu]
extra, no TPU) or `--compile host` otherwise, each in its own process. Per config: whether the step
compiled, the compiled peak per chip against HBM, compiled FLOPs per chip over the model's share
(a replicated batch would show as the device count), the step time at 50% MFU, warnings, and how
long the compile took.

  python benchmarks/plan_paper.py                       # every config with a target
  python benchmarks/plan_paper.py --only 70b/regression_helpfulness 8b/bt_scaled
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import subprocess
import sys
import time

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
TARGET = re.compile(r"^# target: (\w+) x (\d+)", re.M)
GiB = 1 << 30


def targets(only: list[str]) -> list[tuple[str, str, int]]:
  out = []
  paths = [p for group in ("paper", "helpsteer3") for p in glob.glob(os.path.join(ROOT, "configs", group, "*", "*.yaml"))]
  for path in sorted(paths):
    rel = os.path.relpath(path, os.path.join(ROOT, "configs"))
    if only and not any(o in rel for o in only):
      continue
    m = TARGET.search(open(path, encoding="utf-8").read())
    if m:
      out.append((rel, m.group(1), int(m.group(2))))
  return out


def plan(rel: str, chip: str, devices: int) -> dict:
  mode = "tpu" if chip.startswith("v") else "host"
  cmd = [sys.executable, "-m", "hs2p_jax", "plan", "--config", os.path.join(ROOT, "configs", rel),
         "--chip", chip, "--devices", str(devices), "--compile", mode]
  t0 = time.time()
  proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
  seconds = round(time.time() - t0, 1)
  if proc.returncode:
    return {"config": rel, "error": proc.stderr.strip().splitlines()[-1:], "seconds": seconds}
  text = proc.stdout
  r = json.loads(text[text.index("\n{") + 1:] if not text.startswith("{") else text)
  c, a = r["compiled"], r["analytic"]
  return {"config": rel, "target": f"{chip} x {devices}", "mesh": r["target"]["mesh"],
          "attention": r["model"]["attention"], "compiled": c["status"], "compiler": c.get("compiler"),
          "peak_gib": round(c["peak"] / GiB, 2) if c["status"] == "ok" else None,
          "hbm_gib": round(r["target"]["hbm"] / GiB, 2) if r["target"]["hbm"] else None,
          "fits": r["verdict"]["fits"], "basis": r["verdict"]["basis"], "flops_ratio": c.get("flops_ratio"),
          "step_seconds_at_50_mfu": a.get("step_seconds_at_50_mfu"), "warnings": r["warnings"],
          "resident_gib": {k: round(v / GiB, 2) for k, v in a.get("resident", {}).items()},
          "phase_peaks_gib": {ph: round(p["peak"] / GiB, 2) for ph, p in c.get("phases", {}).items()},
          "seconds": seconds}


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--only", nargs="*", default=[], help="substrings of config paths to plan")
  args = ap.parse_args()
  rows = []
  for rel, chip, devices in targets(args.only):
    print(f"planning {rel} for {chip} x {devices} ...", file=sys.stderr, flush=True)
    rows.append(plan(rel, chip, devices))
    print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
  print(json.dumps({"plans": rows}, indent=2))


if __name__ == "__main__":
  main()
