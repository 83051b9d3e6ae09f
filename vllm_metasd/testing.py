"""Tiny Llama checkpoints generated on the fly (tests and smoke runs).

Random weights, a shared byte-level BPE tokenizer, head_dim 64 (what vLLM's
CPU attention supports). A drafter made with ``copy_of`` is the target's exact
copy (ideal alignment); one with another seed is a badly aligned drafter.
"""
from __future__ import annotations

import shutil
from pathlib import Path

_TEXT = (
    "def add(a, b):\n    return a + b\n"
    "The quick brown fox jumps over the lazy dog. "
    "SELECT name, value FROM items WHERE id = 42;\n"
    "Der schnelle braune Fuchs springt über den faulen Hund.\n"
    "12 + 30 = 42. 7 * 6 = 42.\n"
) * 20


def make_tokenizer(out: Path, vocab_size: int = 512) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator([_TEXT], trainer)
    PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>"
    ).save_pretrained(str(out))


def make_llama(out: Path, tokenizer_dir: Path, *, layers: int, hidden: int,
               seed: int, vocab_size: int = 512, copy_of: Path | None = None) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out.mkdir(parents=True, exist_ok=True)
    for f in tokenizer_dir.iterdir():
        shutil.copy(f, out / f.name)
    if copy_of is not None:
        for name in ("config.json", "model.safetensors"):
            shutil.copy(copy_of / name, out / name)
        return out
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
        num_hidden_layers=layers, num_attention_heads=hidden // 64,
        num_key_value_heads=hidden // 64, head_dim=64, max_position_embeddings=512,
        bos_token_id=0, eos_token_id=1, tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(cfg)
    # Sharper logits than the default init so greedy decoding is not a coin toss.
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)
    model.to(torch.float32).save_pretrained(str(out), safe_serialization=True)
    return out


def make_tiny_zoo(root: Path) -> dict[str, str]:
    """A target, an aligned drafter (its exact copy) and two random drafters.
    Returns name -> checkpoint path."""
    root = Path(root)
    tok = root / "tokenizer"
    if not tok.exists():
        make_tokenizer(tok)
    target = make_llama(root / "target", tok, layers=2, hidden=128, seed=0)
    return {
        "target": str(target),
        "good": str(make_llama(root / "good", tok, layers=2, hidden=128, seed=0,
                               copy_of=target)),
        "bad1": str(make_llama(root / "bad1", tok, layers=1, hidden=64, seed=1)),
        "bad2": str(make_llama(root / "bad2", tok, layers=1, hidden=64, seed=2)),
    }
