"""The package as a user installs it: `python -m build` gives an sdist and a wheel holding the
C++ sources, configs and report files; the wheel installed (not editable) runs a decomposition,
and without a C++ compiler the eager path runs with a one-line note."""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = ("engine/csrc/ci_mlp.cpp", "configs/tms_5-2.yaml", "analysis/report/static/live.js")


@pytest.fixture(scope="module")
def dists(tmp_path_factory) -> Path:
    pytest.importorskip("build")
    out = tmp_path_factory.mktemp("dist")
    build_dir = tmp_path_factory.mktemp("src")
    # build from a copy: the build writes egg-info and build/ next to the sources
    subprocess.run(["git", "clone", "-q", str(ROOT), str(build_dir / "spdkit")], check=True)
    for path in (ROOT / "src").rglob("*"):  # the working tree's files, committed or not
        if path.is_file() and "__pycache__" not in path.parts:
            dest = build_dir / "spdkit" / path.relative_to(ROOT)
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(path.read_bytes())
    for name in ("pyproject.toml", "README.md", "MANIFEST.in"):
        if (ROOT / name).is_file():
            (build_dir / "spdkit" / name).write_bytes((ROOT / name).read_bytes())
    cmd = [sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), "."]
    subprocess.run(cmd, cwd=build_dir / "spdkit", check=True, capture_output=True)
    return out


def test_sdist_and_wheel_ship_the_sources_configs_and_report_files(dists):
    (wheel,) = dists.glob("*.whl")
    (sdist,) = dists.glob("*.tar.gz")
    names = zipfile.ZipFile(wheel).namelist()
    assert all(f"spdkit/{f}" in names for f in SHIPPED)
    with tarfile.open(sdist) as tar:
        members = tar.getnames()
    assert all(any(m.endswith(f"src/spdkit/{f}") for m in members) for f in SHIPPED)


def _run(site: Path, env: dict, args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    code = "import sys, spdkit.cli; print('spdkit from', spdkit.__file__, file=sys.stderr); "
    code += "sys.argv = ['spdkit', *sys.argv[1:]]; spdkit.cli.main()"
    return subprocess.run(
        [sys.executable, "-c", code, *args],
        env={**env, "PYTHONPATH": str(site)},
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=900,
    )


def test_the_installed_wheel_runs_with_and_without_a_compiler(dists, tmp_path):
    (wheel,) = dists.glob("*.whl")
    site = tmp_path / "site"
    pip = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site)]
    subprocess.run([*pip, str(wheel)], check=True, capture_output=True)
    env = {k: v for k, v in os.environ.items() if k != "SPDKIT_NO_FUSED"}  # the kernel cache too
    args = ["run", "tms_5-2", "--steps", "100", "--quiet", "--set", "target.train_steps=300"]
    done = _run(site, env, [*args, "--out", str(tmp_path / "run")], tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"spdkit from {site}" in done.stderr  # the wheel, not the editable checkout
    assert (tmp_path / "run" / "summary.json").is_file()
    # no compiler: a fresh kernel cache and a compiler that does not exist
    no_cxx = {**env, "CXX": str(tmp_path / "no-such-c++"), "CC": str(tmp_path / "no-such-cc")}
    no_cxx["SPDKIT_KERNEL_CACHE"] = str(tmp_path / "kernels-none")
    done = _run(site, no_cxx, [*args, "--out", str(tmp_path / "eager")], tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    notes = [line for line in done.stderr.splitlines() if "fused CI kernel unavailable" in line]
    assert len(notes) == 1 and "using the eager implementation" in notes[0]
    assert len(notes[0]) < 400  # one line, not the compiler's whole output
    assert (tmp_path / "eager" / "summary.json").is_file()
