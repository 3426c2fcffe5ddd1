"""Configs in and out: YAML files and bundled names, `--set` overrides, one line per
problem naming the field and what would be valid, the resolved YAML of a run directory."""

from __future__ import annotations

from collections.abc import Iterable
from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from spdkit.config.ci import CI_BY_KIND, CI_CONFIGS
from spdkit.config.legacy import FLAT_KEYS, MLP_ONLY, group_flat_keys, grouped_key
from spdkit.config.schema import SPDConfig
from spdkit.config.targets import TARGET_BY_KIND, TARGET_CONFIGS
from spdkit.errors import ConfigError

BUNDLED_CONFIG_PACKAGE = "spdkit.configs"


def format_validation_error(
    err: ValidationError,
    model: type[BaseModel] = SPDConfig,
    written_as: dict[tuple[str, ...], str] | None = None,
) -> str:
    """One line per problem, naming the field (dotted path) and what would be valid.
    `written_as`: a section path the user wrote under an old flat key (`("training", "steps")`
    → `steps`), so the line names the key as it was written."""
    lines = []
    for e in err.errors():
        loc = _strip_union_tags(e["loc"])
        if e["type"] == "bool_number":  # raised by the section, about one of its fields
            loc = (*loc, e["ctx"]["field"])
        loc = _as_written(loc, written_as or {})
        where = ".".join(str(p) for p in loc) or "<root>"
        if e["type"] == "extra_forbidden":
            allowed = _allowed_fields(model, e["loc"][:-1])
            hint = f" (allowed: {', '.join(allowed)})" if allowed else ""
            lines.append(f"{where}: unknown field{hint}")
        elif e["type"] == "missing":
            lines.append(f"{where}: required field is missing")
        elif e["type"] == "bool_number":
            lines.append(f"{where}: {e['msg']}")
        elif e["type"] in ("union_tag_invalid", "union_tag_not_found"):
            configs = CI_CONFIGS if loc[:1] == ("ci_fn",) else TARGET_CONFIGS
            kinds = ", ".join(c.model_fields["kind"].default for c in configs)
            got = e.get("input", {}).get("kind") if isinstance(e.get("input"), dict) else None
            what = "missing" if got is None else f"unknown ({got!r})"
            lines.append(f"{where}.kind: {what} (allowed: {kinds})")
        elif e["type"] == "value_error" and isinstance(e.get("input"), dict):
            # a validator across fields: its message names them; the section is not repeated
            message = str(e["ctx"]["error"]) if "error" in e.get("ctx", {}) else e["msg"]
            named = where == "<root>" or message.startswith((f"{where}.", f"{where}:"))
            lines.append(message if named else f"{where}: {message}")
        else:
            lines.append(f"{where}: {e['msg']} (got {e.get('input')!r})")
    return "\n".join(lines)


def _as_written(loc: tuple[Any, ...], written_as: dict[tuple[str, ...], str]) -> tuple[Any, ...]:
    for path, old in written_as.items():
        if loc[: len(path)] == path:
            return (old, *loc[len(path) :])
    return loc


def _strip_union_tags(loc: tuple[Any, ...]) -> tuple[Any, ...]:
    """`target.tms.n_features` → `target.n_features`: pydantic puts the union tag in the path."""
    if len(loc) > 1 and loc[0] == "target" and loc[1] in TARGET_BY_KIND:
        return (loc[0], *loc[2:])
    if len(loc) > 1 and loc[0] == "ci_fn" and loc[1] in CI_BY_KIND:
        return (loc[0], *loc[2:])
    return loc


def _allowed_fields(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """Field names of the sub-model at `loc`, to list them next to an unknown key."""
    current: Any = model
    for part in loc:
        if isinstance(part, int):
            continue
        if part in TARGET_BY_KIND and current is not model:
            current = TARGET_BY_KIND[part]
            continue
        if part in CI_BY_KIND and current == "ci-union":
            current = CI_BY_KIND[part]
            continue
        fields = getattr(current, "model_fields", None)
        if not fields or part not in fields:
            return []
        annotation = fields[part].annotation
        args = _flatten_args(annotation)
        current = next((a for a in (annotation, *args) if hasattr(a, "model_fields")), None)
        if current is None and part == "target":
            current = "target-union"  # resolved by the tag that follows
        elif part == "ci_fn":
            current = "ci-union"  # resolved by the tag that follows
        elif current is None:
            return []
    return sorted(getattr(current, "model_fields", {}))


def _flatten_args(annotation: Any) -> tuple[Any, ...]:
    out: list[Any] = []
    for a in getattr(annotation, "__args__", ()):
        out.extend([a, *_flatten_args(a)])
    return tuple(out)


def bundled_config_names() -> list[str]:
    files = resources.files(BUNDLED_CONFIG_PACKAGE).iterdir()
    return sorted(f.name[: -len(".yaml")] for f in files if f.name.endswith(".yaml"))


def parse_config(
    data: dict[str, Any], written_as: dict[tuple[str, ...], str] | None = None
) -> SPDConfig:
    """Validate a dict; raise ConfigError with one line per problem, naming each field as it
    was written (an old flat key by its old name; `written_as` when the caller grouped them)."""
    if not isinstance(data, dict):
        raise ConfigError(f"config must be a mapping of fields, got {type(data).__name__}")
    written_as = {**_flat_names(data), **(written_as or {})}
    try:
        data = group_flat_keys(data)  # spdkit ≤ 0.1's flat keys
    except ValueError as err:
        raise ConfigError(str(err)) from None
    try:
        return SPDConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, written_as=written_as)) from None


