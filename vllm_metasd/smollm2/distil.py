"""Distillation data from the SmolLM2 target through vLLM, and drafter training.

Data: the target answers chat requests (sampled, temperature ``GEN_TEMPERATURE``)
through a vLLM engine in batches and returns, for every answer token, the
target's top-``TOP_K`` log-probabilities (vLLM's raw logprobs: the model's
distribution before temperature). These are the soft targets.

Loss: cross-entropy of the drafter against the renormalised top-k teacher
distribution at every answer position (= KL(teacher_topk || drafter) up to a
constant), teacher-forced on prompt + answer. Only answer positions enter the
vocabulary projection, the dominant cost at vocab 49152, and the drafter's
normaliser is a sampled softmax: exact over every token in the batch's
teacher top-k lists, estimated from ``NEGATIVES`` uniformly drawn other tokens
(importance-weighted, so every token gets pushed down over the steps); about
5x cheaper than the full vocabulary on this CPU.

Drafters: Llama, ``DRAFTER_SHAPE`` (head_dim 64 for vLLM's CPU attention),
tied embeddings initialised from a PCA projection of the target's embedding
matrix (so the drafter starts in the target's token geometry).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

TOP_K = 20
GEN_TEMPERATURE = 0.7
DRAFTER_SHAPE = dict(hidden_size=128, intermediate_size=512, num_hidden_layers=2,
                     num_attention_heads=2, num_key_value_heads=2, head_dim=64)
MAX_SEQ = 1024
NEGATIVES = 4096


# ---------------------------------------------------------------- data


def generate(llm, tokenizer, rows: list[dict], max_tokens: int) -> dict[str, np.ndarray]:
    """Answers of the target to ``rows`` (first turn each) with top-k soft targets,
    packed as flat arrays + offsets (one npz per call)."""
    from vllm import SamplingParams

    from vllm_metasd.smollm2 import chat_prompt

    prompts = [chat_prompt(tokenizer, r["turns"][0]) for r in rows]
    # No per-request seed: vLLM CPU 0.32 crashes on seeded requests whose
    # prefill is chunked ("CPU Generator does not use offset"); the engine seed
    # makes the run reproducible.
    params = SamplingParams(max_tokens=max_tokens, temperature=GEN_TEMPERATURE,
                            logprobs=TOP_K)
    outs = llm.generate(prompts, params, use_tqdm=False)
    prompt_ids, answer_ids, top_ids, top_lp = [], [], [], []
    p_off, a_off = [0], [0]
    for o in outs:
        c = o.outputs[0]
        ids = list(c.token_ids)
        prompt_ids.extend(o.prompt_token_ids)
        answer_ids.extend(ids)
        for tok, lps in zip(ids, c.logprobs):
            ranked = sorted(lps.items(), key=lambda kv: -kv[1].logprob)
            # The sampled token may lie outside the top k (it is then listed
            # extra): keep the k most likely.
            ranked = (ranked + ranked[-1:] * TOP_K)[:TOP_K]
            top_ids.append([t for t, _ in ranked])
            top_lp.append([lp.logprob for _, lp in ranked])
        p_off.append(len(prompt_ids))
        a_off.append(len(answer_ids))
    return {"prompt_ids": np.array(prompt_ids, np.int32),
            "answer_ids": np.array(answer_ids, np.int32),
            "prompt_offsets": np.array(p_off, np.int64),
            "answer_offsets": np.array(a_off, np.int64),
            "top_ids": np.array(top_ids, np.int32).reshape(-1, TOP_K),
            "top_logprobs": np.array(top_lp, np.float16).reshape(-1, TOP_K)}


def examples(parts: list[dict]) -> list[tuple]:
    """[(prompt_ids, answer_ids, top_ids, top_logprobs)] from generated parts."""
    out = []
    for d in parts:
        po, ao = d["prompt_offsets"], d["answer_offsets"]
        for i in range(len(po) - 1):
            a0, a1 = ao[i], ao[i + 1]
            if a1 - a0 < 2:
                continue
            out.append((d["prompt_ids"][po[i]:po[i + 1]], d["answer_ids"][a0:a1],
                        d["top_ids"][a0:a1], d["top_logprobs"][a0:a1]))
    return out


class Batch:
    """Padded prompt+answer ids and the soft targets of the answer positions;
    with ``negatives`` > 0, the candidate tokens of the sampled softmax."""

    def __init__(self, rows: list[tuple], vocab_size: int = 0, negatives: int = 0, rng=None):
        import torch

        seqs = [np.concatenate([p, a[:-1]])[-MAX_SEQ:] for p, a, _, _ in rows]
        width = max(len(s) for s in seqs)
        ids = np.zeros((len(rows), width), np.int64)
        pos_b, pos_t, tids, tlps = [], [], [], []
        for b, ((p, a, ti, tl), s) in enumerate(zip(rows, seqs)):
            ids[b, :len(s)] = s
            # Answer token j is predicted at sequence position len(p) - 1 + j
            # (shifted if the sequence was cut to MAX_SEQ on the left).
            shift = len(p) + len(a) - 1 - len(s)
            first = len(p) - 1 - shift
            start = max(0, -first)
            n = len(a) - start
            pos_b.append(np.full(n, b))
            pos_t.append(np.arange(first + start, first + start + n))
            tids.append(ti[start:])
            tlps.append(tl[start:])
        self.ids = torch.from_numpy(ids)
        self.pos_b = torch.from_numpy(np.concatenate(pos_b))
        self.pos_t = torch.from_numpy(np.concatenate(pos_t))
        self.top_ids = torch.from_numpy(np.concatenate(tids).astype(np.int64))
        lp = torch.from_numpy(np.concatenate(tlps).astype(np.float32))
        self.teacher = torch.softmax(lp, dim=-1)   # renormalised over the top k
        self.candidates = None
        if negatives > 0:
            pos = np.unique(self.top_ids.numpy())
            rest = np.setdiff1d(np.arange(vocab_size), pos, assume_unique=True)
            m = min(negatives, len(rest))
            neg = (rng or np.random.default_rng(0)).choice(rest, size=m, replace=False)
            self.candidates = torch.from_numpy(np.concatenate([pos, np.sort(neg)]))
            self.local_ids = torch.from_numpy(np.searchsorted(pos, self.top_ids.numpy()))
            # log importance weight: each drawn negative stands for len(rest)/m tokens
            self.log_w = torch.cat([torch.zeros(len(pos)),
                                    torch.full((m,), float(np.log(len(rest) / m)))])

    def numel(self) -> int:          # tokens scored (train_lm's throughput counter)
        return int(self.pos_b.numel())


def sampler(exs: list[tuple], batch: int, seed: int, vocab_size: int = 0,
            negatives: int = NEGATIVES):
    """batch_at(step): a pure function of (seed, step), so resumed runs match.
    ``vocab_size`` 0: full softmax."""
    def batch_at(step: int) -> Batch:
        rng = np.random.default_rng([seed, step])
        rows = [exs[i] for i in rng.choice(len(exs), size=batch, replace=False)]
        return Batch(rows, vocab_size, negatives if vocab_size else 0, rng)
    return batch_at


def _topk_ce():
    """Fused vocabulary projection + soft cross-entropy against a top-k teacher:
    the gradient w.r.t. the logits (softmax - teacher) is formed in the forward
    pass, chunk by chunk, and kept in bf16, so no float32 [N, vocab] tensor
    stays alive and the backward is two matmuls (~2x faster than autograd
    through log_softmax on this CPU)."""
    import torch

    class TopKCE(torch.autograd.Function):
        @staticmethod
        def forward(ctx, h, weight, top_ids, teacher, log_w):
            n, chunk = h.shape[0], 1024
            grad = torch.empty(n, weight.shape[0], dtype=h.dtype)
            loss = torch.zeros((), dtype=torch.float32)
            for i in range(0, n, chunk):
                z = (h[i:i + chunk] @ weight.T).float()
                if log_w is not None:
                    z += log_w
                lse = torch.logsumexp(z, dim=-1, keepdim=True)
                p, ids = teacher[i:i + chunk], top_ids[i:i + chunk]
                loss -= (p * (z.gather(1, ids) - lse)).sum()
                z.sub_(lse).exp_().scatter_add_(1, ids, -p)
                grad[i:i + chunk] = z
            ctx.save_for_backward(h, weight, grad)
            return loss / n

        @staticmethod
        def backward(ctx, g):
            h, weight, grad = ctx.saved_tensors
            scale = (g / h.shape[0]).to(h.dtype)
            dw = (grad.T @ h) * scale if ctx.needs_input_grad[1] else None
            return (grad @ weight) * scale, dw, None, None, None

    return TopKCE


def kd_loss(model, b: Batch):
    hidden = model.model(input_ids=b.ids).last_hidden_state       # [B, T, H]
    h = hidden[b.pos_b, b.pos_t]                                   # answer positions
    if b.candidates is None:
        return _topk_ce().apply(h, model.lm_head.weight, b.top_ids, b.teacher, None)
    return _topk_ce().apply(h, model.lm_head.weight[b.candidates], b.local_ids, b.teacher,
                            b.log_w)


def kd_loss_reference(model, b: Batch):
    """Plain autograd version of ``kd_loss`` (tests compare the two)."""
    import torch.nn.functional as F

    hidden = model.model(input_ids=b.ids).last_hidden_state
    h = hidden[b.pos_b, b.pos_t]
    logq = F.log_softmax(model.lm_head(h).float(), dim=-1)
    return -(b.teacher * logq.gather(1, b.top_ids)).sum(-1).mean()


# ---------------------------------------------------------------- models


def embedding_init(target_dir: str, hidden: int):
    """The target's (tied) embedding projected on its top ``hidden`` principal
    directions, scaled to the original per-row RMS."""
    import torch
    from safetensors import safe_open

    with safe_open(str(Path(target_dir) / "model.safetensors"), "pt") as f:
        emb = f.get_tensor("model.embed_tokens.weight").float()
    centred = emb - emb.mean(0, keepdim=True)
    _, _, v = torch.linalg.svd(centred[::4], full_matrices=False)   # rows subsampled
    proj = emb @ v[:hidden].T
    return proj * (emb.pow(2).mean().sqrt() / proj.pow(2).mean().sqrt())


def new_drafter(target_dir: str, embed, seed: int):
    """A bf16 drafter for the target in ``target_dir`` (its vocabulary, special
    tokens and RoPE), embedding initialised with ``embed``."""
    tcfg = json.loads((Path(target_dir) / "config.json").read_text())
    return new_drafter_from_config(
        tcfg["vocab_size"], embed, seed, bos_token_id=tcfg["bos_token_id"],
        eos_token_id=tcfg["eos_token_id"], pad_token_id=tcfg.get("pad_token_id"),
        rope_parameters=tcfg.get("rope_parameters"))


def new_drafter_from_config(vocab_size: int, embed, seed: int, **config):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=vocab_size, max_position_embeddings=2048, rms_norm_eps=1e-5,
                      tie_word_embeddings=True, **config, **DRAFTER_SHAPE)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        model.model.embed_tokens.weight.copy_(embed)
    model.tie_weights()
    return model.to(torch.bfloat16)


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
                   "special_tokens_map.json", "generation_config.json")


def save_drafter(model, target_dir: str, out: Path) -> None:
    import torch

    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.to(torch.bfloat16)
    model.config.dtype = "bfloat16"
    model.save_pretrained(str(tmp), safe_serialization=True)
    for f in TOKENIZER_FILES:
        if (Path(target_dir) / f).exists():
            shutil.copy(Path(target_dir) / f, tmp / f)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)


# ---------------------------------------------------------------- training


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    import math

    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))


def train(model, batch_at, steps: int, peak_lr: float, work: Path, desc: str,
          warmup: int, ckpt_every: int = 20, log=print) -> None:
    """bf16 AdamW on ``kd_loss``, linear warmup + cosine; resumable from
    ``work/train_state.pt`` (batches are a function of the step)."""
    import time

    import torch
    from tqdm import tqdm

    work.mkdir(parents=True, exist_ok=True)
    state_path = work / "train_state.pt"
    opt = torch.optim.AdamW(model.parameters(), lr=peak_lr, betas=(0.9, 0.95),
                            weight_decay=0.01)
    step = 0
    if state_path.exists():
        state = torch.load(state_path, weights_only=False)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        step = state["step"]
    model.train()
    t0, tokens, recent = time.time(), 0, []
    bar = tqdm(total=steps, initial=step, desc=desc, mininterval=10)
    while step < steps:
        batch = batch_at(step)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps, peak_lr, warmup)
        loss = kd_loss(model, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        tokens += batch.numel()
        recent = (recent + [loss.item()])[-ckpt_every:]
        bar.update(1)
        if step % ckpt_every == 0 or step == steps:
            torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "step": step},
                       state_path)
            log(json.dumps({"stage": desc, "step": step,
                            "loss": round(sum(recent) / len(recent), 4),
                            "tokens_per_s": round(tokens / (time.time() - t0))}))
    bar.close()
