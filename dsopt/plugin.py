"""The plugin host: built-in and third-party plugins, loaded the same way, into registries."""

from __future__ import annotations

import dataclasses
import importlib
import importlib.metadata
import logging
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from types import ModuleType
from typing import Any, TypeVar

import pluggy

from dsopt import hookspecs
from dsopt.backend import Target
from dsopt.errors import PluginError, UsageError
from dsopt.pass_infra import Pass

__all__ = ["DEFAULT_PLUGINS", "ENTRY_POINT_GROUP", "PassRegistry", "PluginHost", "TargetRegistry"]

logger = logging.getLogger(__name__)
T = TypeVar("T")

#: Built-in plugins, registered exactly like third-party ones (pytest's default_plugins).
DEFAULT_PLUGINS = ("dsopt.passes", "dsopt.targets", "dsopt.instruments")
ENTRY_POINT_GROUP = "dsopt"


class PassRegistry:
    """Pass classes by name, with the plugin that provided each."""

    def __init__(self) -> None:
        self._passes: dict[str, type[Pass]] = {}
        self.providers: dict[str, str] = {}
        #: pass name -> ("after" | "before", anchor): where default pipelines run it.
        self.placements: dict[str, tuple[str, str]] = {}
        self.current_plugin = "?"

    def add(
        self, pass_class: type[Pass], *, after: str | None = None, before: str | None = None
    ) -> None:
        """Registers `pass_class`; its metadata is checked and its name must be new.

        `after` / `before` (at most one) name a pass or a stage (`dsopt.pipeline.STAGES`, the
        pipeline's named slots): default and target pipelines then run the pass right after
        that pass (or the last pass of that stage), or right before it (or the first pass of
        that stage). Without either the plugin places it itself (`dsopt_extend_pipeline`).
        """
        if after is not None and before is not None:
            raise PluginError(
                f"plugin '{self.current_plugin}': pass '{getattr(pass_class, 'name', '?')}' "
                "declares both after= and before=; give one anchor"
            )
        if not (isinstance(pass_class, type) and issubclass(pass_class, Pass)):
            raise PluginError(
                f"plugin '{self.current_plugin}' registered {pass_class!r}, which is not a "
                "dsopt.Pass subclass"
            )
        name = pass_class.name
        if not name or not pass_class.summary:
            raise PluginError(
                f"plugin '{self.current_plugin}': pass class {pass_class.__name__} must declare "
                "`name` and `summary`"
            )
        if pass_class.exactness not in ("exact", "reassoc", "lossy"):
            raise PluginError(f"pass '{name}': exactness must be exact, reassoc or lossy")
        if pass_class.exactness == "lossy" and pass_class.tolerance is None:
            raise PluginError(f"pass '{name}' is lossy and must declare `tolerance`")
        if not dataclasses.is_dataclass(pass_class):
            raise PluginError(f"pass '{name}' must be a (frozen) dataclass; its fields are options")
        if name in self._passes and self._passes[name] is not pass_class:
            raise PluginError(
                f"pass '{name}' is registered twice: by plugin '{self.providers[name]}' and by "
                f"plugin '{self.current_plugin}'",
                hint="uninstall one of them or block it with --disable-plugin",
            )
        self._passes[name] = pass_class
        self.providers[name] = self.current_plugin
        if after is not None or before is not None:
            anchor = after if after is not None else before
            self.placements[name] = ("after" if after is not None else "before", str(anchor))

    def get(self, name: str) -> type[Pass]:
        """The pass class named `name`; UsageError lists the known names."""
        try:
            return self._passes[name]
        except KeyError:
            raise UsageError(
                f"unknown pass '{name}' (known: {', '.join(sorted(self._passes))})",
                hint="`dsopt passes` lists them with their options",
            ) from None

    def __contains__(self, name: object) -> bool:
        return name in self._passes

    def __iter__(self) -> Iterable[type[Pass]]:  # type: ignore[override]
        return iter(self._passes[name] for name in sorted(self._passes))

    def __len__(self) -> int:
        return len(self._passes)


