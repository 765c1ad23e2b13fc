"""The playground and the chat box as a person uses them: in JupyterLab (the playground also as a Voila
page), in a real (headless) Chromium.

Needs Debian's chromium at /usr/bin/chromium (`.ci/run` installs it); skipped where it is missing. The
screenshots go to a temporary folder; `pytest tests/test_browser.py --screenshots docs` updates the README's.
"""
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from helpers.runtime.paths import REPO_ROOT

CHROMIUM = "/usr/bin/chromium"
NOTEBOOK = "notebooks/05_prompt_playground.ipynb"
CHAT_NOTEBOOK = "notebooks/06_chat.ipynb"
BIN = Path(sys.executable).parent

pytestmark = pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="Debian's chromium is not installed")


def chat_box_cell():
    """The index of the cell that shows notebook 06's chat box."""
    cells = json.loads((REPO_ROOT / CHAT_NOTEBOOK).read_text())["cells"]
    return next(i for i, cell in enumerate(cells) if "ChatBox(reply" in "".join(cell["source"]))


@pytest.fixture(scope="session")
def screenshots(request, tmp_path_factory):
    """Where the screenshots go: --screenshots FOLDER, else a temporary folder (the tests rewrite no tracked file)."""
    chosen = request.config.getoption("--screenshots")
    return Path(chosen) if chosen else tmp_path_factory.mktemp("screenshots")


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """A server started in its own process group, stopped (with its kernels) however the test ends."""

    def __init__(self, command, url, log_path, env=None):
        self.url, self.log = url, open(log_path, "w")
        self.process = subprocess.Popen(command, cwd=REPO_ROOT, stdout=self.log, stderr=subprocess.STDOUT,
                                        start_new_session=True, env={**os.environ, **(env or {})})

    def wait_until_up(self, probe, timeout=90):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited early:\n{Path(self.log.name).read_text()[-2000:]}")
            try:
                urllib.request.urlopen(probe, timeout=2)
                return self
            except urllib.error.HTTPError:  # it answers, if only to refuse the probe
                return self
            except OSError:
                time.sleep(0.5)
        raise TimeoutError(f"server not up after {timeout} s; see {self.log.name}")

    def stop(self):
        try:
            os.killpg(self.process.pid, signal.SIGTERM)
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:  # already gone
            pass
        self.log.close()


@pytest.fixture(scope="module")
def token():
    return secrets.token_hex(16)


@pytest.fixture(scope="module")
def jupyterlab(token, tmp_path_factory):
    # Settings of its own, without autosave: the notebooks the tests run stay as committed.
    settings = tmp_path_factory.mktemp("lab-settings")
    (settings / "@jupyterlab" / "docmanager-extension").mkdir(parents=True)
    (settings / "@jupyterlab" / "docmanager-extension" / "plugin.jupyterlab-settings").write_text('{"autosave": false}')
    committed = {name: (REPO_ROOT / name).read_bytes() for name in (NOTEBOOK, CHAT_NOTEBOOK)}
    port = free_port()
    server = Server([str(BIN / "jupyter"), "lab", "--no-browser", "--ServerApp.ip=127.0.0.1", f"--ServerApp.port={port}",
                     f"--IdentityProvider.token={token}", "--ServerApp.port_retries=0", "--ServerApp.allow_root=True",
                     f"--ServerApp.root_dir={REPO_ROOT}"],
                    f"http://127.0.0.1:{port}/lab/tree/{NOTEBOOK}?token={token}",
                    tmp_path_factory.mktemp("lab") / "jupyterlab.log", env={"JUPYTERLAB_SETTINGS_DIR": str(settings)})
    try:
        yield server.wait_until_up(f"http://127.0.0.1:{port}/api/status?token={token}")
    finally:
        server.stop()
    assert {name: (REPO_ROOT / name).read_bytes() for name in committed} == committed, "JupyterLab saved a notebook"


@pytest.fixture(scope="module")
def voila(token, tmp_path_factory):
    port = free_port()
    server = Server([str(BIN / "voila"), NOTEBOOK, "--no-browser", "--Voila.ip=127.0.0.1", f"--port={port}",
                     f"--token={token}"],
                    f"http://127.0.0.1:{port}/?token={token}", tmp_path_factory.mktemp("voila") / "voila.log")
    try:
        yield server.wait_until_up(f"http://127.0.0.1:{port}/voila/files/probe")
    finally:
        server.stop()


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=["--headless", "--no-sandbox"])
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture
def page(browser):
    page = browser.new_page(viewport={"width": 1280, "height": 1000})
    try:
        yield page
    finally:
        page.close()


