"""Open-loop load: requests arrive while others run (a server's traffic), not in
closed batches.

    python benchmarks/open_loop.py                  # -> results/open_loop.json, ~10 min

Every other benchmark here hands the engine a closed batch (``generate`` of a
list). A server sees requests arrive at random times and join a running batch,
so the batch size changes from step to step and no cohort forms (the
speculation gate's per-step rates decide, not its cohort rule). Here each
engine serves the same schedule of requests arriving as a Poisson process at
``--rates`` requests per second (the zoo's mixed prompts, 64 tokens each,
greedy), driven step by step through its ``LLMEngine`` (``add_request`` when a
request's arrival time has passed, ``step`` while any is unfinished). Engines
alive in one process: plain vLLM, vLLM's n-gram, vLLM's ``draft_model`` with the
general drafter, and the shipped MetaSD setup (default pool). Each round runs
every rate on every engine in turn (the order rotating per round); the first
round is a warm-up (MetaSD's bandits, cost fits and gate learn) and is not
counted. Reported per rate and method: the median over rounds of the mean
latency (arrival to last token) over plain decoding's in the same round, and
of the p90 latency likewise (lower is better); the mean number of requests in
the engine per step.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")

import targets  # noqa: E402  (benchmarks/ is on sys.path when run as a script)
from selection import spec_for  # noqa: E402

HERE = Path(__file__).resolve().parent
METHODS = ("none", "ngram", "draft:general", "metasd")


def serve(llm, prompts: list[str], arrivals: list[float], params, tag: str) -> dict:
    """Requests ``prompts[i]`` arriving ``arrivals[i]`` seconds after the start."""
    eng = llm.llm_engine
    t0 = time.perf_counter()
    finished: dict[int, float] = {}
    added, steps, rows = 0, 0, 0
    while len(finished) < len(prompts):
        now = time.perf_counter() - t0
        while added < len(prompts) and arrivals[added] <= now:
            eng.add_request(f"{tag}-{added}", prompts[added], params)
            added += 1
        if not eng.has_unfinished_requests():
            time.sleep(max(arrivals[added] - now, 0.0))
            continue
        outs = eng.step()
        steps += 1
        rows += added - len(finished)  # requests in the engine this step
        for out in outs:
            if out.finished:
                finished[int(out.request_id.rsplit("-", 1)[1])] = time.perf_counter() - t0
    latency = sorted(finished[i] - arrivals[i] for i in range(len(prompts)))
    return {"mean_latency_s": statistics.fmean(latency),
            "p90_latency_s": latency[int(0.9 * (len(latency) - 1))],
            "mean_requests_per_step": rows / max(steps, 1)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rates", default="4,12,24", help="arrivals per second")
    ap.add_argument("--requests", type=int, default=48, help="per rate and round")
    ap.add_argument("--rounds", type=int, default=5, help="counted rounds (plus one warm-up)")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--out", type=Path, default=HERE / "results" / "open_loop.json")
    args = ap.parse_args()
    import numpy as np
    from vllm import LLM, SamplingParams

    zoo = targets.use("zoo")
    prompts = [p["prompt"] for p in zoo.load_prompts()]
    prompts = [prompts[i % len(prompts)] for i in range(args.requests)]
    rates = [float(r) for r in args.rates.split(",")]
    rng = np.random.default_rng(0)
    schedule = {r: np.cumsum(rng.exponential(1.0 / r, args.requests)).tolist() for r in rates}
    cfg = zoo.default_metasd_config()
    cfg.update(log_stats_interval_s=0)
    specs = {m: ({"method": "metasd", "config": cfg} if m == "metasd"
                 else spec_for(m, "general")) for m in METHODS}
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0, ignore_eos=True)
    engines = {}
    runs: dict[str, dict[float, list[dict]]] = {m: {r: [] for r in rates} for m in METHODS}
    try:
        for m in METHODS:
            engines[m] = LLM(model=zoo.target_path(), enforce_eager=True, max_model_len=1024,
                             seed=0, max_num_seqs=64, speculative_config=specs[m])
        for rnd in range(args.rounds + 1):
            order = list(METHODS[rnd % len(METHODS):] + METHODS[:rnd % len(METHODS)])
            for r in rates:
                for m in order:
                    res = serve(engines[m], prompts, schedule[r], params, f"{rnd}-{r}")
                    if rnd > 0:
                        runs[m][r].append(res)
            print(json.dumps({"round": rnd, **{f"{m}@{r}": runs[m][r][-1]["mean_latency_s"]
                                               for m in METHODS for r in rates if runs[m][r]}}),
                  flush=True)
        stats = engines["metasd"].collective_rpc("metasd_stats")[0]
    finally:
        for llm in engines.values():
            llm.llm_engine.engine_core.shutdown()
    table = []
    for r in rates:
        for m in METHODS:
            ratio = {key: [a[key] / b[key] for a, b in zip(runs[m][r], runs["none"][r])]
                     for key in ("mean_latency_s", "p90_latency_s")}
            table.append({
                "rate": r, "method": m,
                "mean_latency_vs_plain": statistics.median(ratio["mean_latency_s"]),
                "mean_latency_vs_plain_spread": [min(ratio["mean_latency_s"]),
                                                 max(ratio["mean_latency_s"])],
                "p90_latency_vs_plain": statistics.median(ratio["p90_latency_s"]),
                "mean_latency_s": statistics.median(x["mean_latency_s"] for x in runs[m][r]),
                "mean_requests_per_step": statistics.fmean(
                    x["mean_requests_per_step"] for x in runs[m][r])})
    out = {"rounds": args.rounds, "requests": args.requests, "max_tokens": args.max_tokens,
           "results": table, "metasd_gate": stats["gate"],
           "metasd_plain_steps": stats["plain_steps"], "metasd_steps": stats["steps"]}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1) + "\n")
    for row in table:
        print(f"{row['rate']:5.1f}/s {row['method']:14s} mean latency "
              f"{row['mean_latency_vs_plain']:.3f}x plain "
              f"({row['mean_latency_vs_plain_spread'][0]:.2f}-"
              f"{row['mean_latency_vs_plain_spread'][1]:.2f}), p90 "
              f"{row['p90_latency_vs_plain']:.3f}x, {row['mean_requests_per_step']:.1f} "
              f"requests per step")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
