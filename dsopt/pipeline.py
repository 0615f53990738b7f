"""Pipelines: the textual form `a,b{k=v}`, config files, and the default lossless pipeline."""

from __future__ import annotations

import dataclasses
import os
import re
import tomllib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from dsopt.errors import UsageError

__all__ = [
    "DEFAULT_PIPELINE",
    "STAGES",
    "Pipeline",
    "PipelineEntry",
    "find_config",
    "load_config",
    "parse_pipeline",
]

#: Stage order: a pass declares its stage; pipelines list passes in this order.
STAGES = ("canonicalize", "fuse", "qdq", "quantize", "precision", "attention", "prune")

#: The default lossless pipeline; the pass manager repeats it while anything changes.
#: Lossless allows `reassoc` fusions: exact up to float re-association.
DEFAULT_PIPELINE = (
    "inline-constants,eliminate-noops,simplify-shapes,fold-constants,upgrade-opset,"
    "fuse-batch-norm,fold-bias-add,fold-conv-scale,fuse-matmul-add,fuse-activations,"
    "fuse-layer-norm,fuse-attention,fold-constant-chains,merge-layout-chains,fold-pad,"
    "fuse-contrib-ops,fold-qdq,"
    "eliminate-common-subexpressions,eliminate-dead"
)

DEFAULT_ROUNDS = 4


@dataclasses.dataclass
class PipelineEntry:
    """One pass of a pipeline, by name, with option strings."""

    name: str
    options: dict[str, str] = dataclasses.field(default_factory=dict)

    def __str__(self) -> str:
        if not self.options:
            return self.name
        return self.name + "{" + ",".join(f"{k}={v}" for k, v in self.options.items()) + "}"


@dataclasses.dataclass
class Pipeline:
    """An editable, ordered list of pass entries (plugins extend it through a hook)."""

    entries: list[PipelineEntry]
    rounds: int = 1

    def names(self) -> list[str]:
        """The pass names in order."""
        return [e.name for e in self.entries]

    def _index(self, name: str) -> int:
        for i, entry in enumerate(self.entries):
            if entry.name == name:
                return i
        raise UsageError(f"pipeline has no pass '{name}' (passes: {', '.join(self.names())})")

    def insert_after(self, anchor: str, text: str) -> None:
        """Inserts the passes in `text` right after the first `anchor`."""
        i = self._index(anchor)
        self.entries[i + 1 : i + 1] = parse_pipeline(text).entries

    def insert_before(self, anchor: str, text: str) -> None:
        """Inserts the passes in `text` right before the first `anchor`."""
        i = self._index(anchor)
        self.entries[i:i] = parse_pipeline(text).entries

    def append(self, text: str) -> None:
        """Appends the passes in `text`."""
        self.entries.extend(parse_pipeline(text).entries)

    def remove(self, name: str) -> None:
        """Removes every entry named `name`."""
        self.entries = [e for e in self.entries if e.name != name]

    def with_options(self, options: Mapping[str, Mapping[str, Any]]) -> Pipeline:
        """A copy where `options[pass_name]` fills options the text did not set."""
        entries = []
        for entry in self.entries:
            merged = {k: str(v) for k, v in options.get(entry.name, {}).items()}
            merged.update(entry.options)
            entries.append(PipelineEntry(entry.name, merged))
        return Pipeline(entries, self.rounds)

    def __str__(self) -> str:
        return ",".join(str(e) for e in self.entries)


_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.\-]*")


def parse_pipeline(text: str) -> Pipeline:
    """Parses `a,b{k=v,k2=v2},c` into a Pipeline; errors name the position and the text.

    The name `default` stands for the default pipeline's passes, e.g. `legalize-quantized,default`.
    """
    entries: list[PipelineEntry] = []
    i, n = 0, len(text)

    def fail(message: str) -> UsageError:
        return UsageError(
            f"bad --passes text at column {i + 1}: {message} in '{text}'",
            hint="write passes as name,name{option=value,...}",
        )

    while i < n:
        while i < n and text[i] in " \t\n,":
            i += 1
        if i >= n:
            break
        match = _NAME.match(text, i)
        if match is None:
            raise fail(f"expected a pass name, found '{text[i]}'")
        name = match.group(0)
        i = match.end()
        options: dict[str, str] = {}
        while i < n and text[i] == " ":
            i += 1
        if i < n and text[i] == "{":
            close = text.find("}", i)
            if close < 0:
                raise fail("unclosed '{'")
            body = text[i + 1 : close]
            for item in filter(None, (part.strip() for part in body.split(","))):
                if "=" not in item:
                    raise fail(f"option '{item}' needs a value (name=value)")
                key, value = (s.strip() for s in item.split("=", 1))
                if not key:
                    raise fail(f"option '{item}' has no name")
                options[key] = value
            i = close + 1
        while i < n and text[i] == " ":
            i += 1
        if i < n and text[i] != ",":
            raise fail(f"expected ',' after pass '{name}'")
        if name == "default" and not options:  # the default pipeline, spliced in place
            entries.extend(parse_pipeline(DEFAULT_PIPELINE).entries)
        else:
            entries.append(PipelineEntry(name, options))
    if not entries:
        raise UsageError("--passes is empty", hint="name at least one pass; see `dsopt passes`")
    return Pipeline(entries)


