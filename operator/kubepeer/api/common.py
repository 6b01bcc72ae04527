"""Pieces shared by the Kubepeer custom resources: the base model, conditions, quantities.

Every field carries a description: it becomes the CRD schema's description, which is
what `kubectl explain` shows the user.
"""

from __future__ import annotations

import re
from datetime import datetime
from decimal import Decimal, InvalidOperation
from enum import StrEnum
from typing import Annotated, Any, ClassVar

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, PlainSerializer, WithJsonSchema
from pydantic.alias_generators import to_camel

GROUP = "kubepeer.io"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"


class KubeModel(BaseModel):
    """Base for every part of a resource: camelCase on the wire, unknown fields refused."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        use_enum_values=False,
        validate_default=True,
    )

    def to_wire(self) -> dict[str, Any]:
        """The object as the API server stores it (camelCase, unset fields left out)."""
        return self.model_dump(by_alias=True, exclude_none=True, mode="json")


def cel(rule: str, message: str, field_path: str | None = None) -> dict[str, str]:
    """One `x-kubernetes-validations` entry: a CEL rule the API server enforces."""
    entry = {"rule": rule, "message": message}
    if field_path:
        entry["fieldPath"] = field_path
    return entry


# --- Kubernetes quantities (only the binary and decimal SI forms a GPU memory takes) ---

QUANTITY_PATTERN = r"^[0-9]+(\.[0-9]+)?(Ki|Mi|Gi|Ti|k|M|G|T)?$"
_QUANTITY_SUFFIX = {
    "": 1, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12,
    "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40,
}  # fmt: skip


def quantity_bytes(quantity: str) -> int:
    """Bytes in a memory quantity such as `24Gi` or `80G`."""
    match = re.fullmatch(r"([0-9]+(?:\.[0-9]+)?)([A-Za-z]*)", quantity)
    if not match or match.group(2) not in _QUANTITY_SUFFIX:
        raise ValueError(f"'{quantity}' is not a memory quantity such as 24Gi or 80G")
    return int(Decimal(match.group(1)) * _QUANTITY_SUFFIX[match.group(2)])


MemoryQuantity = Annotated[
    str,
    Field(pattern=QUANTITY_PATTERN, max_length=32, json_schema_extra={"example": "24Gi"}),
]


# --- Decimal numbers carried as strings (prices must not pass through a float) ---

DECIMAL_PATTERN = r"^[0-9]+(\.[0-9]+)?([eE][-+]?[0-9]+)?$"


def _parse_decimal(value: object) -> Decimal:
    if isinstance(value, Decimal):
        result = value
    elif isinstance(value, int | str):
        text = str(value).strip()
        if not re.fullmatch(DECIMAL_PATTERN, text):
            raise ValueError(
                f"'{value}' is not a non-negative decimal number such as 0.004 or 1e-9"
            )
        try:
            result = Decimal(text)
        except InvalidOperation as exc:  # pragma: no cover - the pattern admits only decimals
            raise ValueError(f"'{value}' is not a decimal number") from exc
    else:
        raise ValueError(f"{value!r} must be a decimal number written as a string, such as '0.004'")
    if not result.is_finite() or result < 0:
        raise ValueError(f"'{value}' must be a finite, non-negative number")
    return result


DecimalString = Annotated[
    Decimal,
    BeforeValidator(_parse_decimal),
    PlainSerializer(lambda d: format(d, "f") if d == d.to_integral() else str(d), return_type=str),
    WithJsonSchema({"type": "string", "pattern": DECIMAL_PATTERN, "maxLength": 64}),
]

# Go duration subset that reads well in YAML: 30s, 10m, 1h30m.
DURATION_PATTERN = r"^([0-9]+(ms|s|m|h))+$"
_DURATION_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}


def duration_seconds(duration: str) -> float:
    """Seconds in a duration such as `90s`, `10m` or `1h30m`."""
    parts = re.findall(r"([0-9]+)(ms|s|m|h)", duration)
    if not parts or "".join(n + u for n, u in parts) != duration:
        raise ValueError(f"'{duration}' is not a duration such as 90s, 10m or 1h30m")
    return sum(int(n) * _DURATION_UNITS[u] for n, u in parts)


Duration = Annotated[str, Field(pattern=DURATION_PATTERN, max_length=32)]
DnsLabel = Annotated[str, Field(pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", max_length=63)]


# --- Status conditions, Kubernetes style ---


class ConditionStatus(StrEnum):
    TRUE = "True"
    FALSE = "False"
    UNKNOWN = "Unknown"


class Condition(KubeModel):
    """One aspect of the resource's state, as every Kubernetes controller reports it."""

    type: str = Field(
        description="What the condition is about, e.g. Ready, Progressing, Degraded.",
        pattern=r"^[A-Za-z][A-Za-z0-9]*$",
        max_length=64,
    )
    status: ConditionStatus = Field(description="True, False or Unknown.")
    reason: str = Field(
        default="",
        description="Why, in one CamelCase word a program can match, e.g. Unschedulable.",
        max_length=128,
    )
    message: str = Field(default="", description="Why, in words for a person.", max_length=4096)
    observed_generation: int | None = Field(
        default=None, ge=0, description="The spec generation this condition was computed from."
    )
    last_transition_time: datetime | None = Field(
        default=None, description="When the status last changed."
    )


class KubeResource(KubeModel):
    """Fields every custom resource object carries; `spec` and `status` come from subclasses."""

    KIND: ClassVar[str]
    PLURAL: ClassVar[str]

    api_version: str = Field(default=API_VERSION, description="Always kubepeer.io/v1alpha1.")
    kind: str = Field(description="The resource kind.")
    metadata: dict[str, Any] = Field(
        default_factory=dict, description="Standard Kubernetes object metadata."
    )
