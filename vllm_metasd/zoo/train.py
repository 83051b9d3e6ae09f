"""Tokenizer, target pre-training and drafter self-distillation (bf16, CPU).

bf16 matmuls use AMX on this machine (~7x fp32). Long loops checkpoint every
``ckpt_every`` steps to ``<out>/train_state.pt`` and resume from it, so a
killed run continues where it stopped.
"""
from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

VOCAB_SIZE = 4096
SEQ_LEN = 256
TARGET_SHAPE = dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=6,
                    num_attention_heads=8, num_key_value_heads=8)
DRAFTER_SHAPE = dict(hidden_size=256, intermediate_size=704, num_hidden_layers=1,
                     num_attention_heads=4, num_key_value_heads=4)


def train_tokenizer(corpus: dict, out: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE, special_tokens=["<s>", "</s>"], min_frequency=2,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=True,
    )
    texts = [d for dom in corpus.values() for d in dom["train"]]
    tok.train_from_iterator(texts, trainer)
    PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
        model_max_length=1024, clean_up_tokenization_spaces=False,
    ).save_pretrained(str(out))


def tokenize_domain(tokenizer, docs: list[str]) -> np.ndarray:
    """One stream: <s> doc </s> <s> doc </s> ..."""
    ids = tokenizer(docs, add_special_tokens=False)["input_ids"]
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    return np.fromiter((t for seq in ids for t in (bos, *seq, eos)), dtype=np.int16)


def llama_config(shape: dict, tokenizer):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=VOCAB_SIZE, head_dim=64, max_position_embeddings=1024,
        rms_norm_eps=1e-5, tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, torch_dtype="bfloat16", **shape,
    )


def _sampler(streams: list[np.ndarray], weights: list[float], batch: int, seed: int):
    """batch_at(step): random windows, a pure function of (seed, step), so a
    resumed run sees exactly the batches an uninterrupted one would."""
    probs = np.array(weights) / sum(weights)

    def batch_at(step: int) -> torch.Tensor:
        rng = np.random.default_rng([seed, step])
        rows = []
        for s in rng.choice(len(streams), size=batch, p=probs):
            start = rng.integers(0, len(streams[s]) - SEQ_LEN - 1)
            rows.append(streams[s][start:start + SEQ_LEN + 1])
        return torch.from_numpy(np.stack(rows).astype(np.int64))

    return batch_at


def _lr(step: int, total: int, peak: float, warmup: int = 100) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))


def _save_hf(model, tokenizer_dir: Path, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    model.to(torch.bfloat16).save_pretrained(str(out), safe_serialization=True)
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (tokenizer_dir / f).exists():
            shutil.copy(tokenizer_dir / f, out / f)


def train_lm(model, batch_at, steps: int, peak_lr: float, work: Path, desc: str,
             loss_fn=None, ckpt_every: int = 50, log=print) -> None:
    """bf16 AdamW loop with cosine schedule; resumable from ``work/train_state.pt``."""
    work.mkdir(parents=True, exist_ok=True)
    state_path = work / "train_state.pt"
    opt = torch.optim.AdamW(model.parameters(), lr=peak_lr, betas=(0.9, 0.95),
                            weight_decay=0.1)
    step = 0
    if state_path.exists():
        state = torch.load(state_path, weights_only=False)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        step = state["step"]
    model.train()
    t0, tokens = time.time(), 0
    bar = tqdm(total=steps, initial=step, desc=desc)
    while step < steps:
        batch = batch_at(step)
        for g in opt.param_groups:
            g["lr"] = _lr(step, steps, peak_lr)
        if loss_fn is None:
            logits = model(batch[:, :-1]).logits
            loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]),
                                   batch[:, 1:].reshape(-1))
        else:
            loss = loss_fn(model, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        tokens += batch.numel()
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.3f}", tok_s=f"{tokens / (time.time() - t0):.0f}")
        if step % ckpt_every == 0 or step == steps:
            torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "step": step},
                       state_path)
            log(json.dumps({"stage": desc, "step": step, "loss": round(loss.item(), 4),
                            "tokens_per_s": round(tokens / (time.time() - t0))}))
    bar.close()


def new_model(shape: dict, tokenizer, seed: int):
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(llama_config(shape, tokenizer)).to(torch.bfloat16)


def train_target(streams: dict[str, np.ndarray], tokenizer, tokenizer_dir: Path,
                 out: Path, work: Path, steps: int, batch: int, seed: int, log=print) -> None:
    model = new_model(TARGET_SHAPE, tokenizer, seed)
    names = sorted(streams)
    batch_at = _sampler([streams[n] for n in names], [1.0] * len(names), batch, seed)
    train_lm(model, batch_at, steps, 3e-3, work, "target", log=log)
    _save_hf(model, tokenizer_dir, out)


@torch.no_grad()
def generate_continuations(target, tokenizer, docs: list[str], n: int, prompt_tokens: int,
                           new_tokens: int, seed: int, min_tokens: int | None = None) -> np.ndarray:
    """Self-distillation data: the target's own sampled continuations of domain
    prompts (temperature 1), as one token stream. With ``min_tokens`` it stops
    after the batch that brings the stream to that length: a prefix of the full set."""
    torch.manual_seed(seed)
    target.eval()
    out = []
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    prompts = [tokenizer(d, add_special_tokens=False)["input_ids"][:prompt_tokens] for d in docs[:n]]
    prompts = [p for p in prompts if len(p) == prompt_tokens]
    for i in tqdm(range(0, len(prompts), 64), desc="generate"):
        if min_tokens is not None and len(out) >= min_tokens:
            break
        ids = torch.tensor([[bos] + p for p in prompts[i:i + 64]])
        gen = target.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True,
                              temperature=1.0, top_k=0, max_new_tokens=new_tokens,
                              pad_token_id=eos)
        for row in gen.tolist():
            out.extend(row + [eos])
    return np.array(out, dtype=np.int16)


def distil_drafter(target, stream: np.ndarray, tokenizer, tokenizer_dir: Path, out: Path,
                   work: Path, steps: int, batch: int, seed: int, log=print) -> None:
    """KL(target || drafter) on the target's generations, teacher-forced."""
    target.eval()
    model = new_model(DRAFTER_SHAPE, tokenizer, seed)

    def kd_loss(student, b):
        x = b[:, :-1]
        with torch.no_grad():
            teacher = F.log_softmax(target(x).logits.float(), dim=-1)
        s = F.log_softmax(student(x).logits.float(), dim=-1)
        return F.kl_div(s, teacher, log_target=True, reduction="batchmean") / x.shape[1]

    batch_at = _sampler([stream], [1.0], batch, seed)
    train_lm(model, batch_at, steps, 3e-3, work, out.name, loss_fn=kd_loss, log=log)
    _save_hf(model, tokenizer_dir, out)
