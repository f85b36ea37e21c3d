"""The live view in a real browser: `specedge up`, clients generating, and `/dashboard`
loaded in headless Chromium (Debian's `chromium`, installed by `make install`). The page
marks the DOM with what it drew; the screenshot must show the timeline's bars."""

import re
import shutil
import subprocess
import threading

import httpx
import openai
import pytest
from PIL import Image

from tests.helpers import specedge_up, wait_for

pytestmark = pytest.mark.e2e
MODEL = "specedge-tiny-target"
VERIFIER_RGB, EDGE_RGB = (0xD6, 0x27, 0x28), (0x1F, 0x77, 0xB4)  # the page's bar colours
WIDTH, HEIGHT = 1280, 900


def chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        pytest.skip("no chromium on this machine: `make install` installs Debian's package "
                    "(apt-get install --no-install-recommends chromium)")
    return found


@pytest.fixture(scope="module")
def stack():
    with specedge_up() as running:
        yield running


@pytest.fixture
def traffic(stack):
    """Two clients generating until the test ends, so that the timeline always has recent cycles."""
    stop = threading.Event()
    client = openai.OpenAI(base_url=f"{stack.url}/v1", api_key=stack.key, max_retries=0)

    def ask(i: int) -> None:
        n = 0
        while not stop.is_set():
            n += 1
            list(client.chat.completions.create(
                model=MODEL, max_tokens=48, temperature=0, stream=True,
                messages=[{"role": "user", "content": f"Write function {i}-{n} that parses a date."}]))

    threads = [threading.Thread(target=ask, args=(i,), daemon=True) for i in range(2)]
    for t in threads:
        t.start()
    yield
    stop.set()
    for t in threads:
        t.join(timeout=60)


def test_dashboard_needs_no_key_and_reports_the_pipeline(stack, traffic):
    assert "<canvas" in httpx.get(f"{stack.url}/dashboard").text
    assert "<script src" not in httpx.get(f"{stack.url}/dashboard").text  # self-contained

    def busy() -> dict | None:
        data = httpx.get(f"{stack.url}/dashboard/data", params={"window": 5}, timeout=10).json()
        rows = {r["role"]: r for r in data["rows"] if r["spans"]}
        ready = ({"verifier", "edge-agent"} <= set(rows) and len(data["rows"]) == 4 and data["acceptance"]["cycles"]
                 and data["latency_ms"]["itl"]["n"] > 0)  # a second cycle of a request: its first only times TTFT
        return data if ready else None

    data = wait_for(busy, 90, "verifier and edge spans on /dashboard/data", interval_s=0.5)
    assert {r["role"] for r in data["rows"]} == {"verifier", "edge-agent"}
    assert sum(r["role"] == "edge-agent" for r in data["rows"]) == 3  # two edges and the server drafter
    for row in data["rows"]:
        assert row["ok"] and 0 <= row["busy"] <= 1
        for start, end in row["spans"]:
            assert -5 <= start < end <= 0  # aligned to the gateway's clock, inside the window
    assert data["schedulers"] and "queued" in data["schedulers"][0]["counters"]
    assert data["throughput"]["tokens"] > 0 and data["latency_ms"]["itl"]["n"] > 0


def test_headless_chromium_draws_the_timeline_with_data(stack, traffic, tmp_path):
    browser = chromium()
    wait_for(lambda: httpx.get(f"{stack.url}/dashboard/data", timeout=10).json()["acceptance"]["cycles"], 90,
             "cycles through the gateway", interval_s=0.5)
    shot = tmp_path / "dashboard.png"
    run = subprocess.run(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--hide-scrollbars",
         f"--user-data-dir={tmp_path / 'profile'}", f"--window-size={WIDTH},{HEIGHT}",
         "--force-device-scale-factor=1", "--virtual-time-budget=5000", f"--screenshot={shot}", "--dump-dom",
         f"{stack.url}/dashboard"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    dom = run.stdout

    def marks(element: str) -> dict[str, str]:
        tag = re.search(rf'<{element}[^>]*>', dom)
        assert tag, f"no {element} in the DOM: {dom[:500]}"
        return dict(re.findall(r'data-([a-z-]+)="([^"]*)"', tag.group(0)))

    assert int(marks("body")["updates"]) >= 1, "the page never rendered data"
    timeline = marks('section[^>]*id="timeline"')
    assert int(timeline["rows"]) == 4  # a verifier, two edges, the server drafter
    assert int(timeline["verifier-bars"]) > 0 and int(timeline["edge-bars"]) > 0, timeline
    assert int(marks('section[^>]*id="acceptance"')["cycles"]) > 0
    assert float(marks('section[^>]*id="throughput"')["tokens-per-s"]) > 0
    assert int(marks('section[^>]*id="latency"')["itl-n"]) > 0

    # The screenshot: the timeline's plot area holds verifier and edge bars in their colours.
    image = Image.open(shot).convert("RGB")
    assert image.size == (WIDTH, HEIGHT)
    x, y, w, h = (int(v) for v in timeline["plot"].split(","))
    plot = image.crop((x, y, x + w, y + h))
    pixels = list(plot.get_flattened_data())

    def near(rgb: tuple[int, int, int]) -> int:
        return sum(1 for p in pixels if all(abs(a - b) <= 12 for a, b in zip(p, rgb, strict=True)))

    assert near(VERIFIER_RGB) > 100, "no verification bars in the screenshot's timeline"
    assert near(EDGE_RGB) > 100, "no edge drafting bars in the screenshot's timeline"
    assert len(set(pixels)) > 3  # not blank
