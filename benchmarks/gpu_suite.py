"""Everything a GPU lease should run, in one call: the GPU tests, then the kernel and dynamic
benchmarks, each stage with its own time limit, logs written as they go.

    python benchmarks/gpu_suite.py --out $OUT           # tests, gputests, kernels, dynamic
    python benchmarks/gpu_suite.py --out $OUT --stages tests,kernels --budget 540
    python benchmarks/gpu_suite.py --out $OUT --stages vsprofile,kernels --kernel-n 32768

Stages: tests (device tests, compiled: TRITON_INTERPRET=0), gputests (the gpu-marked tests of
files that otherwise test the interpreter on CPU tensors), kernels (benchmarks/kernels.py),
dynamic (benchmarks/dynamic.py --quick), records (benchmarks/latency_records.py:
the tuner's latency records into OUT/records), vsprofile (vertical-slash per-kernel profile),
dyntests (kernel and dynamic tests again, after the benchmarks), gpumarked (only the
gpu-marked tests of the dynamic, gate and kernel files). Stages run in the order given;
a stage that times out or fails is reported and the next one runs. Each stage's output goes to
OUT/<stage>.log (the tail of each is printed at the end), so a lease that ends early still
returns what was measured.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

# name -> (command, share of the budget)
STAGES: dict[str, tuple[list[str], float]] = {
    # Tests whose tensors follow the device (run compiled), then the gpu-marked tests of files
    # that otherwise test the interpreter on CPU tensors (those need TRITON_INTERPRET=1).
    "tests": ([sys.executable, "-m", "pytest", "-q", "-x", "tests/test_kernel.py",
               "tests/test_dynamic.py", "tests/test_apply_gpu.py"], 0.15),
    "gputests": ([sys.executable, "-m", "pytest", "-q", "-m", "gpu", "tests/test_artifacts.py",
                  "tests/test_tune.py", "tests/test_gate.py", "tests/test_flex.py",
                  "tests/test_hopper.py"], 0.05),
    "kernels": ([sys.executable, os.path.join(HERE, "kernels.py"), "--n", "8192,32768,131072",
                 "--rep", "40"],
                0.55),
    "dynamic": ([sys.executable, os.path.join(HERE, "dynamic.py"), "--quick"], 0.25),
    # Latency records for the head tuner at SmolLM2-135M's shapes (9 heads, 3 KV heads, D 64).
    "records": ([sys.executable, os.path.join(HERE, "latency_records.py"), "--n",
                 "2048,4096,8192", "--heads", "9", "--kv-heads", "3", "--dim", "64"], 0.3),
    "vsprofile": ([sys.executable, os.path.join(HERE, "dynamic.py"), "--profile", "--n",
                   "131072"], 0.1),
    # Only the gpu-marked tests of the device and gate files (graphs, bf16 kernels).
    "gpumarked": ([sys.executable, "-m", "pytest", "-q", "-m", "gpu", "tests/test_dynamic.py",
                   "tests/test_gate.py", "tests/test_kernel.py"], 0.1),
    "dyntests": ([sys.executable, "-m", "pytest", "-q", "-x", "tests/test_dynamic.py",
                  "tests/test_kernel.py"], 0.1),
}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="folder for the logs and tables")
    ap.add_argument("--stages", default="tests,gputests,kernels,dynamic",
                    help=f"comma-separated, in order; known: {', '.join(STAGES)}")
    ap.add_argument("--budget", type=float, default=540.0, help="seconds for all stages")
    ap.add_argument("--kernel-n", default=None, help="lengths for the kernels stage (8192,...)")
    ap.add_argument("--patterns", default=None, help="cases for the kernels stage")
    ap.add_argument("--kernel-dim", default=None, help="head dim for the kernels stage")
    ap.add_argument("--limits", default="",
                    help="per-stage seconds overriding the shares, e.g. records=240,dynamic=70")
    a = ap.parse_args(argv)
    os.makedirs(a.out, exist_ok=True)
    env = dict(os.environ, TRITON_INTERPRET="0")
    names = [s for s in a.stages.split(",") if s]
    unknown = [s for s in names if s not in STAGES]
    if unknown:
        print(f"unknown stage(s) {', '.join(unknown)}; known: {', '.join(STAGES)}",
              file=sys.stderr)
        return 1
    fixed = dict(x.split("=") for x in a.limits.split(",") if x)
    t_start = time.monotonic()
    summary = []
    for i, name in enumerate(names):
        cmd, share = STAGES[name]
        left = a.budget - (time.monotonic() - t_start)
        # Later stages get their share of what is left, so an early finish helps them.
        rest = sum(STAGES[s][1] for s in names[i:])
        limit = max(10.0, left * share / rest if rest else left)
        if name in fixed:
            limit = min(float(fixed[name]), max(10.0, left))
        if name == "records":
            cmd = cmd + ["--out", os.path.join(a.out, "records"), "--budget",
                         str(max(10.0, limit - 30))]
        if name == "kernels":
            if a.kernel_n:
                cmd = [a.kernel_n if c == "8192,32768,131072" else c for c in cmd]
            if a.patterns:
                cmd = cmd + ["--patterns", a.patterns]
            if a.kernel_dim:
                cmd = cmd + ["--dim", a.kernel_dim]
            cmd = cmd + ["--log", os.path.join(a.out, "kernels.txt"),
                         "--out", os.path.join(a.out, "kernels.md")]
        log = os.path.join(a.out, f"{name}.log")
        t0 = time.monotonic()
        with open(log, "w") as f:
            try:
                rc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT,
                                    timeout=limit).returncode
                status = f"rc {rc}"
            except subprocess.TimeoutExpired:
                status = f"timed out after {limit:.0f} s"
        summary.append(f"{name}: {status} in {time.monotonic() - t0:.0f} s")
        if name == "records" and os.path.isdir(os.path.join(a.out, "records")):
            # One archive instead of a hundred small files (the lease returns few files).
            import shutil

            rec = os.path.join(a.out, "records")
            shutil.make_archive(rec, "gztar", rec)
            shutil.rmtree(rec)
    for name in names:
        log = os.path.join(a.out, f"{name}.log")
        with open(log) as f:
            lines = [x for x in f.read().splitlines() if "warn" not in x.lower()]
        print(f"===== {name} (last lines)")
        print("\n".join(lines[-25:]))
    print("\n".join(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
