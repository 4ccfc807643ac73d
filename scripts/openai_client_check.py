#!/usr/bin/env python3
"""The official `openai` Python client against `llmtune api`.

Starts `llmtune api` on a free loopback port (default model smollm2-135m; any
--model_name_or_path works), then with `openai.OpenAI`:
  * lists the models,
  * gets a non-streamed chat completion (greedy) and checks content, usage, finish_reason,
  * gets the same completion streamed and checks the chunks add up to the same text, that a
    finish_reason and the usage arrive, and that the stream ends cleanly,
  * checks that bad requests and a wrong key raise the client's typed errors.

    python3 -m venv /work/venv-openai && /work/venv-openai/bin/pip install openai httpx
    LLMTUNE_HOME=/tmp/llmtune-home /work/venv-openai/bin/python scripts/openai_client_check.py
"""

import argparse
import sys
import time

import openai

sys.path.insert(0, __import__("os").path.dirname(__file__))
from serve_util import Server  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model_name_or_path", default="smollm2-135m")
    ap.add_argument("--max_tokens", type=int, default=48)
    ap.add_argument("--question", default="What is the capital of France? Answer in one sentence.")
    a = ap.parse_args()

    key = "sk-llmtune-check"
    with Server(["--model_name_or_path", a.model_name_or_path, "--api_key", key, "--model_id", "llmtune-test"]) as srv:
        print(f"server: {srv.bin} at {srv.base} (pid {srv.pid})")
        client = openai.OpenAI(base_url=srv.base + "/v1", api_key=key)
        print(f"openai client {openai.__version__}")

        models = client.models.list()
        ids = [m.id for m in models.data]
        assert ids == ["llmtune-test"], ids
        print(f"models.list: {ids}")

        messages = [
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": a.question},
        ]
        t0 = time.time()
        r = client.chat.completions.create(
            model="llmtune-test", messages=messages, temperature=0, max_tokens=a.max_tokens
        )
        dt = time.time() - t0
        c = r.choices[0]
        text = c.message.content
        print(f"non-streamed ({dt:.2f} s): finish_reason={c.finish_reason} usage={r.usage.model_dump()}")
        print(f"  content: {text!r}")
        assert r.object == "chat.completion" and r.id.startswith("chatcmpl-"), r
        assert c.message.role == "assistant"
        assert text and text.strip(), "empty content"
        assert c.finish_reason in ("stop", "length"), c.finish_reason
        u = r.usage
        assert u.prompt_tokens > 10, u
        assert 0 < u.completion_tokens <= a.max_tokens, u
        assert u.total_tokens == u.prompt_tokens + u.completion_tokens, u
        if c.finish_reason == "length":
            assert u.completion_tokens == a.max_tokens, u

        t0 = time.time()
        stream = client.chat.completions.create(
            model="llmtune-test",
            messages=messages,
            temperature=0,
            max_tokens=a.max_tokens,
            stream=True,
            stream_options={"include_usage": True},
        )
        pieces, finish, usage, first_at, n_chunks = [], None, None, None, 0
        for chunk in stream:
            n_chunks += 1
            assert chunk.object == "chat.completion.chunk", chunk
            if chunk.usage is not None:
                usage = chunk.usage
            for ch in chunk.choices:
                if ch.delta.content:
                    if first_at is None:
                        first_at = time.time() - t0
                    pieces.append(ch.delta.content)
                if ch.finish_reason:
                    finish = ch.finish_reason
        dt = time.time() - t0
        streamed = "".join(pieces)
        print(
            f"streamed ({dt:.2f} s, first content after {first_at:.2f} s, {n_chunks} chunks, "
            f"{len(pieces)} with content): finish_reason={finish} usage={usage.model_dump() if usage else None}"
        )
        print(f"  content: {streamed!r}")
        assert len(pieces) > 1, "the reply was not streamed in pieces"
        assert streamed == text, "streamed text differs from the non-streamed (greedy) text"
        assert finish == c.finish_reason, finish
        assert usage is not None and usage.model_dump() == u.model_dump(), usage

        try:
            client.chat.completions.create(model="llmtune-test", messages=messages, temperature=7)
            raise AssertionError("temperature 7 was accepted")
        except openai.BadRequestError as e:
            assert e.status_code == 400 and "temperature" in str(e), e
            print(f"bad request -> openai.BadRequestError {e.status_code}: {e.body['message']}")
        try:
            openai.OpenAI(base_url=srv.base + "/v1", api_key="sk-wrong").models.list()
            raise AssertionError("a wrong key was accepted")
        except openai.AuthenticationError as e:
            assert e.status_code == 401, e
            print(f"wrong key -> openai.AuthenticationError {e.status_code}")
        try:
            client.chat.completions.create(model="gpt-4o", messages=messages)
            raise AssertionError("an unknown model was accepted")
        except openai.NotFoundError as e:
            print(f"unknown model -> openai.NotFoundError {e.status_code}")
    print("openai client check: OK")


if __name__ == "__main__":
    main()
