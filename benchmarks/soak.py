"""Soak: thousands of short random requests through one running MetaSD engine.

    python benchmarks/soak.py --long [--minutes 20] [--out F.json] [--plot F.png]
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

``--long`` (``run_long_soak``): the bundled zoo for ``--minutes`` (default 20) of wall
time, in waves of random concurrency up to 64 (the engine's ``max_num_seqs``); prompts
of all five domains, a tenth of them whole with up to 256 new tokens (long catch-ups,
preemption in the 1 GiB KV cache), aborts. After every wave, once the engine is idle,
the bandit states and drafter-KV records left are read (must be 0); the RSS of the
process tree is sampled every ``--rss-every`` seconds. Writes the report with the RSS
series to ``--out`` (default benchmarks/results/soak.json) and an RSS-over-time plot to
``--plot`` (default benchmarks/results/soak_rss.png).
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
SOAK_LONG = dict(minutes=20.0, seed=0, max_concurrency=64, warmup=64, abort_p=0.05,
                 long_p=0.1, rss_every_s=10.0)
# Concurrency of each wave of the long soak (64 twice as likely: the full batch).
WAVE_CONCURRENCY = (1, 4, 8, 16, 32, 64, 64)
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


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


def _random_request(rng: random.Random, prompts, vocab: int, long_p: float = 0.0):
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    domain, text = rng.choice(prompts)
    if long_p and rng.random() < long_p:  # a whole prompt and a long generation
        kw = dict(max_tokens=rng.randint(64, 256), ignore_eos=rng.random() < 0.8)
    else:
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


def run_long_soak(llm, minutes: float = 20.0, seed: int = 0, max_concurrency: int = 64,
                  warmup: int = 64, abort_p: float = 0.05, long_p: float = 0.1,
                  rss_every_s: float = 10.0, progress: bool = False) -> dict:
    """Soak for ``minutes`` of wall time in waves of random concurrency (see the module
    docstring); the report carries the RSS series and the per-wave leftovers."""
    import gc

    rng = random.Random(seed)
    prompts = _prompts()
    engine = llm.llm_engine
    vocab = engine.model_config.get_vocab_size()
    levels = [c for c in WAVE_CONCURRENCY if c <= max_concurrency] or [max_concurrency]

    def batch(prefix, n):
        return [(f"{prefix}-{i}", *_random_request(rng, prompts, vocab, long_p)[1:])
                for i in range(n)]

    scratch = dict(finished=0, aborted=0, invalid=0, lost=0)
    _drive(engine, batch("warmup", warmup), max_concurrency, abort_p, rng, vocab, scratch)
    _idle_stats(llm)
    gc.collect()
    stats_before = llm.collective_rpc("metasd_stats")[0]
    counts = dict(finished=0, aborted=0, invalid=0, lost=0)
    problems: list[str] = []
    t0 = time.monotonic()
    series: list[list[float]] = []  # [minutes, rss MiB, requests done, wave concurrency]
    waves: list[dict] = []
    last = [-rss_every_s]

    def sample(concurrency):
        now = time.monotonic() - t0
        done = counts["finished"] + counts["aborted"] + counts["lost"]
        series.append([round(now / 60, 3), round(tree_rss_mib(), 1), done, concurrency])
        last[0] = now
        if progress:
            print(f"  {now / 60:5.1f} min: {done} requests done, rss {series[-1][1]:.0f} MiB, "
                  f"concurrency {concurrency}", flush=True)

    num_requests = 0
    while not waves or time.monotonic() - t0 < minutes * 60:
        conc = rng.choice(levels)
        n = max(4 * conc, 32)
        wave_t = time.monotonic()
        lost_before = counts["lost"]

        def on_step(step, conc=conc):
            if time.monotonic() - t0 - last[0] >= rss_every_s:
                sample(conc)

        _drive(engine, batch(f"w{len(waves)}", n), conc, abort_p, rng, vocab, counts,
               on_step, problems)
        num_requests += n
        idle = _idle_stats(llm)
        waves.append({"concurrency": conc, "requests": n,
                      "seconds": round(time.monotonic() - wave_t, 1),
                      "lost": counts["lost"] - lost_before,
                      "states_left": idle["live_requests"],
                      "tracked_left": idle.get("tracked_requests", 0)})
    seconds = time.monotonic() - t0
    after = _idle_stats(llm)
    gc.collect()
    sample(0)
    rss = [r for _, r, _, _ in series]
    half = [r for m, r, _, _ in series if m >= series[-1][0] / 2]
    chosen = {k: v["chosen"] - stats_before["drafters"][k]["chosen"]
              for k, v in after["drafters"].items()}
    return {
        "requests": num_requests,
        **counts,
        "minutes": round(seconds / 60, 2),
        "requests_per_s": round(num_requests / seconds, 2),
        "waves": len(waves),
        "max_concurrency": max(w["concurrency"] for w in waves),
        "invalid_examples": problems,
        "live_states_after": after["live_requests"],
        "tracked_after": after.get("tracked_requests", 0),
        "max_states_left_after_a_wave": max(w["states_left"] for w in waves),
        "max_tracked_left_after_a_wave": max(w["tracked_left"] for w in waves),
        "rss_first_mib": rss[0],
        "rss_last_mib": rss[-1],
        "rss_max_mib": max(rss),
        "rss_growth_second_half_mib": round(half[-1] - half[0], 1),
        "preempted": after.get("preempted", 0) - stats_before.get("preempted", 0),
        "disabled_arms": after.get("disabled_arms", []),
        "chosen_per_drafter": chosen,
        "rss_series": {"columns": ["minutes", "rss_mib", "requests_done", "concurrency"],
                       "rows": series},
        "wave_log": waves,
    }


def plot_rss(report: dict, path: str) -> None:
    """RSS of the engine's process tree over the long soak, with each wave's batch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["rss_series"]["rows"]
    minutes = [r[0] for r in rows]
    fig, (ax, bx) = plt.subplots(2, 1, figsize=(8, 5), sharex=True,
                                 gridspec_kw={"height_ratios": [3, 1]})
    ax.plot(minutes, [r[1] for r in rows], color="tab:blue")
    ax.set_ylabel("RSS, process tree (MiB)")
    ax.set_title(f"MetaSD soak on the {report.get('zoo', 'zoo')}: {report['requests']} "
                 f"requests, {report['lost']} lost, {report['invalid']} invalid, "
                 f"{report['live_states_after']} states left", fontsize=9)
    ax.grid(alpha=0.3)
    bx.step(minutes, [r[3] for r in rows], where="post", color="tab:gray")
    bx.set_ylabel("concurrency")
    bx.set_xlabel("minutes")
    bx.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def make_long_engine():
    """The bundled zoo with its default MetaSD config, batches up to 64."""
    from vllm import LLM

    from vllm_metasd import zoo

    if not zoo.available():
        raise SystemExit("soak --long needs the bundled zoo's weights (vllm_metasd/zoo/models)")
    cfg = {**zoo.default_metasd_config(), "log_stats_interval_s": 60.0}
    llm = LLM(model=zoo.target_path(), enforce_eager=True, max_model_len=1024,
              max_num_seqs=SOAK_LONG["max_concurrency"], seed=0,
              speculative_config={"method": "metasd", "config": cfg})
    return llm, "bundled zoo"


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
    ap.add_argument("--long", action="store_true",
                    help="time-based soak on the bundled zoo, batches up to 64")
    ap.add_argument("--minutes", type=float, default=SOAK_LONG["minutes"],
                    help="--long: wall time (default 20)")
    ap.add_argument("--rss-every", type=float, default=SOAK_LONG["rss_every_s"],
                    help="--long: RSS sampling period, seconds")
    ap.add_argument("--plot", help="--long: RSS plot (default results/soak_rss.png)")
    ap.add_argument("--requests", type=int, help="number of requests (default 3000)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--zoo", choices=("auto", "tiny", "real"), default="auto")
    ap.add_argument("--out", help="write the report as JSON here")
    args = ap.parse_args(argv)
    if args.long:
        return main_long(args)
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


