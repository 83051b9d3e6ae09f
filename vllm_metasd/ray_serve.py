"""MetaSD behind Ray Serve LLM's OpenAI-compatible app (runs on CPU too).

From the repository root, the shipped metasd.json on the bundled zoo (starts a
local Ray instance; Ctrl-C or SIGTERM stops the app and Ray):

    VLLM_CPU_KVCACHE_SPACE=2 python -m vllm_metasd.ray_serve \\
        --model vllm_metasd/zoo/models/target --config metasd.json --port 8000

then any OpenAI client at http://localhost:8000/v1 (model name: ``--model`` as
given). ``build_app`` is the same app as a Serve application builder (``serve run
vllm_metasd.ray_serve:build_app model=... metasd=...``, Serve config files). In Python:

    import ray
    from ray import serve
    from vllm_metasd.ray_serve import build_metasd_app

    app = build_metasd_app("vllm_metasd/zoo/models/target", "metasd.json",
                           engine_kwargs={"max_model_len": 1024})
    serve.run(app)

Ray Serve LLM (``ray.serve.llm``) does the serving: its OpenAI ingress, one
``LLMServer`` replica per engine, vLLM's ``AsyncLLM`` inside. MetaSD is vLLM's
``speculative_config``; vLLM loads the plugin in the replica and in the engine
processes it starts. What this module adds:

- the metasd.json validated on the driver and passed inline, drafter paths absolute;
- on the CPU platform: ``accelerator_config={"kind": "cpu"}`` (Ray Serve LLM's CPU
  backend: multiprocessing executor, one ``{"CPU": 1}`` bundle per TP rank), the
  replica actor and the ingress reserving no CPU of their own (each engine holds
  exactly its workers' CPUs: 2 replicas fit a 2-CPU node), and, with several
  replicas, each replica's ``VLLM_CPU_OMP_THREADS_BIND`` from its Serve replica
  rank (vLLM's ``auto`` binding only sees the process's CPU affinity, which Ray
  leaves unrestricted, so every replica would pin its worker to the same core);
- ``MetaSDLLMServer.metasd_stats()``: the per-drafter statistics of a replica,
  through a Serve deployment handle.
"""
from __future__ import annotations

import json
import os
from typing import Any

from ray import serve
from ray.serve.llm import LLMConfig, LLMServer, build_openai_app

from vllm_metasd._ray_env import (DEFAULT_CONFIG, metasd_speculative_config, model_source,
                                  on_cpu, runtime_env_with_vllm_vars)


class MetaSDLLMServer(LLMServer):
    """Ray Serve LLM's ``LLMServer`` with a per-replica CPU binding and MetaSD statistics."""

    async def start(self):
        bind_replica_cpus(self._llm_config.engine_kwargs)
        await super().start()

    async def metasd_stats(self) -> list:
        """``collective_rpc("metasd_stats")`` of this replica's engine: one dict per
        worker (TP rank), as ``LLM.collective_rpc`` returns."""
        client = getattr(self.engine, "_engine_client", None)
        if client is None:
            raise RuntimeError("the vLLM engine of this replica is not running")
        return await client.collective_rpc("metasd_stats")


def bind_replica_cpus(engine_kwargs: dict) -> str | None:
    """On CPU with several replicas, set this replica's ``VLLM_CPU_OMP_THREADS_BIND``
    (replica rank r: cores of workers r*W .. r*W+W-1, W = TP x PP, wrapping around)
    unless it is set already. Returns the binding set, if any."""
    if os.environ.get("VLLM_CPU_OMP_THREADS_BIND") or not on_cpu():
        return None
    ctx = serve.get_replica_context()
    if ctx is None or getattr(ctx, "world_size", 1) <= 1:
        return None  # one engine: vLLM's auto binding (worker core + a reserved core)
    from vllm_metasd.ray_replicas import default_cpu_binds

    world = (engine_kwargs.get("tensor_parallel_size", 1)
             * engine_kwargs.get("pipeline_parallel_size", 1))
    rank = ctx.rank.local_rank if hasattr(ctx.rank, "local_rank") else int(ctx.rank)
    bind = default_cpu_binds(ctx.world_size, world)[rank % ctx.world_size]
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = bind
    return bind


