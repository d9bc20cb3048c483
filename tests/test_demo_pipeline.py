"""The bundled demo pipeline end to end: the five agents in agents/, run by a real daemon from
the repository's own config/ (state in tmp_path, and on a free port through the one setting
WATCHKEEPER_DEMO_PORT), with the demo's page server and webhook receiver; and the
text-generation interface the agents share."""

from __future__ import annotations

import http.server
import json
import os
import re
import socket
import sqlite3
import sys
import threading
from pathlib import Path

import pytest
import yaml
from harness import DaemonProc, wk
from support import require, wait_until

from supervisor.runs.runner import with_own_bin

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "config"
DEMO_PORT_ENV = "WATCHKEEPER_DEMO_PORT"
PIPELINE = ("research", "content", "seo", "community", "analytics")

sys.path.insert(0, str(ROOT / "agents"))
import research  # noqa: E402
import seo  # noqa: E402
import textgen  # noqa: E402


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def demo(tmp_path: Path, scenario: str = "", fetcher: str = "http") -> DaemonProc:
    """The repository's demo config, unchanged but for its state in tmp_path, on a free port
    set as an operator would: WATCHKEEPER_DEMO_PORT in the daemon's environment."""

    def load(path: Path) -> dict:
        return yaml.safe_load(path.read_text())

    settings = load(CONFIG / "watchkeeper.yaml")
    settings.update(state_dir=str(tmp_path / "state"), working_dir=str(ROOT))
    agents = {p.stem: load(p) for p in sorted((CONFIG / "agents.d").glob("*.yaml"))}
    d = DaemonProc(tmp_path, agents, **settings)
    d.demo_env = {"PYTHONPATH": str(ROOT), "WATCHKEEPER_SCENARIO": scenario,
                  "RESEARCH_FETCHER": fetcher, DEMO_PORT_ENV: str(free_port())}
    return d


def start(d: DaemonProc) -> DaemonProc:
    d.start(extra_env=d.demo_env)
    d.wait_event("agent_output", agent="demo", timeout_s=20)  # the server listens
    d.call("start-now", agent="research")  # rather than wait for its first interval
    return d


def inbox(d: DaemonProc, channel: str) -> list[dict]:
    path = d.state_dir / "demo" / "inbox" / f"{channel}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def lines(d: DaemonProc, agent: str) -> list[str]:
    return [e["line"] for e in d.find("agent_output", agent=agent, stream="stdout")]


def posted_count(d: DaemonProc) -> int:
    entries = d.call("memory-list", namespace="community", prefix="posted-")
    return sum(1 for e in entries if e["value"]["state"] == "posted")


def processes_of(state_dir: Path, name: str = "") -> list[int]:
    """Live processes started for this daemon's runs (their environment names its state dir),
    only those whose command name contains `name` if given."""
    needle = f"WATCHKEEPER_STATE_DIR={state_dir}\0".encode()
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/environ", "rb") as f:
                    environ = f.read() + b"\0"
                with open(f"/proc/{entry}/comm") as f:
                    comm = f.read()
            except OSError:
                continue
            if needle in environ and name in comm:
                found.append(int(entry))
    return found


STORED_NOTES = {"format": "watchkeeper-memory", "format_version": 1, "entries": [
    {"namespace": "notes", "key": "solar-panel-recycling", "version": 1, "updated_at": 1.0,
     "updated_by": "research", "run_id": "earlier",
     "value": {"title": "Solar panel recycling", "url": "http://127.0.0.1/pages/x.html",
               "summary": "Panels last about twenty-five years before they are replaced.",
               "text": "Solar panels last about twenty-five years. Recycling recovers most of "
                       "the glass and aluminium in each panel.", "facts": []}}]}


# -- the pipeline -------------------------------------------------------------------------------
def test_articles_flow_from_research_to_the_webhook_once_each(tmp_path):
    """Pages become notes, drafts, approved posts and webhook messages, each article posted once."""
    with start(demo(tmp_path)) as d:
        wait_until(lambda: len(inbox(d, "community")) >= 2, 120,
                   message=f"two posts at the receiver; last events: {d.tail()}")
        d.call("start-now", agent="analytics")
        wait_until(lambda: all(d.find("run_finished", agent=a, outcome="succeeded")
                               for a in PIPELINE), 60, message="every agent ran")
        # Every post at the receiver is marked posted once its community run ends.
        wait_until(lambda: posted_count(d) == len(inbox(d, "community")), 30,
                   message="the posted set matches the receiver")
        notes = d.call("memory-list", namespace="notes")
        drafts = d.call("memory-list", namespace="drafts")
        report = d.call("memory-get", namespace="analytics", key="latest")
    assert len(notes) >= 2 and len(drafts) >= 2
    assert all(dr["value"]["sources"] and not dr["value"]["degraded"] for dr in drafts)
    posts = [p["content"] for p in inbox(d, "community")]
    assert len(posts) == len(set(posts)) >= 2
    assert any("lazy context" in line for line in lines(d, "content"))
    assert report["value"]["pipeline"]["notes"] >= 2
    with sqlite3.connect(d.state_dir / "state.db") as db:
        reporting = {row[0] for row in db.execute("SELECT DISTINCT agent FROM usage")}
    assert set(PIPELINE) <= reporting, reporting