def _flat_names(keys: Iterable[str]) -> dict[tuple[str, ...], str]:
    """Section path → the old flat name it was written as, for each old top-level key."""
    return {FLAT_KEYS[k]: k for k in keys if k in FLAT_KEYS}


def load_config(name_or_path: str | Path, overrides: dict[str, Any] | None = None) -> SPDConfig:
    """Load a bundled config by name (`tms_5-2`) or a YAML file, apply dotted-key overrides."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        text = path.read_text()
    else:
        names = bundled_config_names()
        if str(name_or_path) not in names:
            raise ConfigError(
                f"unknown config {str(name_or_path)!r}: not a file and not a bundled config "
                f"(bundled: {', '.join(names)})"
            )
        text = resources.files(BUNDLED_CONFIG_PACKAGE).joinpath(f"{name_or_path}.yaml").read_text()
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"{name_or_path}: not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{name_or_path}: config must be a mapping of fields")
    overrides = overrides or {}
    written_as = _flat_names([*data, *(k.partition(".")[0] for k in overrides)])
    try:
        data = group_flat_keys(data)  # so that old and new keys below meet in one layout
    except ValueError as err:
        raise ConfigError(f"{name_or_path}: {err}") from None
    for key, value in overrides.items():
        _set_dotted(data, grouped_key(key), value, written=key)
    _default_ci_kind(data)
    _drop_other_kinds_fields(data, list(overrides))
    return parse_config(data, written_as)


def _default_ci_kind(data: dict[str, Any]) -> None:
    """A `ci_fn` section without a `kind` is the default kind's (`mlp`), as an absent section
    is: `--set ci_fn.hidden_dim=8` on a config that leaves `ci_fn` out (the APD twins) tunes the
    default rather than failing on a kind the user never wrote."""
    ci_fn = data.get("ci_fn")
    if isinstance(ci_fn, dict) and "kind" not in ci_fn:
        ci_fn["kind"] = "mlp"


def _drop_other_kinds_fields(data: dict[str, Any], overrides: list[str]) -> None:
    """`--set ci_fn.kind=global_mlp` on a config written for the `mlp` kind: the fields only
    the old kind has (`hidden_dim`, `backend`) go with it, as an old flat `ci_hidden_dim` did;
    a field the user sets in the same call stays, and is an error if the new kind lacks it.
    Also old flat `ci_hidden_dim` / `ci_backend` overrides (`MLP_ONLY`) with another kind.
    Nothing is dropped when the kind was not switched: a misspelt field in a file is an error."""
    ci_fn = data.get("ci_fn")
    if not isinstance(ci_fn, dict) or ci_fn.get("kind") not in CI_BY_KIND:
        return
    set_by_user = [grouped_key(k) for k in overrides if k.startswith("ci_fn")]
    kind_switched = "ci_fn" in set_by_user or "ci_fn.kind" in set_by_user
    flat_mlp_only = {FLAT_KEYS[k][-1] for k in overrides if k in MLP_ONLY}
    fields = CI_BY_KIND[ci_fn["kind"]].model_fields
    explicit = {k.split(".")[1] for k in set_by_user if k.count(".") >= 1}
    for name in [n for n in ci_fn if n not in fields and n not in explicit]:
        if kind_switched or name in flat_mlp_only:
            del ci_fn[name]


def parse_override_value(text: str) -> Any:
    """A `--set` value as the user meant it: YAML (`2e-3`, `[1, 2]`, `{kind: mlp}`, `true`),
    but text YAML cannot read (`*.mlp.*` starts a YAML alias) is that text, and a string that
    reads as a number (YAML takes `1e-5`, with no dot, for text) is the number."""
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def _set_dotted(data: dict[str, Any], key: str, value: Any, written: str | None = None) -> None:
    """data[a][b]... = value for key "a.b...", where a part that is an integer indexes a list
    (`modules.0.C`) and a string on the path (a named choice such as `data: pydoc`) is
    replaced by a section; a path through another value is a ConfigError naming the key as
    the user `written` it (an old flat key) and where it leads."""
    shown = written or key
    parts = key.split(".")
    node: Any = data
    for depth, part in enumerate(parts):
        last = depth == len(parts) - 1
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                where = ".".join(parts[:depth]) or "<root>"
                raise ConfigError(
                    f"--set {shown}: {where} is a list of {len(node)}; use an index 0-{len(node) - 1}"
                )
            if last:
                node[int(part)] = value
            else:
                node = node[int(part)]
        elif isinstance(node, dict):
            if last:
                node[part] = value
            else:
                if isinstance(node.get(part), str):  # a named choice (`data: pydoc`) becomes
                    node[part] = {}  # the section the key sets (`data.path=...`)
                node = node.setdefault(part, {})
        else:
            where = ".".join(parts[:depth])
            raise ConfigError(f"--set {shown}: {where} is a value, not a section")


def dump_config(config: SPDConfig) -> str:
    """Fully resolved YAML (defaults included) for the run directory."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
