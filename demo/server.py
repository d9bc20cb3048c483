"""The demo's local web: the pages research reads, and a Discord-compatible webhook receiver.

    python demo/server.py [--port N] [--publish-every-s 15] [--linger-s 3]

The port is --port, else WATCHKEEPER_DEMO_PORT, else 8765: the one setting the daemon's
alert URL (config/watchkeeper.yaml) and the demo agents (agents/common.py) read too.

GET  /pages/                 the index of published pages: two, then one more every
                             --publish-every-s
GET  /pages/<slug>.html      a page; its "Key facts" list is filled in by JavaScript, so only
                             a real browser (headless Chromium) sees those facts
POST /webhooks/<channel>     a Discord-style webhook (JSON with `content`): answers 204 and
                             appends the post to STATE_DIR/demo/inbox/<channel>.jsonl
GET  /webhooks/<channel>     the posts received on that channel, as a JSON list

It runs as the `demo` agent (config/agents.d/demo.yaml), and standalone too. SIGTERM while
the circuit breaker is open keeps it serving for --linger-s: the breaker stops every run,
this one included, in the same instant it sends its alert here, and the real Discord this
stands in for does not go away when the pipeline halts.
"""

from __future__ import annotations

import argparse
import html
import json
import os
import re
import signal
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

TOPICS = json.loads((Path(__file__).with_name("topics.json")).read_text())
CHANNEL = re.compile(r"^/webhooks/([a-z0-9-]{1,40})$")
PAGE = re.compile(r"^/pages/([a-z0-9-]{1,80})\.html$")
MAX_BODY_BYTES = 64 * 1024


class Site:
    """What the server publishes and receives; shared by the handler threads."""

    def __init__(self, state_dir: Path, publish_every_s: float) -> None:
        self.inbox = state_dir / "demo" / "inbox"
        self.inbox.mkdir(parents=True, exist_ok=True)
        self.publish_every_s = publish_every_s
        self.epoch = self._epoch(state_dir / "demo" / "epoch")
        self.lock = threading.Lock()

    @staticmethod
    def _epoch(path: Path) -> float:
        # The first start of this state dir: a restarted server keeps publishing where it was.
        try:
            return float(path.read_text())
        except (OSError, ValueError):
            now = time.time()
            path.write_text(f"{now}\n")
            return now

    def published(self) -> list[dict]:
        count = 2 + int((time.time() - self.epoch) / self.publish_every_s)
        return TOPICS[:max(1, min(count, len(TOPICS)))]

    def receive(self, channel: str, body: dict) -> dict:
        post = {"received_at": time.time(), "channel": channel,
                "content": body.get("content") or body.get("text") or "", "body": body}
        with self.lock, open(self.inbox / f"{channel}.jsonl", "a") as f:
            f.write(json.dumps(post) + "\n")
        return post

    def posts(self, channel: str) -> list[dict]:
        try:
            lines = (self.inbox / f"{channel}.jsonl").read_text().splitlines()
        except FileNotFoundError:
            return []
        return [json.loads(line) for line in lines if line]


def index_html(topics: list[dict]) -> str:
    items = "".join(f'<li><a href="/pages/{t["slug"]}.html">{html.escape(t["title"])}</a></li>'
                    for t in topics)
    return (f"<!doctype html><html><head><title>Notes from the field</title></head><body>"
            f"<h1>Notes from the field</h1><ul>{items}</ul></body></html>")


def page_html(topic: dict) -> str:
    paragraphs = "".join(f"<p>{html.escape(p)}</p>" for p in topic["paragraphs"])
    facts = json.dumps(topic["facts"]).replace("</", "<\\/")
    return (f"<!doctype html><html><head><title>{html.escape(topic['title'])}</title></head>"
            f'<body><nav><a href="/pages/">All pages</a></nav><article>'
            f"<h1>{html.escape(topic['title'])}</h1>{paragraphs}"
            f'<h2>Key facts</h2><ul id="facts"></ul></article>'
            f"<script>for (const fact of {facts}) {{ const li = document.createElement('li');"
            f" li.textContent = fact; document.getElementById('facts').appendChild(li); }}"
            f"</script><footer>demo page server</footer></body></html>")