def test_research_reads_pages_with_headless_chromium(tmp_path):
    """With Chromium installed, research notes the facts a page's JavaScript renders, and no
    browser process outlives its run."""
    require(research.chromium_path() is not None, "Chromium is not installed")
    with start(demo(tmp_path, fetcher="chromium")) as d:
        wait_until(lambda: any("noted" in line for line in lines(d, "research")), 90,
                   message=f"research noted pages; last events: {d.tail()}")
        notes = d.call("memory-list", namespace="notes")
        wait_until(lambda: not processes_of(d.state_dir, "chrom"), 20,
                   message="Chromium left running after research's run")
    assert notes and all(n["value"]["fetched_with"] == "chromium" for n in notes)
    assert all(n["value"]["facts"] for n in notes)  # only a browser sees these


def test_content_writes_degraded_from_stored_notes_when_research_fails(tmp_path):
    """When research fails, content drafts from the notes already stored and says so."""
    with start(demo(tmp_path, scenario="research-down")) as d:
        d.call("memory-import", data=STORED_NOTES)
        d.wait_event("run_finished", agent="research", outcome="failed", timeout_s=30)
        d.call("start-now", agent="content")
        wait_until(lambda: any("drafted" in line for line in lines(d, "content")), 60,
                   message=f"content drafted; last events: {d.tail()}")
        draft = d.call("memory-get", namespace="drafts", key="solar-panel-recycling")
    said = lines(d, "content")
    assert any(line.startswith("content: degraded: research") for line in said), said
    assert any("[degraded: from stored notes]" in line for line in said), said
    assert draft["value"]["degraded"] is True


def test_seo_downstream_of_degraded_content_carries_the_chain(tmp_path):
    """In research-down, seo (downstream of content) runs degraded with the chain
    content<-research in its environment, its run record and its own words."""
    with start(demo(tmp_path, scenario="research-down")) as d:
        d.wait_event("run_finished", agent="research", outcome="failed", timeout_s=30)
        wait_until(lambda: any(a["agent"] == "content" and a["degraded"]
                               for a in d.call("status")["agents"]), 15)
        d.call("start-now", agent="seo")
        wait_until(lambda: any(line.startswith("seo: degraded:") for line in lines(d, "seo")),
                   30, message=f"seo said it is degraded; last events: {d.tail()}")
        runs = d.call("runs", agent="seo")
    assert any(r["degraded"] == "content<-research" for r in runs), runs
    assert any("(content<-research)" in line for line in lines(d, "seo"))


def test_3am_retry_loop_halts_the_pipeline_with_one_alert(tmp_path):
    """The 3am switch's runaway retries trip the breaker: one alert, no agent left running."""
    # On a free port (WATCHKEEPER_DEMO_PORT): the alert reaching the demo's receiver shows
    # the daemon's webhook URL follows the setting.
    with start(demo(tmp_path, scenario="3am")) as d:
        trip = d.wait_event("breaker_tripped", agent="content", timeout_s=120)
        d.wait_event("alert_delivered", kind="breaker_trip", timeout_s=30)
        wait_until(lambda: not any(a["run_id"] for a in d.call("status")["agents"]), 30,
                   message="every run stopped")
        wait_until(lambda: not processes_of(d.state_dir), 30, message="no agent process left")
        assert d.call("breaker-status")["state"] == "open"
    assert d.proc.returncode == 0
    alerts = inbox(d, "alerts")
    assert len(alerts) == 1 and "Circuit breaker tripped by content" in alerts[0]["content"]
    assert trip["rule"] == "kind_outputs"
    assert any("retrying at once" in line for line in lines(d, "content"))
    posts = [p["content"] for p in inbox(d, "community")]
    assert len(posts) == len(set(posts))


