"""`tuili serve --replicas N`: start (or join) Ray, deploy the engine replicas, serve the app.

Decisions:
- One HTTP surface. The HTTP server is the same FastAPI app as `tuili serve` (`create_app`:
  same errors, API key, streaming, multi-model and `auto` router, /health, /metrics, web
  pages), run by uvicorn in this process with the same draining shutdown; its engines are
  `RemoteEngine`s that forward to Ray Serve deployments through deployment handles, with
  one of our request routers. Ray Serve's own HTTP proxy is not started: it rewrites
  `X-Request-Id` (and adds a second one), queues requests in front of the app and would
  put a second copy of the app's behaviour under test. Whatever the routes learn later
  works here unchanged, as long as requests carry picklable `SamplingParams`.
- One deployment per served model, named `engine<i>`, in a Serve application named after
  the port (`tuili-<port>-<i>`), so several servers can share one Ray cluster.
- Local Ray (no `--ray-address`): started here with the dashboard and usage reporting off,
  bound to 127.0.0.1, as many logical CPUs as the replicas ask for (at least the
  machine's), and stopped on exit. With `--ray-address` (e.g. `auto`, or `HOST:6379` of
  `ray start --head`) it joins that cluster and, on exit, deletes only its applications.
- Autoscaling (`--min-replicas`/`--max-replicas`): Ray Serve's autoscaler on ongoing
  requests per replica (running plus queued: queue depth), aiming at `max_num_seqs / 2`.
"""
from __future__ import annotations

import logging
import os
from typing import Any

from ..app import create_app
from ..launch import DrainingServer, build_router, check_router_flags, model_specs
from ..models import ModelRegistry
from .remote import SESSION, RemoteEngine

log = logging.getLogger("tuili.replicas")

GENERATION_PATHS = ("/v1/chat/completions", "/v1/completions")
FIGURE_PATHS = ("/metrics", "/v1/stats", "/health")
ROUTER_PATHS = {name: f"tuili.serve.replicas.routers.{cls}" for name, cls in
                (("cache-aware", "CacheAwareRouter"), ("pow2", "Pow2Router"), ("round-robin", "RoundRobinRouter"))}


def check_flags(args) -> None:
    n = args.replicas
    if n < 1:
        raise ValueError(f"--replicas: must be >= 1, got {n}")
    if args.cpus_per_replica <= 0:
        raise ValueError(f"--cpus-per-replica: must be > 0, got {args.cpus_per_replica}")
    lo, hi = args.min_replicas, args.max_replicas
    if (lo is None) != (hi is None):
        raise ValueError("--min-replicas and --max-replicas go together")
    if lo is not None and not 0 < lo <= n <= hi:
        raise ValueError(f"--min-replicas {lo} <= --replicas {n} <= --max-replicas {hi} must hold (min >= 1)")


