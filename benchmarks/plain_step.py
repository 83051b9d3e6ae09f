"""What a plain step costs in a MetaSD engine, and the shipped setup against
plain decoding where plain decoding is fastest, measured finely.

    python benchmarks/plain_step.py                 # -> results/plain_step.json, ~8 min

Three engines alive in one process: plain vLLM; MetaSD with every step plain
(the speculation gate's decision forced to "no"); the shipped MetaSD setup
(default pool, throughput objective, match reward, the gate deciding). Where
the gate turns speculation off (on this CPU: batch 16 and above), MetaSD can
be no faster than its plain step. Each round runs batch 1 (prompts one at a
time), then batch 16, then batch 64, each on every engine in turn (the order
rotating per round), so the runs compared are seconds apart; the first round
is a warm-up (the shipped engine's bandits and gate learn there) and is not
counted. Reported per batch size: the median over rounds of MetaSD / plain
in the same round (the spread in ``per_round_ratio``). Greedy, the zoo's
mixed prompts.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
# collective_rpc with a function (below) needs it
os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")

HERE = Path(__file__).resolve().parent


def never_speculate(worker) -> bool:
    """Runs in the worker: the MetaSD proposer's gate answers "no" every step."""
    worker.model_runner.drafter.gate.speculate = lambda batch_size, cohort=False: False
    return True


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=12, help="counted rounds (plus one warm-up)")
    ap.add_argument("--prompts", type=int, default=8, help="prompts at batch 1 per round")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--out", type=Path, default=HERE / "results" / "plain_step.json")
    args = ap.parse_args()

    from vllm import LLM, SamplingParams

    from vllm_metasd import zoo

    prompts = [p["prompt"] for p in zoo.load_prompts()][:64]
    batches = {"bs1": 1, "bs16": 16, "bs64": 64}
    cfg = zoo.default_metasd_config()
    cfg.update(log_stats_interval_s=0)

    def engine(spec=None):
        return LLM(model=zoo.target_path(), enforce_eager=True, max_model_len=1024, seed=0,
                   max_num_seqs=64, speculative_config=spec)

    engines = {"plain": engine(),
               "metasd_plain_steps": engine({"method": "metasd", "config": cfg}),
               "metasd": engine({"method": "metasd", "config": cfg})}
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0, ignore_eos=True)
    tps: dict[str, dict[str, list[float]]] = {m: {b: [] for b in batches} for m in engines}
    try:
        assert engines["metasd_plain_steps"].collective_rpc(never_speculate) == [True]
        names = list(engines)
        for r in range(args.rounds + 1):
            order = names[r % len(names):] + names[:r % len(names)]
            for b, size in batches.items():
                batch = prompts[:args.prompts] if size == 1 else prompts[:size]
                for m in order:
                    t0, n = time.perf_counter(), 0
                    for group in ([[p] for p in batch] if size == 1 else [batch]):
                        n += sum(len(o.outputs[0].token_ids)
                                 for o in engines[m].generate(group, params, use_tqdm=False))
                    if r > 0:
                        tps[m][b].append(n / (time.perf_counter() - t0))
        stats = {m: engines[m].collective_rpc("metasd_stats")[0]
                 for m in ("metasd_plain_steps", "metasd")}
    finally:
        for llm in engines.values():
            llm.llm_engine.engine_core.shutdown()
    per_round = {m: {b: [x / y for x, y in zip(tps[m][b], tps["plain"][b])] for b in batches}
                 for m in ("metasd_plain_steps", "metasd")}
    ratio = {m: {b: statistics.median(v) for b, v in d.items()} for m, d in per_round.items()}
    out = {"rounds": args.rounds, "max_tokens": args.max_tokens,
           "ratio_bs1": ratio["metasd_plain_steps"]["bs1"],
           "ratio_bs16": ratio["metasd_plain_steps"]["bs16"],
           "ratio_bs64": ratio["metasd_plain_steps"]["bs64"],
           "shipped_ratio": ratio["metasd"], "per_round_ratio": per_round,
           "tokens_per_s": tps, "metasd_plain_steps": stats["metasd_plain_steps"]["plain_steps"],
           "metasd_drafted": sum(d["drafted"]
                                 for d in stats["metasd_plain_steps"]["drafters"].values()),
           "shipped_plain_steps": stats["metasd"]["plain_steps"],
           "shipped_steps": stats["metasd"]["steps"] + stats["metasd"]["plain_steps"],
           "shipped_gate": stats["metasd"]["gate"]}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1) + "\n")
    fmt = lambda d: ", ".join(f"batch {b[2:]} {v:.3f}x" for b, v in d.items())  # noqa: E731
    print(f"MetaSD with every step plain / plain vLLM: {fmt(ratio['metasd_plain_steps'])} "
          f"({out['metasd_plain_steps']} plain steps, {out['metasd_drafted']} tokens drafted)")
    print(f"MetaSD shipped setup / plain vLLM: {fmt(ratio['metasd'])} "
          f"({out['shipped_plain_steps']} of {out['shipped_steps']} steps plain); "
          f"medians of {args.rounds} rounds")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
