"""A content-addressed cache of `dsopt optimize` and `dsopt compile` outputs, for build systems.

The key is a sha256 over everything that decides the output: the model's bytes (external data
included), the effective settings (pipeline, options, target, precision, budgets, tolerances),
the bytes of calibration and input files, dsopt's version and the source of every plugin that
is loaded (built-ins included, so an edited checkout or an editable plugin install never returns
a stale artifact). An entry is written to a temporary sibling and renamed into place, so
concurrent builds never see half an entry.

`compile` entries hold the whole OUTDIR (model, library, manifest, report); their key adds the
target's declaration (TVM config, the build machine's CPU for host-tuned targets, lowering
functions), the tuning settings and the versions of TVM and onnxruntime. A hit copies the entry
into a temporary sibling of OUTDIR and renames it into place, so OUTDIR is never partial, with
fresh file times so Make sees the outputs as new.

The cache is opt-in (`--cache-dir DIR`, `--cache` for the user cache dir, or DSOPT_CACHE_DIR):
a hit skips every pass, so hooks (`-p` plugins, --dump-dir, --print-after) would silently not
run; those runs bypass it. What a plugin reads at run time (say the files behind its
`dsopt_calibration_data`) is not part of the key, only its source; nor is the content of a
tuning database.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import importlib.metadata
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from types import ModuleType
from typing import Any

import onnx

__all__ = [
    "ArtifactCache",
    "cache_key",
    "compile_key",
    "compile_settings",
    "default_cache_dir",
    "feeds_digest",
    "target_fingerprint",
]

#: Bump when the key's recipe or the entry layout changes.
CACHE_FORMAT = 1
#: The folder of a compile entry that holds the OUTDIR copy.
_TREE = "outdir"


def default_cache_dir() -> Path:
    """$XDG_CACHE_HOME/dsopt/artifacts, else ~/.cache/dsopt/artifacts."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache")
    return Path(base) / "dsopt" / "artifacts"


def _hash_file(digest: Any, path: Path) -> None:
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)


def _external_files(path: Path) -> list[Path]:
    proto = onnx.load(path, load_external_data=False)
    locations: set[str] = set()
    stack = [proto.graph]
    while stack:
        graph = stack.pop()
        tensors = list(graph.initializer)
        for node in graph.node:
            for attr in node.attribute:
                tensors.extend([attr.t, *attr.tensors])
                stack.extend([attr.g, *attr.graphs] if attr.HasField("g") else attr.graphs)
        for tensor in tensors:
            if tensor.data_location == onnx.TensorProto.EXTERNAL:
                entries = {e.key: e.value for e in tensor.external_data}
                if entries.get("location"):
                    locations.add(entries["location"])
    return [path.parent / loc for loc in sorted(locations)]


def file_digest(path: str | os.PathLike[str]) -> str:
    """sha256 of a file, a folder's files (names and bytes, sorted), or a model and its data.

    An `.onnx` file's external data files are hashed with it.
    """
    path = Path(path)
    digest = hashlib.sha256()
    if path.is_dir():
        for item in sorted(p for p in path.rglob("*") if p.is_file()):
            digest.update(str(item.relative_to(path)).encode() + b"\0")
            _hash_file(digest, item)
        return digest.hexdigest()
    _hash_file(digest, path)
    if path.suffix == ".onnx":
        for data in _external_files(path):
            digest.update(data.name.encode() + b"\0")
            if data.is_file():
                _hash_file(digest, data)
    return digest.hexdigest()


def _source_roots(modules: Iterable[ModuleType]) -> list[Path]:
    """The source a plugin module runs: its package folder, or its top package's, or its file."""
    roots: set[Path] = set()
    for module in modules:
        file = getattr(module, "__file__", None)
        if not file:
            continue
        path = Path(file)
        if path.name == "__init__.py":
            roots.add(path.parent)
            continue
        top = sys.modules.get(module.__name__.split(".")[0]) or importlib.import_module(
            module.__name__.split(".")[0]
        )
        top_file = getattr(top, "__file__", None)
        if top is not module and top_file and Path(top_file).name == "__init__.py":
            roots.add(Path(top_file).parent)
        else:
            roots.add(path)
    return sorted(roots)


