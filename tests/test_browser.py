"""Browser tests: the built book and JupyterLab, driven in Debian's Chromium by Playwright.

- The book: build book/ with Jupyter Book into a temporary folder (warning-free, -W),
  serve it on 127.0.0.1 and open the intro, a sidebar chapter and every notebook page.
  Math must be typeset by MathJax, plots must load, saved widgets must render through
  the vendored html-manager, and no request may fail or leave 127.0.0.1.
- JupyterLab: start it on 127.0.0.1 with a token, open a small generated notebook with
  an IntSlider, run all cells, press ArrowRight on the slider and see the kernel's
  answer change.

Needs Playwright for Python and /usr/bin/chromium (no browser download). Jupyter Book
comes from this interpreter, or from the interpreter named by LORA_COURSE_BOOK_PYTHON.
Without them the tests skip with the reason; with LORA_COURSE_REQUIRE_BROWSER=1 they
fail instead. Screenshots are saved to artifacts/screenshots/.
"""

from __future__ import annotations

import functools
import http.server
import importlib.util
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from urllib.parse import urlparse

import pytest

pytestmark = pytest.mark.browser

ROOT = Path(__file__).resolve().parents[1]
SCREENSHOTS = ROOT / "artifacts" / "screenshots"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
PAGE_TIMEOUT_MS = 30_000
BUILD_TIMEOUT_S = 300
LAB_START_TIMEOUT_S = 90
REQUIRE = os.environ.get("LORA_COURSE_REQUIRE_BROWSER") == "1"


def unavailable(reason: str):
    """Skip, or fail when the environment promises that browser tests can run."""
    if REQUIRE:
        pytest.fail(f"{reason} (LORA_COURSE_REQUIRE_BROWSER=1)", pytrace=False)
    pytest.skip(reason)


# -- the browser --------------------------------------------------------------


@pytest.fixture(scope="session")
def browser():
    if importlib.util.find_spec("playwright") is None:
        unavailable("Playwright for Python is not installed (pip install playwright)")
    if not os.access(CHROMIUM, os.X_OK):
        unavailable(f"{CHROMIUM} not found (Debian: apt-get install -y chromium)")
    from playwright.sync_api import sync_playwright

    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(
            executable_path=CHROMIUM, args=CHROMIUM_ARGS, timeout=PAGE_TIMEOUT_MS
        )
        yield chromium
        chromium.close()


class PageProblems:
    """Collects everything that went wrong while a page loaded."""

    def __init__(self, page, allowed_host="127.0.0.1"):
        self.problems: list[str] = []
        self.allowed_host = allowed_host
        page.on("request", self._on_request)
        page.on("requestfailed", lambda r: self.problems.append(f"failed: {r.url} ({r.failure})"))
        page.on("response", self._on_response)
        page.on("pageerror", lambda e: self.problems.append(f"uncaught JavaScript error: {e}"))
        page.on("console", self._on_console)

    def _on_request(self, request):
        host = urlparse(request.url).hostname
        if request.url.startswith(("http:", "https:", "ws:", "wss:")) and host != self.allowed_host:
            self.problems.append(f"request left {self.allowed_host}: {request.url}")

    def _on_console(self, message):
        # "Failed to load resource" repeats a failed response, which _on_response records
        # with its URL; alone it comes from Chromium's own favicon fetch on the redirect stub
        # index.html (a request the page never made), sometimes logged before it navigates.
        if message.type == "error" and not message.text.startswith("Failed to load resource"):
            self.problems.append(f"console error: {message.text}")

    def _on_response(self, response):
        if response.status >= 400:
            self.problems.append(f"HTTP {response.status}: {response.url}")


# -- the book -----------------------------------------------------------------


def book_python() -> str | None:
    """The interpreter that has Jupyter Book 1.x: LORA_COURSE_BOOK_PYTHON, else this one."""
    chosen = os.environ.get("LORA_COURSE_BOOK_PYTHON")
    if chosen:
        if shutil.which(chosen) is None:
            pytest.fail(f"LORA_COURSE_BOOK_PYTHON={chosen} is not an executable", pytrace=False)
        return chosen
    return sys.executable if importlib.util.find_spec("jupyter_book") else None


