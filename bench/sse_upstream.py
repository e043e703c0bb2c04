"""A stand-in for an LLM API for `bench/metered-stream.sh`: every POST is answered with
the same OpenAI-style stream, CHUNKS content chunks and the final usage chunk, written
at once (so the upstream's own cost per answer stays small).

    python3 bench/sse_upstream.py PORT CHUNKS
"""

import http.server
import json
import sys


def stream(chunks: int) -> bytes:
    events = []
    for n in range(chunks):
        chunk = {
            "id": "chatcmpl-bench",
            "object": "chat.completion.chunk",
            "created": 1733300000,
            "model": "gpt-4o-mini",
            "system_fingerprint": "fp_bench",
            "choices": [
                {"index": 0, "delta": {"content": f" word{n}"}, "logprobs": None, "finish_reason": None}
            ],
        }
        events.append(f"data: {json.dumps(chunk)}\n\n")
    final = {
        "id": "chatcmpl-bench",
        "object": "chat.completion.chunk",
        "created": 1733300000,
        "model": "gpt-4o-mini",
        "choices": [],
        "usage": {"prompt_tokens": 20, "completion_tokens": chunks, "total_tokens": 20 + chunks},
    }
    events.append(f"data: {json.dumps(final)}\n\n")
    events.append("data: [DONE]\n\n")
    return "".join(events).encode()


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    body = b""

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("content-length", "0")))
        self.send_response(200)
        self.send_header("content-type", "text/event-stream")
        self.send_header("content-length", str(len(self.body)))
        self.end_headers()
        try:
            self.wfile.write(self.body)
        except (BrokenPipeError, ConnectionResetError):
            pass  # wrk closes its connections at the end of a run

    def log_message(self, *args: object) -> None:
        pass


if __name__ == "__main__":
    Handler.body = stream(int(sys.argv[2]))
    http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Handler).serve_forever()
