"""A real local OpenAI-compatible chat server for the label tests: Flask serving
`POST /v1/chat/completions` with a small local language model (a randomly initialised GPT-2
from transformers over UTF-8 bytes, greedy decoding), so `spdkit label --endpoint` is tested
over HTTP against the protocol, not against a mock of its client. Label quality is not what it
is for. `fail_first` answers the first requests with 503 (the client must retry)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from flask import Flask, jsonify, request
from werkzeug.serving import make_server


def small_model() -> torch.nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=256, n_positions=1024, n_embd=32, n_layer=2, n_head=2)
    return GPT2LMHeadModel(config).eval()


def chat_app(model: torch.nn.Module, log: list[dict], fail_first: int = 0) -> Flask:
    app = Flask("chat")

    @app.post("/v1/chat/completions")
    def completions():  # noqa: ANN202
        body = request.get_json()
        log.append(body)
        if len(log) <= fail_first:
            return jsonify({"error": "warming up"}), 503
        prompt = "\n".join(m["content"] for m in body["messages"]).encode()[-800:]
        ids = torch.tensor([list(prompt)])
        with torch.no_grad():
            out = model.generate(
                ids, max_new_tokens=min(int(body.get("max_tokens", 16)), 16), do_sample=False,
                pad_token_id=0,
            )  # fmt: skip
        text = bytes(out[0, ids.shape[1] :].tolist()).decode("utf-8", "replace")
        return jsonify(
            {
                "id": f"chat-{len(log)}",
                "object": "chat.completion",
                "model": body["model"],
                "choices": [
                    {"index": 0, "message": {"role": "assistant", "content": text},
                     "finish_reason": "length"}
                ],
            }
        )  # fmt: skip

    return app


@contextmanager
def serve_chat(fail_first: int = 0) -> Iterator[tuple[str, list[dict]]]:
    """(base URL …/v1, the request bodies received) of a server running in a thread."""
    log: list[dict] = []
    server = make_server("127.0.0.1", 0, chat_app(small_model(), log, fail_first), threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}/v1", log
    finally:
        server.shutdown()
        thread.join()
