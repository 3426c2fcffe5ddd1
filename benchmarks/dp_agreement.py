"""Data-parallel SPD against one process: agreement of the final components and step time.

    python benchmarks/dp_agreement.py [--nproc 2] [--json out.json] [--only tms|llama]
        [--device cpu|cuda]

For each case, `spdkit run` once in one process and once with `--nproc N` (torchrun, gloo on a
CPU, NCCL on CUDA), the second reusing the first's target, the same config and global batch;
then the largest relative difference ‖a − b‖ / ‖a‖ over the tensors of components.safetensors,
and each run's training ms per step (its summary's timing: the loop only, no target training,
planning or evaluation). A control pair isolates float summation order: the same one-process
run with a different thread count (OMP_NUM_THREADS 1 against 2), which changes only the order
in which CPU kernels add; its difference is printed next to the data-parallel one.

  tms      bundled tms_5-2, 200 steps
  llama    the Llama-style LM of benchmarks/bench_lm.py (8 layers, d_model 256, MLP 1024,
           vocabulary 8192; random init, saved with save_pretrained), bundled hf_lm config
           (all MLP matrices, C 256, subset routing, KL) on random tokens, 50 steps
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_lm import build_llama  # noqa: E402

SPDKIT = [sys.executable, "-m", "spdkit"]


def case_args(name: str, work: Path) -> list[str]:
    if name == "tms":
        return ["tms_5-2", "--steps", "200"]
    model_dir = work / "llama"
    if not model_dir.exists():
        build_llama().save_pretrained(model_dir)
    sets = ["target.data=random_tokens", "eval.n_eval_samples=16", "eval.pgd_steps=[2]"]
    args = ["hf_lm", "--target-hf", str(model_dir), "--steps", "50"]
    for s in sets:
        args += ["--set", s]
    return args


def run(args: list[str], out: Path, extra: list[str], device: str, threads: int = 1) -> dict:
    cmd = [*SPDKIT, "run", *args, "--out", str(out), "--quiet", "--device", device, *extra]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    result = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{result.stderr[-3000:]}")
    return json.loads((out / "summary.json").read_text())


def relative_gaps(a: Path, b: Path) -> dict[str, float]:
    """‖a − b‖ / ‖a‖ per tensor of components.safetensors, largest first."""
    from spdkit.store.runs import load_tensors

    ta, _ = load_tensors(a / "components.safetensors")
    tb, _ = load_tensors(b / "components.safetensors")
    gaps = {k: float((ta[k] - tb[k]).norm() / ta[k].norm().clamp_min(1e-30)) for k in ta}
    return dict(sorted(gaps.items(), key=lambda kv: -kv[1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--only", choices=["tms", "llama"], default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", type=Path, default=None)
    opts = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for name in [opts.only] if opts.only else ["tms", "llama"]:
            args = case_args(name, work)
            one = run(args, work / f"{name}-1", [], opts.device)
            many = run(
                args,
                work / f"{name}-{opts.nproc}",
                ["--nproc", str(opts.nproc), "--target", str(work / f"{name}-1")],
                opts.device,
            )
            control = work / f"{name}-1-2threads"
            run(args, control, ["--target", str(work / f"{name}-1")], opts.device, threads=2)
            gaps = relative_gaps(work / f"{name}-1", work / f"{name}-{opts.nproc}")
            control_gaps = relative_gaps(work / f"{name}-1", control)
            row = {
                "case": name,
                "nproc": opts.nproc,
                "threads_per_process": 1,
                "max_relative_difference": max(gaps.values()),
                "largest": dict(list(gaps.items())[:3]),
                "control_1_vs_2_threads_max": max(control_gaps.values()),
                "control_largest": dict(list(control_gaps.items())[:3]),
                "ms_per_step_1": one["timing"]["ms_per_step"],
                f"ms_per_step_{opts.nproc}": many["timing"]["ms_per_step"],
                "cores": len(os.sched_getaffinity(0)),
            }
            print(json.dumps(row), flush=True)
            rows.append(row)
    if opts.json:
        opts.json.write_text(json.dumps({"device": opts.device, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
