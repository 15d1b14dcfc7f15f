"""The serving benchmark's pass-through proxy (benchmarks/relay_floor.py), started as the benchmark starts it, in
front of the session's real vLLM server: what a client gets through it is what vLLM answers."""

import sys
from pathlib import Path

from serve_helpers import TINY_MODEL_NAME, free_port, http, sse_events

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import serving as bench  # noqa: E402


def _texts(events: list) -> list[str]:
    return [e["choices"][0]["text"] for e in events if e != "[DONE]" and e.get("choices")]


def test_the_relay_passes_answers_streams_and_refusals_unchanged(tiny_vllm):
    base, _ = tiny_vllm
    body = {"model": TINY_MODEL_NAME, "prompt": "The river", "max_tokens": 8, "temperature": 0.0, "ignore_eos": True}
    with bench.relay_process(base, free_port()) as (url, pid):
        assert pid > 0
        direct, relayed = http(base + "/v1/completions", body), http(url + "/v1/completions", body)
        assert relayed[0] == direct[0] == 200
        assert relayed[2]["choices"][0]["text"] == direct[2]["choices"][0]["text"]
        assert relayed[2]["usage"] == direct[2]["usage"]

        stream = {**body, "stream": True}
        direct_events = sse_events(http(base + "/v1/completions", stream)[2])
        status, headers, text = http(url + "/v1/completions", stream)
        assert status == 200 and headers["Content-Type"].startswith("text/event-stream")
        relayed_events = sse_events(text)
        assert relayed_events[-1] == "[DONE]" and len(relayed_events) == len(direct_events)
        assert _texts(relayed_events) == _texts(direct_events) and "".join(_texts(relayed_events))

        missing = {**body, "model": "no-such-model"}
        direct_err, relayed_err = http(base + "/v1/completions", missing), http(url + "/v1/completions", missing)
        assert relayed_err[0] == direct_err[0] == 404
        assert relayed_err[2] == direct_err[2]
