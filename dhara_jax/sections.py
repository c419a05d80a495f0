"""One config section (a frozen dataclass) from its YAML mapping: the fields' types checked,
unknown keys refused, each error one line naming the field. Used by dhara_jax.config for every
section and by data_pipeline.config for `data:` and its sources."""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Mapping

from dhara_jax.errors import ConfigError


def _field_type(cls: type, name: str) -> Any:
  return typing.get_type_hints(cls)[name]


def _coerce(value: Any, typ: Any, where: str) -> Any:
  """Checks a YAML value against a dataclass field type; ints are accepted for floats."""
  if typing.get_origin(typ) in (typing.Union, types.UnionType):
    typ = next(t for t in typing.get_args(typ) if t is not type(None))
  if typ is bool:
    if isinstance(value, bool):
      return value
  elif typ is int:
    if isinstance(value, int) and not isinstance(value, bool):
      return value
  elif typ is float:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
      return float(value)
    if isinstance(value, str):  # YAML 1.1 reads "1e-3" (no dot) as a string
      try:
        return float(value)
      except ValueError:
        pass
  elif typ is str:
    if isinstance(value, str):
      return value
  elif typing.get_origin(typ) is tuple:  # tuple[int, ...]: a YAML list
    if isinstance(value, (list, tuple)):
      item = typing.get_args(typ)[0]
      return tuple(_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value))
    raise ConfigError(f"{where}: expected a list, got {value!r}")
  else:  # pragma: no cover - only the types above are used in configs
    return value
  raise ConfigError(f"{where}: expected {typ.__name__}, got {value!r}")


def build_section(cls: type, raw: Mapping[str, Any], section: str) -> Any:
  """`cls(**raw)` with every value checked against its field's type; a missing mapping, an
  unknown key or a wrong type is one line naming `section.key`."""
  if not isinstance(raw, Mapping):
    raise ConfigError(f"{section}: expected a mapping, got {raw!r}")
  known = {f.name for f in dataclasses.fields(cls)}
  unknown = sorted(set(raw) - known)
  if unknown:
    raise ConfigError(f"{section}.{unknown[0]}: unknown field")
  kwargs = {k: _coerce(v, _field_type(cls, k), f"{section}.{k}") for k, v in raw.items()}
  return cls(**kwargs)