def main_long(args) -> dict:
    out = args.out or os.path.join(RESULTS, "soak.json")
    plot = args.plot or os.path.join(RESULTS, "soak_rss.png")
    settings = dict(SOAK_LONG, minutes=args.minutes, rss_every_s=args.rss_every, seed=args.seed)
    llm, label = make_long_engine()
    print(f"soak --long: {settings['minutes']} minutes through MetaSD on the {label}", flush=True)
    try:
        report = run_long_soak(llm, **settings, progress=True)
    finally:
        llm.llm_engine.engine_core.shutdown()
    report = {"zoo": label, "settings": settings, **report}
    with open(out, "w") as f:
        json.dump(report, f, indent=1)
    plot_rss(report, plot)
    summary = {k: v for k, v in report.items() if k not in ("rss_series", "wave_log")}
    print(json.dumps(summary, indent=2))
    print(f"soak: wrote {out} and {plot}")
    ok = (report["lost"] == 0 and report["invalid"] == 0 and report["live_states_after"] == 0
          and report["tracked_after"] == 0 and report["max_states_left_after_a_wave"] == 0
          and report["max_tracked_left_after_a_wave"] == 0)
    print("soak:", "OK" if ok else "FAILED")
    if not ok:
        raise SystemExit(1)
    return report


if __name__ == "__main__":  # vLLM's CPU engine spawns workers
    main()