class TargetRegistry:
    """Targets by name and alias, with the plugin that provided each."""

    def __init__(self) -> None:
        self._targets: dict[str, Target] = {}
        self._aliases: dict[str, str] = {}
        self.providers: dict[str, str] = {}
        self.current_plugin = "?"

    def add(self, target: Target) -> None:
        """Registers `target`; names and aliases must be new."""
        if not isinstance(target, Target):
            raise PluginError(
                f"plugin '{self.current_plugin}' registered {target!r}, which is not a dsopt.Target"
            )
        for key in (target.name, *target.aliases):
            owner = self._aliases.get(key)
            if owner is not None:
                raise PluginError(
                    f"target name '{key}' is registered twice: by plugin "
                    f"'{self.providers[owner]}' and by plugin '{self.current_plugin}'"
                )
        self._targets[target.name] = target
        self.providers[target.name] = self.current_plugin
        for key in (target.name, *target.aliases):
            self._aliases[key] = target.name

    def get(self, name: str) -> Target:
        """The target named `name` (or an alias); UsageError lists the known ones."""
        key = self._aliases.get(name)
        if key is None:
            known = ", ".join(
                t.name + (f" [{', '.join(t.aliases)}]" if t.aliases else "")
                for t in sorted(self._targets.values(), key=lambda t: t.name)
            )
            raise UsageError(f"unknown target '{name}' (known: {known})")
        return self._targets[key]

    def __iter__(self) -> Iterable[Target]:  # type: ignore[override]
        return iter(self._targets[name] for name in sorted(self._targets))


class PluginHost:
    """One run's plugin manager and registries (never a module global).

    Order: hookspecs; DEFAULT_PLUGINS; entry-point group `dsopt` (unless
    DSOPT_DISABLE_PLUGIN_AUTOLOAD); `extra` plugin modules (`-p`); blocked names
    (`--disable-plugin`, DSOPT_DISABLE_PLUGINS); check_pending; registration hooks.

    A plugin that fails to import is recorded in `failed` and reported once as a warning;
    it breaks the run only when something it would have provided is asked for.
    """

    def __init__(
        self,
        *,
        extra: Sequence[str | ModuleType] = (),
        disabled: Sequence[str] = (),
        autoload: bool | None = None,
    ) -> None:
        self.pm = pluggy.PluginManager(hookspecs.PROJECT)
        self.pm.add_hookspecs(hookspecs)
        self.failed: dict[str, str] = {}
        blocked = set(disabled)
        blocked.update(filter(None, os.environ.get("DSOPT_DISABLE_PLUGINS", "").split(",")))
        for name in sorted(blocked):
            self.pm.set_blocked(name)
        for name in DEFAULT_PLUGINS:
            if name not in blocked:
                self.pm.register(importlib.import_module(name), name)
        if autoload is None:
            autoload = not os.environ.get("DSOPT_DISABLE_PLUGIN_AUTOLOAD")
        if autoload:
            self._load_entry_points(blocked)
        for plugin in extra:
            self._register_extra(plugin, blocked)
        if os.environ.get("DSOPT_TRACE_PLUGINS"):
            self.pm.add_hookcall_monitoring(_trace_before, _trace_after)
        try:
            self.pm.check_pending()
        except pluggy.PluginValidationError as e:
            name = self.pm.get_name(e.plugin) or repr(e.plugin)
            raise PluginError(
                f"plugin '{name}' implements an unknown hook: {e}",
                hint="check the hook name against dsopt.hookspecs",
            ) from e
        self.passes = PassRegistry()
        self.targets = TargetRegistry()
        self._register_all()
        if self.passes.placements:
            self.pm.register(_Placements(self), "dsopt.placements")
        self.pm.register(_ContractCheck(self), "dsopt.contract")

    @property
    def hook(self) -> Any:
        """The hook relay (`host.hook.dsopt_before_pass(...)`)."""
        return self.pm.hook

    def plugin_names(self) -> list[str]:
        """Names of the registered plugins (built-ins first)."""
        return [name for name, plugin in self.pm.list_name_plugin() if plugin is not None]

    def _load_entry_points(self, blocked: set[str]) -> None:
        for ep in sorted(
            importlib.metadata.entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name
        ):
            if ep.name in blocked or self.pm.get_plugin(ep.name) is not None:
                continue
            try:
                plugin = ep.load()
            except Exception as e:  # noqa: BLE001 - any import failure is reported by name
                dist = ep.dist.name if ep.dist is not None else "?"
                version = ep.dist.version if ep.dist is not None else ""
                message = (
                    f"plugin '{ep.name}' from {dist} {version} failed to import: "
                    f"{type(e).__name__}: {e}"
                )
                self.failed[ep.name] = message
                logger.warning(message)
                continue
            self.pm.register(plugin, ep.name)

    def _register_extra(self, plugin: str | ModuleType, blocked: set[str]) -> None:
        if isinstance(plugin, str):
            if plugin in blocked:
                return
            try:
                module = importlib.import_module(plugin)
            except Exception as e:  # noqa: BLE001
                raise PluginError(
                    f"plugin '{plugin}' (-p) failed to import: {type(e).__name__}: {e}"
                ) from e
            self.pm.register(module, plugin)
        else:
            self.pm.register(plugin, plugin.__name__)

    def _register_all(self) -> None:
        for name, plugin in self.pm.list_name_plugin():
            if plugin is None:  # blocked
                continue
            for hook_name, registry in (
                ("dsopt_register_passes", self.passes),
                ("dsopt_register_targets", self.targets),
            ):
                impl = getattr(plugin, hook_name, None)
                if impl is None:
                    continue
                registry.current_plugin = name
                try:
                    impl(registry=registry)
                except PluginError:
                    raise
                except Exception as e:  # noqa: BLE001 - a broken plugin is named
                    raise PluginError(
                        f"plugin '{name}' failed in {hook_name}: {type(e).__name__}: {e}"
                    ) from e

    def calibration_data(
        self,
        model: Any,
        *,
        shapes: Mapping[str, Sequence[int]] | None = None,
        precision: str | None = None,
        options: Mapping[str, Any] | None = None,
    ) -> tuple[Any, str] | None:
        """Calibration feeds from the first plugin that provides them, and that plugin's name.

        Calls `dsopt_calibration_data` implementations in pluggy's order (last registered
        first, `tryfirst`/`trylast` respected) until one returns something other than None;
        this host calls them itself so that it knows which plugin answered.

        Returns:
            `(CalibrationData, plugin name)`, or None when no plugin provides data.

        Raises:
            PluginError: The plugin raised, returned neither None, a CalibrationData nor a
                non-empty iterable of feed mappings, or a feed does not fit the model's inputs.
        """
        from dsopt.quant.calibration import CalibrationData

        arguments = {
            "model": model,
            "shapes": dict(shapes) if shapes else None,
            "precision": precision,
            "options": dict(options or {}),
        }
        caller = self.pm.hook.dsopt_calibration_data
        for impl in reversed(caller.get_hookimpls()):
            if impl.hookwrapper or getattr(impl, "wrapper", False):
                continue
            name = impl.plugin_name
            try:
                value = impl.function(*(arguments[a] for a in impl.argnames))
            except PluginError:
                raise
            except Exception as e:  # noqa: BLE001 - a broken plugin is named
                raise PluginError(
                    f"plugin '{name}' failed in dsopt_calibration_data: {type(e).__name__}: {e}"
                ) from e
            if value is None:
                continue
            return _as_calibration(value, name, model, CalibrationData), name
        return None

    def get_pass(self, name: str) -> type[Pass]:
        """The pass class `name`, mentioning failed plugins when it is unknown."""
        return self._lookup(self.passes.get, name)

    def get_target(self, name: str) -> Target:
        """The target `name`, mentioning failed plugins when it is unknown."""
        return self._lookup(self.targets.get, name)

    def _lookup(self, get: Callable[[str], T], name: str) -> T:
        try:
            return get(name)
        except UsageError as e:
            if self.failed:
                failed = "; ".join(self.failed.values())
                raise PluginError(f"{e.message}; a plugin failed to load: {failed}") from None
            raise


