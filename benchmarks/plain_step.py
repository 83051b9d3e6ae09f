"""What a plain step costs in a MetaSD engine: MetaSD with every step plain
(the speculation gate's decision forced to "no") vs plain vLLM decoding.

    python benchmarks/plain_step.py                 # -> results/plain_step.json, ~4 min

Where the gate turns speculation off (on this CPU: batch 16 and above), MetaSD
can be no faster than its plain step. Both engines stay alive in one process;
each round runs batch 1 (prompts one at a time) and batch 16 on each, the
order reversed every other round; figures are medians over rounds, reported
as MetaSD / plain. Greedy, the zoo's mixed prompts.
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
    worker.model_runner.drafter.gate.speculate = lambda batch_size: False
    return True


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--prompts", type=int, default=8, help="prompts at batch 1 per round")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--out", type=Path, default=HERE / "results" / "plain_step.json")
    args = ap.parse_args()

    from vllm import LLM, SamplingParams

    from vllm_metasd import zoo

    prompts = [p["prompt"] for p in zoo.load_prompts()][:16]
    cfg = zoo.default_metasd_config()
    cfg.update(log_stats_interval_s=0)
    engines = {
        "plain": LLM(model=zoo.target_path(), enforce_eager=True, max_model_len=1024, seed=0),
        "metasd_plain_steps": LLM(model=zoo.target_path(), enforce_eager=True,
                                  max_model_len=1024, seed=0,
                                  speculative_config={"method": "metasd", "config": cfg}),
    }
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0, ignore_eos=True)
    tps: dict[str, dict[str, list[float]]] = {m: {"bs1": [], "bs16": []} for m in engines}
    try:
        assert engines["metasd_plain_steps"].collective_rpc(never_speculate) == [True]
        for llm in engines.values():
            llm.generate(prompts[:2], params, use_tqdm=False)  # warm-up
        names = list(engines)
        for r in range(args.rounds):
            for m in (names if r % 2 == 0 else names[::-1]):
                llm = engines[m]
                t0, n = time.perf_counter(), 0
                for p in prompts[:args.prompts]:
                    n += len(llm.generate([p], params, use_tqdm=False)[0].outputs[0].token_ids)
                tps[m]["bs1"].append(n / (time.perf_counter() - t0))
                t0 = time.perf_counter()
                outs = llm.generate(prompts[:16], params, use_tqdm=False)
                tps[m]["bs16"].append(sum(len(o.outputs[0].token_ids) for o in outs)
                                      / (time.perf_counter() - t0))
        stats = engines["metasd_plain_steps"].collective_rpc("metasd_stats")[0]
    finally:
        for llm in engines.values():
            llm.llm_engine.engine_core.shutdown()
    med = {m: {b: statistics.median(v) for b, v in d.items()} for m, d in tps.items()}
    out = {"rounds": args.rounds, "max_tokens": args.max_tokens,
           "ratio_bs1": med["metasd_plain_steps"]["bs1"] / med["plain"]["bs1"],
           "ratio_bs16": med["metasd_plain_steps"]["bs16"] / med["plain"]["bs16"],
           "tokens_per_s": tps, "metasd_plain_steps": stats["plain_steps"],
           "metasd_drafted": sum(d["drafted"] for d in stats["drafters"].values())}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1) + "\n")
    print(f"MetaSD with every step plain / plain vLLM: batch 1 {out['ratio_bs1']:.3f}x, "
          f"batch 16 {out['ratio_bs16']:.3f}x (medians of {args.rounds} rounds; "
          f"{out['metasd_plain_steps']} plain steps, {out['metasd_drafted']} tokens drafted)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
