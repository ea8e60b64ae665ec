"""`peftkit serve`: one base model, many adapters, an OpenAI-compatible API (registered with the CLI
when the parser is built). Everything the command is given is checked before the base model loads:
the config keys, the adapter directories, the registry and the port.

    peftkit serve --base smollm2-135m --adapters bot=runs/bot/adapter-best --config serve.yaml
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import signal
import socket
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

from ..base.catalog import DEFAULT_BASE
from ..command_args import ConfigOptions
from ..errors import ConfigError, RegistryError, RequestError
from ..terminal import printable
from .choices import Limits


def _f(default: Any, help: str) -> Any:
    if default in (tuple, dict):  # a factory for an empty one
        return field(default_factory=default, metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class ServeConfig(Limits):
    """The server's settings: the request limits (`Limits`), how the base loads, and the engine's
    settings under `engine:` (its own keys and defaults, `peftkit.serve.engine.EngineConfig`)."""

    dtype: Literal["auto", "float32", "bfloat16", "float16"] = _f(
        "auto",
        "the dtype to load the base in (auto: bf16 where this machine computes it natively, else float32)",
    )
    shutdown_deadline: float = _f(
        10.0, "seconds requests in flight may take to finish on SIGTERM before they are aborted"
    )
    preload: tuple[str, ...] = _f(tuple, "registry references to load at start (the --adapters always are)")
    engine: Any = _f(dict, "engine settings (peftkit.serve.engine.EngineConfig; docs/serve.md lists them)")
    admin_key: str | None = field(
        default=None,
        repr=False,  # never printed
        metadata={"help": "the admin API's key, or its hash (sha256:...); null: the admin API is off"},
    )
    tenants: Any = _f(dict, "tenants: NAME: {keys: [sha256:...], models: [...], default, rate_limit}")
    routes: Any = _f(dict, "routes: NAME: TARGET (an alias) or {stable, canary, canary_percent}")
    default_aliases: tuple[str, ...] = _f(tuple, "model names that mean the caller's default adapter")
    rate_limit: Any = _f(None, "every key's rate limit: {requests_per_minute: N, burst: M}; null: none")
    capture: float = _f(
        0.0,
        "the share of responses stored with their prompts in the registry for monitoring (0: none, "
        "the default; 0.1: one in ten); needs a registry",
    )
    capture_text: bool = _f(
        True, "store the prompt and output text (off: only their sha256 hashes and lengths)"
    )
    capture_redact: tuple[str, ...] = _f(
        tuple, "regular expressions whose matches are replaced by [REDACTED] before anything is stored"
    )
    capture_adapters: Any = _f(dict, "capture rates by adapter name: {NAME: RATE} (beats capture)")
    capture_tenants: Any = _f(
        dict, "capture rates by tenant: {TENANT: RATE} (beats the adapter's; 0 opts out)"
    )
    capture_max_rows: int = _f(10_000, "samples kept per adapter name (the oldest go first)")
    capture_max_bytes: int = _f(50_000_000, "bytes of samples kept per adapter name (the oldest go first)")
    feedback_memory: int = _f(
        100_000, "recent responses remembered, so POST /v1/feedback can name their adapter"
    )
    monitor_every: float = _f(
        0.0, "seconds between the server's own `peftkit monitor run --ab` (0: never; cron can run it instead)"
    )
    monitor_rollback: bool = _f(
        False, "let that run roll back a canary decided significantly worse (audited)"
    )
    monitor_nice: int = _f(19, "CPU niceness of those runs (19: the lowest, so serving comes first)")

    def __post_init__(self) -> None:
        for key in ("max_prompt_tokens", "max_tokens"):
            value = getattr(self, key)
            if value is not None and value < 1:
                raise ConfigError(f"invalid value for {key}: {value}; expected at least 1 or null")
        for key in ("default_max_tokens", "max_n", "max_prompts"):
            if getattr(self, key) < 1:
                raise ConfigError(f"invalid value for {key}: {getattr(self, key)}; expected at least 1")
        every = self.monitor_every
        if isinstance(every, bool) or not (
            isinstance(every, (int, float)) and math.isfinite(every) and every >= 0
        ):
            raise ConfigError(f"invalid value for monitor_every: {every!r}; expected seconds >= 0")
        if isinstance(self.monitor_nice, bool) or self.monitor_nice not in range(0, 20):
            raise ConfigError(f"invalid value for monitor_nice: {self.monitor_nice!r}; expected 0 to 19")
        if not (math.isfinite(self.shutdown_deadline) and self.shutdown_deadline >= 0):
            raise ConfigError(f"invalid value for shutdown_deadline: {self.shutdown_deadline}; expected >= 0")
        if not isinstance(self.preload, (list, tuple)) or not all(isinstance(r, str) for r in self.preload):
            raise ConfigError(f"invalid value for preload: {self.preload!r}; expected a list of references")
        object.__setattr__(self, "preload", tuple(self.preload))
        if not isinstance(self.engine, dict):
            raise ConfigError(f"engine must be a mapping of engine settings, found {self.engine!r}")
        self.access_and_routes()  # checked now, before anything loads
        self.capture_policy()

    def capture_policy(self) -> Any:
        """The capture.CapturePolicy of the capture* keys."""
        from .capture import CapturePolicy

        return CapturePolicy.from_config(self)

    def access_and_routes(self) -> tuple[Any, Any]:
        """(tenants.Access, tenants.Routes) from the keys, tenants, routes and rate limit."""
        from .routes import Routes
        from .tenants import Access

        access = Access.from_config(self.admin_key, self.tenants, self.rate_limit)
        return access, Routes.from_config(self.routes, list(self.default_aliases))

    @property
    def limits(self) -> Limits:
        return Limits(**{f.name: getattr(self, f.name) for f in dataclasses.fields(Limits)})


def field_help() -> dict[str, str]:
    """{key: help} for every config key (the `--KEY VALUE` options), engine keys as engine.KEY."""
    out = {f.name: f.metadata["help"] for f in dataclasses.fields(ServeConfig) if f.name != "engine"}
    from .engine import EngineConfig

    for f in dataclasses.fields(EngineConfig):
        out[f"engine.{f.name}"] = f.metadata["help"]
    return out


def field_defaults() -> dict[str, Any]:
    """{key: default} for every key `field_help` names (what an absent key means)."""
    from .engine import EngineConfig

    out: dict[str, Any] = {}
    for f in dataclasses.fields(ServeConfig):
        if f.name != "engine":
            out[f.name] = f.default if f.default is not dataclasses.MISSING else f.default_factory()
    for f in dataclasses.fields(EngineConfig):
        out[f"engine.{f.name}"] = f.default if f.default is not dataclasses.MISSING else f.default_factory()
    return out


def load_serve_config(path: Path | None, overrides: dict[str, Any] | None = None) -> tuple[ServeConfig, Any]:
    """(ServeConfig, EngineConfig) from a YAML file (optional) and `--KEY VALUE` overrides; unknown or
    invalid keys are named. Nothing heavy is loaded."""
    from ..config_files import build, read_config_file
    from .engine import EngineConfig

    data: dict[str, Any] = read_config_file(path) if path is not None else {}
    for key, value in (overrides or {}).items():
        section, dot, leaf = key.partition(".")
        if dot:
            data[section] = {**(data.get(section) or {}), leaf: value}
        else:
            data[key] = value
    config = build(ServeConfig, data)
    try:
        engine = build(EngineConfig, config.engine, "engine.")
    except RequestError as e:
        raise ConfigError(str(e)) from None
    return config, engine


def served_names(base: str) -> list[str]:
    """The names the base model answers to: a short one first (a built-in name, or the last part of
    a path, without .gguf), then the text given to --base."""
    path = Path(base)
    short = path.stem if path.suffix == ".gguf" else path.name
    return list(dict.fromkeys([short or base, base]))


def _check_port(host: str, port: int) -> None:
    """Fail before the model loads when the address is taken or cannot be bound."""
    _listening(host, port).close()


def _listening(host: str, port: int) -> socket.socket:
    """A socket bound to (host, port) and listening: connections made from now on wait in its backlog
    until the server accepts them, so the address can be announced before the server loop starts."""
    s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((host, port))
        s.listen(2048)
    except OSError as e:
        s.close()
        raise ConfigError(
            f"cannot listen on {host}:{port}: {e.strerror}; choose another --port or --host"
        ) from None
    return s


@dataclass
class Server:
    """A prepared server: the app over a started engine."""

    app: Any
    engine: Any
    catalog: Any
    config: ServeConfig
    access: Any = None
    routes: Any = None


def open_registry(location: str | None, explicit: bool, create: bool = False) -> Any:
    """The registry requests may name versions from: --registry (must exist unless `create`), else
    $PEFTKIT_REGISTRY or the default location when a registry is there (or `create`); None otherwise."""
    from ..registry import Registry

    try:
        return Registry.open(location, create=create)
    except RegistryError:
        if explicit:
            raise
        return None


def prepare(
    base: str,
    adapters: list[str] | None = None,
    registry: str | None = None,
    config: ServeConfig | None = None,
    engine_config: Any | None = None,
) -> Server:
    """Check every input, load the base, start the engine with the adapters preloaded, build the app."""

    from ..base import model_fingerprint
    from ..eval.loading import adapter_specs
    from ..registry.refs import parse_ref
    from ..tools.opening import open_model, read_adapters
    from .catalog import Catalog
    from .engine import Engine, EngineConfig
    from .http import create_app

    config = config or ServeConfig()
    engine_config = engine_config or EngineConfig()
    named = adapter_specs(adapters or [])
    for name, directory in named:  # the files are checked before the slow base load
        if not directory.is_dir():
            raise ConfigError(f"--adapters {name}={directory}: no such adapter directory")
    sources = read_adapters(named)  # a run's directory: the adapter inside it is named
    capture = config.capture_policy()
    reg = open_registry(registry, registry is not None, create=capture.on)  # samples are stored there
    if config.preload and reg is None:
        raise ConfigError("preload names registry versions, but no registry is open (give --registry)")
    for ref in config.preload:
        reg.resolve_version(parse_ref(ref))
    catalog = Catalog(served_names(base), dict(named), reg)
    catalog.read = {source.name: source.files for source in sources}  # read once: the preload takes them
    access, routes = config.access_and_routes()
    routes.check(catalog)  # every route's versions exist
    opened = open_model(base, dtype=config.dtype, log=lambda message: print(
        printable(f"peftkit serve: {message}"), file=sys.stderr, flush=True))  # fmt: skip
    model, tokenizer = opened.model, opened.tokenizer
    catalog.base_fingerprint = model_fingerprint(model)
    if reg is not None:  # the splits every server on this registry routes by (its audit log)
        routes.follow(reg, catalog)
    engine = Engine.start(model, tokenizer, catalog.loader, engine_config)
    try:
        keys = [name for name, _ in named] + [catalog.resolve(ref).key for ref in config.preload]
        for key in keys:
            asyncio.run(engine.load(key))
    except BaseException:
        engine.stop(0)
        raise
    app = create_app(
        engine,
        tokenizer,
        catalog,
        config.limits,
        access=access,
        routes=routes,
        deadline=config.shutdown_deadline,
        capture=capture,
    )
    if config.monitor_every > 0:
        if reg is None:
            raise ConfigError("monitor_every runs `peftkit monitor run` on a registry: give --registry")
        from .schedule import MonitorSchedule

        app.state.background.append(MonitorSchedule(
            config.monitor_every, base, registry, config.monitor_rollback, app.state.metrics, config.monitor_nice
        ))  # fmt: skip
    return Server(app, engine, catalog, config, access, routes)


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def serve(
    base: str = DEFAULT_BASE,
    adapters: list[str] | None = None,
    registry: str | None = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    config: Path | None = None,
    hash_key: bool = False,
    overrides: Annotated[dict[str, Any], ConfigOptions(field_help, field_defaults)] | None = None,
) -> int:
    """Serve the base model and its adapters over an OpenAI-compatible HTTP API.

    Endpoints: /v1/models, /v1/completions, /v1/chat/completions (streaming with "stream": true),
    /health and /ready, and the admin API under /admin (with admin_key set). A request's "model" names
    the base model, an adapter given with --adapters, a route, or a registry version (NAME,
    NAME@production, NAME@staging, NAME@3, NAME@sha256:...), resolved on every request so promotions
    and rollbacks apply at once. Without tenants in the config any key is accepted, so listen on
    127.0.0.1 (the default) unless the network is trusted; with tenants, each key (stored as its
    sha256 hash: --hash-key prints it) may use only its tenant's models. SIGTERM or Ctrl-C lets
    requests in flight finish within shutdown_deadline seconds. See docs/serve.md.

    Args:
        base: the base model: a built-in name (smollm2-135m), an HF model directory or a .gguf file
        adapters: adapter directories to serve, as NAME=DIR (or DIR: named after the directory)
        registry: the adapter registry requests may name versions from (default: $PEFTKIT_REGISTRY,
            else ~/.peftkit/registry when one is there; a directory or a postgresql:// URL)
        host: the address to listen on
        port: the port to listen on
        config: a YAML file of server settings (see the options below for every key)
        hash_key: print the hash (sha256:...) of the key given on stdin, for serve.yaml, and exit
        overrides: config keys set on the command line
    """
    if hash_key:
        print(key_hash_from_stdin())
        return 0

    settings, engine_config = load_serve_config(config, overrides)
    if not 0 <= port <= 65535:
        raise ConfigError(f"--port must be between 0 and 65535, got {port}")
    _check_port(host, port)
    server = prepare(base, adapters, registry, settings, engine_config)
    sock = _listening(host, port)  # listening before it is announced: a client may connect at once
    _announce(server, host, sock.getsockname()[1])
    stopped_by = _run_until_stopped(server.app, sock, settings.shutdown_deadline)
    how = f" on {signal.Signals(stopped_by).name}" if stopped_by is not None else ""
    print(f"peftkit serve: stopped{how}", file=sys.stderr, flush=True)
    return 0


def _announce(server: Server, host: str, port: int) -> None:
    """Print where the server listens, what it serves, and which keys it takes."""
    where = f"http://{'[' + host + ']' if ':' in host else host}:{port}"
    models = ", ".join(m["id"] for m in server.catalog.models())
    print(printable(f"peftkit serve: listening on {where} (OpenAI API: {where}/v1)"), flush=True)
    print(printable(f"peftkit serve: models: {models}"), flush=True)
    access = server.access
    if access.enabled:
        names = ", ".join(t.name for t in access.tenants)
        print(printable(f"peftkit serve: API keys of {len(access.tenants)} tenants ({names})"), flush=True)
    else:
        print("peftkit serve: no API keys are configured: any key is accepted (local use)", flush=True)
    admin = "on (/admin, with the admin key)" if access.admin else "off (no admin_key)"
    print(f"peftkit serve: admin API {admin}", flush=True)
    capture, reg = server.config.capture_policy(), server.catalog.registry
    where = f"the registry {reg.db}" if reg is not None else "no registry: counted only"
    if capture.on:
        kept = "prompts and outputs" if capture.text else "hashes and lengths of prompts and outputs"
        print(
            printable(f"peftkit serve: capturing {capture.rate:g} of responses ({kept}) into {where}"),
            flush=True,
        )
    print(printable(f"peftkit serve: feedback at /v1/feedback is stored in {where}"), flush=True)


def _run_until_stopped(app: Any, sock: socket.socket, deadline: float) -> int | None:
    """Run `app` under uvicorn on the listening `sock` until Ctrl-C or SIGTERM: the number of the
    signal that stopped it (None if it stopped on its own)."""
    import uvicorn

    uv = uvicorn.Config(app, timeout_graceful_shutdown=max(1, math.ceil(deadline)), log_level="warning")
    # Ctrl-C or SIGTERM is how a server is meant to stop: uvicorn shuts down gracefully, then
    # re-raises the signal into the handlers it found, which here only note it, so the exit is 0.
    stops: list[int] = []
    found = {s: signal.signal(s, lambda number, frame: stops.append(number)) for s in STOP_SIGNALS}
    try:
        uvicorn.Server(uv).run(sockets=[sock])
    finally:
        for number, handler in found.items():
            signal.signal(number, handler)
    return stops[0] if stops else None


def key_hash_from_stdin() -> str:
    """The sha256:... hash of the key on stdin (asked for without echo on a terminal); the key itself
    is never printed. One trailing newline is not part of the key."""
    from .tenants import hash_key

    if sys.stdin.isatty():
        import getpass

        key = getpass.getpass("API key (not shown): ")
    else:
        key = sys.stdin.readline().removesuffix("\n").removesuffix("\r")
    if not key.strip():
        raise ConfigError("--hash-key reads the key from stdin, and it was empty")
    return hash_key(key)