def _as_calibration(value: Any, plugin: str, model: Any, data_class: Any) -> Any:
    """A plugin's `dsopt_calibration_data` answer as CalibrationData, checked against `model`."""
    import numpy as np

    from dsopt.numerics import _input_specs, _validate_sample

    if isinstance(value, data_class):
        return value
    what = f"plugin '{plugin}': dsopt_calibration_data"
    if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, Iterable):
        kind = "one feed mapping" if isinstance(value, Mapping) else type(value).__name__
        raise PluginError(
            f"{what} returned {kind}; it must return an iterable of feeds "
            "(mappings input name -> numpy array), a CalibrationData or None",
            hint="return e.g. [{'x': array}, ...]; a single feed goes in a list",
        )
    specs = _input_specs(model)
    feeds = []
    for index, feed in enumerate(value):
        if not isinstance(feed, Mapping) or not all(isinstance(k, str) for k in feed):
            raise PluginError(
                f"{what} sample {index} is {type(feed).__name__}, not a mapping of input "
                "name -> numpy array"
            )
        sample = {name: np.asarray(array) for name, array in feed.items()}
        try:
            _validate_sample(sample, specs, f"{what} sample {index}")
        except UsageError as e:
            raise PluginError(e.message, hint="the feeds must match the model's inputs") from None
        feeds.append(sample)
    if not feeds:
        raise PluginError(f"{what} returned no samples; return None to provide no data")
    data = data_class.from_feeds(feeds)
    data.source = f"plugin {plugin}"
    return data


