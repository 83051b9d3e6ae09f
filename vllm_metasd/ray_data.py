"""Batch inference with MetaSD over a Ray Data dataset (Ray Data LLM's vLLM processor;
runs on CPU too).

From the repository root (the zoo's 320 held-out mixed prompts, the shipped metasd.json):

    python -m vllm_metasd.ray_data --input vllm_metasd/zoo/prompts/mixed.jsonl \\
        --output /tmp/metasd_out.jsonl --max-tokens 64

In Python:

    import ray
    from vllm_metasd.ray_data import build_metasd_processor

    processor = build_metasd_processor("vllm_metasd/zoo/models/target", "metasd.json",
                                       sampling_params={"max_tokens": 64, "temperature": 0})
    ds = ray.data.read_json("vllm_metasd/zoo/prompts/mixed.jsonl")   # rows with "prompt"
    for row in processor(ds).iter_rows():
        print(row["prompt"], "->", row["generated_text"])

Ray Data LLM (``ray.data.llm``) runs the job: a pool of ``concurrency`` actors, each
owning one vLLM engine (MetaSD is its ``speculative_config``; vLLM loads the plugin
in the actor and in the engine processes), fed batches of rows. What this module adds:

- the metasd.json validated on the driver and passed inline, drafter paths absolute;
- on the CPU platform: each engine reserves ``{"CPU": 1}`` per TP rank (Ray Data
  LLM reserves a GPU per engine unless a placement group says otherwise); the
  tokenize / detokenize / chat-template stages are off (vLLM tokenizes the
  ``prompt`` itself; those stages would be extra actors, each reserving a CPU);
  with several engines on one node, vLLM's per-engine core binding is turned off
  (``VLLM_CPU_OMP_THREADS_BIND=nobind``, ``OMP_NUM_THREADS`` = cores / engines):
  Ray Data gives its actors no rank to pick distinct cores from, and vLLM's
  ``auto`` binding would pin every engine to the same core;
- output rows keep the input's columns and add ``generated_text`` and
  ``num_generated_tokens``.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any

from vllm_metasd._ray_env import (DEFAULT_CONFIG, metasd_speculative_config, model_source,
                                  on_cpu, runtime_env_with_vllm_vars)

# Columns Ray Data LLM's stages add that are internal to the request.
_INTERNAL = ("sampling_params", "params", "request_id", "batch_uuid", "embeddings",
             "prompt_token_ids", "generated_tokens", "generated_logprobs", "prompt_logprobs",
             "metrics", "__inference_error__")


def metasd_processor_config(model: str, metasd: Any = DEFAULT_CONFIG, *, concurrency: int = 1,
                            batch_size: int = 16, engine_kwargs: dict | None = None,
                            runtime_env: dict | None = None, **config_kwargs):
    """Ray Data LLM's ``vLLMEngineProcessorConfig`` for ``model`` with MetaSD
    (``metasd``: a metasd.json path, inline JSON or a dict); ``concurrency``
    engines, ``batch_size`` rows per batch; ``engine_kwargs`` go to vLLM."""
    from ray.data.llm import vLLMEngineProcessorConfig

    cpu = on_cpu()
    kwargs = {"enforce_eager": True} if cpu else {}
    kwargs.update(engine_kwargs or {})
    kwargs["speculative_config"] = metasd_speculative_config(metasd)
    extra_env: dict[str, str] = {}
    if cpu:
        world = kwargs.get("tensor_parallel_size", 1) * kwargs.get("pipeline_parallel_size", 1)
        config_kwargs.setdefault("placement_group_config", {"bundles": [{"CPU": 1}] * world})
        for stage in ("tokenize_stage", "detokenize_stage", "chat_template_stage"):
            config_kwargs.setdefault(stage, False)
        if concurrency > 1 and "VLLM_CPU_OMP_THREADS_BIND" not in os.environ:
            cores = len(os.sched_getaffinity(0))
            extra_env = {"VLLM_CPU_OMP_THREADS_BIND": "nobind",
                         "OMP_NUM_THREADS": str(max(1, cores // (concurrency * world)))}
    return vLLMEngineProcessorConfig(
        model_source=model_source(model),
        engine_kwargs=kwargs,
        concurrency=concurrency,
        batch_size=batch_size,
        runtime_env=runtime_env_with_vllm_vars(runtime_env, extra_env),
        **config_kwargs,
    )


def build_metasd_processor(model: str, metasd: Any = DEFAULT_CONFIG, *,
                           sampling_params: dict | None = None, prompt_column: str = "prompt",
                           **kwargs):
    """A Ray Data LLM processor: ``processor(dataset)`` generates for every row's
    ``prompt_column`` with ``sampling_params`` (vLLM ``SamplingParams`` fields; default
    greedy, 64 tokens) and returns the rows plus ``generated_text`` and
    ``num_generated_tokens``. ``kwargs``: :func:`metasd_processor_config`."""
    from ray.data.llm import build_processor

    params = dict(sampling_params or {"max_tokens": 64, "temperature": 0.0})

    def preprocess(row: dict) -> dict:
        return {**row, "prompt": row[prompt_column], "sampling_params": params}

    def postprocess(row: dict) -> dict:
        return {k: v for k, v in row.items() if k not in _INTERNAL}

    return build_processor(metasd_processor_config(model, metasd, **kwargs),
                           preprocess=preprocess, postprocess=postprocess)


def main(argv: list[str] | None = None) -> int:
    import json

    from vllm_metasd import zoo

    ap = argparse.ArgumentParser(
        description="MetaSD batch inference over a JSONL prompt file with Ray Data")
    ap.add_argument("--input", default=str(zoo.ZOO_DIR / "prompts" / "mixed.jsonl"),
                    help="JSONL, one object with a 'prompt' per line (default: the zoo's "
                         "mixed prompts)")
    ap.add_argument("--output", required=True, help="JSONL written in input order")
    ap.add_argument("--model", default=zoo.target_path())
    ap.add_argument("--config", default=DEFAULT_CONFIG, help="metasd.json")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--num-prompts", type=int, help="only the first N prompts")
    ap.add_argument("--concurrency", type=int, default=1, help="vLLM engines (Ray actors)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-model-len", type=int, default=1024)
    args = ap.parse_args(argv)

    import ray

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    # Ray runs its workers at nice 15 by default: on a busy machine an engine (and
    # the vLLM processes it starts) would get almost no CPU.
    os.environ.setdefault("RAY_worker_niceness", "0")
    ray.init(ignore_reinit_error=True, include_dashboard=False)
    try:
        ray.data.DataContext.get_current().execution_options.preserve_order = True
        ds = ray.data.read_json(os.path.abspath(args.input))
        if args.num_prompts:
            ds = ds.limit(args.num_prompts)
        processor = build_metasd_processor(
            args.model, args.config, concurrency=args.concurrency, batch_size=args.batch_size,
            sampling_params={"max_tokens": args.max_tokens, "temperature": args.temperature},
            engine_kwargs={"max_model_len": args.max_model_len})
        t0 = time.perf_counter()
        rows = tokens = 0
        with open(args.output, "w", encoding="utf-8") as out:
            for row in processor(ds).iter_rows():
                out.write(json.dumps(row, default=str) + "\n")
                rows += 1
                tokens += int(row.get("num_generated_tokens", 0))
        elapsed = time.perf_counter() - t0
        print(f"{rows} rows, {tokens} generated tokens in {elapsed:.1f} s "
              f"(including engine start) -> {args.output}")
    finally:
        ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
