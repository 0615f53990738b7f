"""A content-addressed cache of `dsopt optimize` outputs, for build systems.

The key is a sha256 over everything that decides the output: the model's bytes (external data
included), the effective settings (pipeline, options, target, precision, budgets, tolerances),
the bytes of calibration and input files, dsopt's version and the source of every plugin that
is loaded (built-ins included, so an edited checkout or an editable plugin install never returns
a stale artifact). An entry is written to a temporary sibling and renamed into place, so
concurrent builds never see half an entry.

The cache is opt-in (`--cache-dir DIR`, `--cache` for the user cache dir, or DSOPT_CACHE_DIR):
a hit skips every pass, so hooks (`-p` plugins, --dump-dir, --print-after) would silently not
run; those runs bypass it.
"""

from __future__ import annotations

import hashlib
import importlib
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

__all__ = ["ArtifactCache", "cache_key", "default_cache_dir"]

#: Bump when the key's recipe or the entry layout changes.
CACHE_FORMAT = 1


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


class ArtifactCache:
    """Entries `DIR/<key[:2]>/<key>/{model.onnx,report.json}`."""

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
        entry = self._entry(key)
        entry.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{key[:8]}-", dir=entry.parent))
        try:
            shutil.copyfile(model, tmp / "model.onnx")
            (tmp / "report.json").write_text(json.dumps(report, indent=2) + "\n")
            try:
                os.replace(tmp, entry)
            except OSError:  # another build stored the same key first: same bytes
                shutil.rmtree(tmp, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return True
