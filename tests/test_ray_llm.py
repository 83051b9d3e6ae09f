"""MetaSD through Ray Serve LLM's OpenAI app and Ray Data LLM's vLLM processor, on CPU
(vllm_metasd.ray_serve, vllm_metasd.ray_data). Greedy outputs must equal plain decoding
(the session ``plain_llm``); the Serve app is queried with the official openai client."""
import shutil

import pytest

from conftest import PROMPTS, metasd_config
from test_server import _free_port

pytest.importorskip("ray.serve.llm")
pytest.importorskip("ray.data.llm")

MAX_TOKENS = 20
CHAT = [{"role": "system", "content": "Be brief."},
        {"role": "user", "content": "def add(a, b):"}]


@pytest.fixture(scope="module")
def chat_target(tiny_zoo, tmp_path_factory):
    """The tiny target with the zoo's chat template (the tiny zoo ships none)."""
    from vllm_metasd.zoo import CHAT_TEMPLATE

    target = tmp_path_factory.mktemp("ray_llm") / "target"
    shutil.copytree(tiny_zoo["target"], target)
    (target / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    return str(target)


@pytest.fixture(scope="module")
def reference(plain_llm):
    from vllm import SamplingParams

    from vllm_metasd.zoo import CHAT_TEMPLATE

    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True)
    texts = [o.outputs[0].text for o in plain_llm.generate(PROMPTS, params, use_tqdm=False)]
    chat = plain_llm.chat(CHAT, params, chat_template=CHAT_TEMPLATE, use_tqdm=False)
    return texts, chat[0].outputs[0].text


def _cfg(tiny_zoo):
    return metasd_config(tiny_zoo, ["good", "bad1", "lookup"], {"name": "ucb", "beta": 1.0})


def test_ray_serve_openai_app(tiny_zoo, chat_target, reference, local_ray):
    import openai
    from ray import serve

    from vllm_metasd.ray_serve import build_metasd_app

    texts, chat_text = reference
    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        app = build_metasd_app(chat_target, _cfg(tiny_zoo), model_id="tiny",
                               engine_kwargs={"max_model_len": 512, "max_num_seqs": 8,
                                              "seed": 0})
        serve.run(app, name="metasd", route_prefix="/")
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none",
                               max_retries=0, timeout=300)
        assert [m.id for m in client.models.list().data] == ["tiny"]
        extra = {"ignore_eos": True}
        out = client.completions.create(model="tiny", prompt=PROMPTS, max_tokens=MAX_TOKENS,
                                        temperature=0, extra_body=extra)
        assert [c.text for c in sorted(out.choices, key=lambda c: c.index)] == texts
        stream = client.completions.create(model="tiny", prompt=PROMPTS[0], stream=True,
                                           max_tokens=MAX_TOKENS, temperature=0,
                                           extra_body=extra)
        assert "".join(chunk.choices[0].text for chunk in stream) == texts[0]
        chat = client.chat.completions.create(model="tiny", messages=CHAT,
                                              max_tokens=MAX_TOKENS, temperature=0,
                                              extra_body=extra)
        assert chat.choices[0].message.content == chat_text

        # the replica's MetaSD statistics, through a deployment handle
        name = next(d for d in serve.status().applications["metasd"].deployments
                    if "Ingress" not in d)
        stats = serve.get_deployment_handle(name, "metasd").metasd_stats.remote().result()
        drafters = stats[0]["drafters"]
        assert set(drafters) == {"good", "bad1", "lookup"}
        good = drafters["good"]
        assert good["drafted"] > 0 and good["accepted"] == good["drafted"]
    finally:
        serve.shutdown()