def make_handler(site: Site) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = "watchkeeper-demo/1"

        def do_GET(self) -> None:
            if self.path in ("/", "/pages", "/pages/"):
                return self._send(200, "text/html", index_html(site.published()))
            page = PAGE.match(self.path)
            topic = next((t for t in site.published() if page and t["slug"] == page[1]), None)
            if topic is not None:
                return self._send(200, "text/html", page_html(topic))
            channel = CHANNEL.match(self.path)
            if channel:
                return self._send(200, "application/json", json.dumps(site.posts(channel[1])))
            self._send(404, "text/plain", "not found\n")

        def do_POST(self) -> None:
            channel = CHANNEL.match(self.path)
            if not channel:
                return self._send(404, "text/plain", "not found\n")
            length = int(self.headers.get("Content-Length") or 0)
            if not 0 < length <= MAX_BODY_BYTES:
                return self._send(400, "text/plain", "a JSON body of at most 64 KiB\n")
            try:
                body = json.loads(self.rfile.read(length))
            except ValueError:
                body = None
            if not isinstance(body, dict) or not (body.get("content") or body.get("text")):
                return self._send(400, "application/json",
                                  '{"message": "Cannot send an empty message", "code": 50006}')
            post = site.receive(channel[1], body)
            first = post["content"].splitlines()[0][:160]
            print(f"receiver: #{channel[1]}: {first}", flush=True)
            self._send(204, "text/plain", "")

        def _send(self, status: int, content_type: str, text: str) -> None:
            data = text.encode()
            self.send_response(status)
            if status != 204:
                self.send_header("Content-Type", f"{content_type}; charset=utf-8")
                self.send_header("Content-Length", str(len(data)))
            try:
                self.end_headers()
                if status != 204:
                    self.wfile.write(data)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the browser hung up (e.g. after its favicon 404): nothing to answer

        def log_message(self, format: str, *args) -> None:
            pass  # posts are printed above; page fetches would drown the log

    return Handler


def breaker_open() -> bool:
    """Whether the daemon that started this run has its circuit breaker open."""
    if not os.environ.get("WATCHKEEPER_RUN_ID"):
        return False
    from supervisor.control.client import ControlClient

    client = ControlClient(os.environ["WATCHKEEPER_SOCKET"], timeout_s=2.0)
    try:
        return client.call("breaker-status")["state"] == "open"
    except Exception:  # noqa: BLE001 - no answer: nothing to wait for
        return False
    finally:
        client.close()


DEMO_PORT_ENV, DEFAULT_DEMO_PORT = "WATCHKEEPER_DEMO_PORT", 8765


def port_number(text: str) -> int:
    """A TCP port from --port or WATCHKEEPER_DEMO_PORT, or an error naming the valid range."""
    if text.isdigit() and 1 <= int(text) <= 65535:
        return int(text)
    raise argparse.ArgumentTypeError(f"{text!r} is not a port (a whole number 1-65535)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=port_number,
                        default=os.environ.get(DEMO_PORT_ENV) or str(DEFAULT_DEMO_PORT),
                        help=f"default: ${DEMO_PORT_ENV}, else {DEFAULT_DEMO_PORT}")
    parser.add_argument("--publish-every-s", type=float, default=15.0)
    parser.add_argument("--linger-s", type=float, default=3.0)
    args = parser.parse_args()
    state_dir = Path(os.environ.get("WATCHKEEPER_STATE_DIR", "demo-state"))
    site = Site(state_dir, args.publish_every_s)
    try:
        server = ThreadingHTTPServer(("127.0.0.1", args.port), make_handler(site))
    except OSError as exc:
        print(f"demo server: cannot listen on 127.0.0.1:{args.port}: {exc.strerror}; is another "
              f"demo running? Start this one on another port: {DEMO_PORT_ENV}=PORT (in the "
              "daemon's environment)", file=sys.stderr)
        return 1
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    agent = None
    if os.environ.get("WATCHKEEPER_RUN_ID"):
        from supervisor.sdk import Agent

        agent = Agent()
        agent.start_heartbeat()
    threading.Thread(target=server.serve_forever, daemon=True).start()
    print(f"demo server: pages on http://127.0.0.1:{args.port}/pages/, webhooks on "
          f"http://127.0.0.1:{args.port}/webhooks/<channel>", flush=True)
    stop.wait()
    if breaker_open():
        print(f"demo server: the pipeline is halted; serving {args.linger_s:g}s more for the "
              "alert", flush=True)
        threading.Event().wait(args.linger_s)
    server.shutdown()
    if agent is not None:
        agent.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
