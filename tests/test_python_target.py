"""Targets from Python factories: `spdkit run CONFIG --target-factory M:F --data-factory M:G`."""

import json
from dataclasses import dataclass

import torch
import yaml
from typer.testing import CliRunner

from spdkit.cli import app
from tests.helpers import Net, tiny_tms_dict


@dataclass(frozen=True)
class GaussianData:
    width: int

    def sample(self, batch_size: int, generator: torch.Generator) -> torch.Tensor:
        return torch.randn(batch_size, self.width, generator=generator)


def gaussian_data() -> GaussianData:
    return GaussianData(6)


def seeded_net() -> Net:
    torch.manual_seed(123)
    return Net()


def config_file(tmp_path) -> str:
    data = tiny_tms_dict(modules=[{"pattern": "layers.*.mlp_in", "C": 6}], steps=12)
    path = tmp_path / "mine.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def test_run_and_eval_a_model_from_a_factory(tmp_path):
    run_dir = tmp_path / "run"
    args = ["run", config_file(tmp_path), "--out", str(run_dir), "--quiet"]
    args += ["--target-factory", "tests.test_python_target:seeded_net"]
    args += ["--data-factory", "tests.test_python_target:gaussian_data"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert config["target"]["kind"] == "python"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert set(summary["modules"]) == {"layers.0.mlp_in", "layers.1.mlp_in"}
    # the saved target is the factory's model, weight for weight
    from safetensors.torch import load_file

    saved = load_file(run_dir / "target.safetensors")
    assert torch.equal(saved["head.weight"], seeded_net().head.weight)
    result = CliRunner().invoke(app, ["eval", str(run_dir)])
    assert result.exit_code == 0, result.output
    assert json.loads((run_dir / "summary.json").read_text())["modules"] == summary["modules"]


def test_bad_factories_are_one_line_errors(tmp_path):
    cases = [
        (["--target-factory", "tests.test_python_target:seeded_net"], "go together"),
        (
            ["--target-factory", "no_such_pkg:f", "--data-factory", "tests.test_model:Net"],
            "cannot import 'no_such_pkg'",
        ),
        (
            ["--target-factory", "tests.test_model:nope", "--data-factory", "tests.test_model:Net"],
            "has no attribute 'nope'",
        ),
        (
            ["--target-factory", "not dotted", "--data-factory", "tests.test_model:Net"],
            "target.factory",
        ),
        (
            [
                "--target-factory",
                "tests.test_python_target:seeded_net",
                "--data-factory",
                "tests.test_python_target:seeded_net",
            ],
            "without sample",
        ),
    ]
    for i, (extra, message) in enumerate(cases):
        out = tmp_path / f"run{i}"
        result = CliRunner().invoke(app, ["run", config_file(tmp_path), "--out", str(out), *extra])
        assert result.exit_code == 2, (extra, result.output)
        lines = result.output.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], lines