def every_topic_done() -> dict:
    """A memory export as after a long first demo: every topic has its note and its draft."""
    topics = json.loads((ROOT / "demo" / "topics.json").read_text())
    entries = []
    for n, t in enumerate(topics, start=1):
        note = {"title": t["title"], "url": f"http://127.0.0.1/pages/{t['slug']}.html",
                "summary": t["paragraphs"][0], "text": " ".join(t["paragraphs"]), "facts": []}
        draft = {"title": t["title"], "body": t["paragraphs"][0], "url": note["url"],
                 "sources": [t["slug"]], "degraded": False}
        for namespace, by, value in (("notes", "research", note), ("drafts", "content", draft)):
            entries.append({"namespace": namespace, "key": t["slug"], "version": 1,
                            "updated_at": float(n), "updated_by": by, "run_id": "earlier",
                            "value": value})
    return {"format": "watchkeeper-memory", "format_version": 1, "entries": entries}


def test_3am_trips_even_after_every_topic_has_its_article(tmp_path):
    """Started after an earlier demo used up every topic, the 3am scenario still trips."""
    d = demo(tmp_path, scenario="3am")
    d.start(extra_env=d.demo_env)
    with d:
        d.call("memory-import", data=every_topic_done())
        d.call("start-now", agent="content")
        d.wait_event("breaker_tripped", agent="content", timeout_s=60)
    assert any("retrying at once" in line for line in lines(d, "content"))


def test_research_without_chromium_says_once_how_to_install_it(tmp_path):
    """With no Chromium on PATH, research says how to install it in its first run only."""
    d = demo(tmp_path, fetcher="auto")
    bin_dir = tmp_path / "bin"  # every command of the system but a browser
    bin_dir.mkdir()
    for directory in ("/usr/local/bin", "/usr/bin", "/bin"):
        for tool in Path(directory).iterdir():
            if not any(name in tool.name for name in ("chrom", "headless_shell")) \
                    and not (bin_dir / tool.name).exists():
                (bin_dir / tool.name).symlink_to(tool)
    d.demo_env["PATH"] = str(bin_dir)
    with start(d):
        wait_until(lambda: len(d.find("run_finished", agent="research")) >= 2, 60,
                   message=f"two research runs; last events: {d.tail()}")
    hints = [line for line in lines(d, "research") if "no Chromium on PATH" in line]
    assert len(hints) == 1 and "apt-get install chromium" in hints[0]


# -- agent logic without a daemon ----------------------------------------------------------------
class FakeMemory:
    def __init__(self) -> None:
        self.entries: dict[tuple[str, str], dict] = {}

    def entry(self, namespace: str, key: str) -> dict | None:
        return self.entries.get((namespace, key))

    def put(self, namespace: str, key: str, value, expect_version: int | None = None) -> int:
        current = self.entries.get((namespace, key), {"version": 0})["version"]
        assert expect_version in (None, current)
        self.entries[(namespace, key)] = {"value": value, "version": current + 1}
        return current + 1


def test_seo_rate_limit_grants_a_burst_then_refills_with_time(monkeypatch):
    """seo's token bucket lets SEO_BURST drafts through at once, then one per 60/SEO_PER_MINUTE s."""
    agent = type("FakeAgent", (), {"memory": FakeMemory()})()
    now = [1000.0]
    monkeypatch.setattr(seo.time, "time", lambda: now[0])
    assert seo.take_tokens(agent, 10)[0] == seo.BURST
    assert seo.take_tokens(agent, 10)[0] == 0
    now[0] += 60 / seo.PER_MINUTE
    assert seo.take_tokens(agent, 10)[0] == 1


def test_seo_scores_a_keyword_led_title_of_search_length_higher():
    """A 30-60 character title that leads with the main keyword outscores a bare topic name."""
    words = ["solar", "panel", "recycling"]
    assert seo.score_title("Solar panel recycling: 6 Things Worth Knowing", words) > \
        seo.score_title("Recycling", words)


# -- docs/agents.md ---------------------------------------------------------------------------------
def doc_blocks(language: str) -> list[str]:
    text = (ROOT / "docs" / "agents.md").read_text()
    return re.findall(rf"^```{language}\n(.*?)^```$", text, re.S | re.M)


def test_every_example_in_the_agent_guide_runs(tmp_path):
    """Each Python and bash example in docs/agents.md runs as an agent and exits 0."""
    examples = doc_blocks("python") + doc_blocks("bash")
    assert len(examples) >= 14
    jobs = [{"id": f"example-{i}", "schedule": {"every_s": 3600},
             "command": ["{python}", "-c", code] if i < len(doc_blocks("python"))
             else ["bash", "-c", code]} for i, code in enumerate(examples)]
    spec = {"jobs": jobs, "memory_write": ["docs-demo", "greeter"],
            "limits": {"launches": {"max_runs": 100, "window_s": 3600}}}
    with DaemonProc(tmp_path, {"example": spec}).start(extra_env={"PYTHONPATH": str(ROOT)}) as d:
        d.call("memory-import", data=STORED_NOTES)  # for the examples that read notes
        for i, job in enumerate(jobs):
            d.call("start-now", agent="example", job=job["id"])
            ended = d.wait_event("run_finished", agent="example", job=job["id"], timeout_s=30)
            assert ended["outcome"] == "succeeded", (examples[i], d.tail())
    assert d.find("output_emitted", kind="article") and d.find("output_emitted", kind="greeting")


