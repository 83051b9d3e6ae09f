"""Soak: thousands of short random requests through one running MetaSD engine.

    python benchmarks/soak.py [--quick] [--requests N] [--zoo auto|tiny|real] [--out FILE]

Requests stream into vLLM's ``LLMEngine`` (add_request / step), up to
``--concurrency`` in flight: prompts of random domains (the zoo's held-out
prompts) cut to random lengths, random ``max_tokens``, greedy or sampled with
random temperature / top-p / top-k, sometimes ``n = 2`` or a stop string, and
a few aborted at a random step. At the end it reports

- RSS of the engine's process tree (frontend + engine core + workers) after a
  warm-up and after the run, and the growth;
- bandit states and drafter-KV records still alive once the engine is idle
  (must be 0);
- requests lost: neither finished nor aborted (must be 0), and finished
  requests with an invalid output (wrong completion count, token outside the
  vocabulary, longer than max_tokens, unexpected finish reason; must be 0).

``--quick`` (200 requests, under a minute on an idle 2-core machine) is what
tests/test_reliability.py runs, on its shared engine, through ``run_soak``.
The zoo: the bundled one when its weights are present (``--zoo auto``), else
a tiny random-weight zoo (vllm_metasd.testing.make_tiny_zoo).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
import time

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

QUICK = dict(num_requests=200, seed=0, concurrency=16, warmup=40)
LONG = dict(num_requests=3000, seed=0, concurrency=16, warmup=50)


def tree_rss_mib() -> float:
    """Resident memory of this process and all its descendants, MiB."""
    import psutil

    me = psutil.Process()
    total = 0
    for p in [me, *me.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total / 2**20


def _prompts() -> list[tuple[str, str]]:
    from vllm_metasd import zoo

    out = []
    for domain in zoo.DOMAINS:
        out += [(domain, p["prompt"]) for p in zoo.load_prompts(domain)]
    return out


def _random_request(rng: random.Random, prompts, vocab: int):
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    domain, text = rng.choice(prompts)
    text = text[: rng.randint(1, max(1, min(len(text), 300)))]
    kw = dict(max_tokens=rng.randint(1, 40), ignore_eos=rng.random() < 0.8)
    if rng.random() < 0.5:
        kw["temperature"] = 0.0
    else:  # vLLM allows n > 1 only when sampling
        kw.update(temperature=rng.choice([0.3, 0.7, 1.0, 1.3]), top_p=rng.choice([1.0, 0.9, 0.5]),
                  top_k=rng.choice([-1, -1, 1, 20]), seed=rng.randrange(2**31),
                  n=2 if rng.random() < 0.1 else 1)
    if rng.random() < 0.1:
        kw["stop"] = [rng.choice([" ", "\n", ".", "e", "the"])]
    # One final output per request, all n completions in it (as LLM.generate asks).
    return domain, text, SamplingParams(output_kind=RequestOutputKind.FINAL_ONLY, **kw)


def _invalid(out, params, vocab: int, max_model_len: int) -> str | None:
    """Why a finished request's output is wrong, or None."""
    if len(out.outputs) != params.n:
        return f"{len(out.outputs)} completions for n={params.n}"
    room = max_model_len - len(out.prompt_token_ids)
    for c in out.outputs:
        if len(c.token_ids) > params.max_tokens or not all(0 <= t < vocab for t in c.token_ids):
            return f"{len(c.token_ids)} tokens for max_tokens={params.max_tokens} or bad id"
        if c.finish_reason not in ("length", "stop"):
            return f"finish_reason {c.finish_reason!r}"
        if (params.ignore_eos and not params.stop
                and len(c.token_ids) != min(params.max_tokens, room)):
            return f"{len(c.token_ids)} tokens, expected {min(params.max_tokens, room)}"
    return None


def _drive(engine, requests, concurrency, abort_p, rng, vocab, counts, on_step=None,
           problems=None):
    """Stream ``requests`` [(rid, text, params)] through the engine."""
    pending = list(reversed(requests))
    inflight: dict[str, tuple] = {}  # rid -> (params, abort at step or None)
    step = 0
    while pending or inflight:
        while pending and len(inflight) < concurrency:
            rid, text, params = pending.pop()
            engine.add_request(rid, text, params)
            abort_at = step + rng.randint(0, 6) if rng.random() < abort_p else None
            inflight[rid] = (params, abort_at)
        if engine.has_unfinished_requests():
            for out in engine.step():
                if out.finished and out.request_id in inflight:
                    params, _ = inflight.pop(out.request_id)
                    counts["finished"] += 1
                    why = _invalid(out, params, vocab, engine.model_config.max_model_len)
                    if why is not None:
                        counts["invalid"] += 1
                        if problems is not None and len(problems) < 5:
                            problems.append(f"{out.request_id}: {why}")
        step += 1
        for rid, (params, abort_at) in list(inflight.items()):
            if abort_at is not None and abort_at <= step:
                engine.abort_request([rid])
                inflight.pop(rid)
                counts["aborted"] += 1
        if not engine.has_unfinished_requests() and inflight and not pending:
            break  # the engine has nothing left for them: lost
        if on_step is not None:
            on_step(step)
    counts["lost"] += len(inflight)