def test_ray_data_batch_job(tiny_zoo, reference, local_ray):
    from vllm_metasd.ray_data import build_metasd_processor

    texts, _ = reference
    ds = local_ray.data.from_items(
        [{"id": i, "prompt": p} for i, p in enumerate(PROMPTS)])
    processor = build_metasd_processor(
        tiny_zoo["target"], _cfg(tiny_zoo), batch_size=8,
        sampling_params={"max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True},
        engine_kwargs={"max_model_len": 512, "max_num_seqs": 8, "seed": 0})
    rows = sorted(processor(ds).take_all(), key=lambda r: r["id"])
    assert [r["prompt"] for r in rows] == PROMPTS
    assert [r["generated_text"] for r in rows] == texts
    assert all(r["num_generated_tokens"] == MAX_TOKENS for r in rows)
    assert not {"sampling_params", "params"} & set(rows[0])


def test_readme_ray_serve_and_ray_data_commands(tmp_path):
    """The README's Ray Serve command (its curl request) and Ray Data command, run from
    the repository root on the bundled zoo; changed only: a free port, and 4 prompts of
    16 tokens written to a temporary file."""
    import json
    import os
    import signal
    import subprocess
    import time

    from test_quickstart import REPO, _env, die_with_parent, readme_block, shell_commands

    if not (REPO / "vllm_metasd/zoo/models/target/model.safetensors").exists():
        pytest.skip("bundled zoo not present")
    serve_cmd, curl = shell_commands(readme_block("bash", "python -m vllm_metasd.ray_serve"))
    port = _free_port()
    serve_cmd = serve_cmd.replace("--port 8000", f"--port {port}")
    curl = curl.replace("localhost:8000", f"localhost:{port}")
    assert str(port) in serve_cmd and str(port) in curl
    log_path = tmp_path / "ray_serve.log"
    with open(log_path, "w") as log:
        # bash -c runs a single command in its own process: SIGTERM reaches Python
        proc = subprocess.Popen(["bash", "-c", serve_cmd], cwd=REPO, env=_env(), stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True,
                                preexec_fn=die_with_parent)
        try:
            deadline = time.monotonic() + 600
            while True:  # /v1/models answers before the engine is up: ask for a completion
                out = subprocess.run(curl, shell=True, capture_output=True, text=True,
                                     timeout=300)
                try:
                    resp = json.loads(out.stdout)
                except ValueError:
                    resp = {}
                if resp.get("choices"):
                    break
                assert proc.poll() is None and time.monotonic() < deadline, \
                    log_path.read_text()[-3000:]
                time.sleep(3)
            assert resp["choices"][0]["message"]["content"]
            assert resp["usage"]["completion_tokens"] == 32
        finally:
            proc.send_signal(signal.SIGTERM)  # the app and Ray shut down cleanly
            try:
                proc.wait(timeout=90)
            except subprocess.TimeoutExpired:
                pass
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    assert proc.returncode == 0, log_path.read_text()[-3000:]

    (data_cmd,) = shell_commands(readme_block("bash", "python -m vllm_metasd.ray_data"))
    output = tmp_path / "out.jsonl"
    for old, new in (("--output /tmp/metasd_out.jsonl", f"--output {output}"),
                     ("--num-prompts 32", "--num-prompts 4"), ("--max-tokens 64", "--max-tokens 16")):
        assert old in data_cmd
        data_cmd = data_cmd.replace(old, new)
    proc = subprocess.run(["bash", "-c", data_cmd], cwd=REPO, env=_env(), capture_output=True,
                          text=True, timeout=900, start_new_session=True,
                          preexec_fn=die_with_parent)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    rows = [json.loads(line) for line in output.read_text().splitlines()]
    mixed = [json.loads(line) for line in
             (REPO / "vllm_metasd/zoo/prompts/mixed.jsonl").read_text().splitlines()][:4]
    assert [(r["domain"], r["prompt"]) for r in rows] == [(m["domain"], m["prompt"]) for m in mixed]
    assert all(r["generated_text"] and r["num_generated_tokens"] == 16 for r in rows)
    assert "4 rows, 64 generated tokens" in proc.stdout


def test_configs_on_cpu(tiny_zoo, monkeypatch, tmp_path):
    """What the helpers hand to Ray (no engine): MetaSD inline with absolute drafter
    paths, CPU resources, forwarded VLLM_* variables, no core binding for several
    Ray Data engines."""
    import json
    import os
    from pathlib import Path

    from vllm_metasd.ray_data import metasd_processor_config
    from vllm_metasd.ray_serve import MetaSDLLMServer, metasd_llm_config

    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
    monkeypatch.delenv("VLLM_CPU_OMP_THREADS_BIND", raising=False)
    cfg_file = tmp_path / "metasd.json"
    cfg = _cfg(tiny_zoo)
    cfg["drafters"][0]["path"] = os.path.relpath(tiny_zoo["good"], tmp_path)  # to the file
    cfg_file.write_text(json.dumps(cfg))

    llm_config = metasd_llm_config(tiny_zoo["target"], str(cfg_file), model_id="tiny",
                                   engine_kwargs={"max_model_len": 512})
    spec = llm_config.engine_kwargs["speculative_config"]
    assert spec["method"] == "metasd"
    assert spec["config"]["drafters"][0]["path"] == str(Path(tiny_zoo["good"]).resolve())
    assert llm_config.engine_kwargs["enforce_eager"] is True
    assert llm_config.accelerator_config.kind == "cpu"
    assert llm_config.deployment_config["ray_actor_options"] == {"num_cpus": 0}
    assert llm_config.runtime_env["env_vars"]["VLLM_CPU_KVCACHE_SPACE"] == "1"
    assert llm_config.server_cls is MetaSDLLMServer

    cfg = _cfg(tiny_zoo)
    one = metasd_processor_config(tiny_zoo["target"], cfg, concurrency=1)
    assert [b["CPU"] for b in one.placement_group_config["bundles"]] == [1]
    assert not any(b.get("GPU") for b in one.placement_group_config["bundles"])
    assert "VLLM_CPU_OMP_THREADS_BIND" not in one.runtime_env["env_vars"]
    two = metasd_processor_config(tiny_zoo["target"], cfg, concurrency=2,
                                  engine_kwargs={"tensor_parallel_size": 1})
    assert two.runtime_env["env_vars"]["VLLM_CPU_OMP_THREADS_BIND"] == "nobind"
    assert int(two.runtime_env["env_vars"]["OMP_NUM_THREADS"]) >= 1
    assert two.engine_kwargs["speculative_config"]["config"]["num_speculative_tokens"] == 3
