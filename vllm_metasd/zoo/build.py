"""Build the model zoo: corpus -> tokenizer -> target -> drafters -> prompts.

    python -m vllm_metasd.zoo.build [--out DIR] [--work DIR] [--target-steps N]

Seeded and resumable: each stage is skipped when its output exists, and the
training loops resume from their last checkpoint in ``--work``. The shipped
zoo was built with the defaults below.
"""
from __future__ import annotations

import argparse
import json
import os
import random
from pathlib import Path

import numpy as np

from vllm_metasd.zoo import CHAT_TEMPLATE, DOMAINS, ZOO_DIR

PROMPTS_PER_DOMAIN = 64
PROMPT_TOKENS = 32
MIN_PROMPT_TOKENS = 12


def log_to(path: Path):
    def log(msg: str) -> None:
        print(msg, flush=True)
        with open(path, "a") as f:
            f.write(msg + "\n")
    return log


def write_prompts(corpus: dict, tokenizer, out: Path, seed: int) -> None:
    """Held-out documents cut after PROMPT_TOKENS tokens (at a token boundary)."""
    out.mkdir(parents=True, exist_ok=True)
    mixed = []
    for domain in DOMAINS:
        rows = []
        for doc in corpus[domain]["heldout"]:
            ids = tokenizer(doc, add_special_tokens=False)["input_ids"]
            # Short documents (a math problem, a JSON record) are cut halfway,
            # so the continuation is still in-domain text the target knows.
            cut = min(PROMPT_TOKENS, len(ids) // 2)
            if cut < MIN_PROMPT_TOKENS:
                continue
            rows.append({"domain": domain, "prompt": tokenizer.decode(ids[:cut])})
            if len(rows) == PROMPTS_PER_DOMAIN:
                break
        assert len(rows) == PROMPTS_PER_DOMAIN, (domain, len(rows))
        (out / f"{domain}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        mixed.extend(rows)
    random.Random(seed).shuffle(mixed)
    (out / "mixed.jsonl").write_text("".join(json.dumps(r) + "\n" for r in mixed))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ZOO_DIR)
    ap.add_argument("--work", type=Path, default=Path.home() / ".cache" / "vllm_metasd_zoo")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--target-steps", type=int, default=1000)
    ap.add_argument("--target-batch", type=int, default=24)
    ap.add_argument("--drafter-steps", type=int, default=300)
    ap.add_argument("--drafter-batch", type=int, default=16)
    ap.add_argument("--distil-prompts", type=int, default=512)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    args = ap.parse_args(argv)

    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    from vllm_metasd.zoo import corpus as corpus_mod
    from vllm_metasd.zoo import train

    torch.set_num_threads(args.threads)
    models, work = args.out / "models", args.work
    work.mkdir(parents=True, exist_ok=True)
    log = log_to(work / "build.log")

    corpus = corpus_mod.build(args.seed)
    tok_dir = work / "tokenizer"
    if not (tok_dir / "tokenizer.json").exists():
        train.train_tokenizer(corpus, tok_dir)
    tokenizer = AutoTokenizer.from_pretrained(str(tok_dir))
    # Prompts first: they only need the tokenizer, and a problem shows at once.
    write_prompts(corpus, tokenizer, args.out / "prompts", args.seed)

    streams_path = work / "streams.npz"
    if not streams_path.exists():
        np.savez(streams_path, **{d: train.tokenize_domain(tokenizer, corpus[d]["train"])
                                  for d in DOMAINS})
    streams = dict(np.load(streams_path))
    log(json.dumps({"stage": "corpus", "tokens": {d: int(len(s)) for d, s in streams.items()}}))

    target_dir = models / "target"
    if not (target_dir / "model.safetensors").exists():
        train.train_target(streams, tokenizer, tok_dir, target_dir, work / "target",
                           args.target_steps, args.target_batch, args.seed, log)
    if not (target_dir / "chat_template.jinja").exists():
        (target_dir / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    target = LlamaForCausalLM.from_pretrained(str(target_dir), dtype=torch.bfloat16)

    distil = {}
    for i, domain in enumerate(DOMAINS):
        path = work / f"distil-{domain}.npy"
        if not path.exists():
            np.save(path, train.generate_continuations(
                target, tokenizer, corpus[domain]["train"], args.distil_prompts,
                prompt_tokens=16, new_tokens=112, seed=args.seed + i))
        distil[domain] = np.load(path)

    for i, name in enumerate([*DOMAINS, "general"]):
        out = models / f"drafter-{name}"
        if (out / "model.safetensors").exists():
            continue
        stream = distil[name] if name != "general" else np.concatenate(list(distil.values()))
        steps = args.drafter_steps * (2 if name == "general" else 1)
        train.distil_drafter(target, stream, tokenizer, tok_dir, out, work / f"drafter-{name}",
                             steps, args.drafter_batch, args.seed + 10 + i, log)

    random_dir = models / "drafter-random"
    if not (random_dir / "model.safetensors").exists():
        train._save_hf(train.new_model(train.DRAFTER_SHAPE, tokenizer, args.seed + 99),
                       tok_dir, random_dir)

    log(json.dumps({"stage": "done", "out": str(args.out)}))


if __name__ == "__main__":
    main()
