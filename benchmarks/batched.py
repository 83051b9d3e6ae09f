"""Batch 16 and 64, interleaved: MetaSD setups against plain decoding and
n-gram, every engine alive in this one process.

    python benchmarks/batched.py --out benchmarks/results/batched.json

``selection.py`` runs one engine at a time and its MetaSD variants one after
another on one engine, and the machine's drift between them is as large as
the differences between variants; ``plain_step.py`` interleaves finely but
serves the same prompts every round (a prompt served before is the warm
start's best neighbour of itself). Here each round gives every method the same
fresh closed batch of 16, then of 64 prompts (the order of the methods
rotating per round); a first round is not counted (MetaSD's bandits, cost fits,
gate and warm start learn). Reported per batch size: the median over rounds of
each method's tokens/s over plain decoding's in the same round, and the spread.
Methods as in ``batch1.py``. Greedy, the zoo's mixed prompts (the fourth round
would start over from the first prompt).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB per engine

import targets  # noqa: E402  (benchmarks/ is on sys.path when run as a script)
from batch1 import spec  # noqa: E402
from parity import Engine  # noqa: E402
from selection import unseen  # noqa: E402

METHODS = ("none", "ngram", "metasd@default", "metasd@default+probe", "metasd@paper",
           "metasd@paper+probe")
BATCHES = (16, 64)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=None, help="default: results/batched.json")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--rounds", type=int, default=3, help="counted rounds (plus a first one)")
    ap.add_argument("--max-tokens", type=int, default=64)
    args = ap.parse_args()
    from vllm import SamplingParams

    methods = args.methods.split(",")
    if "none" not in methods:
        raise SystemExit("--methods must include none (the ratios are to plain decoding)")
    take = unseen([p["prompt"] for p in targets.use("zoo").load_prompts()])
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0, ignore_eos=True)
    tps = {m: {b: [] for b in BATCHES} for m in methods}
    engines = {}
    try:
        for m in methods:
            engines[m] = Engine(m, spec(m), max(BATCHES))
        for r in range(args.rounds + 1):
            order = methods[r % len(methods):] + methods[:r % len(methods)]
            for b in BATCHES:
                batch = take(b)
                for m in order:
                    t0 = time.perf_counter()
                    tokens, _, _ = engines[m].generate(batch, params)
                    if r > 0:
                        tps[m][b].append(tokens / (time.perf_counter() - t0))
            if r > 0:
                print(json.dumps({"round": r, **{f"{m} bs{b}": tps[m][b][-1] for m in methods
                                                 for b in BATCHES}}), flush=True)
        stats = {m: e.llm.collective_rpc("metasd_stats")[0] for m, e in engines.items()
                 if e.metasd}
    finally:
        for e in engines.values():
            e.close()
    entries = []
    for m in methods:
        e = {"method": m}
        for b in BATCHES:
            ratio = [x / y for x, y in zip(tps[m][b], tps["none"][b])]
            e[f"tokens_per_s_bs{b}"] = statistics.median(tps[m][b])
            e[f"vs_plain_bs{b}"] = statistics.median(ratio)
            e[f"vs_plain_bs{b}_spread"] = [min(ratio), max(ratio)]
        if m in stats:
            e["plain_steps"] = stats[m]["plain_steps"]
            e["steps"] = stats[m]["steps"] + stats[m]["plain_steps"]
            e["arm_share"] = {n: d["chosen"] for n, d in stats[m]["drafters"].items()}
        entries.append(e)
    out = {"rounds": args.rounds, "max_tokens": args.max_tokens, "k": 4, "methods": entries}
    out_path = args.out or targets.results_path("batched.json")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(out, indent=1) + "\n")
    for e in entries:
        print(f"{e['method']:24s} " + "  ".join(
            f"bs{b} {e[f'vs_plain_bs{b}']:.2f}x plain ({e[f'vs_plain_bs{b}_spread'][0]:.2f}-"
            f"{e[f'vs_plain_bs{b}_spread'][1]:.2f})" for b in BATCHES))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
