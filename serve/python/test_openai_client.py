#!/usr/bin/env python3
"""Checks a running qserve server with the official `openai` Python client.

Usage: python3 serve/python/test_openai_client.py --base-url http://127.0.0.1:8000/v1 --model tiny [--api-key KEY]

Run by serve/tests/openai_python.rs, which starts the server on configs/models/qwen3-tiny-chat with an API key.
Exits non-zero on the first failed check.
"""

import argparse
import concurrent.futures
import re
import sys
import time
import urllib.request

import openai


def metric(base_url, name):
    root = base_url.rsplit("/v1", 1)[0]
    page = urllib.request.urlopen(root + "/metrics", timeout=10).read().decode()
    m = re.search(r"^" + re.escape(name) + r" (\S+)$", page, re.M)
    assert m, f"{name} not in /metrics"
    return float(m.group(1))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--base-url", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--api-key", default="EMPTY")
    args = ap.parse_args()
    client = openai.OpenAI(base_url=args.base_url, api_key=args.api_key, max_retries=0, timeout=60)
    greedy = dict(model=args.model, temperature=0, extra_body={"ignore_eos": True})
    messages = [{"role": "user", "content": "What is the capital of France?"}]

    # Models.
    ids = [m.id for m in client.models.list().data]
    assert ids == [args.model], ids

    # Non-streaming chat, max_tokens.
    r = client.chat.completions.create(messages=messages, max_tokens=10, **greedy)
    assert r.object == "chat.completion"
    assert r.choices[0].finish_reason == "length", r
    assert r.usage.completion_tokens == 10
    assert r.usage.total_tokens == r.usage.prompt_tokens + 10
    text = r.choices[0].message.content
    assert isinstance(text, str)

    # Streaming chat gives the same text, a finish reason and usage.
    stream = client.chat.completions.create(
        messages=messages, max_tokens=10, stream=True, stream_options={"include_usage": True}, **greedy
    )
    parts, finish, usage = [], None, None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            if c.delta.content:
                parts.append(c.delta.content)
            if c.finish_reason:
                finish = c.finish_reason
    assert "".join(parts) == text, ("".join(parts), text)
    assert finish == "length"
    assert usage is not None and usage.completion_tokens == 10

    # Stop strings.
    long = client.chat.completions.create(messages=messages, max_tokens=40, **greedy).choices[0].message.content
    assert len(long) >= 8, long
    mid = len(long) // 2
    stop = long[mid : mid + 2]
    r = client.chat.completions.create(messages=messages, max_tokens=40, stop=[stop], **greedy)
    assert r.choices[0].message.content == long[: long.find(stop)], (r.choices[0].message.content, stop)
    assert r.choices[0].finish_reason == "stop"

    # Completions.
    r = client.completions.create(prompt="The quick brown fox", max_tokens=5, **greedy)
    assert r.object == "text_completion" and r.usage.completion_tokens == 5
    assert r.choices[0].finish_reason == "length"

    # Errors are raised as the client's typed exceptions.
    try:
        client.chat.completions.create(messages=messages, max_tokens=4, model=args.model, temperature=-1)
        raise AssertionError("temperature -1 accepted")
    except openai.BadRequestError as e:
        assert e.status_code == 400 and "temperature" in str(e)
    try:
        client.chat.completions.create(messages=messages, max_tokens=4, model="no-such-model")
        raise AssertionError("unknown model accepted")
    except openai.NotFoundError as e:
        assert e.status_code == 404
    if args.api_key != "EMPTY":
        bad = openai.OpenAI(base_url=args.base_url, api_key="wrong", max_retries=0)
        try:
            bad.models.list()
            raise AssertionError("wrong API key accepted")
        except openai.AuthenticationError as e:
            assert e.status_code == 401

    # 32 concurrent requests agree with the same requests one at a time (greedy).
    def ask(i):
        return client.completions.create(prompt=f"Hello number {i}", max_tokens=3 + i % 5, **greedy).choices[0].text

    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        together = list(pool.map(ask, range(32)))
    alone = [ask(i) for i in range(32)]
    assert together == alone

    # A client that goes away mid-stream frees its KV blocks.
    stream = client.chat.completions.create(messages=messages, max_tokens=3000, stream=True, **greedy)
    for n, _ in enumerate(stream):
        if n == 3:
            break
    assert metric(args.base_url, "qserve_kv_blocks_in_use") > 0
    stream.close()
    deadline = time.time() + 10
    while metric(args.base_url, "qserve_kv_blocks_in_use") != 0:
        assert time.time() < deadline, "KV blocks not freed after the client closed the stream"
        time.sleep(0.02)
    assert metric(args.base_url, "qserve_sequences_aborted_total") >= 1

    print("openai client: all checks passed")


if __name__ == "__main__":
    try:
        main()
    except AssertionError as e:
        print("FAILED:", repr(e), file=sys.stderr)
        raise
