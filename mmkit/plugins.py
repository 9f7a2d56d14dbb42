"""The plugin host: finds plugins through the ``mmkit`` entry-point group, isolates their failures,
validates what they register, and answers "which encoder / projector / reader is called X?".

No host is created at import time; :func:`get_host` builds one on first use.

Environment switches:

- ``MMKIT_PLUGINS``: comma-separated allow-list of entry-point names; set but empty loads none.
- ``MMKIT_BLOCK_PLUGINS``: comma-separated entry-point names never to load.
- ``MMKIT_PLUGINS_STRICT=1``: a broken plugin is a fatal error (for plugin CI).
- ``MMKIT_TRACE_HOOKS=1``: print every hook call (pluggy's tracing).

Every hook is called through pluggy, so tracing, ``tryfirst``/``trylast`` and hook wrappers apply
to all of them. The registration hooks (``mmkit_modalities`` ...) and ``mmkit_commands`` are
called one plugin at a time (each call with every wrapper around it), so a plugin whose hook fails
is recorded as failed and the others still register; names are then taken in registration order
(the first plugin to register a name keeps it, so a later plugin cannot knock out a built-in).
"""

from __future__ import annotations

import difflib
import importlib
import importlib.metadata as metadata
import os
import sys
import time
from collections.abc import Callable, Iterable
from typing import Any

import attrs
import pluggy

from mmkit import hookspecs
from mmkit.errors import NotRegisteredError, PluginError, PluginLoadError
from mmkit.specs import BenchmarkSpec, EncoderSpec, ExporterSpec, MetricSpec, ModalitySpec, ProjectorSpec, ReaderSpec

ENTRY_POINT_GROUP = "mmkit"
#: mmkit's distribution name on the package index (the import name and command stay ``mmkit``;
#: ``mmkit`` there is another project), and the bare name, which a checkout's plugins may still use.
DISTRIBUTION = "mmkit-sdk"
MMKIT_DISTRIBUTIONS = (DISTRIBUTION, "mmkit")
DEFAULT_PLUGINS = (
    "mmkit.default_plugins.projectors",
    "mmkit.default_plugins.lora_targets",
    "mmkit.default_plugins.readers",
    "mmkit.default_plugins.metrics",
    "mmkit.default_plugins.exporters",
)

# hook name -> (descriptor type, registry kind) for the registration hooks.
_REGISTRATION_HOOKS: dict[str, tuple[type, str]] = {
    "mmkit_modalities": (ModalitySpec, "modality"),
    "mmkit_encoders": (EncoderSpec, "encoder"),
    "mmkit_projectors": (ProjectorSpec, "projector"),
    "mmkit_dataset_readers": (ReaderSpec, "reader"),
    "mmkit_metrics": (MetricSpec, "metric"),
    "mmkit_exporters": (ExporterSpec, "exporter"),
    "mmkit_benchmarks": (BenchmarkSpec, "benchmark"),
}


@attrs.define
class PluginRecord:
    """What the host knows about one plugin, for listings and checks."""

    name: str
    distribution: str
    version: str
    source: str  # "entry point", "default" or "in-process"
    status: str = "ok"  # "ok" or "failed"
    error: str | None = None
    import_ms: float = 0.0
    hooks: list[str] = attrs.field(factory=list)
    requires_mmkit: str | None = None
    module: Any = attrs.field(default=None, repr=False)

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "distribution": self.distribution,
            "version": self.version,
            "source": self.source,
            "status": self.status,
            "error": self.error,
            "import_ms": round(self.import_ms, 1),
            "hooks": self.hooks,
            "requires_mmkit": self.requires_mmkit,
        }


@attrs.frozen
class Registered:
    """A descriptor with the plugin that registered it."""

    spec: Any
    plugin: str


def _env_list(name: str) -> list[str] | None:
    raw = os.environ.get(name)
    if raw is None:
        return None
    return [part.strip() for part in raw.split(",") if part.strip()]


