"""Config primitives: the error type, JSON reading, typed values and the frame and bucket-grid rules."""

from __future__ import annotations

import difflib
import enum
import json
import math
import re
import types
import typing
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal

# VAE downsamples 8x and the DiT patchifies 2x, so every pixel side must be a multiple of 16.
PIXEL_MULTIPLE = 16
# The causal Wan VAE keeps frame 0 alone and then packs frames in groups of 4.
FRAME_STRIDE = 4


class _Missing(enum.Enum):
    """Marks an error that is about a key, not a value (an enum member so it survives pickling)."""

    NO_VALUE = 0


NO_VALUE = _Missing.NO_VALUE


class ConfigError(ValueError):
    """A config problem, worded for the user: file, key, value, the rule broken and a hint."""

    def __init__(self, file: Any, key: str, value: Any, rule: str, hint: str = "") -> None:
        # The five fields are the exception's args, so Ray can pickle and rebuild it across processes.
        super().__init__(file, key, value, rule, hint)
        self.file, self.key, self.value, self.rule, self.hint = str(file), key, value, rule, hint

    def __str__(self) -> str:
        head = self.file + (f": key '{self.key}'" if self.key else "")
        head += "" if self.value is NO_VALUE else f" = {self.value!r}"
        return f"{head}: {self.rule}" + (f". Hint: {self.hint}" if self.hint else "")


def read_json_file(path: Path, what: str) -> Any:
    """Parse a JSON file, turning a missing file or bad JSON into a ConfigError with line and column."""
    if not path.is_file():
        raise ConfigError(path, "", NO_VALUE, f"{what} file not found (resolved to {path})")
    text = path.read_text(encoding="utf-8")
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        hint = ""
        if text[err.pos : err.pos + 2] in ("//", "/*"):
            hint = "JSON has no comments; remove them (docs/CONFIG.md documents every key instead)"
        elif text[err.pos : err.pos + 1] in ("}", "]"):
            hint = "a trailing comma before this bracket is not allowed in JSON"
        rule = f"invalid JSON at line {err.lineno}, column {err.colno}: {err.msg}"
        raise ConfigError(path, "", NO_VALUE, rule, hint) from None


def resolve_relative(path: Path, base: Path) -> Path:
    """A relative path is read from `base` (the naming file's directory); where it exists only under the working
    directory (SimpleTuner's convention, e.g. "config/multidatabackend.json" run from the project root), from there."""
    path = path.expanduser()
    if path.is_absolute():
        return path.resolve()
    beside = base / path
    if not beside.exists() and (Path.cwd() / path).exists():
        return (Path.cwd() / path).resolve()
    return beside.resolve()


def suggest(key: str, known: Iterable[str]) -> str:
    """A 'did you mean' hint naming the closest known key, or an empty string."""
    close = difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.6)
    return f"did you mean '{close[0]}'?" if close else "see docs/CONFIG.md for the keys this project reads"


def _type_name(hint: Any) -> str:
    """How a type annotation reads in an error message."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _type_name(a) for a in args)
    if origin is tuple:
        return f"a list of {_type_name(args[0])}" if args[-1] is Ellipsis else f"a list of {len(args)} values"
    names = {bool: "true/false", int: "an integer", float: "a number", str: "a string", Path: "a path string"}
    return names.get(hint, getattr(hint, "__name__", str(hint)))


def _scalar(value: Any, hint: Any) -> Any:
    """Convert one JSON scalar to bool/int/float/str/Path; None where it does not fit."""
    # Strings are accepted for numbers and booleans because SimpleTuner's config.json goes through argparse.
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in ("true", "false"):
            return value.strip().lower() == "true"
    elif hint is int and not isinstance(value, bool):
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str) and re.fullmatch(r"\s*[-+]?\d+\s*", value):
            return int(value)
    elif hint is float and not isinstance(value, bool):
        number = value
        if isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                return None
        if isinstance(number, (int, float)) and math.isfinite(number):
            return float(number)
    elif hint is str and isinstance(value, str):
        return value
    elif hint is Path and isinstance(value, str) and value.strip():
        return Path(value)
    return None


def coerce(value: Any, hint: Any, where: Any, key: str) -> Any:
    """Check a JSON value against a type annotation and convert it, or raise ConfigError."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return coerce(value, inner, where, key)
    if origin is Literal:
        choice = _scalar(value, int) if all(isinstance(a, int) for a in args) else value
        if choice in args:
            return choice
        raise ConfigError(where, key, value, f"expected {_type_name(hint)}")
    if origin is tuple:
        items = value.split(",") if isinstance(value, str) else value
        if isinstance(items, list):
            inner = args[0]
            items = [i.strip() if isinstance(i, str) else i for i in items]
            converted = [_scalar(i, inner) for i in items]
            fixed_length = args[-1] is Ellipsis or len(items) == len(args)
            if fixed_length and all(c is not None for c in converted):
                return tuple(converted)
        raise ConfigError(where, key, value, f"expected {_type_name(hint)}")
    converted = _scalar(value, hint)
    if converted is None:
        raise ConfigError(where, key, value, f"expected {_type_name(hint)}")
    return converted


