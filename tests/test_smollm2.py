"""SmolLM2 target: GGUF conversion (on a tiny GGUF written here), distillation
pieces, and MetaSD on the real target (only if it has been fetched:
``python -m vllm_metasd.smollm2.fetch``)."""
import json

import numpy as np
import pytest

from vllm_metasd import smollm2

H, HEADS, KV_HEADS, FFN, LAYERS = 128, 2, 1, 256, 2


def _permute(w, n_head, n_head_kv=None):
    """llama.cpp's convert_hf_to_gguf permutation of q/k rows (rotary layout)."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def _unpermute(w, n_head, n_head_kv=None):
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def write_tiny_gguf(path, tok_dir):
    """A 2-layer Llama GGUF as llama.cpp writes it: gpt2 BPE tokenizer with a
    chat template, Q4_1 matrices, a Q8_0 embedding, F32 norms, no output.weight
    (tied). Returns {hf_name: the weight the conversion must recover}."""
    import gguf
    from gguf import GGMLQuantizationType as Q

    from vllm_metasd.testing import make_tokenizer

    make_tokenizer(tok_dir, vocab_size=320)
    tj = json.loads((tok_dir / "tokenizer.json").read_text())
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    vocab = sorted(tj["model"]["vocab"].items(), key=lambda kv: kv[1])
    tokens = specials + [t for t, _ in vocab if t not in ("<s>", "</s>")]
    tokens += [f"<pad{i}>" for i in range(-len(tokens) % 32)]
    merges = [m if isinstance(m, str) else " ".join(m) for m in tj["model"]["merges"]]
    vocab_size = len(tokens)

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(LAYERS)
    w.add_context_length(256)
    w.add_embedding_length(H)
    w.add_feed_forward_length(FFN)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(vocab_size)
    w.add_rope_dimension_count(H // HEADS)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(tokens)
    w.add_token_types([3] * len(specials) + [1] * (vocab_size - len(specials)))
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_pad_token_id(2)
    w.add_add_bos_token(False)
    w.add_chat_template("{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
                        "{{ m['content'] }}<|im_end|>\n{% endfor %}"
                        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")

    rng = np.random.default_rng(0)
    expected = {}

    def add(gguf_name, hf_name, arr, qtype, perm=None):
        data = arr.astype(np.float32)
        stored = perm[0](data, *perm[1:]) if perm else data
        if qtype == Q.F32:
            w.add_tensor(gguf_name, stored)
            back = stored
        else:
            qdata = gguf.quants.quantize(stored, qtype)
            w.add_tensor(gguf_name, qdata, raw_shape=qdata.shape, raw_dtype=qtype)
            back = gguf.quants.dequantize(qdata, qtype)
        if perm:
            back = _unpermute(back, *perm[1:])
        expected[hf_name] = (data, back)

    add("token_embd.weight", "model.embed_tokens.weight",
        rng.normal(0, 0.5, (vocab_size, H)), Q.Q8_0)
    hd = H // HEADS
    for i in range(LAYERS):
        p, b = f"model.layers.{i}.", f"blk.{i}."
        add(b + "attn_norm.weight", p + "input_layernorm.weight", 1 + rng.normal(0, .1, H), Q.F32)
        add(b + "ffn_norm.weight", p + "post_attention_layernorm.weight",
            1 + rng.normal(0, .1, H), Q.F32)
        add(b + "attn_q.weight", p + "self_attn.q_proj.weight", rng.normal(0, .1, (H, H)),
            Q.Q4_1, (_permute, HEADS, HEADS))
        add(b + "attn_k.weight", p + "self_attn.k_proj.weight",
            rng.normal(0, .1, (KV_HEADS * hd, H)), Q.Q4_1, (_permute, HEADS, KV_HEADS))
        add(b + "attn_v.weight", p + "self_attn.v_proj.weight",
            rng.normal(0, .1, (KV_HEADS * hd, H)), Q.Q4_1)
        add(b + "attn_output.weight", p + "self_attn.o_proj.weight",
            rng.normal(0, .1, (H, H)), Q.Q4_1)
        add(b + "ffn_gate.weight", p + "mlp.gate_proj.weight", rng.normal(0, .1, (FFN, H)), Q.Q4_1)
        add(b + "ffn_up.weight", p + "mlp.up_proj.weight", rng.normal(0, .1, (FFN, H)), Q.Q4_1)
        add(b + "ffn_down.weight", p + "mlp.down_proj.weight", rng.normal(0, .1, (H, FFN)), Q.Q4_1)
    add("output_norm.weight", "model.norm.weight", 1 + rng.normal(0, .1, H), Q.F32)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return expected


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    d = tmp_path_factory.mktemp("gguf")
    expected = write_tiny_gguf(d / "tiny.Q4_1.gguf", d / "tok")
    return d / "tiny.Q4_1.gguf", expected


def test_gguf_conversion_recovers_dequantized_weights(tiny_gguf, tmp_path):
    import torch
    from safetensors.torch import load_file

    from vllm_metasd.smollm2.fetch import convert_gguf

    path, expected = tiny_gguf
    out = tmp_path / "hf"
    convert_gguf(path, out, dtype="float32")
    cfg = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in cfg       # plain weights, not a GGUF model
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["tie_word_embeddings"]
    assert (cfg["hidden_size"], cfg["num_hidden_layers"], cfg["num_key_value_heads"]) == \
        (H, LAYERS, KV_HEADS)
    sd = load_file(str(out / "model.safetensors"))
    for name, (orig, deq) in expected.items():
        got = sd[name].numpy()
        # Exactly the GGUF's dequantized values, q/k rows back in HF order...
        np.testing.assert_allclose(got, deq, rtol=1e-6, atol=1e-6, err_msg=name)
        # ... and close to the weights before quantization (wrong q/k order would not be).
        assert np.abs(got - orig).mean() < 0.15 * np.abs(orig).mean(), name
    # Same model as transformers' own GGUF loader, which refuses save_pretrained.
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                               dtype=torch.float32)
    conv = LlamaForCausalLM.from_pretrained(str(out), dtype=torch.float32)
    ids = torch.tensor([[1, 5, 9, 40, 77, 3]])
    torch.testing.assert_close(conv(ids).logits, ref(ids).logits)


def test_gguf_conversion_keeps_tokenizer_and_chat_template_and_verifies(tiny_gguf, tmp_path):
    from transformers import AutoTokenizer

    from vllm_metasd.smollm2.fetch import convert_gguf, verify

    path, _ = tiny_gguf
    out = tmp_path / "hf"
    convert_gguf(path, out)                                        # bf16 default
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    ref = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    tok = AutoTokenizer.from_pretrained(str(out))
    text = "def add(a, b):\n    return a + b"
    assert tok(text)["input_ids"] == ref(text)["input_ids"]
    assert tok.eos_token == "<|im_end|>"
    prompt = smollm2.chat_prompt(tok, "hello")
    assert prompt == "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n"
    report = verify(out, {"hidden_size": H, "vocab_size": tok.vocab_size}, "hi",
                    max_new_tokens=4)
    assert report["chat_template"] and "greedy_answer" in report
    with pytest.raises(ValueError, match="hidden_size"):
        verify(out, {"hidden_size": H + 1})


def test_topk_kd_loss_matches_autograd_and_answer_positions_align():
    import torch

    from vllm_metasd.smollm2 import distil

    rng = np.random.default_rng(0)
    V = 4096

    def ex(np_, na):
        top = rng.integers(0, V, (na, distil.TOP_K)).astype(np.int32)
        lp = np.sort(-5 * rng.random((na, distil.TOP_K)), axis=1)[:, ::-1]
        return (rng.integers(0, V, np_).astype(np.int32), rng.integers(0, V, na).astype(np.int32),
                top, lp.astype(np.float16))

    rows = [ex(7, 5), ex(3, 9)]
    b = distil.Batch(rows)
    assert b.ids.shape == (2, 11) and b.numel() == 14
    # Answer token j is predicted where the sequence holds its predecessor.
    for (p, a, _, _), bi in zip(rows, range(2)):
        pos = b.pos_t[b.pos_b == bi].numpy()
        assert pos[0] == len(p) - 1
        np.testing.assert_array_equal(b.ids[bi, pos[1:]].numpy(), a[:-1])
    # Left-truncation to MAX_SEQ drops the earliest positions only.
    long = ex(distil.MAX_SEQ, 4)
    bl = distil.Batch([long])
    assert bl.ids.shape[1] == distil.MAX_SEQ and bl.numel() == 4
    np.testing.assert_array_equal(bl.ids[0, bl.pos_t[1:]].numpy(), long[1][:-1])

    torch.manual_seed(0)
    emb = torch.randn(V, 128) * 0.02
    grads = []
    for fn in (distil.kd_loss, distil.kd_loss_reference):
        m = distil.new_drafter_from_config(V, emb, seed=0).float()
        loss = fn(m, b)
        loss.backward()
        grads.append((loss.item(), [p.grad.clone() for p in m.parameters()]))
    assert grads[0][0] == pytest.approx(grads[1][0], rel=1e-5)
    for g1, g2 in zip(grads[0][1], grads[1][1]):
        torch.testing.assert_close(g1, g2, rtol=1e-4, atol=1e-6)


def test_tasks_are_chat_requests_per_domain():
    from vllm_metasd.smollm2 import tasks
    from vllm_metasd.zoo import corpus

    c = corpus.build(0)
    for d in smollm2.DOMAINS:
        rows = tasks.make_tasks(d, c[d]["heldout"], 8, 0)
        assert len(rows) == 8 and {r["category"] for r in rows} == {d}
        assert all(len(r["turns"]) == 1 and len(r["turns"][0]) > 20 for r in rows)
        assert rows == tasks.make_tasks(d, c[d]["heldout"], 8, 0)      # seeded


@pytest.mark.skipif(not (smollm2.PKG_DIR / "prompts" / "mixed.jsonl").exists(),
                    reason="smollm2 prompts not built")
def test_shipped_prompt_sets():
    mixed = smollm2.load_prompts(split="mixed")
    for d in smollm2.DOMAINS:
        rows = smollm2.load_prompts(d)
        assert len(rows) >= 32 and {r["category"] for r in rows} == {d}
    assert len(mixed) == sum(len(smollm2.load_prompts(d)) for d in smollm2.DOMAINS)


@pytest.mark.skipif(not smollm2.drafters_available(), reason="smollm2 drafters not built")
def test_shipped_drafters_share_the_target_tokenizer_and_are_small():
    sizes = 0
    for name in smollm2.DRAFTERS:
        d = smollm2.PKG_DIR / "models" / f"drafter-{name}"
        cfg = json.loads((d / "config.json").read_text())
        assert cfg["vocab_size"] == smollm2.EXPECTED_CONFIG["vocab_size"]
        assert cfg["head_dim"] == 64 and cfg["tie_word_embeddings"]
        assert (d / "tokenizer.json").read_bytes() == \
            (smollm2.PKG_DIR / "models" / "drafter-code" / "tokenizer.json").read_bytes()
        sizes += (d / "model.safetensors").stat().st_size
    assert sizes < 110e6


@pytest.mark.skipif(not smollm2.available(),
                    reason="SmolLM2 target not fetched (python -m vllm_metasd.smollm2.fetch)")
def test_metasd_on_smollm2_equals_plain_decoding_float32():
    from pathlib import Path

    from transformers import AutoTokenizer
    from vllm import SamplingParams

    from conftest import make_llm

    assert (Path(smollm2.target_path()) / "tokenizer.json").read_bytes() == \
        (Path(smollm2.drafter_path("code")) / "tokenizer.json").read_bytes()
    tok = AutoTokenizer.from_pretrained(smollm2.target_path())
    rows = smollm2.load_prompts(split="mixed")[:5]
    prompts = [smollm2.chat_prompt(tok, r["turns"][0]) for r in rows]
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    cfg = smollm2.default_metasd_config()
    cfg["drafters"] = [d for d in cfg["drafters"] if d["name"] in ("code", "math", "general",
                                                                   "lookup")]
    cfg.update(num_speculative_tokens=3, log_stats_interval_s=0)
    outputs = []
    for spec in (None, {"method": "metasd", "config": cfg}):
        llm = make_llm(smollm2.target_path(), spec, dtype="float32", max_num_seqs=4,
                       max_model_len=1024)
        try:
            outs = llm.generate(prompts, params, use_tqdm=False)
            outputs.append([list(o.outputs[0].token_ids) for o in outs])
            if spec is not None:
                st = llm.collective_rpc("metasd_stats")[0]["drafters"]
                assert sum(s["accepted"] for s in st.values()) > 0   # drafters do help
        finally:
            llm.llm_engine.engine_core.shutdown()
            del llm
    assert outputs[0] == outputs[1]


def test_chat_workload_from_a_jsonl_file(tmp_path):
    from vllm_metasd import zoo
    from vllm_metasd.smollm2.workload import chat_rows, chat_workload, select

    f = tmp_path / "bench.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in [
        {"category": "writing", "turns": ["Write a haiku.", "Now a limerick."]},
        {"category": "coding", "turns": ["def fib(n):"]},
        {"category": "writing", "turns": ["Write a poem."]},
        {"turns": ["No category."]}]))
    rows = chat_rows(select("zoo"), f, per_domain=1)
    assert [r["category"] for r in rows] == ["writing", "coding", "all"]
    if zoo.available():
        prompts, cats = chat_workload(select("zoo"), f)
        assert len(prompts) == 4 and "Write a haiku." in prompts[0]
        assert "limerick" not in prompts[0]                      # first turn only
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"category": "x", "turns": []}\n')
    with pytest.raises(ValueError, match="turns"):
        chat_rows(select("zoo"), bad, None)
    with pytest.raises(ValueError, match="unknown target"):
        select("llama")


def test_shipped_metasd_json_matches_the_default_config():
    from pathlib import Path

    shipped = json.loads(Path(smollm2.metasd_json_path()).read_text())
    default = smollm2.default_metasd_config()
    assert [d["name"] for d in shipped["drafters"]] == [d["name"] for d in default["drafters"]]
    for s, d in zip(shipped["drafters"], default["drafters"]):
        if "path" in s:
            assert (smollm2.PKG_DIR / s["path"]).resolve() == Path(d["path"]).resolve()
    for key in ("policy", "reward", "warm_start", "prompt_probe", "num_speculative_tokens"):
        assert shipped[key] == default[key], key
    if smollm2.drafters_available():
        from vllm_metasd.config import load_config

        cfg = load_config(smollm2.metasd_json_path())      # paths exist, resolved
        assert len(cfg.drafters) == len(shipped["drafters"])


def test_sampled_softmax_is_exact_when_every_token_is_drawn():
    import torch

    from vllm_metasd.smollm2 import distil

    rng = np.random.default_rng(1)
    V = 512
    rows = [(rng.integers(0, V, 6).astype(np.int32), rng.integers(0, V, 7).astype(np.int32),
             rng.integers(0, V, (7, distil.TOP_K)).astype(np.int32),
             np.sort(-5 * rng.random((7, distil.TOP_K)), axis=1)[:, ::-1].astype(np.float16))]
    full, sampled = distil.Batch(rows), distil.Batch(rows, V, negatives=V, rng=rng)
    assert len(sampled.candidates) == V and float(sampled.log_w.abs().max()) == 0.0
    m = distil.new_drafter_from_config(V, torch.randn(V, 128) * 0.02, seed=0).float()
    assert distil.kd_loss(m, sampled).item() == pytest.approx(distil.kd_loss(m, full).item(),
                                                              rel=1e-5)
    few = distil.Batch(rows, V, negatives=16, rng=rng)
    assert len(few.candidates) == len(np.unique(rows[0][2])) + 16
    loss = distil.kd_loss(m, few)
    loss.backward()
    assert torch.isfinite(loss) and m.lm_head.weight.grad.abs().sum() > 0


@pytest.mark.skipif(not smollm2.available(),
                    reason="SmolLM2 target not converted (python -m vllm_metasd.smollm2.fetch)")
def test_readme_smollm2_serve_and_chat_curl_as_written(tmp_path):
    import subprocess

    from test_quickstart import (_free_port, readme_block, running_server, shell_commands,
                                 _metasd_chosen)

    cmds = shell_commands(readme_block("bash", "smollm2/target --enforce-eager"))
    serve = next(c for c in cmds if "vllm serve" in c)
    curl = next(c for c in cmds if c.startswith("curl"))
    port = _free_port()  # the only change: a free port instead of 8000
    serve = serve.replace("--port 8000", f"--port {port}")
    curl = curl.replace("localhost:8000", f"localhost:{port}")
    with running_server(serve, tmp_path / "serve.log", port, shell=True):
        out = subprocess.run(curl, shell=True, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr
        resp = json.loads(out.stdout)
        assert resp["usage"]["completion_tokens"] == 48
        assert resp["choices"][0]["message"]["content"].strip()
        assert _metasd_chosen(port) > 0  # MetaSD drafted