def textarea(page, name):
    return page.locator(f".playground-{name} textarea")


# In the page, at every frame: once the output has text and then more (it streams), press Stop, still enabled. The
# model trained here writes 500 tokens in under a second, which a round trip from the test to the page can outlast.
PRESS_STOP_WHILE_IT_STREAMS = """([output, stop]) => {
    if (output.value.length === 0) return false;
    output.dataset.firstLength ??= output.value.length;
    if (output.value.length <= Number(output.dataset.firstLength) || stop.disabled) return false;
    stop.click();
    return true;
}"""


def use_the_playground(page, screenshot):
    """What a person does: type, Generate, watch it stream, Stop, read the stats; then an empty prompt."""
    prompt, output = textarea(page, "prompt"), textarea(page, "output")
    prompt.fill("Tell me about the dragons of Tibet.")
    page.locator(".widget-slider", has_text="n_predict").locator(".widget-readout").fill("500")
    page.keyboard.press("Enter")
    stop = page.get_by_role("button", name="Stop").element_handle()
    page.get_by_role("button", name="Generate").click()
    page.wait_for_function(PRESS_STOP_WHILE_IT_STREAMS, arg=[output.element_handle(), stop], timeout=30_000)
    stats = page.locator(".playground-stats", has_text="tokens/s")
    stats.wait_for(timeout=30_000)
    assert "first token" in stats.inner_text()
    page.screenshot(path=str(screenshot), full_page=True)
    prompt.fill("")
    page.get_by_role("button", name="Generate").click()
    page.locator(".playground-status", has_text="error: The prompt is empty").wait_for(timeout=10_000)


def test_playground_in_jupyterlab(jupyterlab, page, screenshots):
    page.goto(jupyterlab.url)
    page.get_by_text("Python 3 (ipykernel) | Idle").wait_for(timeout=60_000)  # the kernel is up
    news = page.get_by_role("button", name="No", exact=True)  # "get notified about Jupyter news?"
    if news.count():
        news.click()
    page.locator(".jp-Notebook:visible .jp-Cell").first.click()  # the notebook opened, not one the workspace restored
    page.keyboard.press("Escape")
    for _ in range(2):  # run the title cell and the one that shows the playground, as Shift+Enter would
        page.keyboard.press("Shift+Enter")
    textarea(page, "prompt").wait_for(timeout=60_000)
    use_the_playground(page, screenshots / "playground-jupyterlab.png")


def test_playground_as_a_voila_page(voila, page, screenshots):
    page.goto(voila.url)
    textarea(page, "prompt").wait_for(timeout=90_000)
    assert page.get_by_text("from helpers.lessons.playground import Playground").count() == 0  # no code shown
    use_the_playground(page, screenshots / "playground-voila.png")


def test_chat_box_in_jupyterlab(jupyterlab, page, screenshots):
    # A workspace of its own: the playground test's workspace would restore its notebook over this one
    page.goto(jupyterlab.url.replace(f"/lab/tree/{NOTEBOOK}", f"/lab/workspaces/chat/tree/{CHAT_NOTEBOOK}"))
    page.get_by_text("Python 3 (ipykernel) | Idle").wait_for(timeout=60_000)
    news = page.get_by_role("button", name="No", exact=True)
    if news.count():
        news.click()
    page.locator(".jp-Notebook:visible .jp-Cell").first.click()  # the notebook opened, not one the workspace restored
    page.keyboard.press("Escape")
    for _ in range(chat_box_cell() + 1):  # run every cell down to the one that shows the chat box
        page.keyboard.press("Shift+Enter")
    message = page.locator(".chat-message input")
    message.wait_for(timeout=120_000)
    message.fill("Hello! Who are you?")
    page.get_by_role("button", name="Send").click()
    transcript = page.locator(".chat-transcript")
    transcript.locator("b", has_text="AI:").wait_for(timeout=30_000)
    page.locator(".chat-status", has_text="tokens").wait_for(timeout=60_000)
    assert "Hello! Who are you?" in transcript.inner_text()
    message.fill("And then?")
    message.press("Enter")
    page.wait_for_function("() => document.querySelector('.chat-transcript').innerText.split('User:').length == 3",
                           timeout=30_000)
    page.locator(".chat-status", has_text="tokens").wait_for(timeout=60_000)
    page.screenshot(path=str(screenshots / "chat-jupyterlab.png"), full_page=True)
    page.get_by_role("button", name="Reset").click()
    page.locator(".chat-status", has_text="New conversation").wait_for(timeout=10_000)
    assert transcript.inner_text().strip() == ""
