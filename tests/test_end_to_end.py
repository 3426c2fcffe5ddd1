"""End to end: decompose a freshly trained TMS 5-2 and check the five features are recovered.

The fast test uses a shortened schedule (4k steps at batch 1024, lr 1e-2, C = 10) and seed 2;
the slow test runs the bundled paper config. SPD on TMS has local minima in which one
subcomponent serves two features through opposite signs of V; some seeds of the short schedule
land there (README, "Known limitations"), so the fast test pins a seed.
"""

import pytest

from spdkit.config import load_config, parse_config
from spdkit.pipeline.run import run_experiment
from tests.helpers import tiny_tms_dict


def short_tms_config(seed: int):
    data = tiny_tms_dict(
        seed=seed,
        steps=4000,
        batch_size=1024,
        optimizer={"lr": 1e-2, "lr_schedule": "cosine"},
        modules=[{"pattern": "linear1", "C": 10}, {"pattern": "linear2", "C": 10}],
        ci_hidden_dim=16,
        log_every=500,
        checkpoint_every=4000,
    )
    data["target"]["train_steps"] = 4000
    return parse_config(data)


def assert_features_recovered(summary, mmcs_min: float, ml2r_tol: float) -> None:
    fm = summary["feature_match"]
    assert fm["mmcs"] >= mmcs_min, fm
    assert abs(fm["ml2r"] - 1) <= ml2r_tol, fm
    assert len(set(fm["matched_subcomponent"])) == 5, fm  # five distinct subcomponents
    w = summary["modules"]["linear1"]
    assert w["n_non_negligible"] == 5 and w["n_active_on_one_hot"] == 5, w


def test_tms_5_2_short_run_recovers_the_features(tmp_path):
    summary = run_experiment(short_tms_config(seed=2), tmp_path / "run", progress=False)
    assert_features_recovered(summary, mmcs_min=0.99, ml2r_tol=0.05)
    assert summary["output_losses"]["unmasked"] < 1e-4


@pytest.mark.slow
def test_tms_5_2_paper_config_matches_table_1(tmp_path):
    summary = run_experiment(load_config("tms_5-2"), tmp_path / "run", progress=False)
    assert_features_recovered(summary, mmcs_min=0.999, ml2r_tol=0.03 + 0.007)
