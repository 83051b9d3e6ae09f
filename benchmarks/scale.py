"""Large batches and memory: MetaSD vs single drafters at 64 concurrent requests,
and KV / weight memory with N draft LMs.

    python benchmarks/scale.py [--requests 64] [--max-tokens 64] [--counts 2 4 6] [--tiny]

(a) Throughput. 64 requests from every domain (the zoo's mixed held-out set)
are submitted at once (max_num_seqs = 64) to one engine per variant, in this
one run: no speculation, vLLM's own ``draft_model`` method with each single
drafter of the default MetaSD setup (and vLLM's ``ngram`` for prompt lookup),
and MetaSD over all of them. Greedy, ``ignore_eos``, so every variant emits the
same tokens (checked: ``identical_to_plain``). Output tokens/s of the fastest
of ``--repeats`` timed ``generate`` calls after a warm-up (other processes'
load comes and goes); ratios against no speculation, and MetaSD against the
best single drafter.

(b) Memory with N = 2, 4, 6 draft LMs (the first N of the default setup's):

- weights: parameter bytes of the target and of each draft LM (tensor shapes
  from the checkpoints x the engine's dtype);
- KV: bytes per token = layers x 2 x kv_heads x head_dim x dtype bytes, for
  the target and each draft LM (every MetaSD draft LM has its own KV layers in
  the request's blocks), and the KV blocks vLLM allocated in the fixed
  ``VLLM_CPU_KVCACHE_SPACE`` (``cache_config.num_gpu_blocks``): the token
  capacity shrinks as drafters are added.

Writes ``results/scale.json``. ``--tiny`` runs on the tiny random-weight zoo
(development; the figures mean nothing there).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")

HERE = Path(__file__).resolve().parent
K = 4


# ---- setup ------------------------------------------------------------------------

def zoo_setup(num_requests: int) -> dict:
    from vllm_metasd import zoo

    if not zoo.available():
        raise SystemExit("the zoo's weights are missing; build them with "
                         "`python -m vllm_metasd.zoo.build`, or pass --tiny")
    cfg = zoo.default_metasd_config()
    mixed = zoo.load_prompts(split="mixed")
    rows = [mixed[i % len(mixed)] for i in range(num_requests)]
    return {"target": zoo.target_path(), "config": cfg,
            "prompts": [r["prompt"] for r in rows],
            "domains": sorted({r["domain"] for r in rows})}


def tiny_setup(num_requests: int, workdir: Path) -> dict:
    from vllm_metasd.testing import make_tiny_zoo

    paths = make_tiny_zoo(workdir)
    drafters = [{"name": n, "kind": "draft_model", "path": paths[n]}
                for n in ("good", "bad1", "bad2")]
    drafters.append({"name": "lookup", "kind": "ngram", "prompt_lookup_min": 2,
                     "prompt_lookup_max": 4})
    base = ["def add(a, b):", "The quick brown fox", "SELECT name, value FROM",
            "Der schnelle braune", "12 + 30 ="]
    return {"target": paths["target"],
            "config": {"num_speculative_tokens": K, "drafters": drafters,
                       "policy": {"name": "ucb", "beta": 1.0}, "reward": "bd"},
            "prompts": [base[i % len(base)] for i in range(num_requests)],
            "domains": ["tiny"]}


MAX_MODEL_LEN = {"zoo": 1024, "tiny": 512}
_max_len = MAX_MODEL_LEN["zoo"]


def make_llm(target: str, speculative_config=None, max_num_seqs: int = 64):
    from vllm import LLM

    return LLM(model=target, enforce_eager=True, max_model_len=_max_len, seed=0,
               max_num_seqs=max_num_seqs, speculative_config=speculative_config,
               disable_log_stats=False)


def close(llm) -> None:
    llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()


def spec_counters(llm) -> tuple[int, int]:
    """(verification steps, accepted draft tokens) so far."""
    values = {m.name: m.value for m in llm.get_metrics() if hasattr(m, "value")}
    return (int(values.get("vllm:spec_decode_num_drafts", 0)),
            int(values.get("vllm:spec_decode_num_accepted_tokens", 0)))


# ---- (a) throughput -----------------------------------------------------------------

def variants(config: dict) -> dict[str, dict | None]:
    """name -> vLLM speculative_config: none, each single drafter, MetaSD."""
    k = config["num_speculative_tokens"]
    out: dict[str, dict | None] = {"none": None}
    for d in config["drafters"]:
        if d["kind"] == "draft_model":
            out[d["name"]] = {"method": "draft_model", "model": d["path"],
                              "num_speculative_tokens": k}
        else:
            out[d["name"]] = {"method": "ngram", "num_speculative_tokens": k,
                              "prompt_lookup_min": d["prompt_lookup_min"],
                              "prompt_lookup_max": d["prompt_lookup_max"]}
    out["metasd"] = {"method": "metasd", "config": {**config, "log_stats_interval_s": 0}}
    return out


def throughput(setup: dict, max_tokens: int, only: list[str] | None, repeats: int) -> dict:
    from vllm import SamplingParams

    prompts = setup["prompts"]
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    warm = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    results: dict[str, dict] = {}
    reference = None
    for name, spec in variants(setup["config"]).items():
        if only and name not in (*only, "none", "metasd"):
            continue
        t_start = time.perf_counter()
        llm = make_llm(setup["target"], spec, max_num_seqs=len(prompts))
        startup = time.perf_counter() - t_start
        llm.generate(prompts[:4], warm, use_tqdm=False)
        if name == "metasd":
            llm.collective_rpc("metasd_reset_stats")
        steps0, acc0 = spec_counters(llm)
        times = []
        for _ in range(repeats):  # best of: transient load from other processes
            t0 = time.perf_counter()
            outputs = llm.generate(prompts, params, use_tqdm=False)
            times.append(time.perf_counter() - t0)
        seconds = min(times)
        steps1, acc1 = spec_counters(llm)
        tokens = [list(o.outputs[0].token_ids) for o in outputs]
        if reference is None:
            reference = tokens
        n_tokens = sum(len(t) for t in tokens)
        row = {"output_tokens": n_tokens, "seconds": seconds,
               "tokens_per_s": n_tokens / seconds, "startup_s": startup,
               "all_seconds": times, "identical_to_plain": tokens == reference}
        if spec is not None:
            row["mean_accepted_len"] = (acc1 - acc0) / max(steps1 - steps0, 1)
        if name == "metasd":
            stats = llm.collective_rpc("metasd_stats")[0]
            total = sum(d["chosen"] for d in stats["drafters"].values()) or 1
            row["drafters"] = {n: {"share": d["chosen"] / total,
                                   "acceptance_rate": d["acceptance_rate"],
                                   "mean_reward": d["mean_reward"]}
                               for n, d in stats["drafters"].items()}
            row["overhead_s"] = stats["overhead_s"]
        results[name] = row
        print(f"{name:10s} {row['tokens_per_s']:8.1f} tok/s  "
              f"acc_len={row.get('mean_accepted_len', 0):.2f}  "
              f"identical={row['identical_to_plain']}", flush=True)
        close(llm)
    base = results["none"]["tokens_per_s"]
    for row in results.values():
        row["ratio_vs_none"] = row["tokens_per_s"] / base
    singles = {n: r for n, r in results.items() if n not in ("none", "metasd")}
    summary = {}
    if singles and "metasd" in results:
        best = max(singles, key=lambda n: singles[n]["tokens_per_s"])
        summary = {"best_single_drafter": best,
                   "metasd_vs_best_single": (results["metasd"]["tokens_per_s"]
                                             / singles[best]["tokens_per_s"]),
                   "metasd_vs_none": results["metasd"]["ratio_vs_none"]}
    return {"requests": len(prompts), "max_tokens": max_tokens, "k": setup["config"][
        "num_speculative_tokens"], "variants": results, "summary": summary}


# ---- (b) memory -------------------------------------------------------------------

def checkpoint_numel(path: str) -> int:
    from safetensors import safe_open

    total = 0
    for f in sorted(Path(path).glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as st:
            for key in st.keys():
                n = 1
                for dim in st.get_slice(key).get_shape():
                    n *= dim
                total += n
    return total


def kv_bytes_per_token(path: str, dtype_bytes: int) -> int:
    cfg = json.loads((Path(path) / "config.json").read_text())
    heads = cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    kv_heads = cfg.get("num_key_value_heads") or heads
    return cfg["num_hidden_layers"] * 2 * kv_heads * head_dim * dtype_bytes


def memory(setup: dict, counts: list[int]) -> dict:
    import torch

    lm = [d for d in setup["config"]["drafters"] if d["kind"] == "draft_model"]
    out = {}
    for n in counts:
        chosen = [dict(lm[i % len(lm)], name=f"{lm[i % len(lm)]['name']}{i}")
                  for i in range(n)]  # cycles when asked for more than exist
        cfg = {**setup["config"], "drafters": chosen, "log_stats_interval_s": 0}
        llm = make_llm(setup["target"], {"method": "metasd", "config": cfg})
        vc = llm.llm_engine.vllm_config
        dtype = vc.model_config.dtype
        kv_dtype = dtype if vc.cache_config.cache_dtype == "auto" else getattr(
            torch, vc.cache_config.cache_dtype, dtype)
        wbytes = torch.empty((), dtype=dtype).element_size()
        kvbytes = torch.empty((), dtype=kv_dtype).element_size()
        target_w = checkpoint_numel(setup["target"]) * wbytes
        drafter_w = [checkpoint_numel(d["path"]) * wbytes for d in chosen]
        target_kv = kv_bytes_per_token(setup["target"], kvbytes)
        drafter_kv = [kv_bytes_per_token(d["path"], kvbytes) for d in chosen]
        blocks = vc.cache_config.num_gpu_blocks
        block_size = vc.cache_config.block_size
        out[str(n)] = {
            "drafters": [d["path"] for d in chosen],
            "dtype": str(dtype).removeprefix("torch."),
            "weight_bytes": {"target": target_w, "drafters": sum(drafter_w),
                             "total": target_w + sum(drafter_w),
                             "drafters_over_target": sum(drafter_w) / target_w},
            "kv_bytes_per_token": {"target": target_kv, "drafters": sum(drafter_kv),
                                   "total": target_kv + sum(drafter_kv),
                                   "drafters_over_target": sum(drafter_kv) / target_kv},
            "kv_cache_space_gib": float(os.environ["VLLM_CPU_KVCACHE_SPACE"]),
            "num_kv_blocks": blocks,
            "block_size": block_size,
            "kv_token_capacity": blocks * block_size if blocks else None,
        }
        print(f"N={n}: weights {out[str(n)]['weight_bytes']['total'] / 2**20:.1f} MiB, "
              f"KV {out[str(n)]['kv_bytes_per_token']['total']} B/token, "
              f"{blocks} blocks", flush=True)
        close(llm)
    # Without drafters, for reference: the plain engine's KV blocks in the same space.
    llm = make_llm(setup["target"])
    out["0"] = {"num_kv_blocks": llm.llm_engine.vllm_config.cache_config.num_gpu_blocks}
    close(llm)
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--counts", type=int, nargs="+", default=[2, 4, 6],
                    help="numbers of draft LMs for the memory figures")
    ap.add_argument("--repeats", type=int, default=2,
                    help="timed generates per variant; the fastest counts")
    ap.add_argument("--only", nargs="*", help="throughput variants to run (default all)")
    ap.add_argument("--skip", choices=["throughput", "memory"], action="append", default=[])
    ap.add_argument("--tiny", action="store_true", help="tiny random-weight zoo (smoke run)")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "scale.json")
    args = ap.parse_args(argv)

    global _max_len
    _max_len = MAX_MODEL_LEN["tiny" if args.tiny else "zoo"]
    with tempfile.TemporaryDirectory() as tmp:
        setup = (tiny_setup(args.requests, Path(tmp)) if args.tiny
                 else zoo_setup(args.requests))
        result = {"zoo": "tiny" if args.tiny else "bundled", "target": setup["target"],
                  "domains": setup["domains"], "cpu_count": os.cpu_count(),
                  "kv_cache_space_gib": float(os.environ["VLLM_CPU_KVCACHE_SPACE"])}
        if "throughput" not in args.skip:
            result["throughput"] = throughput(setup, args.max_tokens, args.only, args.repeats)
        if "memory" not in args.skip:
            result["memory"] = memory(setup, args.counts)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(json.dumps({"summary": result.get("throughput", {}).get("summary"),
                      "memory": {n: {"weights_MiB": m.get("weight_bytes", {}).get("total", 0)
                                     / 2**20,
                                     "kv_B_per_token": m.get("kv_bytes_per_token", {})
                                     .get("total"),
                                     "kv_blocks": m["num_kv_blocks"]}
                                 for n, m in result.get("memory", {}).items()}}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