@pytest.fixture(scope="session")
def book_html(tmp_path_factory) -> Path:
    """Build book/ once per session into a temporary folder; return the HTML folder."""
    python = book_python()
    if python is None:
        unavailable(
            "Jupyter Book 1.x is not installed here (pip install -e '.[book]'), and "
            "LORA_COURSE_BOOK_PYTHON does not name an interpreter that has it"
        )
    if not list((ROOT / "notebooks").glob("*.ipynb")):
        unavailable("notebooks/ holds no notebooks yet, so the book has no chapters to test")
    out = tmp_path_factory.mktemp("book")
    command = [
        python, "-c", "import sys; from jupyter_book.cli.main import main; sys.exit(main())",
        "build", str(ROOT / "book"), "--path-output", str(out),
        "--builder", "html", "-W", "--keep-going",
    ]  # fmt: skip
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"jupyter-book build took longer than {BUILD_TIMEOUT_S} s", pytrace=False)
    if done.returncode != 0:
        log = (done.stdout + done.stderr)[-6000:]
        pytest.fail(f"jupyter-book build -W failed (exit {done.returncode}):\n{log}", pytrace=False)
    html = out / "_build" / "html"
    assert (html / "intro.html").is_file()
    return html


@pytest.fixture(scope="session")
def book_url(book_html):
    """Serve the built book on 127.0.0.1 on a free port."""

    class QuietHandler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    handler = functools.partial(QuietHandler, directory=str(book_html))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def open_book_page(browser, book_url, path):
    """Open one page, wait for MathJax and the widget manager to finish; return (page, problems)."""
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.set_default_timeout(PAGE_TIMEOUT_MS)
    problems = PageProblems(page)
    page.goto(f"{book_url}/{path}", wait_until="load")
    page.wait_for_load_state("networkidle")
    # MathJax typesets asynchronously after load; wait until it says it is done.
    if page.evaluate("() => !!(window.MathJax && window.MathJax.startup)"):
        page.evaluate("() => window.MathJax.startup.promise")
    return page, problems


def check_math(page, path):
    sources = page.locator("div.math, span.math").count()
    typeset = page.locator("mjx-container").count()
    assert sources > 0, f"{path}: no math on the page to typeset"
    assert typeset >= sources, f"{path}: MathJax typeset {typeset} of {sources} formulas"
    assert page.locator("mjx-merror").count() == 0, f"{path}: MathJax reported a TeX error"


def check_images(page, path):
    sizes = page.evaluate(
        # only images on show: a widget keeps its other frames (and its live frame, empty
        # until a kernel draws it) hidden
        "() => Array.from(document.querySelectorAll('main img')).filter(img => img.checkVisibility())"
        ".map(img => [img.getAttribute('src'), img.naturalWidth, img.naturalHeight])"
    )
    broken = [src for src, w, h in sizes if w == 0 or h == 0]
    assert not broken, f"{path}: images that did not load: {broken}"
    return len(sizes)


def check_widgets(page, path):
    """Every saved widget view must have been replaced by a rendered widget."""
    views = page.locator('script[type="application/vnd.jupyter.widget-view+json"]').count()
    if views:
        page.wait_for_function("n => document.querySelectorAll('.jupyter-widgets').length >= n", arg=views)
        box = page.locator(".jupyter-widgets").first.bounding_box()
        assert box and box["height"] > 0, f"{path}: a widget was rendered with no size"
        state = page.locator('script[type="application/vnd.jupyter.widget-state+json"]')
        if state.count() and "SliderModel" in (state.first.text_content() or ""):
            assert page.locator(".widget-slider").first.is_visible(), f"{path}: slider not drawn"
    return views


def screenshot(page, name):
    """Save the first screen of the page (full-page shots of long pages cost seconds each)."""
    page.screenshot(path=str(SCREENSHOTS / f"{name}.png"))