def start_ray(args) -> bool:
    """Join the cluster at --ray-address, or start a local one; True when started here."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    import ray

    if args.ray_address:
        local = args.ray_address.split(":")[0] in ("127.0.0.1", "localhost")  # nodes bound to loopback
        ray.init(address=args.ray_address, namespace="tuili", log_to_driver=True,
                 **({"_node_ip_address": "127.0.0.1"} if local else {}))
        return False
    want = (args.max_replicas or args.replicas) * args.cpus_per_replica
    # address="local": a new Ray of our own, even where a stale /tmp/ray/ray_current_cluster names another
    ray.init(address="local", include_dashboard=False, num_cpus=max(os.cpu_count() or 1, int(want + 0.999)),
             namespace="tuili",
             _node_ip_address="127.0.0.1", log_to_driver=True)
    return True


def deployment_options(args, engine_options: dict[str, Any], name: str) -> dict[str, Any]:
    from ray.serve.config import RequestRouterConfig

    max_seqs = int(engine_options.get("max_num_seqs") or 64)
    options: dict[str, Any] = {
        "name": name,
        "ray_actor_options": {"num_cpus": args.cpus_per_replica},
        "max_ongoing_requests": min(max_seqs + args.max_queue, 100_000),
        "request_router_config": RequestRouterConfig(request_router_class=ROUTER_PATHS[args.routing],
                                                     request_routing_stats_period_s=2.0,
                                                     request_routing_stats_timeout_s=10.0),
        "health_check_period_s": 2.0,
        "health_check_timeout_s": 30.0,
        "graceful_shutdown_timeout_s": 5.0,
    }
    if args.min_replicas is not None:
        options["autoscaling_config"] = {"min_replicas": args.min_replicas, "max_replicas": args.max_replicas,
                                         "initial_replicas": args.replicas,
                                         "target_ongoing_requests": max(1, max_seqs // 2),
                                         "upscale_delay_s": 5.0, "downscale_delay_s": 30.0}
    else:
        options["num_replicas"] = args.replicas
    return options


def deploy(args, engine_options: dict[str, Any]) -> tuple[ModelRegistry, list[str]]:
    """One engine deployment per served model; returns the registry of RemoteEngines and the app names."""
    from ray import serve

    from .replica import EngineReplica

    serve.start(proxy_location="Disabled")
    specs = model_specs(args)
    registry = ModelRegistry()
    apps = []
    threads = int(args.cpus_per_replica) if args.cpus_per_replica >= 1 else 1
    for i, spec in enumerate(specs):
        options = dict(engine_options, **spec.options)
        name = f"engine{i}"
        app = f"tuili-{args.port}-{i}"
        deployment = serve.deployment(EngineReplica).options(**deployment_options(args, options, name))
        log.info("deploying %s: %d replica(s) x %g CPU, routing %s", spec.model, args.replicas,
                 args.cpus_per_replica, args.routing)
        handle = serve.run(deployment.bind(spec.model, options, args.max_queue, threads), name=app,
                           route_prefix=None, blocking=False)
        apps.append(app)
        info = handle.info.remote().result(timeout_s=600)
        engine = RemoteEngine(info, handle, name, args.replicas, max_queue=args.max_queue)
        registry.add(spec.name or engine.model_name, engine)
    return registry, apps


class ReplicaEdge:
    """Outside the app: the session key of a call, and fresh replica figures before they are read.

    The session is the `X-Session-Id` header, else the body's `user` field (the body is read
    here and handed on unchanged; bodies over the size limit are handed on unread, so the
    app's own limit answers them)."""

    def __init__(self, app, figures, max_request_bytes: int):
        self.app = app
        self.figures = figures
        self.max_request_bytes = max_request_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        if path in FIGURE_PATHS:
            await self.figures.refresh()
        session = None
        for k, v in scope.get("headers", []):
            if k.lower() == b"x-session-id" and v:
                session = v.decode("latin-1")[:256]
        if session is None and scope.get("method") == "POST" and path in GENERATION_PATHS:
            receive, session = await self._peek_user(receive)
        token = SESSION.set(session)
        try:
            await self.app(scope, receive, send)
        finally:
            SESSION.reset(token)

    async def _peek_user(self, receive):
        import json

        messages, size = [], 0
        while True:
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":
                break
            size += len(message.get("body", b""))
            if not message.get("more_body") or size > self.max_request_bytes:
                break
        user = None
        if size <= self.max_request_bytes:
            try:
                body = json.loads(b"".join(m.get("body", b"") for m in messages if m["type"] == "http.request"))
                if isinstance(body, dict) and isinstance(body.get("user"), str) and body["user"]:
                    user = "user:" + body["user"][:256]
            except ValueError:
                pass
        pending = list(messages)

        async def replay():
            if pending:
                return pending.pop(0)
            return await receive()

        return replay, user


def serve_replicas(args, engine_options: dict[str, Any]) -> int:
    import uvicorn

    check_flags(args)
    check_router_flags(args)
    started = start_ray(args)
    apps: list[str] = []
    try:
        registry, apps = deploy(args, engine_options)
        router = build_router(args, registry)
        from .stats import ReplicaCollector, ReplicaStats

        engines = {m.name: m.engine for m in registry.all()}
        figures = ReplicaStats(list(engines.values()))
        names = [m.name for m in registry.all()] + ([router.name] if router else [])
        base = f"http://{args.host}:{args.port}"

        def ready() -> None:
            print(f"tuili serving {', '.join(names)} at {base}/v1 on {args.replicas} replica(s) "
                  f"(routing {args.routing})", flush=True)

        timeout = float(args.shutdown_timeout)
        max_bytes = int(args.max_request_bytes)
        app = create_app(registry, api_key=args.api_key, on_ready=ready, router=router, max_request_bytes=max_bytes)
        app.state.metrics.registry.register(ReplicaCollector(engines))
        app.state.replica_figures = figures
        config = uvicorn.Config(ReplicaEdge(app, figures, max_bytes), host=args.host, port=args.port,
                                log_level="warning", access_log=False, timeout_graceful_shutdown=timeout + 5)
        DrainingServer(config, app, registry, timeout).run()
    finally:
        stop(started, apps)
    return 0


def stop(started: bool, apps: list[str]) -> None:
    import ray
    from ray import serve

    try:
        if started:
            serve.shutdown()
        else:
            for app in apps:
                serve.delete(app, _blocking=True)
    except Exception as e:  # noqa: BLE001 - leaving anyway
        log.warning("stopping the Serve applications: %s", e)
    ray.shutdown()
