#!/usr/bin/env python3
"""Checks a running `baton serve` with the official `openai` Python client (PyPI).

Usage: .venv/bin/python tests/openai_client.py --base-url http://127.0.0.1:PORT/v1

Prints one line per check; exits 1 with a message naming the failed check.
"""

import argparse
import asyncio
import sys
import time

import openai

MODEL = "smollm2"
CHAT = [{"role": "user", "content": "What is the capital of France?"}]


class CheckFailed(Exception):
    pass


def expect(cond, message):
    if not cond:
        raise CheckFailed(message)


def collect_chat_stream(chunks):
    """Joins a chat stream's deltas; returns (text, finish_reason, chunk list)."""
    text, finish, seen = [], None, []
    for chunk in chunks:
        seen.append(chunk)
        expect(chunk.object == "chat.completion.chunk", f"chunk object is {chunk.object!r}")
        expect(chunk.model == MODEL, f"chunk model is {chunk.model!r}")
        for choice in chunk.choices:
            if choice.delta.content:
                text.append(choice.delta.content)
            if choice.finish_reason is not None:
                finish = choice.finish_reason
    return "".join(text), finish, seen


def check_models(client):
    ids = [m.id for m in client.models.list()]
    expect(MODEL in ids, f"models.list() is {ids}, without {MODEL!r}")
    return f"ids={ids}"


def check_sync_stream(client):
    stream = client.chat.completions.create(
        model=MODEL, messages=CHAT, max_tokens=32, temperature=0, stream=True
    )
    text, finish, chunks = collect_chat_stream(stream)
    expect(text.strip(), "streamed text is empty")
    expect(finish in ("stop", "length"), f"finish_reason is {finish!r}")
    expect(len({c.id for c in chunks}) == 1, "chunks carry different ids")
    first = chunks[0].choices[0].delta
    expect(first.role == "assistant", f"first delta role is {first.role!r}")
    return f"{len(chunks)} chunks, finish={finish}, text={text!r}"


async def check_async_stream(base_url, api_key, n=4):
    prompts = [
        "What is the capital of France?",
        "Name a colour.",
        "Say hello.",
        "What is 2 + 2?",
    ]

    async with openai.AsyncOpenAI(base_url=base_url, api_key=api_key, max_retries=0,
                                  timeout=120) as client:

        async def one(i):
            stream = await client.chat.completions.create(
                model=MODEL,
                messages=[{"role": "user", "content": prompts[i % len(prompts)]}],
                max_tokens=24,
                temperature=0,
                stream=True,
            )
            text, finish = [], None
            async for chunk in stream:
                for choice in chunk.choices:
                    if choice.delta.content:
                        text.append(choice.delta.content)
                    if choice.finish_reason is not None:
                        finish = choice.finish_reason
            return "".join(text), finish

        start = time.monotonic()
        results = await asyncio.gather(*(one(i) for i in range(n)))
        elapsed = time.monotonic() - start
    for i, (text, finish) in enumerate(results):
        expect(text.strip(), f"async stream {i} has empty text")
        expect(finish in ("stop", "length"), f"async stream {i} finish_reason is {finish!r}")
    return f"{n} concurrent streams in {elapsed:.1f}s, finish={[f for _, f in results]}"


def check_completions(client):
    max_tokens = 8
    r = client.completions.create(
        model=MODEL,
        prompt="The capital of France is",
        max_tokens=max_tokens,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    expect(r.object == "text_completion", f"object is {r.object!r}")
    expect(len(r.choices) == 1, f"{len(r.choices)} choices")
    text = r.choices[0].text
    expect(text.strip(), "completion text is empty")
    expect(r.choices[0].finish_reason == "length",
           f"finish_reason is {r.choices[0].finish_reason!r} with ignore_eos")
    u = r.usage
    expect(u is not None, "no usage")
    expect(u.prompt_tokens > 0, f"prompt_tokens is {u.prompt_tokens}")
    expect(u.completion_tokens == max_tokens,
           f"completion_tokens is {u.completion_tokens}, want {max_tokens}")
    expect(u.total_tokens == u.prompt_tokens + u.completion_tokens,
           f"total_tokens {u.total_tokens} != {u.prompt_tokens} + {u.completion_tokens}")
    return f"usage={u.prompt_tokens}+{u.completion_tokens}, text={text!r}"


def check_include_usage(client):
    max_tokens = 16
    stream = client.chat.completions.create(
        model=MODEL,
        messages=CHAT,
        max_tokens=max_tokens,
        temperature=0,
        stream=True,
        logprobs=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    text, finish, chunks = collect_chat_stream(stream)
    last = chunks[-1]
    expect(last.usage is not None, "last chunk has no usage")
    expect(last.choices == [], f"last chunk has choices {last.choices}")
    expect(all(c.usage is None for c in chunks[:-1]), "usage on a chunk before the last")
    # One logprobs entry per streamed token: counts the tokens even where a chunk carries
    # several (text held back across a multi-byte character).
    streamed = sum(
        len(ch.logprobs.content or [])
        for c in chunks
        for ch in c.choices
        if ch.logprobs is not None
    )
    u = last.usage
    expect(streamed == max_tokens, f"{streamed} tokens streamed, want {max_tokens}")
    expect(u.completion_tokens == streamed,
           f"usage.completion_tokens {u.completion_tokens} != {streamed} streamed tokens")
    expect(u.total_tokens == u.prompt_tokens + u.completion_tokens, "total_tokens mismatch")
    expect(finish == "length", f"finish_reason is {finish!r} with ignore_eos")
    return f"usage={u.prompt_tokens}+{u.completion_tokens}, {streamed} tokens streamed"


def check_errors(client):
    try:
        client.chat.completions.create(model="no-such-model", messages=CHAT, max_tokens=1)
    except openai.NotFoundError as e:
        expect(e.status_code == 404, f"unknown model: status {e.status_code}")
    else:
        raise CheckFailed("unknown model: no openai.NotFoundError")
    try:
        client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=1,
                                       temperature=-1)
    except openai.BadRequestError as e:
        expect(e.status_code == 400, f"temperature -1: status {e.status_code}")
        expect("temperature" in str(e), f"temperature -1: message does not name it: {e}")
    else:
        raise CheckFailed("temperature -1: no openai.BadRequestError")
    return "unknown model -> NotFoundError, temperature -1 -> BadRequestError"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-url", required=True, help="e.g. http://127.0.0.1:8000/v1")
    parser.add_argument("--api-key", default="not-needed")
    args = parser.parse_args()

    client = openai.OpenAI(base_url=args.base_url, api_key=args.api_key, max_retries=0,
                           timeout=120)
    checks = [
        ("models.list", lambda: check_models(client)),
        ("sync streaming chat", lambda: check_sync_stream(client)),
        ("async streaming chat x4",
         lambda: asyncio.run(check_async_stream(args.base_url, args.api_key))),
        ("completions", lambda: check_completions(client)),
        ("stream include_usage", lambda: check_include_usage(client)),
        ("errors", lambda: check_errors(client)),
    ]
    print(f"openai {openai.__version__} against {args.base_url}")
    for name, check in checks:
        try:
            detail = check()
        except CheckFailed as e:
            print(f"FAIL {name}: {e}")
            sys.exit(1)
        except Exception as e:  # a client error where none was expected
            print(f"FAIL {name}: {type(e).__name__}: {e}")
            sys.exit(1)
        print(f"ok   {name}: {detail}")
    print(f"all {len(checks)} checks passed")


if __name__ == "__main__":
    main()
