"""`tuili serve`: build the served models and the router from the flags, run uvicorn, stop cleanly.

Shutdown (SIGTERM or Ctrl-C): the listening socket closes at once, so new connections are
refused, and a request that still arrives on an open connection gets 503; requests in
flight run on. `--shutdown-timeout` seconds after the signal, whatever is still running
ends with an error event (streams) or a 503 (non-streamed calls), each engine saves its
disk tier, and the process exits. A second signal exits at once, as uvicorn does.
"""
from __future__ import annotations

import logging
import threading
from typing import Any

from ..config import DEFAULT_MODEL
from ..engine import AsyncEngine, EngineShutdownError
from ..router import load_router
from ..router.probe import DEFAULT_FEATURES, DEFAULT_PROBE, check_model, is_probe
from .app import create_app
from .model_spec import ModelSpec, engine_option_names, parse_model_spec, parse_router_spec
from .models import ModelRegistry
from .router import Router

log = logging.getLogger("tuili.serve")


def model_specs(args) -> list[ModelSpec]:
    """The served models: every --model NAME=MODEL[,opts], plus the positional MODEL if given;
    the default model when neither is."""
    known = engine_option_names()
    specs = [parse_model_spec(text, known) for text in (args.models or [])]
    if args.model is not None or not specs:
        specs.insert(0, ModelSpec(args.served_model_name, args.model or DEFAULT_MODEL))
    elif args.served_model_name:
        raise ValueError("--served-model-name: names the positional MODEL; with --model, write NAME=MODEL")
    return specs


def build_registry(args, engine_options: dict[str, Any]) -> ModelRegistry:
    """One Engine (own weights, own KV budget) and one AsyncEngine thread per served model."""
    registry = ModelRegistry()
    specs = model_specs(args)
    names = [s.name for s in specs if s.name is not None]
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise ValueError(f"--model: the name {dup!r} is given twice")
    for spec in specs:
        options = dict(engine_options, **spec.options)
        # loaded in its loop thread: one OpenMP team per model, not one more in the main thread
        served = AsyncEngine.from_options(spec.model, max_queue=args.max_queue, **options)
        name = spec.name or served.model_name
        registry.add(name, served)
        if len(specs) > 1:
            log.info("serving %s as %r (%s)", spec.model, name,
                     ", ".join(f"{k}={v}" for k, v in spec.options.items()) or "server-wide engine options")
    return registry


def check_router_flags(args) -> None:
    """Fail on the router's flags before any model is loaded."""
    if not getattr(args, "router", None):
        return
    fast, strong = parse_router_spec(args.router)
    router_files(args)
    if args.router_max_wait is not None and args.router_max_wait < 0:
        raise ValueError(f"--router-max-wait: must be >= 0 ms, got {args.router_max_wait}")
    named = [s.name for s in model_specs(args)]
    for want in (fast, strong):
        if None not in named and want not in named:
            raise ValueError(f"--router: {want!r} is not a served model; served: {', '.join(named)}")


def build_router(args, registry: ModelRegistry) -> Router | None:
    """The router behind --router-name, when --router fast=NAME,strong=NAME is given."""
    if not getattr(args, "router", None):
        return None
    fast, strong = parse_router_spec(args.router)
    classifier, probe = router_files(args)
    engines = {m.name: m.engine for m in registry.all()}
    if probe is not None and fast in engines:
        shape = engines[fast].engine
        try:
            check_model(probe, shape.model_config, shape.model_name)
        except ValueError:
            if getattr(args, "router_signal", "auto") == "probe" or args.router_model:
                raise
            log.info("router: the shipped probe was fitted on %s, not on the fast model %s; surface features "
                     "decide (`tuili router train --signal probe --model ...` fits one)",
                     probe.info.get("model"), shape.model_name)
            probe = None
    router = Router(args.router_name, fast, strong, classifier, engines, max_wait_ms=args.router_max_wait,
                    probe=probe)
    used = probe or classifier
    log.info("router %r: fast=%s strong=%s signal=%s threshold=%.4f (strong share %.2f) max_wait=%s ms",
             router.name, fast, strong, "probe (layer %d)" % probe.info["layer"] if probe else "features",
             used.threshold, used.strong_share, args.router_max_wait)
    return router


def router_files(args) -> tuple:
    """(surface-features classifier, probe classifier or None) from --router-model and
    --router-signal: a probe file given is the probe (the shipped features are its fallback);
    otherwise the shipped probe unless --router-signal features."""
    signal = getattr(args, "router_signal", "auto")
    given = load_router(args.router_model, args.router_strong_share) if args.router_model else None
    if given is not None and is_probe(given):
        if signal == "features":
            raise ValueError("--router-signal features: --router-model is a probe router")
        return load_router(DEFAULT_FEATURES, args.router_strong_share), given
    features = given or load_router(DEFAULT_FEATURES, args.router_strong_share)
    if signal == "features" or (given is not None and signal == "auto"):
        return features, None
    return features, load_router(DEFAULT_PROBE, args.router_strong_share)


def serve(args, engine_options: dict[str, Any]) -> int:
    import uvicorn

    check_router_flags(args)
    registry = build_registry(args, engine_options)
    router = build_router(args, registry)
    names = [m.name for m in registry.all()] + ([router.name] if router else [])
    name = names[-1] if router else names[0]
    base = f"http://{args.host}:{args.port}"
    auth = f" -H 'Authorization: Bearer {args.api_key}'" if args.api_key else ""

    def ready() -> None:
        print(f"tuili serving {', '.join(names)} at {base}/v1\n"
              f"try: curl {base}/v1/chat/completions -H 'Content-Type: application/json'{auth} "
              f"-d '{{\"model\": \"{name}\", \"messages\": [{{\"role\": \"user\", \"content\": \"Hello!\"}}]}}'",
              flush=True)

    timeout = float(getattr(args, "shutdown_timeout", 30.0))
    if timeout < 0:
        raise ValueError(f"--shutdown-timeout: must be >= 0 seconds, got {timeout}")
    app = create_app(registry, api_key=args.api_key, on_ready=ready, router=router,
                     max_request_bytes=int(getattr(args, "max_request_bytes", 4 << 20)))
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level="warning", access_log=False,
                            timeout_graceful_shutdown=timeout + 5)
    DrainingServer(config, app, registry, timeout).run()
    return 0


class DrainingServer:
    """uvicorn's server, with the drain deadline of `--shutdown-timeout` on the first signal."""

    def __new__(cls, config, app, registry: ModelRegistry, timeout: float):
        import uvicorn

        class _Server(uvicorn.Server):
            def handle_exit(self, sig, frame) -> None:
                if not self.should_exit:
                    start_drain(app, registry, timeout)
                super().handle_exit(sig, frame)

        return _Server(config)


def start_drain(app, registry: ModelRegistry, timeout: float) -> threading.Timer:
    """Refuse new calls now; end the calls still running after `timeout` seconds."""
    app.state.draining = True
    calls = sum(m.engine.stats().get("calls_in_flight", 0) for m in registry.all())
    log.info("shutting down: %d calls in flight get up to %.1f s to finish", calls, timeout)

    def deadline() -> None:
        error = EngineShutdownError(f"the server is shutting down and this request did not finish within "
                                    f"--shutdown-timeout ({timeout:g} s)")
        ended = sum(m.engine.fail_all(error) for m in registry.all())
        if ended:
            log.warning("shutdown deadline: ended %d calls still running", ended)

    timer = threading.Timer(timeout, deadline)
    timer.daemon = True
    timer.start()
    return timer
