"""From a clone to a served MetaSD model, as the README says: the shipped metasd.json,
the README's `LLM(...)`, `vllm serve`, curl and openai examples run as written from the
repository root (extracted from README.md, so the two cannot drift), a bad metasd.json
ends `vllm serve` with one line, and chat completions on the zoo's target (its shipped
chat template) are identical with and without MetaSD. Real servers on the bundled zoo."""
import contextlib
import io
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from test_server import _free_port

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()
ZOO_TARGET = "vllm_metasd/zoo/models/target"

pytestmark = pytest.mark.skipif(
    not (REPO / ZOO_TARGET / "model.safetensors").exists(), reason="bundled zoo not present")


def readme_block(lang: str, containing: str) -> str:
    """The one fenced ``lang`` block of README.md containing ``containing``."""
    blocks = [b for b in re.findall(rf"^```{lang}\n(.*?)^```", README, re.S | re.M)
              if containing in b]
    assert len(blocks) == 1, f"{len(blocks)} ```{lang} blocks contain {containing!r}"
    return blocks[0]


def shell_commands(block: str) -> list[str]:
    """A bash block's commands, backslash continuations joined."""
    return [c.strip() for c in block.replace("\\\n", " ").splitlines() if c.strip()]


def _env(**extra) -> dict:
    # the `vllm` script lives next to this Python
    path = os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")
    return {**os.environ, "PATH": path, **extra}


def die_with_parent():
    """Popen preexec_fn: the child gets SIGTERM when the test process dies (a killed
    or timed-out pytest leaves no server behind; vLLM then stops its engine too)."""
    import ctypes

    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


@contextlib.contextmanager
def running_server(cmd, log_path: Path, port: int, *, shell=False, cwd=REPO, timeout=600):
    """Start a server (its own process group), wait until it answers, yield an openai
    client; kill the whole group afterwards."""
    import openai

    log = open(log_path, "w")
    proc = subprocess.Popen(cmd, shell=shell, cwd=cwd, env=_env(), stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True,
                            preexec_fn=die_with_parent)

    def kill_group(sig):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)

    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none",
                               max_retries=0, timeout=300)
        deadline = time.monotonic() + timeout
        while True:
            try:
                client.models.list()
                break
            except openai.APIConnectionError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(log_path.read_text()[-3000:])
                time.sleep(1)
        yield client
    finally:
        kill_group(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
        kill_group(signal.SIGKILL)
        log.close()


def _metasd_chosen(port: int) -> float:
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=30).text
    return sum(s.value for fam in text_string_to_metric_families(text) for s in fam.samples
               if s.name == "metasd_drafter_chosen_total")


# ---- 1. the shipped metasd.json and the README's examples -------------------------------

def test_readme_config_is_the_shipped_metasd_json_and_valid_from_the_repo_root():
    from vllm_metasd import zoo
    from vllm_metasd.config import load_config

    shipped = json.loads((REPO / "metasd.json").read_text())
    assert json.loads(readme_block("json", '"drafters"')) == shipped
    cfg = load_config(str(REPO / "metasd.json"))  # paths resolve against its directory
    assert all(Path(d.path).is_dir() for d in cfg.drafters if d.kind == "draft_model")
    assert cfg == load_config(zoo.default_metasd_config())
    # the same file from another working directory (it is relative to itself)
    cwd = os.getcwd()
    try:
        os.chdir("/")
        assert load_config(str(REPO / "metasd.json")) == cfg
    finally:
        os.chdir(cwd)
    # every config the README passes names that file, relative to the repo root
    assert (REPO / "vllm_metasd/zoo/models/target/chat_template.jinja").read_text() == \
        zoo.CHAT_TEMPLATE


def test_readme_llm_example_runs_from_the_repo_root():
    code = readme_block("python", "LLM(model=")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=_env(),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    printed = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    assert printed, proc.stdout[-3000:]
    for name in ("code", "general", "lookup"):
        assert repr(name) in printed[-1]  # the per-drafter statistics dict