def _short_error(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


class PluginHost:
    """Owns one pluggy ``PluginManager`` and the registries built from it."""

    def __init__(self, *, load_entrypoints: bool = True, strict: bool | None = None):
        self.pm = pluggy.PluginManager(hookspecs.PROJECT)
        self.pm.add_hookspecs(hookspecs)
        self.strict = os.environ.get("MMKIT_PLUGINS_STRICT") == "1" if strict is None else strict
        self.records: dict[str, PluginRecord] = {}
        self._registry: dict[str, dict[str, Registered]] | None = None
        if os.environ.get("MMKIT_TRACE_HOOKS") == "1":
            self.pm.trace.root.setwriter(lambda msg: print(msg, end="", file=sys.stderr))
            self.pm.enable_tracing()
        for module_name in DEFAULT_PLUGINS:
            self._register_module(module_name, name=module_name.rsplit(".", 1)[-1],
                                  distribution=DISTRIBUTION, version=_mmkit_version(), source="default")
        if load_entrypoints:
            self.load_entrypoints()

    # -- loading ---------------------------------------------------------------------------
    def load_entrypoints(self) -> None:
        allow = _env_list("MMKIT_PLUGINS")
        block = set(_env_list("MMKIT_BLOCK_PLUGINS") or [])
        seen: set[tuple[str, str]] = set()
        for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
            dist = getattr(ep, "dist", None)
            dist_name = dist.metadata["Name"] if dist is not None else "?"
            key = (dist_name, ep.name)
            if key in seen:  # editable installs can list an entry point twice
                continue
            seen.add(key)
            if (allow is not None and ep.name not in allow) or ep.name in block:
                continue
            record = PluginRecord(
                name=ep.name,
                distribution=dist_name,
                version=dist.version if dist is not None else "?",
                source="entry point",
                requires_mmkit=_declared_mmkit_range(dist),
            )
            self._load(record, ep.load)

    def register(self, plugin: Any, name: str | None = None) -> PluginRecord:
        """Register an object or module in-process (tests, notebooks). Raises on a bad plugin."""
        name = name or getattr(plugin, "__name__", None) or type(plugin).__name__
        record = PluginRecord(name=name, distribution="(in-process)", version="", source="in-process")
        self._load(record, lambda: plugin, fatal=True)
        return record

    def unregister(self, name: str) -> None:
        record = self.records.pop(name, None)
        if record is not None and record.module is not None and self.pm.is_registered(record.module):
            self.pm.unregister(record.module)
        self._registry = None

    def _register_module(self, module_name: str, **fields: Any) -> None:
        record = PluginRecord(**fields)
        self._load(record, lambda: importlib.import_module(module_name), fatal=True)

    def _load(self, record: PluginRecord, load: Callable[[], Any], fatal: bool = False) -> None:
        if record.name in self.records:
            other = self.records[record.name]
            if not (fatal or self.strict):
                # Keep the clash visible to `plugins list` and check(): store it under a key that
                # names its distribution (the name itself belongs to the first plugin).
                self.records[f"{record.name} [{record.distribution}]"] = record
            self._fail(record, f"plugin name {record.name!r} is already used by {other.distribution}", fatal)
            return
        self.records[record.name] = record
        self._registry = None
        start = time.perf_counter()
        try:
            module = load()
        except Exception as exc:  # Ctrl-C and a plugin's own sys.exit() are not import failures: they go through
            record.import_ms = (time.perf_counter() - start) * 1000
            self._fail(record, f"import failed: {_short_error(exc)}", fatal, exc)
            return
        record.import_ms = (time.perf_counter() - start) * 1000
        record.module = module
        try:
            self.pm.register(module, name=record.name)
        except Exception as exc:  # pluggy.PluginValidationError and friends
            self._fail(record, f"registration failed: {_short_error(exc)}", fatal, exc)
            return
        unknown = self._unknown_hooks(module)
        if unknown:
            self.pm.unregister(module)
            self._fail(record, "; ".join(unknown), fatal)
            return
        record.hooks = sorted(impl_name for impl_name in self._hook_names(module))

    def _fail(self, record: PluginRecord, message: str, fatal: bool, exc: BaseException | None = None) -> None:
        record.status = "failed"
        record.error = message
        self.records.setdefault(record.name, record)
        if fatal or self.strict:
            raise PluginLoadError(f"plugin {record.name!r} ({record.distribution}): {message}") from exc

    def _hook_names(self, module: Any) -> list[str]:
        return [hc.name for hc in self.pm.get_hookcallers(module) or []]

    def _unknown_hooks(self, module: Any) -> list[str]:
        """Hook implementations with no matching spec, e.g. a misspelled ``mmkit_modalitys``."""
        problems = []
        # Only hooks with a spec: the misspelled name itself now has a (spec-less) caller too.
        known = [name for name in dir(self.pm.hook)
                 if name.startswith("mmkit_") and getattr(self.pm.hook, name).spec is not None]
        for caller in self.pm.get_hookcallers(module) or []:
            if caller.spec is None:
                guess = difflib.get_close_matches(caller.name, known, n=1)
                hint = f" (did you mean {guess[0]!r}?)" if guess else ""
                problems.append(f"unknown hook {caller.name!r}{hint}")
        return problems

    # -- calling hooks ---------------------------------------------------------------------
    def _per_plugin(self, hook_name: str) -> list[tuple[Any, Callable[..., list[Any]]]]:
        """``(implementation, call)`` per plugin implementing ``hook_name``, in pluggy's call order
        (``tryfirst`` first, then the last registered). ``call(**kwargs)`` runs that one
        implementation with every wrapper around it through pluggy's executor, the one
        ``HookCaller.__call__`` uses, so tracing and monitoring see it. (Not
        ``pm.subset_hook_caller``: it needs hashable plugin objects, and a plugin may be any object.)"""
        impls = getattr(self.pm.hook, hook_name).get_hookimpls()
        wrappers = [i for i in impls if i.wrapper or i.hookwrapper]
        plain = [i for i in impls if not (i.wrapper or i.hookwrapper)]

        def one(impl: Any) -> Callable[..., list[Any]]:
            # pluggy's layout: implementations first, wrappers last (called outermost)
            return lambda **kwargs: self.pm._hookexec(hook_name, [impl, *wrappers], kwargs, False)

        return [(impl, one(impl)) for impl in reversed(plain)]

    # -- registries ------------------------------------------------------------------------
    def _build_registry(self) -> dict[str, dict[str, Registered]]:
        registry: dict[str, dict[str, Registered]] = {kind: {} for _, kind in _REGISTRATION_HOOKS.values()}
        for hook_name, (spec_type, kind) in _REGISTRATION_HOOKS.items():
            calls = self._per_plugin(hook_name)
            # Called in pluggy's order; names are then taken in registration order: the first plugin
            # to register a name keeps it, so a later plugin (tryfirst or not) cannot knock out a built-in.
            returned: dict[str, list[Any] | Exception] = {}
            for impl, call in calls:
                record = self.records.get(impl.plugin_name)
                if record is not None and record.status != "ok":
                    continue
                try:
                    returned[impl.plugin_name] = [spec for result in call() for spec in (result or [])]
                except Exception as exc:
                    returned[impl.plugin_name] = exc
            order = {name: i for i, name in enumerate(self.records)}  # records are kept in registration order
            for impl, _ in sorted(calls, key=lambda c: order.get(c[0].plugin_name, len(order))):
                record = self.records.get(impl.plugin_name)
                if impl.plugin_name not in returned:
                    continue
                try:
                    specs = returned[impl.plugin_name]
                    if isinstance(specs, Exception):
                        raise specs
                    for spec in specs:
                        if not isinstance(spec, spec_type):
                            raise PluginError(f"{hook_name} returned {type(spec).__name__}, expected {spec_type.__name__}")
                except Exception as exc:
                    if record is not None:
                        self._fail(record, f"{hook_name} failed: {_short_error(exc)}", False, exc)
                        self._drop(registry, impl.plugin_name)
                        continue
                    raise
                for spec in specs:
                    taken = registry[kind].get(spec.name)
                    if taken is not None:
                        message = (f"duplicate {kind} {spec.name!r}: registered by plugin {taken.plugin!r} "
                                   f"and by plugin {impl.plugin_name!r}")
                        if record is not None:
                            self._fail(record, message, False)
                            self._drop(registry, impl.plugin_name)
                            break
                        raise PluginError(message)
                    registry[kind][spec.name] = Registered(spec, impl.plugin_name)
        return registry

    @staticmethod
    def _drop(registry: dict[str, dict[str, Registered]], plugin: str) -> None:
        for entries in registry.values():
            for name in [n for n, reg in entries.items() if reg.plugin == plugin]:
                del entries[name]

    @property
    def registry(self) -> dict[str, dict[str, Registered]]:
        if self._registry is None:
            self._registry = self._build_registry()
        return self._registry

    def _all(self, kind: str) -> dict[str, Any]:
        return {name: reg.spec for name, reg in sorted(self.registry[kind].items())}

    def _get(self, kind: str, name: str) -> Any:
        entries = self.registry[kind]
        if name not in entries:
            known = ", ".join(sorted(entries)) or "none"
            hint = ""
            broken = [r for r in self.records.values() if r.status != "ok"]
            if broken:
                hint = " Failed plugins: " + ", ".join(f"{r.name} ({r.error})" for r in broken) + "."
            raise NotRegisteredError(f"no {kind} named {name!r}; registered: {known}.{hint}")
        return entries[name].spec

    def modalities(self) -> dict[str, ModalitySpec]:
        return self._all("modality")

    def modality(self, name: str) -> ModalitySpec:
        return self._get("modality", name)

    def encoder(self, name: str) -> EncoderSpec:
        return self._get("encoder", name)

    def encoders(self) -> dict[str, EncoderSpec]:
        return self._all("encoder")

    def projector(self, name: str) -> ProjectorSpec:
        return self._get("projector", name)

    def projectors(self) -> dict[str, ProjectorSpec]:
        return self._all("projector")

    def reader(self, name: str) -> ReaderSpec:
        return self._get("reader", name)

    def readers(self) -> dict[str, ReaderSpec]:
        return self._all("reader")

    def metric(self, name: str) -> MetricSpec:
        return self._get("metric", name)

    def metrics(self) -> dict[str, MetricSpec]:
        return self._all("metric")

    def exporter(self, name: str) -> ExporterSpec:
        return self._get("exporter", name)

    def exporters(self) -> dict[str, ExporterSpec]:
        return self._all("exporter")

    def benchmark(self, name: str) -> BenchmarkSpec:
        return self._get("benchmark", name)

    def benchmarks(self) -> dict[str, BenchmarkSpec]:
        return self._all("benchmark")

    def provider(self, kind: str, name: str) -> str:
        """The plugin that registered ``name`` of ``kind``."""
        self._get(kind, name)
        return self.registry[kind][name].plugin

    def modality_for_key(self, key: str) -> ModalitySpec | None:
        """The modality whose data keys include ``key`` (canonical or alias)."""
        for spec in self.modalities().values():
            if key in spec.data_keys:
                return spec
        return None

    def lora_targets(self, model_type: str, module_names: Iterable[str]) -> list[str]:
        result = self.pm.hook.mmkit_lora_targets(model_type=model_type, module_names=list(module_names))
        if not result:
            raise PluginError(f"no plugin knows LoRA targets for model_type {model_type!r}")
        return list(result)

    def add_commands(self, app: Any) -> None:
        for impl, call in self._per_plugin("mmkit_commands"):
            record = self.records.get(impl.plugin_name)
            try:
                call(app=app)
            except Exception as exc:
                if record is None:
                    raise
                self._fail(record, f"mmkit_commands failed: {_short_error(exc)}", False, exc)

    # -- checks ----------------------------------------------------------------------------
    def check(self) -> list[str]:
        """Every problem found: failed plugins, dangling references, unsupported mmkit versions."""
        self.registry  # noqa: B018 - building it records registration failures
        problems = [f"{r.name} ({r.distribution}): {r.error}" for r in self.records.values() if r.status != "ok"]
        try:
            self.pm.check_pending()  # pluggy's own check: implementations of hooks nobody specified
        except pluggy.PluginValidationError as exc:
            problems.append(f"{exc.plugin_name if hasattr(exc, 'plugin_name') else '?'}: {exc}")
        from packaging.specifiers import InvalidSpecifier, SpecifierSet

        for record in self.records.values():
            if not record.requires_mmkit:
                continue
            try:
                ok = SpecifierSet(record.requires_mmkit).contains(_mmkit_version(), prereleases=True)
            except InvalidSpecifier:
                ok = False
            if not ok:
                problems.append(f"{record.name} ({record.distribution}): requires mmkit{record.requires_mmkit}, "
                                f"this is mmkit {_mmkit_version()}")
        encoders, projectors = self.encoders(), self.projectors()
        for spec in self.modalities().values():
            owner = self.provider("modality", spec.name)
            if spec.encoder not in encoders:
                problems.append(f"{owner}: modality {spec.name!r} names encoder {spec.encoder!r}, which is not registered")
            elif encoders[spec.encoder].modality != spec.name:
                problems.append(f"{owner}: encoder {spec.encoder!r} is for modality {encoders[spec.encoder].modality!r}, "
                                f"not {spec.name!r}")
            if spec.projector not in projectors:
                problems.append(f"{owner}: modality {spec.name!r} names projector {spec.projector!r}, which is not registered")
        for spec in encoders.values():
            if spec.modality not in self.modalities():
                problems.append(f"{self.provider('encoder', spec.name)}: encoder {spec.name!r} is for unknown "
                                f"modality {spec.modality!r}")
        seen_keys: dict[str, str] = {}
        for spec in self.modalities().values():
            for token in (*spec.data_keys, *spec.markers.special_tokens(), *spec.markers.aliases):
                if token in seen_keys and seen_keys[token] != spec.name:
                    problems.append(f"modalities {seen_keys[token]!r} and {spec.name!r} both claim {token!r}")
                seen_keys[token] = spec.name
        return problems

    def verify_lazy(self) -> list[str]:
        """Resolve every lazy reference (imports the heavy modules). Used by ``plugins check``."""
        from mmkit.specs import resolve

        problems = []
        for kind, entries in self.registry.items():
            for name, reg in entries.items():
                for field in attrs.fields(type(reg.spec)):
                    value = getattr(reg.spec, field.name)
                    if field.name in {"load", "build", "read", "detect", "compute", "export", "check"} and value is not None:
                        try:
                            resolve(value)
                        except Exception as exc:
                            problems.append(f"{reg.plugin}: {kind} {name!r}.{field.name} -> {value!r}: {_short_error(exc)}")
                demo = getattr(reg.spec, "demo", None)
                if demo is not None:
                    try:
                        resolve(demo.build)
                    except Exception as exc:
                        problems.append(f"{reg.plugin}: modality {name!r} demo -> {demo.build!r}: {_short_error(exc)}")
        return problems


def _mmkit_version() -> str:
    from mmkit import __version__

    return __version__


def _declared_mmkit_range(dist: Any) -> str | None:
    """The version range a plugin's distribution declares for mmkit, e.g. '>=0.1,<0.2'."""
    if dist is None:
        return None
    from packaging.requirements import InvalidRequirement, Requirement

    for line in dist.requires or []:
        try:
            req = Requirement(line)
        except InvalidRequirement:
            continue
        if req.name.lower().replace("_", "-") in MMKIT_DISTRIBUTIONS and not req.marker:
            return str(req.specifier) or None
    return None


_HOST: PluginHost | None = None


def get_host() -> PluginHost:
    """The process-wide host, created on first use."""
    global _HOST
    if _HOST is None:
        _HOST = PluginHost()
    return _HOST


def set_host(host: PluginHost | None) -> None:
    """Replace (or with ``None`` drop) the process-wide host; tests use this."""
    global _HOST
    _HOST = host