def test_book_intro_page(browser, book_url):
    page, problems = open_book_page(browser, book_url, "intro.html")
    check_math(page, "intro.html")
    assert "lora_course" in page.title()
    # The navigation lists the notebooks and the four sidebars.
    nav = page.locator("nav.bd-docs-nav").inner_text()
    assert "LoRA made easy" in nav and "Precision and quantization made easy" in nav
    screenshot(page, "book-intro")
    page.close()
    assert not problems.problems, problems.problems


@pytest.mark.parametrize(
    "chapter",
    [
        "attention-is-all-you-need-for-now",
        "lora-made-easy",
        "normalization-made-easy",
        "precision-and-quantization-made-easy",
    ],
)
def test_book_sidebar_pages(browser, book_url, chapter):
    path = f"sidebars/{chapter}.html"
    page, problems = open_book_page(browser, book_url, path)
    check_math(page, path)
    assert page.locator("mjx-container").count() >= 20, f"{path}: expected a page full of math"
    screenshot(page, f"book-sidebar-{chapter}")
    page.close()
    assert not problems.problems, problems.problems


@pytest.fixture(scope="session")
def notebook_reports(browser, book_url, book_html):
    """Visit every notebook page once; record what each check found (an empty list is a pass)."""
    reports = {}
    for file in sorted(book_html.glob("notebooks/[0-9][0-9]_*.html")):  # the .ipynb chapters
        path = file.relative_to(book_html).as_posix()
        page, problems = open_book_page(browser, book_url, path)
        found = {"failures": [], "widgets": 0}
        try:
            if page.locator("div.math, span.math").count():
                check_math(page, path)
            if check_images(page, path) == 0:
                found["failures"].append(f"{path}: a notebook page should show a plot")
            found["widgets"] = check_widgets(page, path)
        except AssertionError as error:
            found["failures"].append(str(error))
        name = "book-" + path.replace("/", "-").removesuffix(".html")
        screenshot(page, name)
        if found["widgets"]:  # and the first rendered widget, with the cell around it
            output = page.locator(".cell_output", has=page.locator(".jupyter-widgets")).first
            output.screenshot(path=str(SCREENSHOTS / f"{name}-widget.png"))
        page.close()
        found["failures"] += [f"{path}: {problem}" for problem in problems.problems]
        reports[path] = found
    return reports


def test_book_notebook_pages(notebook_reports):
    """Every notebook page loads cleanly, typesets its math and shows its plots."""
    assert notebook_reports, "the book has no notebook pages"
    failures = [f for report in notebook_reports.values() for f in report["failures"]]
    assert not failures, "\n".join(failures)


def test_book_static_widgets_render(notebook_reports):
    """Saved ipywidgets state becomes live widgets through the vendored html-manager."""
    with_widgets = {path: r for path, r in notebook_reports.items() if r["widgets"]}
    if not with_widgets:
        unavailable("no notebook in the book has saved widget state yet")
    # check_widgets raised (and was recorded) unless every view on the page rendered.
    failures = [f for report in with_widgets.values() for f in report["failures"]]
    assert not failures, "\n".join(failures)


# Absolute paths of the machine that built the notebooks, and test markers, must never
# reach a page; base64 runs (saved PNGs) are skipped so random letters cannot match.
FORBIDDEN = re.compile(r"NBVAL|/work/|/root/|/tmp/|/home/|site-packages")
BASE64_RUN = re.compile(r"[A-Za-z0-9+/=\\\n]{100,}")
SCRIPT_OR_STYLE = re.compile(r"<(script|style)\b.*?</\1>", re.S)


def book_pages(book_html: Path) -> list[str]:
    return sorted(
        p.relative_to(book_html).as_posix()
        for p in book_html.rglob("*.html")
        if not p.relative_to(book_html).as_posix().startswith(("_static/", "_sources/"))
    )