def test_readme_serve_curl_and_openai_examples_as_written(tmp_path):
    serve, curl = shell_commands(readme_block("bash", "vllm serve vllm_metasd/zoo"))
    assert "vllm serve" in serve and curl.startswith("curl")
    port = _free_port()  # the only change: a free port instead of 8000
    serve = serve.replace("--port 8000", f"--port {port}")
    curl = curl.replace("localhost:8000", f"localhost:{port}")
    assert str(port) in serve and str(port) in curl
    with running_server(serve, tmp_path / "serve.log", port, shell=True):
        if shutil.which("curl"):
            out = subprocess.run(curl, shell=True, capture_output=True, text=True, timeout=300)
            assert out.returncode == 0, out.stderr
            resp = json.loads(out.stdout)
        else:  # the curl command's URL and JSON body, sent by httpx
            import httpx

            args = shlex.split(curl)
            url = next(a for a in args if "localhost:" in a)
            body = json.loads(args[args.index("-d") + 1])
            resp = httpx.post(f"http://{url}", json=body, timeout=300).json()
        assert resp["usage"]["completion_tokens"] == 32 and resp["choices"][0]["text"]

        code = readme_block("python", "chat.completions.create").replace(
            "localhost:8000", f"localhost:{port}")
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            exec(compile(code, "README.md", "exec"), {})
        assert printed.getvalue().strip()
        assert _metasd_chosen(port) > 0  # MetaSD chose drafters for those requests
    log = (tmp_path / "serve.log").read_text()
    assert "MetaSD: 7 drafters" in log, log[-3000:]


# ---- 2. a bad metasd.json: one line, no traceback ---------------------------------------

def _bad_serve(spec: str, cli: str = "module", **env):
    target = str(REPO / ZOO_TARGET)
    args = ["serve", target, "--enforce-eager", "--port", str(_free_port()),
            "--speculative-config", spec]
    cmd = ([sys.executable, "-m", "vllm.entrypoints.cli.main", *args] if cli == "module"
           else ["vllm", *args])
    return subprocess.run(cmd, capture_output=True, text=True, timeout=180, cwd=REPO,
                          env=_env(VLLM_LOGGING_LEVEL="WARNING", **env))


@pytest.mark.parametrize("case", ["missing-drafter-file", "several-problems-script",
                                  "inline-json-target-device-cpu"])
