"""Config validation: bundled configs load; every bad field is a one-line error naming it."""

from pathlib import Path

import pytest
import yaml

from spdkit.config import ConfigError, bundled_config_names, load_config, parse_config
from tests.helpers import tiny_tms_dict


def test_bundled_tms_configs_have_the_paper_hyperparameters():
    names = bundled_config_names()
    assert {"tms_5-2", "tms_40-10", "tms_5-2-id", "tms_40-10-id"} <= set(names)
    for name, C, coeff, p in [("tms_5-2", 20, 3e-3, 1), ("tms_40-10-id", 200, 1e-4, 2)]:
        cfg = load_config(name)
        assert (
            cfg.training.steps,
            cfg.training.batch_size,
            cfg.ci_fn.hidden_dim,
            cfg.loss.n_mask_samples,
        ) == (
            40000,
            4096,
            16,
            1,
        )
        assert all(m.C == C for m in cfg.modules)
        assert (cfg.loss.importance_minimality_coeff, cfg.importance.pnorm) == (coeff, p)
        assert (cfg.training.optimizer.lr, cfg.training.optimizer.lr_schedule) == (1e-3, "cosine")
    assert load_config("tms_40-10").target.train_batch_size == 8192


BAD_FIELDS = [
    ({"steps": 0}, "steps"),
    ({"batch_size": -1}, "batch_size"),
    ({"pnorm": 0}, "pnorm"),
    ({"importance_minimality_coeff": -1}, "importance_minimality_coeff"),
    ({"n_mask_samples": 0}, "n_mask_samples"),
    ({"ci_hidden_dim": 0}, "ci_hidden_dim"),
    ({"output_loss": "l1"}, "output_loss"),
    ({"modules": []}, "modules"),
    ({"modules": [{"pattern": "linear1", "C": 0}]}, "modules.0.C"),
    ({"modules": [{"pattern": "linear1"}]}, "modules.0.C"),
    ({"optimizer": {"lr": 1e-3, "lr_schedule": "cosin"}}, "optimizer.lr_schedule"),
    ({"optimizer": {"lr": 0}}, "optimizer.lr"),
    ({"optimizer": {"lr": 1e-3, "warmup_frac": 1.5}}, "optimizer.warmup_frac"),
    (
        {"target": {"kind": "tms", "n_features": 5, "n_hidden": 2, "feature_probability": 1.5}},
        "target.feature_probability",
    ),
    ({"target": {"kind": "tms", "n_features": 0, "n_hidden": 2}}, "target.n_features"),
    ({"seed": "abc"}, "seed"),
    ({"steps": True}, "steps"),
    ({"optimizer": {"lr": True}}, "optimizer.lr"),
    ({"target": {"n_features": 5, "n_hidden": 2}}, "target.kind"),
    ({"target": {"kind": "mlp", "n_features": 5}}, "target.kind"),
    (
        {"target": {"kind": "resid_mlp", "n_features": 5, "n_layers": 0, "d_mlp": 2}},
        "target.n_layers",
    ),
    ({"ci_backend": "gpu"}, "ci_backend"),
]


@pytest.mark.parametrize(("override", "field"), BAD_FIELDS)
def test_invalid_field_names_the_field(override, field):
    with pytest.raises(ConfigError) as err:
        parse_config(tiny_tms_dict(**override))
    msg = str(err.value)
    assert msg.splitlines()[0].startswith(field + ":"), msg
    assert "Traceback" not in msg


def test_invalid_literal_lists_allowed_values():
    with pytest.raises(ConfigError, match="'constant', 'cosine' or 'linear'"):
        parse_config(tiny_tms_dict(optimizer={"lr": 1e-3, "lr_schedule": "step"}))


def test_unknown_key_is_an_error_listing_allowed_keys():
    with pytest.raises(ConfigError) as err:
        parse_config(tiny_tms_dict(importance_coeff=1e-3))
    assert "importance_coeff: unknown field" in str(err.value)
    assert "importance, insert_identity, loss" in str(err.value)  # the sections
    with pytest.raises(ConfigError) as err:
        parse_config({**tiny_tms_dict(), "loss": {"importance_coeff": 1e-3}})
    assert "loss.importance_coeff: unknown field" in str(err.value)
    assert "importance_minimality_coeff" in str(err.value)
    with pytest.raises(
        ConfigError, match=r"optimizer\.beta: unknown field \(allowed: lr, lr_schedule"
    ):
        parse_config(tiny_tms_dict(optimizer={"lr": 1e-3, "beta": 0.9}))