def test_book_pages_have_no_markers_paths_or_raw_math(book_html):
    """No page shows NBVAL, an absolute machine path or an untypeset $$ (grep of the built HTML)."""
    found = []
    for path in book_pages(book_html):
        html = BASE64_RUN.sub("", (book_html / path).read_text())
        for match in FORBIDDEN.finditer(html):
            start = max(match.start() - 60, 0)
            found.append(f"{path}: {match.group()!r} in ...{html[start : match.end() + 60]!r}")
        if "$$" in SCRIPT_OR_STYLE.sub("", html):
            found.append(f"{path}: a raw $$ outside scripts (math that was not parsed)")
    assert len(book_pages(book_html)) > 20
    assert not found, "\n".join(found[:40])


def test_book_every_page_loads_cleanly(browser, book_url, book_html):
    """Every page of the book: no console error, no failed request, nothing fetched from outside."""
    failures = []
    for path in book_pages(book_html):
        if path.startswith("notebooks/") and path[10:12].isdigit():
            continue  # the notebook chapters are visited, with more checks, by notebook_reports
        page, problems = open_book_page(browser, book_url, path)
        page.close()
        failures += [f"{path}: {problem}" for problem in problems.problems]
    assert not failures, "\n".join(failures)


def test_book_search_works_over_http(browser, book_url):
    page, problems = open_book_page(browser, book_url, "search.html?q=RMSNorm")
    page.wait_for_function(
        "() => /found \\d+ page/.test(document.querySelector('#search-results')?.innerText || '')"
    )
    results = page.locator("#search-results li").count()
    page.close()
    assert results >= 2, "searching the served book for RMSNorm found fewer than 2 pages"
    assert not problems.problems, problems.problems


VISIBLE_FRAME = """root => {
    const shown = Array.from(root.querySelectorAll('img, .widget-html-content'))
        .filter(el => el.checkVisibility() && (el.tagName !== 'IMG' || el.naturalWidth > 0));
    return shown.map(el => el.tagName === 'IMG' ? el.src : el.innerText).join('|');
}"""


def move_first_control(page, widget):
    """Move the widget's first control one step, the way a reader does (keyboard or click)."""
    handle = widget.locator(".widget-slider .noUi-handle, .widget-hslider .noUi-handle").first
    if handle.count():
        handle.focus()
        page.keyboard.press("ArrowRight")
        return
    buttons = widget.locator(".widget-toggle-button")
    if buttons.count() > 1:
        # the one that is not selected
        for i in range(buttons.count()):
            if "mod-active" not in (buttons.nth(i).get_attribute("class") or ""):
                buttons.nth(i).click()
                return
    widget.locator("select").first.select_option(index=1)


def test_book_widgets_change_the_frame_with_no_kernel(browser, book_url, notebook_reports):
    """On every page with a widget, moving its first control shows a different frame."""
    pages = [path for path, r in notebook_reports.items() if r["widgets"]]
    failures, with_frames = [], []
    for path in pages:
        page, problems = open_book_page(browser, book_url, path)
        widgets_on_page = page.locator(".lc-frames")  # interact_frames widgets (rendered by now)
        if widgets_on_page.count():
            with_frames.append(path)
        for n in range(widgets_on_page.count()):
            widget = widgets_on_page.nth(n)
            widget.scroll_into_view_if_needed()
            before = widget.evaluate(VISIBLE_FRAME)
            move_first_control(page, widget)
            try:
                page.wait_for_function(
                    f"([root, before]) => ({VISIBLE_FRAME})(root) !== before && ({VISIBLE_FRAME})(root) !== ''",
                    arg=[widget.element_handle(), before],
                    timeout=5000,
                )
            except Exception:
                failures.append(f"{path}: widget {n} still shows the same frame after its control moved")
            if not before:
                failures.append(f"{path}: widget {n} showed no frame")
        page.close()
        failures += [f"{path}: {problem}" for problem in problems.problems]
    assert len(with_frames) >= 9, f"expected the 9 widget notebooks, found frames on {with_frames}"
    assert not failures, "\n".join(failures)


# -- JupyterLab ---------------------------------------------------------------

