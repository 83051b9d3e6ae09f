"""Where a speculative engine step's drafting time goes: MetaSD vs vLLM's draft_model.

    python benchmarks/profile_step.py --out benchmarks/results/profile_step.json

Runs each engine in this process (vLLM's uniprocess executor, no engine-core
process) so the drafting code can be timed from outside, unchanged: the
runner's ``propose_draft_token_ids`` (the whole drafting phase of a step),
every drafter model's ``forward`` + ``compute_logits`` (the drafter forwards),
and, for MetaSD, the reward hand-off (``observe``) and the scheduler hook
(``on_schedule``). Times are the main thread's CPU time (``time.thread_time``),
so other processes on the machine barely move them. "own" = drafting phase +
reward + hooks - drafter forwards: the speculative method's own work per step.
MetaSD engines also report their internal phase timers (``metasd_stats``
``phase_s``): choice, inputs, catch-up metadata, forwards, validation, reward.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
# One OpenMP thread: no thread spins in a barrier waiting for another, so the
# main thread's CPU time is its own work (other processes barely move it).
os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "0")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # idle OpenMP threads sleep, not spin
os.environ.setdefault("KMP_BLOCKTIME", "0")

HERE = Path(__file__).resolve().parent

from parity import spec_for  # noqa: E402  (benchmarks/ is on sys.path when run as a script)


class Clock:
    def __init__(self):
        self.s: dict[str, float] = {}

    def wrap(self, owner, name: str, key: str) -> None:
        fn = getattr(owner, name)

        def timed(*a, **kw):
            t0 = time.thread_time()
            try:
                return fn(*a, **kw)
            finally:
                self.s[key] = self.s.get(key, 0.0) + time.thread_time() - t0

        setattr(owner, name, timed)


def profile(method: str, drafter: str, prompts: list[str], batch: int, max_tokens: int) -> dict:
    from vllm import LLM, SamplingParams

    from vllm_metasd import zoo

    llm = LLM(model=zoo.target_path(), enforce_eager=True, seed=0, max_model_len=1024,
              max_num_seqs=batch, distributed_executor_backend="uni",
              speculative_config=spec_for(method, drafter))
    try:
        runner = llm.llm_engine.model_executor.driver_worker.worker.model_runner
        drafter_obj = runner.drafter
        clock = Clock()
        models = [a.model for a in getattr(drafter_obj, "arms", [drafter_obj])
                  if getattr(a, "model", None) is not None]
        for i, m in enumerate({id(m): m for m in models}.values()):
            clock.wrap(m, "forward", "forward")
            clock.wrap(m, "compute_logits", "forward")
        clock.wrap(runner, "propose_draft_token_ids", "drafting")
        for hook in ("observe", "on_schedule"):
            if hasattr(drafter_obj, hook):
                clock.wrap(drafter_obj, hook, hook)
        steps = [0]
        step_fn = llm.llm_engine.step

        def counted():
            steps[0] += 1
            return step_fn()

        llm.llm_engine.step = counted
        params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
        llm.generate(prompts[:batch], params, use_tqdm=False)  # warm-up
        clock.s.clear()
        steps[0] = 0
        if method != "draft_model":
            llm.collective_rpc("metasd_reset_stats")
        llm.generate(prompts[:batch], params, use_tqdm=False)
        s = clock.s
        own = s.get("drafting", 0) + s.get("observe", 0) + s.get("on_schedule", 0) - s.get("forward", 0)
        entry = {"method": f"{method}:{drafter}" if method != "metasd:default" else method,
                 "batch": batch, "steps": steps[0],
                 "ms_per_step": {k: 1e3 * v / steps[0] for k, v in s.items()},
                 "own_ms_per_step": 1e3 * own / steps[0]}
        if method != "draft_model":
            st = llm.collective_rpc("metasd_stats")[0]
            if "phase_s" in st:
                entry["metasd_phase_ms_per_step"] = {
                    k: 1e3 * v / max(st["steps"], 1) for k, v in st["phase_s"].items()}
        return entry
    finally:
        llm.llm_engine.engine_core.shutdown()
        del llm
        import gc

        gc.collect()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=HERE / "results" / "profile_step.json")
    ap.add_argument("--drafter", default="general")
    ap.add_argument("--batches", default="1,16,64")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--methods", default="draft_model,metasd:only,metasd:pinned,metasd:default")
    ap.add_argument("--label", default="after", help="tag stored with the entries")
    ap.add_argument("--single", default=None, help=argparse.SUPPRESS)  # METHOD:BATCH, internal
    args = ap.parse_args()

    from vllm_metasd import zoo

    prompts = [p["prompt"] for p in zoo.load_prompts()]
    if args.single:  # one engine per process: vLLM's in-process engines do not restart cleanly
        method, batch = args.single.rsplit(":", 1)
        print("RESULT " + json.dumps(profile(method, args.drafter, prompts, int(batch),
                                             args.max_tokens)), flush=True)
        return 0
    entries = []
    for batch in map(int, args.batches.split(",")):
        for method in args.methods.split(","):
            cmd = [sys.executable, __file__, "--single", f"{method}:{batch}",
                   "--drafter", args.drafter, "--max-tokens", str(args.max_tokens)]
            for attempt in range(2):  # a shared machine can starve one engine's start
                run = subprocess.run(cmd, capture_output=True, text=True)
                if run.returncode == 0:
                    break
                print(run.stderr[-3000:], file=sys.stderr)
            run.check_returncode()
            out = run.stdout
            e = json.loads(next(l for l in out.splitlines() if l.startswith("RESULT "))[7:])
            e["label"] = args.label
            print(json.dumps(e), flush=True)
            entries.append(e)
    old = json.loads(args.out.read_text()) if args.out.exists() else []
    old = [e for e in old if e.get("label") != args.label]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(old + entries, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
