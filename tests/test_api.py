"""The Python API (splitlm.Device, serve, export_plan, choose_plan) and the OpenAI-compatible endpoint on the device,
driven with the official `openai` client and compared with `splitlm generate`."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import splitlm

TEMPLATE = "{% for m in messages %}<{{ m.role }}>{{ m.content }}\n{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}"
"""A chat template for the tiny model (its byte tokenizer has no ChatML markers)."""


@pytest.fixture(scope="module")
def art(artifacts, tmp_path_factory):
    """A copy of the shared tiny export with a chat template beside its head."""
    root = tmp_path_factory.mktemp("api") / "art"
    shutil.copytree(artifacts[1].device_dir.parent, root)
    (root / "device" / "chat_template.jinja").write_text(TEMPLATE)
    return root


@pytest.fixture(scope="module")
def cloud(art):
    server = splitlm.serve(art)
    yield f"127.0.0.1:{server.port}"
    server.stop(grace=None)


def _cli_generate(art, server, prompt, n, chat=False) -> str:
    """What `splitlm generate` prints on stdout."""
    cmd = [sys.executable, "-m", "splitlm.cli", "generate", "--artifacts", str(art), "--server", server, "--prompt", prompt,
           "--max-tokens", str(n)] + (["--chat"] if chat else [])
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_the_readme_example_runs(art):
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    block = re.search(r"<!-- api-example -->\s*```python\n(.*?)```", readme, re.S)
    assert block, "the README has no API example block"
    code = block.group(1).replace('"art"', repr(str(art)))
    assert len(code.strip().splitlines()) <= 12
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip()


def test_device_generates_what_the_cli_does_and_streams_it(art, cloud):
    prompt = "the device asks "
    with splitlm.Device(art, server=cloud) as device:
        result = device.generate(prompt, 12)
        pieces = list(device.stream(prompt, 12))
        assert "".join(pieces) == result.text and len(pieces) > 1
        assert result.extra["bytes_up"] > 0 and result.stop_reason in ("max_tokens", "eos")
        local = splitlm.Device(art).generate(prompt, 12)  # the exported tail in this process
    assert _cli_generate(art, cloud, prompt, 12) == prompt + result.text + "\n"
    assert local.token_ids == result.token_ids


def test_stop_strings_end_the_generation_and_are_left_out(art, cloud):
    with splitlm.Device(art, server=cloud) as device:
        full = device.generate("stop here: ", 24)
        assert full.text
        stop = full.text[len(full.text) // 2:][:3]
        cut = device.generate("stop here: ", 24, stop=["never in the text", stop])
    assert cut.stop_reason == "stop" and cut.text == full.text[:full.text.index(stop)]
    assert len(cut.token_ids) < len(full.token_ids)


def test_chat_messages_use_the_template(art, cloud):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}]
    with splitlm.Device(art, server=cloud) as device:
        ids = device.prompt_ids(messages)
        assert device.tokenizer.decode(ids) == "<system>be brief\n<user>hello\n<assistant>"
        result = device.chat(messages, 8)
        with pytest.raises(splitlm.api.ConfigError, match="message 0 must be"):
            device.chat([{"role": "robot", "content": "x"}])
    assert len(result.token_ids) == 8 or result.stop_reason == "eos"


def test_partition_returns_the_plan():
    from tests.test_partition import MB, synthetic

    result = splitlm.choose_plan(synthetic(), 80 * MB, 1000)
    assert result.plan is not None and result.plan.split_layer == result.chosen.split
    assert splitlm.choose_plan(synthetic(), 5 * MB, 1000).plan is None


# -- the OpenAI-compatible endpoint -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def endpoint(art, cloud):
    from splitlm.openai_server import OpenAIServer

    device = splitlm.Device(art, server=cloud)
    server = OpenAIServer(device, port=0, api_key="sekret").start()
    yield f"http://127.0.0.1:{server.port}/v1"
    server.stop()
    device.close()


@pytest.fixture()
def client(endpoint):
    openai = pytest.importorskip("openai")
    return openai.OpenAI(base_url=endpoint, api_key="sekret", max_retries=0)


def test_openai_chat_completions_equal_generate_chat(client, art, cloud):
    messages = [{"role": "user", "content": "hello there"}]
    whole = client.chat.completions.create(model="tiny-random", messages=messages, temperature=0, max_tokens=10)
    text = whole.choices[0].message.content
    assert whole.choices[0].finish_reason in ("length", "stop") and whole.usage.completion_tokens <= 10
    assert _cli_generate(art, cloud, "hello there", 10, chat=True) == text + "\n"
    chunks = list(client.chat.completions.create(model="tiny-random", messages=messages, temperature=0, max_tokens=10,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_openai_completions_equal_generate(client, art, cloud):
    prompt = "the endpoint answers "
    whole = client.completions.create(model="tiny-random", prompt=prompt, temperature=0, max_tokens=10)
    assert _cli_generate(art, cloud, prompt, 10) == prompt + whole.choices[0].text + "\n"
    streamed = client.completions.create(model="tiny-random", prompt=prompt, temperature=0, max_tokens=10, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == whole.choices[0].text
    models = client.models.list()
    assert [m.id for m in models.data] == ["tiny-random"]


def test_openai_fields_that_are_not_implemented_are_refused(client, endpoint):
    import openai

    messages = [{"role": "user", "content": "x"}]
    for extra, field in ((dict(n=2), "n"), (dict(tools=[{"type": "function", "function": {"name": "f"}}]), "tools"),
                         (dict(presence_penalty=0.5), "presence_penalty"), (dict(logprobs=True), "logprobs"),
                         (dict(temperature=3), "temperature")):
        with pytest.raises(openai.BadRequestError) as info:
            client.chat.completions.create(model="tiny-random", messages=messages, max_tokens=2, **extra)
        assert field in str(info.value)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=endpoint, api_key="wrong", max_retries=0).models.list()
    with pytest.raises(openai.BadRequestError, match="prompt"):
        client.completions.create(model="tiny-random", prompt="x" * 400, max_tokens=2)  # past the plan's 128 positions


def test_the_device_side_of_the_api_imports_no_torch(art, cloud):
    code = ("import sys, splitlm\n"
            f"d = splitlm.Device({str(art)!r}, server={cloud!r})\n"
            "print(len(d.generate('hi', 3).token_ids))\n"
            "assert 'torch' not in sys.modules, 'torch was imported'\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "3"


def test_device_serve_command_answers_on_its_port(art, cloud, tmp_path):
    import json
    import time
    import urllib.request

    port_file = tmp_path / "port"
    proc = subprocess.Popen([sys.executable, "-m", "splitlm.cli", "device-serve", "--artifacts", str(art), "--server", cloud,
                             "--port", "0", "--port-file", str(port_file)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not port_file.exists():
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read() if proc.poll() is not None else "timeout"
            time.sleep(0.1)
        base = f"http://127.0.0.1:{int(port_file.read_text())}"
        assert json.load(urllib.request.urlopen(f"{base}/health", timeout=30)) == {"status": "ok"}
        body = json.dumps({"prompt": "cli ", "max_tokens": 4, "temperature": 0}).encode()
        request = urllib.request.Request(f"{base}/v1/completions", body, {"Content-Type": "application/json"})
        answer = json.load(urllib.request.urlopen(request, timeout=60))
        assert answer["object"] == "text_completion" and answer["usage"]["completion_tokens"] == 4
    finally:
        proc.terminate()
        proc.wait(30)