def test_the_agent_file_in_the_guide_is_valid(tmp_path):
    """The example agent file in docs/agents.md passes check-config."""
    (agents := tmp_path / "agents.d").mkdir()
    (agents / "digest.yaml").write_text(doc_blocks("yaml")[0])
    (agents / "content.yaml").write_text(yaml.safe_dump(
        {"jobs": [{"id": "draft", "command": ["true"], "schedule": {"every_s": 60}}]}))
    (tmp_path / "watchkeeper.yaml").write_text(f"state_dir: {tmp_path / 'state'}\n")
    result = wk("--config", str(tmp_path / "watchkeeper.yaml"), "check-config")
    assert result.returncode == 0, result.stderr


# -- text generation ------------------------------------------------------------------------------
CONTEXT = ('## notes/solar\n{"title":"Solar panel recycling","text":"Solar panels last about '
           'twenty-five years. Recycling recovers the glass of each panel. Heat pumps are '
           'unrelated."}\n')


def test_offline_text_is_extractive_and_deterministic():
    """The offline backend writes only context sentences, the same ones every time."""
    prompt = textgen.Prompt("article", "Write an article.", subject="Solar panel recycling",
                            context=CONTEXT)
    first, again = textgen.Offline().generate(prompt), textgen.Offline().generate(prompt)
    assert first == again and first.cost == 0 and first.tokens > 0
    assert "Solar panels last about twenty-five years." in first.text


class FakeModel(http.server.BaseHTTPRequestHandler):
    requests: list[dict] = []

    def do_POST(self) -> None:
        FakeModel.requests.append({"path": self.path, "auth": self.headers["Authorization"],
                                   "body": json.loads(self.rfile.read(
                                       int(self.headers["Content-Length"])))})
        data = json.dumps({"model": "fake-1", "usage": {"total_tokens": 321},
                           "choices": [{"message": {"content": " A title "}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def fake_model():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FakeModel)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()
    server.server_close()


def test_openai_compatible_backend_reports_the_servers_usage(fake_model):
    """With WATCHKEEPER_LLM_BASE_URL set, text comes from /chat/completions with its token count."""
    backend = textgen.backend_from_env({"WATCHKEEPER_LLM_BASE_URL": fake_model,
                                        "WATCHKEEPER_LLM_API_KEY": "k",
                                        "WATCHKEEPER_LLM_MODEL": "m",
                                        "WATCHKEEPER_LLM_COST_PER_1K_TOKENS": "0.5"})
    gen = backend.generate(textgen.Prompt("title", "Rewrite.", subject="x", context=CONTEXT))
    assert (gen.text, gen.tokens, gen.cost, gen.model) == ("A title", 321, 0.1605, "fake-1")
    request = FakeModel.requests[-1]
    assert request["path"] == "/v1/chat/completions" and request["auth"] == "Bearer k"
    assert request["body"]["model"] == "m" and "Solar panels" in request["body"]["messages"][1][
        "content"]


def test_unreachable_model_server_falls_back_to_offline_text():
    """A model server that cannot be reached yields offline text instead of failing the run."""
    backend = textgen.backend_from_env({"WATCHKEEPER_LLM_BASE_URL":
                                        f"http://127.0.0.1:{free_port()}/v1"})
    gen = backend.generate(textgen.Prompt("summary", "Sum up.", subject="solar panel",
                                          context=CONTEXT))
    assert gen.model == "offline-extractive" and "twenty-five years" in gen.text


# -- daemon behaviour the demo relies on ------------------------------------------------------
def test_agents_find_the_daemons_own_cli():
    """The daemon's bin directory is added to an agent's PATH once, after what PATH had."""
    own = os.path.dirname(sys.executable)
    assert with_own_bin("/usr/bin:/bin") == f"/usr/bin:/bin:{own}"
    assert with_own_bin(f"{own}:/usr/bin") == f"{own}:/usr/bin"


def test_check_config_reports_a_missing_agents_dir(tmp_path):
    """check-config names a missing agents.d and exits 1 instead of looping forever."""
    config = tmp_path / "watchkeeper.yaml"
    config.write_text(f"state_dir: {tmp_path / 'state'}\n")
    result = wk("--config", str(config), "check-config", timeout_s=20)
    assert result.returncode == 1
    assert "agents_dir: " in result.stderr and "is not a directory" in result.stderr