def _idle_stats(llm, timeout=30.0) -> dict:
    """MetaSD stats once the engine core has flushed finished requests."""
    deadline = time.monotonic() + timeout
    while True:
        s = llm.collective_rpc("metasd_stats")[0]
        if (s["live_requests"] == 0 and s["tracked_requests"] == 0) or time.monotonic() > deadline:
            return s
        time.sleep(0.05)


def run_soak(llm, num_requests: int, seed: int = 0, concurrency: int = 16, warmup: int = 20,
             abort_p: float = 0.05, progress: bool = False) -> dict:
    """Soak one running MetaSD engine; see the module docstring."""
    import gc

    rng = random.Random(seed)
    prompts = _prompts()
    vocab = llm.llm_engine.model_config.get_vocab_size()
    engine = llm.llm_engine

    def batch(prefix, n):
        out = []
        for i in range(n):
            _, text, params = _random_request(rng, prompts, vocab)
            out.append((f"{prefix}-{i}", text, params))
        return out

    scratch = dict(finished=0, aborted=0, invalid=0, lost=0)
    _drive(engine, batch("soak-warmup", warmup), concurrency, abort_p, rng, vocab, scratch)
    _idle_stats(llm)
    gc.collect()
    rss_before = tree_rss_mib()
    stats_before = llm.collective_rpc("metasd_stats")[0]
    counts = dict(finished=0, aborted=0, invalid=0, lost=0)
    t0 = time.perf_counter()
    requests = batch("soak", num_requests)

    def on_step(step):
        if progress and step % 500 == 0:
            done = counts["finished"] + counts["aborted"]
            print(f"  step {step}: {done}/{num_requests} done, rss {tree_rss_mib():.0f} MiB",
                  flush=True)

    problems: list[str] = []
    half = num_requests // 2
    _drive(engine, requests[:half], concurrency, abort_p, rng, vocab, counts, on_step, problems)
    _idle_stats(llm)
    rss_mid = tree_rss_mib()
    _drive(engine, requests[half:], concurrency, abort_p, rng, vocab, counts, on_step, problems)
    seconds = time.perf_counter() - t0
    after = _idle_stats(llm)
    gc.collect()
    rss_after = tree_rss_mib()
    chosen = {k: v["chosen"] - stats_before["drafters"][k]["chosen"]
              for k, v in after["drafters"].items()}
    return {
        "requests": num_requests,
        **counts,
        "seconds": round(seconds, 1),
        "requests_per_s": round(num_requests / seconds, 2),
        "rss_before_mib": round(rss_before, 1),
        "rss_after_mib": round(rss_after, 1),
        "rss_growth_mib": round(rss_after - rss_before, 1),
        "rss_mid_mib": round(rss_mid, 1),
        "rss_growth_second_half_mib": round(rss_after - rss_mid, 1),
        "invalid_examples": problems,
        "live_states_after": after["live_requests"],
        "tracked_after": after["tracked_requests"],
        "disabled_arms": after.get("disabled_arms", []),
        "chosen_per_drafter": chosen,
    }


def make_engine(which: str):
    from vllm import LLM

    from vllm_metasd import zoo

    if which == "real" or (which == "auto" and zoo.available()):
        target, cfg = zoo.target_path(), zoo.default_metasd_config()
        label = "bundled zoo"
    else:
        from vllm_metasd.testing import make_tiny_zoo

        paths = make_tiny_zoo(tempfile.mkdtemp(prefix="soak-zoo-"))
        target = paths["target"]
        drafters = [{"name": n, "kind": "draft_model", "path": paths[n]}
                    for n in ("good", "bad1", "bad2")]
        drafters.append({"name": "lookup", "kind": "ngram", "prompt_lookup_min": 1,
                         "prompt_lookup_max": 3})
        cfg = {"num_speculative_tokens": 3, "drafters": drafters,
               "policy": {"name": "ucb", "beta": 1.0}, "log_stats_interval_s": 0}
        label = "tiny random-weight zoo"
    llm = LLM(model=target, enforce_eager=True, max_model_len=512, max_num_seqs=16, seed=0,
              speculative_config={"method": "metasd", "config": cfg})
    return llm, label


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="200 requests (CI)")
    ap.add_argument("--requests", type=int, help="number of requests (default 3000)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--zoo", choices=("auto", "tiny", "real"), default="auto")
    ap.add_argument("--out", help="write the report as JSON here")
    args = ap.parse_args(argv)
    settings = dict(QUICK if args.quick else LONG, seed=args.seed)
    if args.requests:
        settings["num_requests"] = args.requests
    llm, label = make_engine(args.zoo)
    print(f"soak: {settings['num_requests']} requests through MetaSD on the {label}", flush=True)
    report = run_soak(llm, **settings, progress=not args.quick)
    report["zoo"] = label
    print(json.dumps(report, indent=2))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)
    ok = (report["lost"] == 0 and report["invalid"] == 0 and report["live_states_after"] == 0
          and report["tracked_after"] == 0)
    print("soak:", "OK" if ok else "FAILED")
    if not ok:
        raise SystemExit(1)
    return report


if __name__ == "__main__":  # vLLM's CPU engine spawns workers
    main()