def test_duplicate_patterns_rejected():
    """A check across fields gives its own message, one line, without the whole config."""
    with pytest.raises(ConfigError) as err:
        parse_config(tiny_tms_dict(modules=[{"pattern": "a", "C": 1}, {"pattern": "a", "C": 2}]))
    assert str(err.value) == "modules: pattern(s) listed twice: ['a']"


def test_yaml_file_overrides_and_errors(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(tiny_tms_dict()))
    cfg = load_config(path, {"optimizer.lr": 5e-4, "seed": 3})
    assert (cfg.training.optimizer.lr, cfg.seed) == (5e-4, 3)
    with pytest.raises(ConfigError, match="unknown config 'nope'.*tms_5-2"):
        load_config("nope")
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")
    path.write_text("steps: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(path)
    path.write_text("- just a list")
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_config(path)


def test_target_kind_errors_list_the_kinds_and_fields():
    with pytest.raises(
        ConfigError,
        match=r"target.kind: unknown \('mlp'\) \(allowed: tms, resid_mlp, induction, tiny_lm, planted_lm, hf, python\)",
    ):
        parse_config(tiny_tms_dict(target={"kind": "mlp"}))
    bad = {"kind": "resid_mlp", "n_features": 5, "n_layers": 1, "d_mlp": 2, "n_hidden": 3}
    with pytest.raises(ConfigError, match=r"target.n_hidden: unknown field \(allowed: d_mlp, "):
        parse_config(tiny_tms_dict(target=bad))


def test_set_overrides_index_lists_and_name_bad_paths():
    cfg = load_config("tms_5-2", {"modules.1.C": 7})
    assert [m.C for m in cfg.modules] == [20, 7]
    with pytest.raises(
        ConfigError, match=r"--set modules.5.C: modules is a list of 2; use an index 0-1"
    ):
        load_config("tms_5-2", {"modules.5.C": 7})
    with pytest.raises(
        ConfigError, match=r"--set steps.x: training.steps is a value, not a section"
    ):
        load_config("tms_5-2", {"steps.x": 7})


def test_removed_batch_layerwise_field_still_loads_old_configs():
    assert parse_config(tiny_tms_dict(batch_layerwise_passes=False)).engine.per_pass_backward
    with pytest.warns(UserWarning, match="batch_layerwise_passes was removed"):
        parse_config(tiny_tms_dict(batch_layerwise_passes=True))


def test_subset_routing_errors_name_the_field_and_the_choices():
    with pytest.raises(ConfigError) as err:
        parse_config(tiny_tms_dict(subset_routing={"kind": "all", "p": 0.0}))
    lines = str(err.value).splitlines()
    assert lines[0].startswith("subset_routing.kind:") and "'uniform_k' or 'bernoulli'" in lines[0]
    assert lines[1].startswith("subset_routing.p:") and "greater than 0" in lines[1]
    with pytest.raises(
        ConfigError, match=r"subset_routing.mode: unknown field \(allowed: kind, p, scope\)"
    ):
        parse_config(tiny_tms_dict(subset_routing={"mode": "x"}))


def test_the_flat_layout_of_old_configs_reads_into_the_sections():
    """Every old top-level key lands in its section: the flat and the grouped dict give the
    same config, and `--set` takes either name."""
    flat = parse_config(
        tiny_tms_dict(
            ci_hidden_dim=5,
            ci_backend="eager",
            lower_sigmoid="straight_through",
            component_init="normal",
            delta_component=True,
            pgd={"n_steps": 3},
            prefix_replay=False,
            importance_penalty="smooth_l0",
            on_nonfinite="skip",
        )
    )
    grouped = load_config("tms_5-2", {"steps": 60})
    assert flat.ci_fn.hidden_dim == 5 and flat.ci_fn.backend == "eager"
    assert flat.ci_fn.lower_sigmoid == "straight_through"
    assert (flat.components.init, flat.components.delta) == ("normal", True)
    assert flat.adversary.n_steps == 3 and flat.engine.prefix_replay is False
    assert flat.importance.penalty == "smooth_l0" and flat.training.on_nonfinite == "skip"
    assert grouped.training.steps == 60
    again = parse_config(flat.model_dump(mode="json"))
    assert again == flat
    both = load_config("tms_5-2", {"training.steps": 7, "pgd.init": "ones"})
    assert (both.training.steps, both.adversary.init) == (7, "ones")


def test_a_key_given_both_ways_is_one_line_naming_both():
    data = tiny_tms_dict()
    data["training"] = {"steps": 5, "batch_size": 8, "optimizer": {"lr": 1e-3}}
    with pytest.raises(ConfigError, match=r"^steps and training.steps both given"):
        parse_config(data)


def test_old_mlp_only_ci_keys_are_dropped_for_other_kinds():
    """`ci_hidden_dim` / `ci_backend` were written into every old config but only the mlp
    kind read them: with a global kind they are ignored, as they were."""
    cfg = parse_config(tiny_tms_dict(ci_fn={"kind": "global_mlp"}, ci_hidden_dim=8))
    assert cfg.ci_fn.kind == "global_mlp" and not hasattr(cfg.ci_fn, "hidden_dim")


def test_the_oldest_run_directory_config_still_loads():
    from spdkit.store.runs import load_run_config

    cfg = load_run_config(Path(__file__).parent / "fixtures" / "run_26f5880")
    assert cfg.ci_fn.hidden_dim == 8 and cfg.training.steps == 20
    assert cfg.loss.importance_minimality_coeff == 0.003 and cfg.importance.pnorm == 1.0


def test_switching_the_ci_kind_by_set_drops_the_old_kinds_fields(tmp_path):
    """`--set ci_fn.kind=...` on a config written for another kind: the fields only the old
    kind has go with it (an old flat `ci_backend` override too); a field given in the same
    call must fit the new kind."""
    cfg = load_config("tms_5-2", {"ci_fn.kind": "global_mlp", "ci_backend": "eager"})
    assert cfg.ci_fn.kind == "global_mlp" and cfg.ci_fn.hidden_dims == [256]
    assert load_config("vpd_lm", {"ci_fn.kind": "mlp"}).ci_fn.lower_sigmoid == "straight_through"
    with pytest.raises(ConfigError, match=r"ci_fn.hidden_dim: unknown field"):
        load_config("tms_5-2", {"ci_fn.kind": "global_mlp", "ci_fn.hidden_dim": 8})


def test_a_misspelt_ci_field_in_a_file_is_an_error_not_dropped(tmp_path):
    """Dropping another kind's fields applies only when `--set` switches the kind: a typo
    under `ci_fn` in a file must not load silently with the default."""
    data = yaml.safe_load(load_config("tms_5-2").model_dump_json())
    data["ci_fn"]["hiden_dim"] = 8
    path = tmp_path / "typo.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match=r"^ci_fn.hiden_dim: unknown field"):
        load_config(path)
    with pytest.raises(ConfigError, match=r"^ci_fn.hiden_dim: unknown field"):
        load_config("tms_5-2", {"ci_fn.hiden_dim": 8})


def test_errors_in_an_old_flat_file_name_the_key_as_written(tmp_path):
    path = tmp_path / "old.yaml"
    path.write_text(yaml.safe_dump(tiny_tms_dict(steps=0)))
    with pytest.raises(ConfigError, match=r"^steps: Input should be greater"):
        load_config(path)
    with pytest.raises(ConfigError, match=r"^pnorm: Input should be greater"):
        load_config("tms_5-2", {"pnorm": -1})


def test_a_ci_section_without_a_kind_is_the_default_kind():
    """The APD twins leave `ci_fn` out; `--set ci_fn.hidden_dim=8` on one tunes the default
    `mlp` kind (as an absent section is) rather than failing on `ci_fn.kind: missing`."""
    cfg = load_config("tms_5-2-apd", {"ci_fn.hidden_dim": 8})
    assert cfg.ci_fn.kind == "mlp" and cfg.ci_fn.hidden_dim == 8
    with pytest.raises(ConfigError, match=r"^ci_fn.hiden_dim: unknown field"):
        load_config("tms_5-2-apd", {"ci_fn.hiden_dim": 8})