SLIDER_CELL = """\
import ipywidgets as widgets

slider = widgets.IntSlider(value=3, min=0, max=10, description="k")
answer = widgets.Label(value="k squared is 9")


def on_change(change):
    answer.value = f"k squared is {change['new'] ** 2}"


slider.observe(on_change, names="value")
widgets.VBox([slider, answer])"""


# interact_frames with both kinds of frame: a figure and text. Grids of floats, so the
# free sliders a live kernel reveals can take values between the frames.
FRAMES_CELL = """\
import matplotlib.pyplot as plt
from lora_course.widgets import interact_frames


def curve(a=1.0):
    plt.figure(figsize=(3, 2))
    plt.plot([0, 1], [0, a])
    plt.title(f"slope {a:g}")
    plt.show()


def words(x=0.0):
    return f"x squared is {x * x:.4f}"


display(interact_frames(curve, {"a": [1.0, 2.0]}))
display(interact_frames(words, {"x": [0.0, 1.0]}))"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def jupyterlab(tmp_path):
    """A JupyterLab server on 127.0.0.1 with a token, serving a slider notebook; yields its URL."""
    if importlib.util.find_spec("jupyterlab") is None or importlib.util.find_spec("ipywidgets") is None:
        unavailable("jupyterlab and ipywidgets are needed in this interpreter")
    import nbformat

    root = tmp_path / "lab"
    root.mkdir()
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(SLIDER_CELL)]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, root / "slider.ipynb")
    frames = nbformat.v4.new_notebook()
    frames.cells = [nbformat.v4.new_code_cell(FRAMES_CELL)]
    frames.metadata["kernelspec"] = nb.metadata["kernelspec"]
    nbformat.write(frames, root / "frames.ipynb")

    token, port = secrets.token_hex(16), free_port()
    home = tmp_path / "home"  # a clean profile: no saved layouts, settings or runtime files
    env = {
        **os.environ,
        "JUPYTER_CONFIG_DIR": str(home / "config"),
        "JUPYTER_RUNTIME_DIR": str(home / "runtime"),
        "JUPYTERLAB_SETTINGS_DIR": str(home / "settings"),
        "JUPYTERLAB_WORKSPACES_DIR": str(home / "workspaces"),
        # the kernel imports lora_course.widgets from this checkout
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    command = [
        sys.executable, "-m", "jupyter", "lab", "--no-browser",
        "--ServerApp.ip=127.0.0.1", f"--ServerApp.port={port}", "--ServerApp.port_retries=0",
        f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={root}",
        "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
        "--LabApp.news_url=None",
        "--LabApp.extension_manager=readonly",
        "--LabApp.expose_app_in_browser=True",  # lets the test ask whether the kernel is ready
    ]  # fmt: skip
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        command.append("--allow-root")  # CI containers run as root
    log = open(tmp_path / "jupyterlab.log", "w")
    server = subprocess.Popen(
        command, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + LAB_START_TIMEOUT_S
        while True:
            if server.poll() is not None:
                pytest.fail(f"jupyter lab exited with {server.returncode}:\n{read_tail(log)}")
            try:
                with urllib.request.urlopen(f"{url}/api/status?token={token}", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"jupyter lab did not start in {LAB_START_TIMEOUT_S} s:\n{read_tail(log)}")
            time.sleep(0.5)
        yield url, token
    finally:
        stop_server(server)
        log.close()


def read_tail(log) -> str:
    log.flush()
    return Path(log.name).read_text()[-4000:]


def stop_server(server: subprocess.Popen) -> None:
    """Stop the server we started (SIGTERM shuts its kernels down), then its process group."""
    if server.poll() is None:
        server.terminate()
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(timeout=10)
    try:  # and anything else still running in the process group we created
        os.killpg(server.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


KERNEL_READY = """() => {
    const kernel = window.jupyterapp?.shell.currentWidget?.sessionContext?.session?.kernel;
    return !!kernel && kernel.connectionStatus === "connected" && kernel.status === "idle";
}"""


def test_jupyterlab_slider_changes_output(browser, jupyterlab):
    url, token = jupyterlab
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    page.set_default_timeout(60_000)
    problems = PageProblems(page)
    page.goto(f"{url}/lab/tree/slider.ipynb?token={token}", wait_until="domcontentloaded")
    try:
        # Wait for the notebook and a connected, idle kernel, then Run > Run All Cells.
        page.locator(".jp-Notebook .jp-Cell").first.wait_for()
        page.wait_for_function(KERNEL_READY)
        page.locator(".lm-MenuBar-itemLabel", has_text="Run").first.click()
        page.get_by_role("menuitem", name="Run All Cells", exact=True).click()

        handle = page.locator(".jp-OutputArea .widget-slider .noUi-handle").first
        handle.wait_for(state="visible")
        before_label = page.locator(".jp-OutputArea").get_by_text("k squared is 9")
        before_label.wait_for(state="visible")
        before = before_label.inner_text()

        handle.focus()
        page.keyboard.press("ArrowRight")  # 3 -> 4; the kernel's observer updates the label
        after_label = page.locator(".jp-OutputArea").get_by_text("k squared is 16")
        after_label.wait_for(state="visible")
        after = after_label.inner_text()
        readout = page.locator(".jp-OutputArea .widget-readout").first.inner_text()
    finally:
        page.screenshot(path=str(SCREENSHOTS / "jupyterlab-slider.png"))
        context.close()
    assert before != after
    assert after.strip() == "k squared is 16"
    assert readout.strip() == "4"
    assert not [p for p in problems.problems if "request left" in p], problems.problems


def test_jupyterlab_frames_recompute_live(browser, jupyterlab):
    """With a kernel, interact_frames redraws for values off its grid (both frame kinds)."""
    url, token = jupyterlab
    context = browser.new_context(viewport={"width": 1280, "height": 1000})
    page = context.new_page()
    page.set_default_timeout(60_000)
    page.goto(f"{url}/lab/tree/frames.ipynb?token={token}", wait_until="domcontentloaded")
    try:
        page.locator(".jp-Notebook .jp-Cell").first.wait_for()
        page.wait_for_function(KERNEL_READY)
        page.locator(".lm-MenuBar-itemLabel", has_text="Run").first.click()
        page.get_by_role("menuitem", name="Run All Cells", exact=True).click()
        boxes = page.locator(".jp-OutputArea .lc-frames")
        page.wait_for_function("() => document.querySelectorAll('.jp-OutputArea .lc-frames').length == 2")
        figure, text = boxes.nth(0), boxes.nth(1)
        page.get_by_text("x squared is 0.0000").wait_for(state="visible")

        # On the grid: the browser switches frames; the kernel then reveals the free sliders.
        for box in (figure, text):
            box.locator(".widget-slider .noUi-handle").first.focus()
            page.keyboard.press("ArrowRight")  # 1.0 -> 2.0 and 0.0 -> 1.0
        page.get_by_text("x squared is 1.0000").wait_for(state="visible")
        free_figure = figure.locator(".widget-slider .noUi-handle").nth(1)
        free_text = text.locator(".widget-slider .noUi-handle").nth(1)
        free_figure.wait_for(state="visible")  # only a live kernel shows these
        free_text.wait_for(state="visible")
        grid_frame = figure.evaluate(VISIBLE_FRAME)

        # Off the grid: only the kernel can draw these.
        free_text.focus()
        page.keyboard.press("ArrowLeft")  # 1.0 -> 0.99, a value no frame holds
        page.get_by_text("x squared is 0.9801").wait_for(state="visible")
        free_figure.focus()
        page.keyboard.press("ArrowLeft")
        page.wait_for_function(
            f"([root, before]) => {{ const now = ({VISIBLE_FRAME})(root); return now && now !== before; }}",
            arg=[figure.element_handle(), grid_frame],
        )
        readout = figure.locator(".widget-readout").nth(1).inner_text()
    finally:
        page.screenshot(path=str(SCREENSHOTS / "jupyterlab-frames.png"))
        context.close()
    assert float(readout) < 2.0