def test_bad_config_ends_vllm_serve_with_one_clean_line(tmp_path, case):
    bad = tmp_path / "metasd.json"
    if case == "missing-drafter-file":
        bad.write_text(json.dumps({"num_speculative_tokens": 4, "drafters": [
            {"name": "code", "kind": "draft_model", "path": "zoo/drafter-code"}]}))
        proc = _bad_serve(str(bad))
        expected = (f"MetaSD config error: drafters[0].path: '{tmp_path}/zoo/drafter-code' "
                    "does not exist; point it at the drafter's model directory (relative "
                    f"paths resolve against '{tmp_path}')")
    elif case == "several-problems-script":  # the `vllm` console script
        bad.write_text(json.dumps({"num_speculative_tokens": 0, "polcy": {}, "drafters": [
            {"name": "lookup", "kind": "ngram"}]}))
        proc = _bad_serve(str(bad), cli="script")
        expected = "MetaSD config error: "
    else:  # VLLM_TARGET_DEVICE=cpu skips platform plugins: the general plugin's hook
        spec = json.dumps({"method": "metasd", "config": {
            "num_speculative_tokens": 4, "policy": {"name": "thompson"},
            "drafters": [{"name": "code", "kind": "draft_model",
                          "path": str(REPO / "vllm_metasd/zoo/models/drafter-code")}]}})
        proc = _bad_serve(spec, VLLM_TARGET_DEVICE="cpu")
        expected = "MetaSD config error: policy.name: unknown policy 'thompson'; use one of"
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out[-3000:]
    assert "Traceback" not in out, out[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(expected), last
    assert "MetaSDConfigError" not in out and out.count("MetaSD config error") == 1
    if case == "several-problems-script":  # every problem, on the same line
        assert "num_speculative_tokens: input should be greater than or equal to 1, got 0" \
            in last and "polcy: unknown key" in last


def test_llm_callers_still_get_the_exception_object(tiny_zoo):
    from vllm import LLM

    from vllm_metasd.config import MetaSDConfigError

    with pytest.raises(MetaSDConfigError, match=r"drafters\[0\]\.path: .* does not exist"):
        LLM(model=tiny_zoo["target"], enforce_eager=True, speculative_config={
            "method": "metasd", "config": {"num_speculative_tokens": 3, "drafters": [
                {"name": "x", "kind": "draft_model", "path": "/nonexistent/drafter"}]}})
    assert not getattr(sys.excepthook, "_metasd", False)  # not the vllm CLI process


def test_cli_excepthook_prints_one_line_only_for_metasd_errors(capsys, monkeypatch):
    from vllm_metasd.config import MetaSDConfigError
    from vllm_metasd.patches import cli

    assert cli.is_vllm_cli(["/usr/bin/vllm", "serve"])
    assert cli.is_vllm_cli(["/x/site-packages/vllm/entrypoints/cli/main.py", "serve"])
    assert not cli.is_vllm_cli(["/x/bin/pytest"]) and not cli.is_vllm_cli([])
    monkeypatch.setattr(sys, "argv", ["/usr/bin/vllm", "serve"])
    monkeypatch.setattr(sys, "excepthook", sys.__excepthook__)
    cli.install_excepthook()
    cli.install_excepthook()  # idempotent
    try:
        raise MetaSDConfigError("k: bad; fix it")
    except MetaSDConfigError as e:
        sys.excepthook(type(e), e, e.__traceback__)
    assert capsys.readouterr().err == "MetaSD config error: k: bad; fix it\n"
    try:
        raise KeyError("other")
    except KeyError as e:
        sys.excepthook(type(e), e, e.__traceback__)
    assert "Traceback" in capsys.readouterr().err  # anything else: the usual traceback


# ---- 3. chat on the zoo's target, MetaSD vs plain serve ---------------------------------

@pytest.fixture(scope="module")
def chat_servers(tmp_path_factory):
    """The zoo target served plain and with the shipped metasd.json (float32, so greedy
    outputs are exactly equal; in bf16 the verified batch's shape can flip near-ties),
    neither given a chat template: the target's own is used."""
    tmp = tmp_path_factory.mktemp("chat")
    ports = _free_port(), _free_port()
    common = ["serve", ZOO_TARGET, "--enforce-eager", "--dtype", "float32",
              "--max-model-len", "512", "--max-num-seqs", "4", "--host", "127.0.0.1"]
    cli = [sys.executable, "-m", "vllm.entrypoints.cli.main"]
    with contextlib.ExitStack() as stack:
        # started one after the other: two engines starting at once on 2 cores is slower
        plain = stack.enter_context(running_server(
            [*cli, *common, "--port", str(ports[0])], tmp / "plain.log", ports[0]))
        metasd = stack.enter_context(running_server(
            [*cli, *common, "--port", str(ports[1]), "--speculative-config", "metasd.json"],
            tmp / "metasd.log", ports[1]))
        yield plain, metasd, ports[1]


CHATS = [
    [{"role": "user", "content": "def add(a, b):"}],
    [{"role": "system", "content": "You write SQL."},
     {"role": "user", "content": "SELECT name, price FROM products WHERE"}],
    [{"role": "user", "content": "Tom has 3 apples and buys 4 more. How many apples?"},
     {"role": "assistant", "content": "Tom has 3 + 4 = 7 apples."},
     {"role": "user", "content": "Der Hund läuft"}],
]


def test_chat_completions_metasd_identical_to_plain_serve(chat_servers):
    plain, metasd, port = chat_servers
    extra = {"ignore_eos": True}
    first = None
    for messages in CHATS:
        outs = [c.chat.completions.create(model=ZOO_TARGET, messages=messages, max_tokens=48,
                                          temperature=0, extra_body=extra)
                for c in (plain, metasd)]
        texts = [o.choices[0].message.content for o in outs]
        assert texts[0] and texts[0] == texts[1], messages
        assert outs[0].usage == outs[1].usage and outs[1].usage.completion_tokens == 48
        first = first or texts[1]
    stream = metasd.chat.completions.create(model=ZOO_TARGET, messages=CHATS[0],
                                            max_tokens=48, temperature=0, stream=True,
                                            extra_body=extra)
    assert "".join(c.choices[0].delta.content or "" for c in stream) == first
    assert _metasd_chosen(port) > 0