def default_pipeline() -> Pipeline:
    """The lossless default pipeline, repeated up to DEFAULT_ROUNDS while it changes the model."""
    pipeline = parse_pipeline(DEFAULT_PIPELINE)
    pipeline.rounds = DEFAULT_ROUNDS
    return pipeline


__all__ += ["default_pipeline", "DEFAULT_ROUNDS"]

_CONFIG_KEYS = {
    "passes",
    "target",
    "verify",
    "options",
    "check",
    "rtol",
    "atol",
    "shapes",
    "rounds",
    "precision",
    "size_budget",
    "max_error",
    "min_cosine",
}

#: `--precision mixed` budgets a config may set: what each accepts, for errors.
BUDGET_KEYS = {
    "size_budget": 'a fraction of the float32 weight bytes in (0, 1] or a size like "12MB"',
    "max_error": "a positive relative L2 error, e.g. 0.01",
    "min_cosine": "a cosine in (-1, 1), e.g. 0.995",
}


def check_budget(key: str, value: Any, where: str) -> None:
    """Raises a one-line UsageError naming `key` when `value` is no valid budget for it."""
    import math

    ok = False
    number = isinstance(value, int | float) and not isinstance(value, bool)
    if key == "size_budget" and (number or isinstance(value, str)):
        from dsopt.mixed import parse_size_budget

        try:
            parse_size_budget(value, 1 << 30)
            ok = True
        except UsageError:
            ok = False
    elif key == "max_error":
        ok = number and 0 < value < math.inf
    elif key == "min_cosine":
        ok = number and -1 < value < 1
    if not ok:
        raise UsageError(
            f"{where}: {key} = {value!r} is not {BUDGET_KEYS[key]}",
            hint=f"fix {key} (a --precision mixed budget; the flag --{key.replace('_', '-')} "
            "overrides it)",
        )


def find_config(start: Path | None = None) -> Path | None:
    """The nearest `dsopt.toml`, or `pyproject.toml` with `[tool.dsopt]`, from `start` upwards."""
    here = (start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        candidate = folder / "dsopt.toml"
        if candidate.is_file():
            return candidate
        project = folder / "pyproject.toml"
        if (
            project.is_file()
            and "tool" in _read_toml(project)
            and "dsopt" in _read_toml(project).get("tool", {})
        ):
            return project
    return None


def load_config(path: str | os.PathLike[str] | None) -> dict[str, Any]:
    """Reads a dsopt config (dsopt.toml, or pyproject's [tool.dsopt]); unknown keys are errors."""
    if path is None:
        return {}
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"config file {path} does not exist")
    data = _read_toml(path)
    if path.name == "pyproject.toml":
        data = data.get("tool", {}).get("dsopt", {})
    unknown = sorted(set(data) - _CONFIG_KEYS)
    if unknown:
        raise UsageError(
            f"{path}: unknown dsopt setting '{unknown[0]}' "
            f"(known: {', '.join(sorted(_CONFIG_KEYS))})"
        )
    if isinstance(data.get("passes"), list):
        data["passes"] = ",".join(str(p) for p in data["passes"])
    options = data.get("options", {})
    if not isinstance(options, dict) or not all(isinstance(v, dict) for v in options.values()):
        raise UsageError(
            f"{path}: [options] must hold one table per pass, e.g. [options.fold-constants]"
        )
    for key in BUDGET_KEYS:
        if key in data:
            check_budget(key, data[key], str(path))
    data["source"] = str(path)
    return data


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except (tomllib.TOMLDecodeError, OSError) as e:
        raise UsageError(f"{path}: not valid TOML ({e})") from e


def stage_sorted(names: Iterable[str], stage_of: Mapping[str, str]) -> list[str]:
    """`names` stably ordered by stage (helper for plugins building pipelines)."""
    order = {s: i for i, s in enumerate(STAGES)}
    return sorted(names, key=lambda name: order.get(stage_of.get(name, ""), len(order)))


__all__ += ["BUDGET_KEYS", "check_budget", "stage_sorted"]