def _trace_before(hook_name: str, impls: Any, kwargs: Any) -> None:
    logger.warning("hook %s -> %s", hook_name, [i.plugin_name for i in impls])


def _trace_after(outcome: Any, hook_name: str, impls: Any, kwargs: Any) -> None:
    logger.warning("hook %s done", hook_name)


class _Placements:
    """Places passes registered with `after=`/`before=` into default pipelines.

    Runs after every plugin's own `dsopt_extend_pipeline` edits (trylast).
    """

    def __init__(self, host: PluginHost) -> None:
        self.host = host

    @hookspecs.hookimpl(trylast=True)
    def dsopt_extend_pipeline(self, pipeline: Any) -> None:
        from dsopt.pipeline import STAGES, parse_pipeline

        registry = self.host.passes
        for name, (where, anchor) in sorted(registry.placements.items()):
            if name in pipeline.names():
                continue  # the target's pipeline or the plugin already placed it
            names = pipeline.names()
            if anchor in names:
                index = names.index(anchor) + (1 if where == "after" else 0)
            elif anchor in STAGES:
                rank = STAGES.index(anchor)
                stages = [
                    STAGES.index(registry.get(n).stage) if n in registry else len(STAGES)
                    for n in names
                ]
                if where == "after":
                    later = [i for i, s in enumerate(stages) if s > rank]
                    same = [i + 1 for i, s in enumerate(stages) if s == rank]
                    index = same[-1] if same else (later[0] if later else len(names))
                else:
                    index = next((i for i, s in enumerate(stages) if s >= rank), len(names))
            elif anchor in registry:
                logger.debug("pass '%s' not placed: '%s' is not in the pipeline", name, anchor)
                continue
            else:
                raise PluginError(
                    f"plugin '{registry.providers[name]}': pass '{name}' is declared {where}= "
                    f"'{anchor}', which is neither a pass nor a stage ({', '.join(STAGES)})",
                    hint="name a registered pass (`dsopt passes`) or a stage",
                )
            pipeline.entries[index:index] = parse_pipeline(name).entries


class _ContractCheck:
    """Under `--verify each`, holds third-party passes to their declared exactness.

    Runs a pass's input and output models in onnxruntime and refuses one that declared `exact`
    (bitwise) or `reassoc` (fp32 rtol 1e-5) but changed the outputs beyond that, naming the
    plugin. Built-in passes are held to it by their tests.
    """

    def __init__(self, host: PluginHost) -> None:
        self.host = host
        self.before: Any = None

    def _applies(self, pass_: Any, ctx: Any) -> bool:
        provider = self.host.passes.providers.get(pass_.name, "?")
        return (
            ctx.options.get("verify") == "each"
            and pass_.exactness != "lossy"
            and provider not in DEFAULT_PLUGINS
        )

    @hookspecs.hookimpl
    def dsopt_before_pass(self, pass_: Any, module: Any, ctx: Any) -> None:
        self.before = module.to_proto() if self._applies(pass_, ctx) else None

    @hookspecs.hookimpl
    def dsopt_after_pass(self, pass_: Any, module: Any, ctx: Any, record: Any) -> None:
        before, self.before = self.before, None
        if before is None or not record.changed:
            return
        from dsopt import numerics
        from dsopt.errors import ModelError

        try:
            feeds = numerics.random_inputs(before, shapes=ctx.options.get("shapes"), seed=0)
            reference = numerics.run_model(before, feeds, label="pass input")
        except (ModelError, UsageError) as e:  # not runnable here: nothing to compare
            logger.debug("contract check of '%s' skipped: %s", pass_.name, e.message)
            return
        candidate = numerics.run_model(module.to_proto(), feeds, label="pass output")
        tight = pass_.exactness == "exact"
        bad = [
            c
            for c in numerics.compare_outputs(
                reference, candidate, rtol=0.0 if tight else 1e-5, atol=0.0 if tight else 1e-6
            )
            if not c.within_tolerance
        ]
        if bad:
            provider = self.host.passes.providers.get(pass_.name, "?")
            raise PluginError(
                f"plugin '{provider}': pass '{pass_.name}' declares exactness "
                f"'{pass_.exactness}' but changed the outputs under --verify each: "
                f"{bad[0].describe()}",
                hint="fix the pass, or declare exactness='lossy' with a tolerance",
            )
