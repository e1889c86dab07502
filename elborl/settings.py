"""The schema of the settings: each section of `params.yaml` is one `@section` class, the single place that says
a setting's type, default, range and meaning.

A section is a pydantic dataclass, so to the rest of the code it is a plain dataclass (attribute access,
`dataclasses.asdict`, `dataclasses.replace`, `fields()`, keyword construction), and every construction,
`replace` and assignment is validated: a bad value raises `SettingsError` (a ValueError) naming the key and the
rule, e.g. `rl.lr: must be > 0, got -1`; an unknown key raises `rl: unknown key(s) ['x']; expected some of [...]`.

A field is written `name: Annotated[TYPE, <rules>, Field(description=..., ge=/gt=/le=/lt=...)] = DEFAULT`:

- TYPE is one of `Int`, `Float`, `Bool`, `Str` (the YAML reading of a number, a flag, a word; see below) or a
  tuple/dict of them;
- rules: `OneOf(choices, noun)` for a word from a fixed list, `Rule(doc, check)` for anything else;
- `Field(json_schema_extra={"note": ...})` adds a short reason to the range in error messages and the reference.

Rules that tie several settings together stay in the section's `validate()`, called when settings are loaded:
a benchmark may build combinations that do not go together and report them. `reference()` in elborl/config.py
writes docs/configuration.md from these declarations.
"""

from collections import defaultdict
from dataclasses import fields, is_dataclass
from typing import Annotated, Any, Callable
import functools
import types
import typing

import annotated_types
from pydantic import BeforeValidator, ConfigDict, Strict, ValidationError
from pydantic.dataclasses import dataclass as pydantic_dataclass
from pydantic_core import core_schema


def _yaml_float(value):
    """A float from a YAML number; YAML 1.1 reads `1e-3` (no dot) as a string, so numeric strings count too.
    A bool is refused: `true` is no number."""
    if isinstance(value, bool):
        raise ValueError(f"expected float, got {value!r}")
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            raise ValueError(f"expected float, got {value!r}") from None
    return value


# An int is an int (not 2.0, not "2", not true), a float any number (kept a float: the base model's cache key
# hashes the settings as JSON), a bool true or false, a str a string.
Int = Annotated[int, Strict()]
Float = Annotated[float, BeforeValidator(_yaml_float)]
Bool = Annotated[bool, Strict()]
Str = Annotated[str, Strict()]


class Rule:
    """A check beyond a type and a range: `check(value)` raises ValueError saying what is wrong (the key is
    added), `doc` says the rule in the configuration reference."""

    def __init__(self, doc: str, check: Callable[[Any], None]):
        self.doc, self._check = doc, check

    def __get_pydantic_core_schema__(self, source, handler):
        return core_schema.no_info_after_validator_function(self.validate, handler(source))

    def validate(self, value):
        self._check(value)
        return value


class OneOf(Rule):
    """A word from a fixed list: `unknown <noun> 'x'; expected one of (...)` otherwise."""

    def __init__(self, choices, noun: str):
        self.choices, self.noun = tuple(choices), noun
        super().__init__("one of " + ", ".join(f"`{c}`" for c in self.choices), self._one_of)

    def _one_of(self, value) -> None:
        if value not in self.choices:
            raise ValueError(f"unknown {self.noun} {value!r}; expected one of {self.choices}")


class SettingsError(ValueError):
    """Bad settings: `problems` lists (dotted key, what is wrong); the message joins them as `key: problem`."""

    def __init__(self, problems: list[tuple[str, str]]):
        self.problems = problems
        super().__init__("; ".join(f"{key or 'top level'}: {problem}" for key, problem in problems))


def section(name: str):
    """Makes a class a validated settings section named `name` in params.yaml ("" for the top level)."""

    def make(cls):
        cls = pydantic_dataclass(cls, config=ConfigDict(extra="forbid", validate_assignment=True))
        cls.__settings_section__ = name
        init, setattr_ = cls.__init__, cls.__setattr__

        @functools.wraps(init)
        def __init__(self, *args, **kwargs):
            try:
                init(self, *args, **kwargs)
            except ValidationError as error:
                raise SettingsError(problems(type(self), error, name)) from None

        @functools.wraps(setattr_)
        def __setattr__(self, key, value):
            try:
                setattr_(self, key, value)
            except ValidationError as error:
                raise SettingsError(problems(type(self), error, name)) from None

        cls.__init__, cls.__setattr__ = __init__, __setattr__
        return cls

    return make


def build(cls, raw, where: str | None = None):
    """An instance of the section `cls` from a mapping of settings (nested sections as mappings), every problem
    named under `where` (default: the section's own name)."""
    where = cls.__settings_section__ if where is None else where
    if not isinstance(raw, dict):
        raise SettingsError([(where, f"expected a mapping, got {raw!r}")])
    try:
        return cls.__pydantic_validator__.validate_python(raw)
    except ValidationError as error:
        raise SettingsError(problems(cls, error, where)) from None


# --- messages -------------------------------------------------------------------------------------
EXPECTED = {"float_type": "float", "float_parsing": "float", "int_type": "int", "int_parsing": "int",
            "int_from_float": "int", "bool_type": "bool", "bool_parsing": "bool", "string_type": "str",
            "dict_type": "a mapping", "tuple_type": "a list", "list_type": "a list", "dataclass_type": "a mapping",
            "dataclass_args_type": "a mapping"}
BOUNDS = ("greater_than", "greater_than_equal", "less_than", "less_than_equal")


