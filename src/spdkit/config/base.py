"""The base of every config model."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, model_validator
from pydantic_core import PydanticCustomError


class StrictModel(BaseModel):
    """Base for every config model: unknown keys are errors, assignments are re-validated, and
    a boolean is not a number (pydantic would read `steps: true` as 1)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    @model_validator(mode="before")
    @classmethod
    def _no_bool_for_numbers(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for name, value in data.items():
                field = cls.model_fields.get(name)
                if (
                    isinstance(value, bool)
                    and field is not None
                    and field.annotation in (int, float)
                ):
                    raise PydanticCustomError(
                        "bool_number", "expected a number, got a boolean", {"field": name}
                    )
        return data
