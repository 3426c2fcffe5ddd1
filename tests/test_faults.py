"""Faults of the machine rather than the config: a disk that fills up during a checkpoint
write, an output directory that cannot be written. The full disk is simulated where the OS
reports it, in os.write; everything else is a real run."""

import errno
import os
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from spdkit.cli import app
from spdkit.config import parse_config
from spdkit.pipeline.run import resume_run, run_experiment
from spdkit.store import runs
from tests.helpers import tiny_tms_dict


def short_run_dict() -> dict:
    """Checkpoints at steps 10, 20, 30, 40; about a second of training."""
    data = tiny_tms_dict(steps=40, checkpoint_every=10, log_every=10)
    data["target"]["train_steps"] = 200
    return data


def fill_disk_at_checkpoint(monkeypatch: pytest.MonkeyPatch, nth: int) -> None:
    """From the nth checkpoint file written on, the disk is full: os.write puts the first half
    of the data on disk (a short write), then fails with ENOSPC, as a real full disk does."""
    real_write = os.write
    temp_files: list[str] = []

    def write(fd: int, data: bytes) -> int:
        try:
            name = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            return real_write(fd, data)
        if ".latest.safetensors." not in name:
            return real_write(fd, data)
        if name not in temp_files:
            temp_files.append(name)
        if len(temp_files) < nth:
            return real_write(fd, data)
        if os.fstat(fd).st_size == 0 and len(data) > 1:
            return real_write(fd, bytes(data[: len(data) // 2]))
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "write", write)


def permissions_are_enforced(tmp_path: Path) -> bool:
    """False for root with CAP_DAC_OVERRIDE, which writes into a 0o500 directory anyway; a
    probe rather than `geteuid() == 0`, so root without that capability still runs the test."""
    probe = tmp_path / "probe"
    probe.mkdir(mode=0o500)
    try:
        (probe / "file").touch()
    except PermissionError:
        return True
    finally:
        probe.chmod(0o700)
    return False


needs_proc = pytest.mark.skipif(
    not Path("/proc/self/fd").is_dir(), reason="the simulation finds file names in /proc"
)


@needs_proc
def test_full_disk_during_a_checkpoint_keeps_the_last_one(tmp_path, monkeypatch):
    """The step-20 checkpoint hits a full disk: the error names the file and the reason, the
    step-10 checkpoint is intact, no half-written temp file is left, and after the disk is
    freed `resume` finishes bit-identical to a run that never failed."""
    config = parse_config(short_run_dict())
    run_experiment(config, tmp_path / "reference", progress=False)
    fill_disk_at_checkpoint(monkeypatch, nth=2)
    out = tmp_path / "run"
    with pytest.raises(OSError) as err:
        run_experiment(config, out, progress=False)
    assert err.value.errno == errno.ENOSPC
    assert f"cannot write {out / runs.CHECKPOINT}: no space left on device" in str(err.value)
    assert sorted(p.name for p in out.rglob("*") if p.name.endswith(".tmp")) == []
    _, meta = runs.load_tensors(out / runs.CHECKPOINT)
    assert meta["step"] == "10"
    assert not (out / "components.safetensors").exists()

    monkeypatch.undo()  # space freed
    resume_run(out, progress=False)
    expected, _ = runs.load_tensors(tmp_path / "reference" / "components.safetensors")
    got, _ = runs.load_tensors(out / "components.safetensors")
    assert set(got) == set(expected)
    assert all(torch.equal(got[k], expected[k]) for k in expected)


@pytest.mark.parametrize("fault", ["full disk", "read-only parent", "parent is a file"])
def test_write_failures_are_one_line_cli_errors(tmp_path, monkeypatch, fault):
    """`spdkit run` into a place it cannot write: exit status 2 and exactly one line that names
    the path and the reason, never a traceback."""
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(short_run_dict()))
    parent = tmp_path / "parent"
    out = parent / "run"
    if fault == "full disk":
        if not Path("/proc/self/fd").is_dir():
            pytest.skip("the simulation finds file names in /proc")
        fill_disk_at_checkpoint(monkeypatch, nth=2)
        expected = (
            f"cannot write {out / runs.CHECKPOINT}: no space left on device; the last complete "
            f"checkpoint is kept; once fixed, `spdkit resume {out}`"
        )
    elif fault == "read-only parent":
        if not permissions_are_enforced(tmp_path):
            pytest.skip("running as root: directory permissions are not enforced")
        parent.mkdir(mode=0o500)
        expected = f"output directory {out} is not writable (Permission denied)"
    else:
        parent.write_text("")
        expected = f"output directory {out} is not writable (Not a directory)"
    try:
        result = CliRunner().invoke(app, ["run", str(config), "--out", str(out), "--quiet"])
    finally:
        if parent.is_dir():
            parent.chmod(0o700)  # so that pytest can clean up
    assert result.exit_code == 2, result.output
    assert result.output.strip().splitlines() == [f"error: {expected}"]


def test_run_files_are_readable_by_others_as_the_umask_allows(tmp_path):
    """mkstemp creates 0600 files; run directories are shared, so writes follow the umask."""
    from spdkit.store import runs

    runs.atomic_write_text(tmp_path / "a.json", "{}")
    mask = os.umask(0)
    os.umask(mask)
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o666 & ~mask


def test_tensors_are_saved_without_copies_except_where_storage_is_shared(tmp_path):
    """A checkpoint's tensors go to the file as they are (a copy of each made a save hold three
    times the checkpoint); only a tensor sharing storage with one before it (a tied weight, a
    view) is copied, since safetensors refuses shared storage. Both read back exactly."""
    from spdkit.store.atomic import load_tensors, save_tensors, unshared_cpu

    w = torch.randn(4, 3)
    own = torch.randn(5)
    tensors = {"w": w, "tied": w, "row": w[1], "own": own}
    out = unshared_cpu(tensors)
    assert out["w"].data_ptr() == w.data_ptr() and out["own"].data_ptr() == own.data_ptr()
    assert out["tied"].data_ptr() != w.data_ptr() and out["row"].data_ptr() != w[1].data_ptr()
    save_tensors(tmp_path / "t.safetensors", tensors)
    back, _ = load_tensors(tmp_path / "t.safetensors")
    assert all(torch.equal(back[k], v) for k, v in tensors.items())


def test_an_atomic_copy_that_fails_midway_leaves_the_old_file(tmp_path, monkeypatch):
    """A copy is streamed into a temp file beside the destination and renamed over it: a
    failure mid-copy leaves the old destination whole and no temp file."""
    from spdkit import files

    src, dst = tmp_path / "src.bin", tmp_path / "dst.bin"
    src.write_bytes(bytes(range(256)) * 64)
    dst.write_bytes(b"old")
    files.atomic_copy(src, dst)
    assert dst.read_bytes() == src.read_bytes()
    dst.write_bytes(b"old")

    def fail_after_first_block(source, fd, chunk=1 << 22):
        files._write_all(fd, source.read(100))
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(files, "_copy_into", fail_after_first_block)
    with pytest.raises(OSError, match="no space left on device"):
        files.atomic_copy(src, dst)
    assert dst.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dst.bin", "src.bin"]