def plugin_fingerprint(host: Any) -> dict[str, Any]:
    """Name, distribution version and source digest of every plugin the host loaded."""
    versions = {
        host.pm.get_name(plugin): f"{dist.project_name} {dist.version}"
        for plugin, dist in host.pm.list_plugin_distinfo()
    }
    modules = [p for p in host.pm.get_plugins() if isinstance(p, ModuleType)]
    digest = hashlib.sha256()
    for root in _source_roots(modules):
        files = sorted(root.rglob("*.py")) if root.is_dir() else [root]
        for file in files:
            digest.update(str(file.relative_to(root.parent)).encode() + b"\0")
            _hash_file(digest, file)
    names = sorted(filter(None, (host.pm.get_name(p) for p in host.pm.get_plugins())))
    return {"plugins": {n: versions.get(n) for n in names}, "source": digest.hexdigest()}


def cache_key(model: str | os.PathLike[str], settings: Mapping[str, Any], host: Any) -> str:
    """The sha256 key of an optimize run.

    `settings` holds every option that shapes the output (JSON-serializable); entries naming
    files go through `file_digest` when their key ends in `_file`.
    """
    from dsopt import __version__

    resolved = {}
    for key, value in sorted(settings.items()):
        if key.endswith("_file") and value is not None and Path(str(value)).exists():
            value = file_digest(str(value))
        resolved[key] = value
    recipe = {
        "format": CACHE_FORMAT,
        "dsopt": __version__,
        "model": file_digest(model),
        "settings": resolved,
        "plugins": plugin_fingerprint(host),
    }
    text = json.dumps(recipe, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def feeds_digest(feeds: Iterable[Mapping[str, Any]]) -> str:
    """sha256 of in-memory feeds: names, dtypes, shapes and bytes of every array, in order."""
    import numpy as np

    digest = hashlib.sha256()
    for index, feed in enumerate(feeds):
        digest.update(f"#{index}".encode())
        for name in sorted(feed):
            array = np.ascontiguousarray(feed[name])
            digest.update(f"{name}\0{array.dtype.str}\0{array.shape}\0".encode())
            digest.update(array.tobytes())
    return digest.hexdigest()


def _callable_name(value: Any) -> str:
    return f"{getattr(value, '__module__', '?')}.{getattr(value, '__qualname__', repr(value))}"


def _build_machine() -> dict[str, Any]:
    """The CPU a host-tuned target compiles for: architecture, model name and SIMD flags."""
    import platform

    info: dict[str, Any] = {"machine": platform.machine()}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key in ("model name", "flags", "Features", "CPU part") and key not in info:
                info[key] = " ".join(sorted(value.split())) if key != "model name" else value
    except OSError:
        info["processor"] = platform.processor()
    return info


def target_fingerprint(target: Any) -> dict[str, Any]:
    """Everything a `dsopt.Target` declares that shapes a compiled OUTDIR, JSON-ready."""
    spec: dict[str, Any] = {}
    for field in dataclasses.fields(target):
        value = getattr(target, field.name)
        if callable(value):
            value = _callable_name(value)
        elif isinstance(value, (set, frozenset)):
            value = sorted(value)
        spec[field.name] = value
    if getattr(target, "host_cpu", False):
        spec["build_machine"] = _build_machine()
    return spec


def _version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def compile_key(
    model: str | os.PathLike[str], settings: Mapping[str, Any], host: Any, target: Any
) -> str:
    """The sha256 key of a compile run: `cache_key` plus the target and runtime versions."""
    versions = {
        name: _version(name) for name in ("apache-tvm", "apache-tvm-ffi", "onnxruntime", "onnx")
    }
    full = {
        **settings,
        "command": "compile",
        "target_spec": target_fingerprint(target),
        "versions": versions,
    }
    return cache_key(model, full, host)


#: Run options of the per-pass instruments: a hit runs no pass, so runs using them bypass.
_INSTRUMENTS = ("print_after", "print_after_change", "dump_dir")


def compile_settings(
    settings: Mapping[str, Any], options: Mapping[str, Any] | None
) -> dict[str, Any] | None:
    """`compile`'s arguments as JSON-ready key settings; None when the run must bypass.

    In-memory feeds (`inputs`, `calibration`) become digests, a calibration path becomes a
    `calibration_file` (hashed by `cache_key`), and a config file path its loaded settings.
    """
    from dsopt.pipeline import load_config

    options = dict(options or {})
    if any(options.get(name) for name in _INSTRUMENTS):
        return None
    options = {k: v for k, v in options.items() if k not in (*_INSTRUMENTS, "progress")}
    resolved: dict[str, Any] = {"options": options}
    for name, value in settings.items():
        if name == "config" and value is not None and not isinstance(value, Mapping):
            value = load_config(value)
        if name == "inputs" and value is not None:
            value = feeds_digest(value)
        if name == "calibration" and value is not None:
            if isinstance(value, (str, os.PathLike)) and str(value) != "synthetic":
                resolved["calibration_file"] = str(value)
                continue
            if not isinstance(value, str):
                value = feeds_digest(value)
        resolved[name] = value
    return resolved


class ArtifactCache:
    """Entries `DIR/<key[:2]>/<key>/`: `model.onnx` + `report.json` (optimize) or `outdir/`."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)

    def _entry(self, key: str) -> Path:
        return self.root / key[:2] / key

    def get(self, key: str) -> tuple[Path, dict[str, Any]] | None:
        """The cached model file and report of `key`, or None."""
        entry = self._entry(key)
        model, report = entry / "model.onnx", entry / "report.json"
        if not (model.is_file() and report.is_file()):
            return None
        try:
            return model, json.loads(report.read_text())
        except (OSError, ValueError):
            return None  # a damaged entry is a miss; the next store replaces it

    def put(self, key: str, model: Path, report: Mapping[str, Any]) -> bool:
        """Stores a copy of `model` (no external data) and its report; False when not cacheable."""
        if _external_files(model):
            return False

        def fill(tmp: Path) -> None:
            shutil.copyfile(model, tmp / "model.onnx")
            (tmp / "report.json").write_text(json.dumps(report, indent=2) + "\n")

        self._store(key, fill)
        return True

    def get_tree(self, key: str) -> Path | None:
        """The cached OUTDIR of `key` if its manifest's files are all there, unchanged."""
        tree = self._entry(key) / _TREE
        try:
            manifest = json.loads((tree / "manifest.json").read_text())
            json.loads((tree / "report.json").read_text())
        except (OSError, ValueError):
            return None
        from dsopt.driver import verify_manifest
        from dsopt.errors import UsageError

        try:
            verify_manifest(tree, manifest)
        except UsageError:
            return None  # damaged: a miss, and the next store replaces it
        return tree

    def put_tree(self, key: str, folder: Path) -> None:
        """Stores a copy of the OUTDIR `folder` under `key` (atomically: all or nothing)."""
        entry = self._entry(key)
        if entry.exists() and self.get_tree(key) is None:  # damaged: replace it
            shutil.rmtree(entry, ignore_errors=True)
        self._store(
            key, lambda tmp: shutil.copytree(folder, tmp / _TREE, copy_function=shutil.copyfile)
        )

    def _store(self, key: str, fill: Any) -> None:
        """Fills a temporary sibling of `key`'s entry with `fill(tmp)`, then renames it in."""
        entry = self._entry(key)
        entry.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{key[:8]}-", dir=entry.parent))
        try:
            fill(tmp)
            try:
                os.replace(tmp, entry)
            except OSError:  # another build stored the same key first: same bytes
                shutil.rmtree(tmp, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def restore_tree(self, tree: Path, out: Path, report: Mapping[str, Any]) -> None:
        """Copies the cached OUTDIR `tree` to `out` with `report` as its report.json.

        The copy is built in a temporary sibling of `out` and renamed into place; files get
        fresh modification times.
        """
        from dsopt.limits import discard_on_abort

        out.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
        with discard_on_abort(staging):
            try:
                shutil.copytree(tree, staging, dirs_exist_ok=True, copy_function=shutil.copyfile)
                (staging / "report.json").write_text(json.dumps(report, indent=2) + "\n")
                if out.exists():
                    shutil.rmtree(out)
                os.replace(staging, out)
            finally:
                if staging.exists():
                    shutil.rmtree(staging, ignore_errors=True)