def metasd_llm_config(model: str, metasd: Any = DEFAULT_CONFIG, *, model_id: str | None = None,
                      num_replicas: int = 1, engine_kwargs: dict | None = None,
                      runtime_env: dict | None = None, deployment_config: dict | None = None,
                      **llm_config_kwargs) -> LLMConfig:
    """Ray Serve LLM's ``LLMConfig`` for ``model`` with MetaSD (``metasd``: a
    metasd.json path, inline JSON or a dict). ``model_id``: the name clients use
    (default: ``model`` as given). ``engine_kwargs`` go to vLLM (``enforce_eager``
    defaults to True on CPU)."""
    cpu = on_cpu()
    kwargs = {"enforce_eager": True} if cpu else {}
    kwargs.update(engine_kwargs or {})
    kwargs["speculative_config"] = metasd_speculative_config(metasd)
    deployment = {"num_replicas": num_replicas}
    if cpu:
        deployment["ray_actor_options"] = {"num_cpus": 0}
    deployment.update(deployment_config or {})
    if cpu:
        llm_config_kwargs.setdefault("accelerator_config", {"kind": "cpu"})
    return LLMConfig(
        model_loading_config={"model_id": model_id or model, "model_source": model_source(model)},
        engine_kwargs=kwargs,
        deployment_config=deployment,
        runtime_env=runtime_env_with_vllm_vars(runtime_env),
        server_cls=MetaSDLLMServer,
        **llm_config_kwargs,
    )


def build_metasd_app(model: str, metasd: Any = DEFAULT_CONFIG, **kwargs):
    """Ray Serve LLM's OpenAI app (``/v1/completions``, ``/v1/chat/completions``,
    ``/v1/models``) serving ``model`` with MetaSD; ``kwargs``: :func:`metasd_llm_config`."""
    llm_config = metasd_llm_config(model, metasd, **kwargs)
    args: dict[str, Any] = {"llm_configs": [llm_config]}
    if on_cpu():
        args["ingress_deployment_config"] = {"ray_actor_options": {"num_cpus": 0}}
    return build_openai_app(args)


def _value(text: Any) -> Any:
    if not isinstance(text, str):
        return text
    try:
        return json.loads(text)
    except ValueError:
        return text


def build_app(args: dict | None = None):
    """Application builder for ``serve run vllm_metasd.ray_serve:build_app key=value ...``:
    ``model`` (default: the bundled zoo's target), ``metasd`` (default metasd.json),
    ``model_id``, ``num_replicas``; every other key is a vLLM engine argument
    (``max_model_len=1024 dtype=float32``; values parsed as JSON when they are)."""
    args = dict(args or {})
    if "model" in args:
        model = args.pop("model")
    else:
        from vllm_metasd import zoo

        model = zoo.target_path()
    metasd = args.pop("metasd", DEFAULT_CONFIG)
    model_id = args.pop("model_id", None)
    num_replicas = int(args.pop("num_replicas", 1))
    return build_metasd_app(model, metasd, model_id=model_id, num_replicas=num_replicas,
                            engine_kwargs={k: _value(v) for k, v in args.items()})


def main(argv: list[str] | None = None) -> int:
    import argparse
    import signal
    import time

    import ray

    from vllm_metasd import zoo

    ap = argparse.ArgumentParser(
        description="Serve a model with MetaSD through Ray Serve LLM's OpenAI app")
    ap.add_argument("--model", default=zoo.target_path())
    ap.add_argument("--config", default=DEFAULT_CONFIG, help="metasd.json")
    ap.add_argument("--model-id", help="the name clients use (default: --model as given)")
    ap.add_argument("--host", default="0.0.0.0")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--num-replicas", type=int, default=1)
    ap.add_argument("--engine-kwargs", default="{}",
                    help='vLLM engine arguments as JSON, e.g. \'{"max_model_len": 1024}\'')
    args = ap.parse_args(argv)

    def stop(signum, frame):
        raise KeyboardInterrupt

    # Ray runs its workers at nice 15 by default: on a busy machine an engine (and
    # the vLLM processes it starts) would get almost no CPU.
    os.environ.setdefault("RAY_worker_niceness", "0")
    ray.init(include_dashboard=False)
    signal.signal(signal.SIGTERM, stop)  # after ray.init, which installs its own
    try:
        serve.start(http_options={"host": args.host, "port": args.port})
        app = build_metasd_app(args.model, args.config, model_id=args.model_id,
                               num_replicas=args.num_replicas,
                               engine_kwargs=json.loads(args.engine_kwargs))
        serve.run(app, name="metasd", route_prefix="/")
        print(f"MetaSD on Ray Serve: http://{args.host}:{args.port}/v1, model "
              f"{args.model_id or args.model!r}; Ctrl-C stops", flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        serve.shutdown()
        ray.shutdown()
    return 0


__all__ = ["MetaSDLLMServer", "bind_replica_cpus", "build_app", "build_metasd_app",
           "metasd_llm_config"]


if __name__ == "__main__":
    import sys

    sys.exit(main())
