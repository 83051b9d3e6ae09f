"""`vllm serve` with MetaSD: the OpenAI API through the official client, and early
clear errors for bad configs. Real server processes on loopback."""
import json
import os
import socket
import subprocess
import sys
import time

import pytest

from conftest import PROMPTS, metasd_config

CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}assistant:{% endif %}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve_cmd(target, spec, *extra):
    return [sys.executable, "-m", "vllm.entrypoints.cli.main", "serve", target,
            "--enforce-eager", "--max-model-len", "512", "--max-num-seqs", "8",
            "--speculative-config", spec, *extra]


@pytest.fixture(scope="module")
def server(tiny_zoo, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("server")
    cfg = tmp / "metasd.json"
    cfg.write_text(json.dumps(metasd_config(tiny_zoo, ["bad1", "good", "lookup"])))
    template = tmp / "chat.jinja"
    template.write_text(CHAT_TEMPLATE)
    port = _free_port()
    log = open(tmp / "server.log", "w")
    proc = subprocess.Popen(
        _serve_cmd(tiny_zoo["target"], str(cfg),  # a bare metasd.json path
                   "--host", "127.0.0.1", "--port", str(port), "--chat-template", str(template)),
        stdout=log, stderr=subprocess.STDOUT)
    import openai

    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none",
                           max_retries=0)
    deadline = time.monotonic() + 240
    while True:
        try:
            client.models.list()
            break
        except openai.APIConnectionError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError((tmp / "server.log").read_text()[-3000:])
            time.sleep(1)
    yield client, tiny_zoo["target"], tmp / "server.log"
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()


def test_completions_equal_plain_decoding_streaming_and_not(server, plain_llm):
    from vllm import SamplingParams

    client, target, _ = server
    prompts = PROMPTS[:6]
    ref = [o.outputs[0].text for o in plain_llm.generate(
        prompts, SamplingParams(max_tokens=24, temperature=0, ignore_eos=True), use_tqdm=False)]
    extra = {"ignore_eos": True}
    out = client.completions.create(model=target, prompt=prompts, max_tokens=24,
                                    temperature=0, extra_body=extra)
    assert [c.text for c in sorted(out.choices, key=lambda c: c.index)] == ref
    for prompt, expected in zip(prompts[:2], ref):
        stream = client.completions.create(model=target, prompt=prompt, max_tokens=24,
                                           temperature=0, stream=True, extra_body=extra)
        assert "".join(chunk.choices[0].text for chunk in stream) == expected


def test_chat_completions_streaming_and_not(server):
    client, target, log = server
    messages = [{"role": "user", "content": "def add(a, b):"}]
    extra = {"ignore_eos": True}
    full = client.chat.completions.create(model=target, messages=messages, max_tokens=16,
                                          temperature=0, extra_body=extra)
    text = full.choices[0].message.content
    assert full.usage.completion_tokens == 16 and text
    stream = client.chat.completions.create(model=target, messages=messages, max_tokens=16,
                                            temperature=0, stream=True, extra_body=extra)
    assert "".join(c.choices[0].delta.content or "" for c in stream) == text
    assert "MetaSD: 3 drafters" in log.read_text()  # the proposer really ran


@pytest.mark.parametrize("case, expected", [
    ({"config": "/nonexistent/metasd.json"}, "file '/nonexistent/metasd.json' not found"),
    ({"config": {"num_speculative_tokens": 0, "drafters": [
        {"name": "x", "kind": "ngram"}]}}, "num_speculative_tokens: input should be greater"),
    ({"config": {"num_speculative_tokens": 3, "policy": {"name": "thompson"}, "drafters": [
        {"name": "x", "kind": "draft_model", "path": "/nonexistent"}]}}, "unknown policy"),
    ({"config": {"num_speculative_tokens": 3, "drafters": [
        {"name": "x", "kind": "draft_model", "path": "/nonexistent/drafter"}]}},
     "drafters[0].path: '/nonexistent/drafter' does not exist"),
    ({"config": "{not json"}, "is not valid JSON"),
    ({"config": {"num_speculative_tokens": 3, "drafterz": []}}, "drafterz: unknown key"),
    ("missing/metasd.json", "metasd.json' not found"),  # a bare path
])
def test_bad_config_exits_early_with_a_clear_message(tiny_zoo, case, expected):
    spec = case if isinstance(case, str) else json.dumps({"method": "metasd", **case})
    t0 = time.monotonic()
    proc = subprocess.run(_serve_cmd(tiny_zoo["target"], spec, "--port", str(_free_port())),
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "VLLM_LOGGING_LEVEL": "WARNING"})
    assert proc.returncode != 0
    assert expected in proc.stderr + proc.stdout
    assert time.monotonic() - t0 < 60
