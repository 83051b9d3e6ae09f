"""The shipped model zoo: complete, one tokenizer and vocab, loads in vLLM by path."""
import hashlib
import json
from pathlib import Path

import pytest

from vllm_metasd import zoo

pytestmark = pytest.mark.skipif(not zoo.available(), reason="zoo weights not built")

MODELS = ["target", *(f"drafter-{d}" for d in zoo.DRAFTERS)]


def model_dir(name: str) -> Path:
    return zoo.ZOO_DIR / "models" / name


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_every_model_is_a_llama_checkpoint_sharing_one_tokenizer_and_vocab():
    target_cfg = json.loads((model_dir("target") / "config.json").read_text())
    tok = digest(model_dir("target") / "tokenizer.json")
    for name in MODELS:
        d = model_dir(name)
        cfg = json.loads((d / "config.json").read_text())
        assert cfg["architectures"] == ["LlamaForCausalLM"], name
        assert cfg["vocab_size"] == target_cfg["vocab_size"], name
        assert digest(d / "tokenizer.json") == tok, name
        assert (d / "model.safetensors").stat().st_size > 0


def test_drafters_are_much_smaller_than_the_target():
    size = {n: (model_dir(n) / "model.safetensors").stat().st_size for n in MODELS}
    for name in MODELS[1:]:
        assert size[name] * 5 < size["target"], (name, size[name], size["target"])
    assert sum(size.values()) < 80e6  # shipped in the repository


def test_general_equal_is_a_drafter_of_the_specialists_shape():
    assert "general-equal" in zoo.DRAFTERS
    def cfg(name):
        return json.loads((model_dir(name) / "config.json").read_text())

    assert cfg("drafter-general-equal") == cfg("drafter-code")
    assert digest(model_dir("drafter-general-equal") / "model.safetensors") != \
        digest(model_dir("drafter-general") / "model.safetensors")


def test_default_config_and_paper_pool():
    from vllm_metasd.config import load_config

    default, paper = zoo.default_metasd_config(), zoo.paper_pool_config()
    assert [d["name"] for d in default["drafters"]] == [*zoo.DOMAINS, "general", "lookup"]
    assert [d["name"] for d in paper["drafters"]] == [*zoo.DOMAINS, "general-equal", "lookup"]
    assert paper["drafters"][-1] == default["drafters"][-1]  # the same n-gram lookup
    assert {k: v for k, v in paper.items() if k != "drafters"} == \
        {k: v for k, v in default.items() if k != "drafters"}  # policy, reward, k, warm start, probe
    for cfg in (default, paper):
        parsed = load_config(cfg)
        assert all(Path(d.path).is_dir() for d in parsed.drafters if d.kind == "draft_model")


def test_prompt_sets_are_held_out_per_domain():
    mixed = zoo.load_prompts(split="mixed")
    for dom in zoo.DOMAINS:
        rows = zoo.load_prompts(dom)
        assert len(rows) >= 50 and {r["domain"] for r in rows} == {dom}
        assert all(r["prompt"].strip() for r in rows)
    assert len(mixed) == sum(len(zoo.load_prompts(d)) for d in zoo.DOMAINS)


def test_vllm_serves_the_target_by_path_with_zoo_tokenizer():
    from transformers import AutoTokenizer
    from vllm import SamplingParams

    from conftest import make_llm

    llm = make_llm(zoo.target_path(), max_num_seqs=4)
    try:
        prompt = zoo.load_prompts("code")[0]["prompt"]
        out = llm.generate([prompt], SamplingParams(max_tokens=24, temperature=0),
                           use_tqdm=False)[0]
        tok = AutoTokenizer.from_pretrained(zoo.drafter_path("code"))
        assert out.prompt_token_ids == tok(prompt)["input_ids"]
        assert len(out.outputs[0].token_ids) > 0
        assert max(out.outputs[0].token_ids) < tok.vocab_size + len(tok.get_added_vocab())
    finally:
        del llm
