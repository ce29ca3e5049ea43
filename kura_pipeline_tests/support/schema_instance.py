"""Build a JSON instance that validates against a JSON Schema, deterministically.

Used by the loopback server to answer structured-output requests the way a
well-behaved model would. It covers what pydantic emits for response models:
objects with required properties, ``$ref``/``$defs``, ``anyOf``/``oneOf`` (the
first non-null branch), ``allOf``, nullable type lists, enums/consts, string
length bounds and common formats, numeric bounds, arrays (``items``,
``prefixItems``, ``minItems``/``maxItems``, ``uniqueItems``) and dicts
(``additionalProperties``). ``pattern`` and ``multipleOf`` are not honoured.

A prompt that offers its options as a list of elements named after a string
property (``<answers><answer>A</answer><answer>B</answer></answers>`` for a
property ``answer``, as Kura's parent assignment does) gets one of those
options in that property, as a model that follows the prompt would answer:
see ``tagged_options``.
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Mapping, Sequence
from typing import Any

# Used when the request itself offers too few words to make text from.
FALLBACK_WORDS: tuple[str, ...] = (
    "user", "asks", "help", "with", "code", "review", "data", "analysis", "writing",
    "travel", "plans", "debugging", "python", "tests", "recipe", "ideas", "budget",
    "questions", "about", "learning", "languages", "history", "summary", "email",
)

_WORD_RE = re.compile(r"[A-Za-z][A-Za-z'-]{2,}")
_TAGGED_RE = re.compile(r"<([A-Za-z_][A-Za-z0-9_-]*)>([^<]*)</\1>")
_BLOCK_RE = re.compile(r"<([A-Za-z_][A-Za-z0-9_-]*)>(.*?)</\1>", re.DOTALL)
_PLACEHOLDER_RE = re.compile(r"^\[.*\]$", re.DOTALL)
# Past this depth optional parts are dropped so recursive models terminate.
_MAX_DEPTH = 6
_FORMATS: dict[str, str] = {
    "date-time": "2024-01-01T00:00:00Z",
    "date": "2024-01-01",
    "time": "12:00:00",
    "email": "user@example.com",
    "uri": "https://example.com/",
    "uuid": "00000000-0000-4000-8000-000000000000",
    "ipv4": "127.0.0.1",
}


def words_from_text(text: str, limit: int = 400) -> list[str]:
    """Lower-cased words of the text, in order, without duplicates."""
    seen: dict[str, None] = {}
    for match in _WORD_RE.finditer(text):
        seen.setdefault(match.group(0).lower(), None)
        if len(seen) >= limit:
            break
    return list(seen)


def tagged_options(text: str) -> dict[str, list[str]]:
    """Options offered as a list of elements inside another element:
    ``{"answer": ["A", "B"]}`` for ``<answers><answer>A</answer><answer>B</answer></answers>``.

    Elements outside a list (an output format such as ``<name> [your name] </name>``) and
    bracketed placeholders are not options.
    """
    options: dict[str, list[str]] = {}
    for container in _BLOCK_RE.finditer(text):
        for item in _TAGGED_RE.finditer(container.group(2)):
            value = item.group(2).strip()
            if item.group(1) != container.group(1) and value and not _PLACEHOLDER_RE.match(value):
                options.setdefault(item.group(1), []).append(value)
    return options


def generate_instance(
    schema: dict[str, Any],
    rng: random.Random,
    words: Sequence[str] = (),
    choices: Mapping[str, Sequence[str]] | None = None,
) -> Any:
    """Return a value valid for ``schema``; the same rng seed gives the same value.

    ``choices`` maps a property name to the options a string property of that name takes.
    """
    return _Generator(schema, rng, words, choices).value(schema, 0)


class _Generator:
    def __init__(
        self,
        root: dict[str, Any],
        rng: random.Random,
        words: Sequence[str],
        choices: Mapping[str, Sequence[str]] | None = None,
    ) -> None:
        self.root = root
        self.rng = rng
        self.words = list(words) if len(words) >= 3 else list(words) + list(FALLBACK_WORDS)
        self.choices = {k: list(v) for k, v in (choices or {}).items() if v}

    def resolve(self, schema: dict[str, Any]) -> dict[str, Any]:
        """Follow local ``$ref`` pointers (``#/$defs/X``, ``#/definitions/X``)."""
        seen = 0
        while "$ref" in schema and seen < 32:
            ref = schema["$ref"]
            if not isinstance(ref, str) or not ref.startswith("#"):
                raise ValueError(f"only local $ref is supported, got {ref!r}")
            target: Any = self.root
            for part in filter(None, ref[1:].split("/")):
                target = target[part.replace("~1", "/").replace("~0", "~")]
            # Sibling keywords next to $ref (e.g. a description) are kept.
            schema = {**target, **{k: v for k, v in schema.items() if k != "$ref"}}
            seen += 1
        return schema

    def value(self, schema: Any, depth: int) -> Any:
        if schema is True or not isinstance(schema, dict):
            return self.text(None, None)
        schema = self.resolve(schema)
        if "const" in schema:
            return schema["const"]
        if "enum" in schema:
            return self.rng.choice(schema["enum"])
        for key in ("anyOf", "oneOf"):
            if key in schema:
                return self.value(self.pick_branch(schema[key], depth), depth)
        if "allOf" in schema:
            return self.value(self.merge_all_of(schema), depth)
        kind = self.kind(schema, depth)
        if kind == "null":
            return None
        if kind == "boolean":
            return self.rng.random() < 0.5
        if kind == "integer":
            return self.integer(schema)
        if kind == "number":
            return self.number(schema)
        if kind == "array":
            return self.array(schema, depth)
        if kind == "object":
            return self.obj(schema, depth)
        return self.string(schema)

    def pick_branch(self, branches: list[Any], depth: int) -> Any:
        """First non-null branch, or null when deep enough to stop recursing."""
        non_null = [b for b in branches if self.kind(self.resolve(b), depth) != "null"]
        if non_null and not (depth >= _MAX_DEPTH and len(non_null) < len(branches)):
            return non_null[0]
        return {"type": "null"} if len(non_null) < len(branches) else branches[0]

    def merge_all_of(self, schema: dict[str, Any]) -> dict[str, Any]:
        merged: dict[str, Any] = {k: v for k, v in schema.items() if k != "allOf"}
        for part in schema["allOf"]:
            part = self.resolve(part)
            for key, val in part.items():
                if key == "properties":
                    merged["properties"] = {**merged.get("properties", {}), **val}
                elif key == "required":
                    merged["required"] = sorted({*merged.get("required", []), *val})
                else:
                    merged.setdefault(key, val)
        return merged

    def kind(self, schema: dict[str, Any], depth: int) -> str:
        kind = schema.get("type")
        if isinstance(kind, list):
            non_null = [k for k in kind if k != "null"]
            if not non_null or (depth >= _MAX_DEPTH and "null" in kind):
                return "null"
            return str(non_null[0])
        if isinstance(kind, str):
            return kind
        if "properties" in schema or "additionalProperties" in schema:
            return "object"
        if "items" in schema or "prefixItems" in schema:
            return "array"
        if "anyOf" in schema or "oneOf" in schema or "allOf" in schema or "enum" in schema:
            return "composite"
        return "string"

    def text(self, min_len: int | None, max_len: int | None) -> str:
        low = min_len or 0
        out = " ".join(self.rng.choice(self.words) for _ in range(self.rng.randint(2, 6)))
        while len(out) < low:
            out = f"{out} {self.rng.choice(self.words)}"
        if max_len is not None and len(out) > max_len:
            out = out[:max_len]
            # A cut can end on a space; drop it unless that breaks minLength.
            if len(out.rstrip()) >= low:
                out = out.rstrip()
        return out

    def string(self, schema: dict[str, Any]) -> str:
        fmt = schema.get("format")
        if isinstance(fmt, str) and fmt in _FORMATS:
            return _FORMATS[fmt]
        return self.text(schema.get("minLength"), schema.get("maxLength"))

    def integer(self, schema: dict[str, Any]) -> int:
        low, high = _bounds(schema)
        lo = math.ceil(low) if low is not None else None
        hi = math.floor(high) if high is not None else None
        if schema.get("exclusiveMinimum") is not None and lo == schema["exclusiveMinimum"]:
            lo += 1
        if schema.get("exclusiveMaximum") is not None and hi == schema["exclusiveMaximum"]:
            hi -= 1
        lo, hi = _fill_bounds(lo, hi, span=100)
        return self.rng.randint(int(lo), int(hi))

    def number(self, schema: dict[str, Any]) -> float:
        low, high = _bounds(schema)
        lo, hi = _fill_bounds(low, high, span=1.0)
        # Stay strictly inside when a bound is exclusive.
        value = round(self.rng.uniform(lo, hi), 3)
        if schema.get("exclusiveMinimum") is not None and value <= schema["exclusiveMinimum"]:
            value = (lo + hi) / 2
        if schema.get("exclusiveMaximum") is not None and value >= schema["exclusiveMaximum"]:
            value = (lo + hi) / 2
        return value

    def array(self, schema: dict[str, Any], depth: int) -> list[Any]:
        prefix = schema.get("prefixItems") or []
        low = int(schema.get("minItems", 0))
        high = schema.get("maxItems")
        if depth >= _MAX_DEPTH:
            count = max(low, len(prefix))
        else:
            count = self.rng.randint(max(low, 1), max(low, 1) + 2)
        if prefix:  # fill the whole tuple
            count = max(count, len(prefix))
        if high is not None:
            count = min(count, int(high))
        count = max(count, low)
        items = schema.get("items", {} if not prefix else False)
        out: list[Any] = []
        attempts = 0
        while len(out) < count and attempts < count * 10:
            attempts += 1
            index = len(out)
            if index < len(prefix):
                item_schema = prefix[index]
            elif items is False:
                break
            else:
                item_schema = items
            item = self.value(item_schema, depth + 1)
            if schema.get("uniqueItems") and item in out:
                continue
            out.append(item)
        return out

    def obj(self, schema: dict[str, Any], depth: int) -> dict[str, Any]:
        props: dict[str, Any] = schema.get("properties", {})
        required = set(schema.get("required", []))
        out: dict[str, Any] = {}
        for name, prop in props.items():
            # Optional properties are filled too (richer answers), except deep down.
            if name in required or depth < _MAX_DEPTH:
                out[name] = self.value(prop, depth + 1)
                if name in self.choices and isinstance(out[name], str):
                    limit = self.resolve(prop).get("maxLength") if isinstance(prop, dict) else None
                    fitting = [c for c in self.choices[name] if limit is None or len(c) <= limit]
                    if fitting:
                        out[name] = self.rng.choice(fitting)
        extra = schema.get("additionalProperties")
        want = int(schema.get("minProperties", 0))
        if isinstance(extra, dict) and not props and depth < _MAX_DEPTH:
            want = max(want, self.rng.randint(1, 2))
        if extra is not False:
            extra_schema = extra if isinstance(extra, dict) else {"type": "string"}
            while len(out) < want:
                key = f"{self.rng.choice(self.words)}_{len(out)}"
                out[key] = self.value(extra_schema, depth + 1)
        return out


def _bounds(schema: dict[str, Any]) -> tuple[float | None, float | None]:
    """Inclusive or exclusive bounds, whichever the schema gives."""
    low = schema.get("minimum", schema.get("exclusiveMinimum"))
    high = schema.get("maximum", schema.get("exclusiveMaximum"))
    return low, high


def _fill_bounds(low: float | None, high: float | None, span: float) -> tuple[float, float]:
    """Close an open range with a span of ``span`` next to the bound given."""
    if low is None and high is None:
        return 0, span
    if low is None:
        assert high is not None
        return high - span, high
    if high is None:
        return low, low + span
    return low, high
