"""training.candidates: several starts on one target, the lowest-loss one finished."""

import json

import torch

from spdkit.config import parse_config
from spdkit.pipeline.candidates import SEED_STRIDE, selection_step
from spdkit.pipeline.run import resume_run, run_experiment
from spdkit.store import runs
from tests.helpers import tiny_tms_dict


def _config(**overrides):
    data = tiny_tms_dict(steps=30, log_every=5, checkpoint_every=10, **overrides)
    data["target"]["train_steps"] = 200
    data["training"] = {"candidates": 3, "select_frac": 0.5}
    return parse_config(data)


def test_the_lowest_loss_start_is_finished_exactly_as_a_run_from_it(tmp_path):
    config = _config()
    out = tmp_path / "picked"
    run_experiment(config, out, progress=False)
    record = json.loads((out / "candidates.json").read_text())
    totals = [c["total"] for c in record["candidates"]]
    assert len(totals) == 3 and record["chosen"] == totals.index(min(totals))
    assert record["selection_step"] == selection_step(config) == 15
    assert [c["seed"] for c in record["candidates"]] == [0, SEED_STRIDE, 2 * SEED_STRIDE]
    # the same as one plain run from the chosen start, on the same target
    seed = record["candidates"][record["chosen"]]["seed"]
    plain = config.model_copy(
        update={"seed": seed, "training": config.training.model_copy(update={"candidates": 1})}
    )
    alone = tmp_path / "alone"
    run_experiment(plain, alone, target_path=out, progress=False)
    a, _ = runs.load_tensors(out / "components.safetensors")
    b, _ = runs.load_tensors(alone / "components.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(5, 31, 5))


def test_a_selection_stopped_midway_resumes_from_the_starts_checkpoints(tmp_path):
    config = _config()
    out = tmp_path / "r"
    run_experiment(config, out, progress=False)
    first = json.loads((out / "candidates.json").read_text())
    done, _ = runs.load_tensors(out / "components.safetensors")
    # as if killed after the starts were trained but before the choice was written
    for name in ("candidates.json", "components.safetensors", "summary.json"):
        (out / name).unlink()
    (out / runs.CHECKPOINT).unlink()
    resume_run(out, progress=False)
    again = json.loads((out / "candidates.json").read_text())
    assert again == first
    redone, _ = runs.load_tensors(out / "components.safetensors")
    assert all(torch.equal(done[k], redone[k]) for k in done)


def test_the_api_says_candidates_are_a_run_feature():
    import pytest
    from torch import nn

    import spdkit
    from spdkit.errors import ConfigError

    class Data:
        def sample(self, batch_size, generator):
            return torch.rand(batch_size, 5, generator=generator)

    with pytest.raises(ConfigError, match="training.candidates > 1 is run by `spdkit run`"):
        spdkit.decompose(nn.Sequential(nn.Linear(5, 2)), Data(), _config(), progress=False)