def problems(cls, error: ValidationError, where: str) -> list[tuple[str, str]]:
    """pydantic's errors as (dotted key, problem), unknown keys grouped per section."""
    found, unknown = [], defaultdict(list)
    for item in error.errors(include_url=False):
        loc = [part for part in item["loc"] if part != "[key]"]
        if item["type"] == "unexpected_keyword_argument":
            unknown[tuple(loc[:-1])].append(str(loc[-1]))
            continue
        found.append((_key(where, loc), _problem(cls, loc, item)))
    for parent, keys in unknown.items():
        known = sorted(f.name for f in fields(_section_at(cls, parent)))
        found.append((_key(where, parent), f"unknown key(s) {sorted(keys)}; expected some of {known}"))
    return found


def _key(where: str, loc) -> str:
    key = where
    for part in loc:
        key = f"{key}[{part}]" if isinstance(part, int) else f"{key}.{part}" if key else str(part)
    return key


def _section_at(cls, loc):
    for name in loc:
        cls = typing.get_type_hints(cls)[name]
    return cls


def _problem(cls, loc, item: dict) -> str:
    kind, value = item["type"], item.get("input")
    if kind in ("value_error", "assertion_error"):
        return str(item["ctx"]["error"])
    if kind in EXPECTED:
        return f"expected {EXPECTED[kind]}, got {value!r}"
    if kind in BOUNDS:
        info = _field_info(cls, loc)
        bounds = dict(item["ctx"]) if info is None else bounds_of(info)
        note = (info.json_schema_extra or {}).get("note") if info is not None else None
        return f"must be {describe_bounds(bounds)}{f' ({note})' if note else ''}, got {value!r}"
    if kind == "finite_number":
        return f"must be finite, got {value!r}"
    if kind == "too_short":
        return f"must have at least {item['ctx']['min_length']} item(s), got {value!r}"
    return f"{item['msg'][0].lower()}{item['msg'][1:]}, got {value!r}"


def _field_info(cls, loc):
    """The pydantic field at `loc` when it is a field of a section (not an item inside one)."""
    try:
        owner = _section_at(cls, loc[:-1])
        return owner.__pydantic_fields__[loc[-1]]
    except (KeyError, TypeError, AttributeError, IndexError):
        return None


# --- what the reference shows ---------------------------------------------------------------------
def bounds_of(info) -> dict:
    """{"gt"/"ge"/"lt"/"le": bound} of a pydantic field."""
    bounds = {}
    for item in info.metadata:
        for kind in ("gt", "ge", "lt", "le"):
            if isinstance(item, getattr(annotated_types, kind.capitalize())):
                bounds[kind] = getattr(item, kind)
    return bounds


def describe_bounds(bounds: dict) -> str:
    """`> 0`, `>= 1`, `in [0, 1)`."""
    low = ("gt", bounds["gt"]) if "gt" in bounds else ("ge", bounds["ge"]) if "ge" in bounds else None
    high = ("lt", bounds["lt"]) if "lt" in bounds else ("le", bounds["le"]) if "le" in bounds else None
    if low and high:
        return f"in {'(' if low[0] == 'gt' else '['}{low[1]}, {high[1]}{')' if high[0] == 'lt' else ']'}"
    symbol = {"gt": ">", "ge": ">=", "lt": "<", "le": "<="}
    kind, bound = low or high
    return f"{symbol[kind]} {bound}"


def type_name(annotation) -> str:
    """The YAML shape of a field's type: int, float, bool, str, list of int, mapping of str to float."""
    if typing.get_origin(annotation) is Annotated:
        return type_name(typing.get_args(annotation)[0])
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is tuple:
        return f"list of {type_name(args[0])}"
    if origin is dict:
        return f"mapping of {type_name(args[0])} to {type_name(args[1])}" if args else "mapping"
    if annotation is dict:
        return "mapping"
    if annotation is Any:
        return "any"
    if is_dataclass(annotation):
        return "section"
    if isinstance(annotation, types.GenericAlias):
        return str(annotation)
    return getattr(annotation, "__name__", str(annotation))


def rules_of(info) -> list[str]:
    """What a field accepts beyond its type: its range (with its note) and its rules, also those on the items of
    a list or a mapping."""
    out = []
    bounds = bounds_of(info)
    if bounds:
        note = (info.json_schema_extra or {}).get("note")
        out.append(describe_bounds(bounds) + (f" ({note})" if note else ""))
    if any(getattr(item, "allow_inf_nan", True) is False for item in info.metadata):
        out.append("finite")
    out += [f"at least {item.min_length} item(s)" for item in info.metadata if isinstance(item, annotated_types.MinLen)]
    out += [item.doc for item in info.metadata if isinstance(item, Rule)]
    for where, arg in zip(("keys", "values"), _item_types(info.annotation)):
        inner = _annotated_rules(arg)
        if inner:
            out.append(f"{where}: {', '.join(inner)}")
    return out


def _item_types(annotation):
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is dict:
        return args
    if origin is tuple:
        return [None, args[0]]
    return []


def _annotated_rules(annotation) -> list[str]:
    if typing.get_origin(annotation) is not Annotated:
        return []
    out = []
    for item in typing.get_args(annotation)[1:]:
        if isinstance(item, Rule):
            out.append(item.doc)
        elif hasattr(item, "metadata"):  # a FieldInfo of constraints
            bounds = bounds_of(item)
            if bounds:
                out.append(describe_bounds(bounds))
            if any(getattr(m, "allow_inf_nan", True) is False for m in item.metadata):
                out.append("finite")
        else:
            bounds = bounds_of(types.SimpleNamespace(metadata=[item]))
            if bounds:
                out.append(describe_bounds(bounds))
    return out

