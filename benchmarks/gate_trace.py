"""The speculation gate's decisions, step by step, in one MetaSD engine.

    python benchmarks/gate_trace.py                 # default pool, batch 16, ~2 min

Batches below 4 rows are not gated (``core.gate``): the prompts run in
batches of ``--batch`` (the last steps of each, as requests finish, go below).
Each batch is a cohort (its requests start together, none joins later): the
gate judges it by how far its least-advanced request advances.

Prints one character per decision (``s``: speculate, ``p``: plain) with the
measured tokens/s of each step the gate learnt from (``(..)`` speculative,
``[..]`` plain), then the count of plain decisions and the gate's state.
"""
from __future__ import annotations

import argparse
import json
import os

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
# collective_rpc with a function (below) needs it
os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")


def trace(worker) -> bool:
    """Runs in the worker: record the gate's decisions and observations."""
    gate = worker.model_runner.drafter.gate
    log: list[str] = []
    speculate, observe = gate.speculate, gate.observe

    def traced_speculate(batch_size, cohort=False):
        decision = speculate(batch_size, cohort)
        log.append("s" if decision else "p")
        return decision

    def traced_observe(batch_size, speculated, tokens, seconds, cohort=False):
        log.append(f"({tokens / seconds:.0f})" if speculated else f"[{tokens / seconds:.0f}]")
        return observe(batch_size, speculated, tokens, seconds, cohort)

    gate.speculate, gate.observe = traced_speculate, traced_observe
    worker.metasd_gate_log = log
    return True


def read_log(worker) -> list[str]:
    return worker.metasd_gate_log


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=64)
    args = ap.parse_args()

    from vllm import LLM, SamplingParams

    from vllm_metasd import zoo

    cfg = zoo.default_metasd_config()
    cfg.update(log_stats_interval_s=0)
    llm = LLM(model=zoo.target_path(), enforce_eager=True, max_model_len=1024, seed=0,
              speculative_config={"method": "metasd", "config": cfg})
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0, ignore_eos=True)
    try:
        assert llm.collective_rpc(trace) == [True]
        prompts = [p["prompt"] for p in zoo.load_prompts()][:args.prompts]
        for i in range(0, len(prompts), args.batch):
            llm.generate(prompts[i:i + args.batch], params, use_tqdm=False)
        log = llm.collective_rpc(read_log)[0]
        gate = llm.collective_rpc("metasd_stats")[0]["gate"]
    finally:
        llm.llm_engine.engine_core.shutdown()
    print(" ".join(log))
    decisions = [x for x in log if x in ("s", "p")]
    print(f"{decisions.count('p')} plain of {len(decisions)} decisions; gate: {json.dumps(gate)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
