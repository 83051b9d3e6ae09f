"""The main job: MetaSD on the bundled model zoo, checked against plain decoding.

    python -m vllm_metasd.demo [--config metasd.json] [--target DIR] [--num-prompts N]

Runs the mixed-domain prompt set twice through vLLM on this machine, one
request at a time and in float32: once without speculation, once with MetaSD.
Greedy outputs must be identical token for token (exit 1 otherwise). Prints
tokens/s of both and per-drafter statistics (steps chosen, drafted, accepted,
mean reward).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")


def default_setup(workdir: Path) -> tuple[str, dict, list[str]]:
    """(target, metasd config, prompts): the bundled zoo, else a tiny
    random-weight zoo generated on the fly."""
    from vllm_metasd import zoo

    if zoo.available():
        prompts = [p["prompt"] for p in zoo.load_prompts(split="mixed")]
        return zoo.target_path(), zoo.default_metasd_config(), prompts
    from vllm_metasd.testing import make_tiny_zoo

    paths = make_tiny_zoo(workdir)
    config = {
        "num_speculative_tokens": 4,
        "drafters": [
            {"name": "good", "kind": "draft_model", "path": paths["good"]},
            {"name": "bad", "kind": "draft_model", "path": paths["bad1"]},
            {"name": "lookup", "kind": "ngram", "prompt_lookup_min": 2,
             "prompt_lookup_max": 4},
        ],
        "policy": {"name": "ucb", "beta": 1.0},
        "reward": "bd",
    }
    prompts = ["def add(a, b):", "The quick brown fox", "SELECT name FROM",
               "Der schnelle braune", "12 + 30 ="] * 4
    return paths["target"], config, prompts


def run(target: str, prompts: list[str], max_tokens: int, speculative_config=None):
    from vllm import LLM, SamplingParams

    # float32: the token-for-token check is then exact; in bf16 the target's
    # rounding depends on the batch shape (1 token vs k+1 verified per step),
    # which can flip near-tie argmaxes with or without speculation.
    # Batch 1 (one sequence at a time): on a CPU, where the target's forward is
    # compute-bound, speculation pays at small batches (benchmarks/README.md).
    llm = LLM(model=target, enforce_eager=True, max_model_len=512, max_num_seqs=1,
              seed=0, speculative_config=speculative_config, dtype="float32")
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    t0 = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - t0
    tokens = [list(o.outputs[0].token_ids) for o in outputs]
    stats = llm.collective_rpc("metasd_stats")[0] if speculative_config else None
    del llm
    gc.collect()
    return tokens, elapsed, stats


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", help="metasd.json (default: the bundled zoo's)")
    ap.add_argument("--target", help="target model directory (default: the zoo's)")
    ap.add_argument("--num-prompts", type=int, default=20)
    ap.add_argument("--max-tokens", type=int, default=64)
    args = ap.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        target, config, prompts = default_setup(Path(tmp))
        if args.config:
            config = args.config
        target = args.target or target
        prompts = prompts[: args.num_prompts]
        print(f"target: {target}\nprompts: {len(prompts)}, max_tokens: {args.max_tokens}")

        plain, t_plain, _ = run(target, prompts, args.max_tokens)
        spec = {"method": "metasd", "config": config}
        metasd, t_metasd, stats = run(target, prompts, args.max_tokens, spec)

    n_tokens = sum(len(t) for t in plain)
    same = plain == metasd
    print(f"\nplain decoding : {n_tokens / t_plain:8.1f} tokens/s")
    print(f"MetaSD         : {n_tokens / t_metasd:8.1f} tokens/s "
          f"({t_plain / t_metasd:.2f}x)")
    print(f"greedy outputs identical to plain decoding: {same}")
    if stats:
        print(json.dumps(stats["drafters"], indent=1))
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