def check_range(where: Any, key: str, value: float, lo: float | None = None, hi: float | None = None,
                lo_open: bool = False, hi_open: bool = False) -> None:  # fmt: skip
    """Raise ConfigError unless lo <= value <= hi (either end open or absent)."""
    below = lo is not None and (value <= lo if lo_open else value < lo)
    above = hi is not None and (value >= hi if hi_open else value > hi)
    if below or above:
        left = "(" if lo_open else "["
        right = ")" if hi_open else "]"
        span = f"{left}{'-inf' if lo is None else lo}, {'inf' if hi is None else hi}{right}"
        raise ConfigError(where, key, value, f"must lie in {span}")


def check_frames(frames: int, key: str, where: Any = "config") -> int:
    """Return frames if (frames - 1) % 4 == 0 and frames >= 1, else raise naming the nearest valid counts."""
    if isinstance(frames, bool) or not isinstance(frames, int) or frames < 1:
        raise ConfigError(where, key, frames, "a frame count must be a positive integer", "93 is the default")
    if (frames - 1) % FRAME_STRIDE:
        below = frames - (frames - 1) % FRAME_STRIDE
        above = below + FRAME_STRIDE
        rule = f"frame counts must satisfy (frames - 1) % {FRAME_STRIDE} == 0 (the VAE packs frames in 4s)"
        raise ConfigError(where, key, frames, rule, f"use {below} or {above}")
    return frames


def check_resolution(h: int, w: int, key: str, alignment: int = 64, where: Any = "config") -> None:
    """Apply the bucket grid rule: sides divisible by 16, the long side a multiple of `alignment`."""
    size = f"{h}x{w}"
    if isinstance(alignment, bool) or not isinstance(alignment, int) or alignment < 1:
        raise ConfigError(where, "aspect_bucket_alignment", alignment, "must be a positive integer")
    for side, name in ((h, "height"), (w, "width")):
        if isinstance(side, bool) or not isinstance(side, int) or side < PIXEL_MULTIPLE:
            raise ConfigError(where, key, size, f"{name} must be an integer >= {PIXEL_MULTIPLE}")
    short_side, long_side = sorted((h, w))
    # The short side is the bucket's resolution (480 for 480p); only a non-square bucket's long side is gridded.
    # Checked first because a long side on the grid also passes the 16 rule, so its hint is the useful one.
    if short_side != long_side and long_side % alignment:
        low = long_side - long_side % alignment
        fits = " or ".join(str(v) for v in (low, low + alignment) if v >= short_side)
        rule = f"the long side {long_side} is not a multiple of aspect_bucket_alignment {alignment}"
        raise ConfigError(where, key, size, rule, f"use {fits} for the long side")
    for side, name in ((h, "height"), (w, "width")):
        if side % PIXEL_MULTIPLE:
            low = side - side % PIXEL_MULTIPLE
            rule = f"{name} {side} is not divisible by {PIXEL_MULTIPLE} (VAE x8, patch x2)"
            raise ConfigError(where, key, size, rule, f"use {low} or {low + PIXEL_MULTIPLE}")
