"""Drive the real ComfyUI frontend in headless Chromium (selenium + Debian's chromium/chromedriver).

Nothing is downloaded: selenium talks to ``/usr/bin/chromedriver``, which starts ``/usr/bin/chromium``
(override with ``$STREAMRT_CHROMIUM`` / ``$STREAMRT_CHROMEDRIVER``). Chromium runs with a fake camera
(``--use-fake-device-for-media-stream``, ``--use-fake-ui-for-media-stream``), so the camera of Stream Frame
Input (and ComfyUI's WebcamCapture) works: it captures Chromium's synthetic test pattern.

Typical use::

    prepare_user_settings(server.user_dir)          # no first-run template dialog
    with ComfyPage.open(server.base_url) as page:   # waits for the app and the StreamRT extension
        page.js("return app.graph.nodes.length")    # `app`, `api`, `LiteGraph` are in scope
        page.screenshot(path)
        errors = page.console_entries(levels=("SEVERE",))
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

CHROMIUM = os.environ.get("STREAMRT_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("STREAMRT_CHROMEDRIVER", "/usr/bin/chromedriver")

#: flags known to work here as root in a closed network (see the machine notes), plus a fake camera
CHROMIUM_FLAGS = (
    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-dev-shm-usage", "--use-fake-device-for-media-stream", "--use-fake-ui-for-media-stream",
)

#: prepended to every script: the frontend's globals under short names
JS_PRELUDE = ("const app = window.comfyAPI.app.app; const api = window.comfyAPI.api.api; "
              "const LiteGraph = window.LiteGraph;\n")


def browser_missing_reason() -> str | None:
    """Why the browser tests can't run here, or None when they can."""
    for path, what in ((CHROMIUM, "chromium"), (CHROMEDRIVER, "chromedriver")):
        if not (os.path.isfile(path) and os.access(path, os.X_OK)):
            return (f"{what} not found at {path} (install Debian's chromium and chromium-driver, "
                    f"or set $STREAMRT_{what.upper()})")
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install selenium)"
    return None


def prepare_user_settings(user_dir: str | os.PathLike, **settings: Any) -> None:
    """Write ComfyUI's per-user settings so a fresh profile skips the first-run template browser."""
    path = Path(user_dir) / "default" / "comfy.settings.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    current = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    current.update({"Comfy.TutorialCompleted": True, **settings})
    path.write_text(json.dumps(current, indent=2), encoding="utf-8")


class ComfyPage:
    """One headless Chromium on the ComfyUI page (fresh profile, 1600x1200 window)."""

    def __init__(self, driver, profile_dir: str):
        self.driver = driver
        self.profile_dir = profile_dir
        self.console: list[dict] = []  # every browser log entry read so far

    # ---- lifecycle
    @classmethod
    def launch(cls, width: int = 1600, height: int = 1200) -> ComfyPage:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service

        profile = tempfile.mkdtemp(prefix="streamrt-chromium-")
        options = webdriver.ChromeOptions()
        options.binary_location = CHROMIUM
        for flag in CHROMIUM_FLAGS:
            options.add_argument(flag)
        options.add_argument(f"--user-data-dir={profile}")
        options.add_argument(f"--window-size={width},{height}")
        options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
        driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
        driver.set_script_timeout(120)
        # Before any page script: no "Try Nodes 2.0" banner above the canvas.
        driver.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument", {
            "source": "try { localStorage.setItem('vueNodesBannerDismissed', 'true') } catch (e) {}"})
        return cls(driver, profile)

    @classmethod
    def open(cls, base_url: str, timeout: float = 60.0) -> ComfyPage:
        page = cls.launch()
        try:
            page.goto(base_url, timeout=timeout)
        except BaseException:
            page.close()
            raise
        return page

    def goto(self, base_url: str, timeout: float = 60.0) -> None:
        """Load the page and wait for the app, the node definitions and the StreamRT extension."""
        self.driver.get(base_url.rstrip("/") + "/")
        self.wait_js("""
            const a = window.comfyAPI?.app?.app;
            return !!(a && a.vueAppReady && a.graph && a.canvas && window.LiteGraph
                      && window.LiteGraph.registered_node_types?.StreamRTSampler && window.StreamRT);
        """, timeout=timeout, what="the ComfyUI app with the StreamRT extension")

    def close(self) -> None:
        try:
            self.driver.quit()
        finally:
            shutil.rmtree(self.profile_dir, ignore_errors=True)

    def __enter__(self) -> ComfyPage:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- javascript
    def js(self, script: str, *args: Any) -> Any:
        """Run a function body (``return ...``) with app/api/LiteGraph in scope."""
        return self.driver.execute_script(JS_PRELUDE + script, *args)

    def js_async(self, script: str, *args: Any) -> Any:
        """Run an async function body; its return value (or a thrown error) comes back.

        A thrown error is re-raised here as RuntimeError with the JS stack.
        """
        wrapped = (JS_PRELUDE + "const __done = arguments[arguments.length - 1];\n"
                   "(async function () {\n" + script + "\n}).apply(null, Array.from(arguments).slice(0, -1))"
                   ".then(v => __done({ok: true, value: v === undefined ? null : v}),"
                   " e => __done({ok: false, error: String(e && e.stack || e)}));")
        result = self.driver.execute_async_script(wrapped, *args)
        if not result.get("ok"):
            raise RuntimeError(f"browser script failed: {result.get('error')}")
        return result.get("value")

    def wait_js(self, script: str, *args: Any, timeout: float = 30.0, poll: float = 0.1,
                what: str | None = None) -> Any:
        """Poll a script until it returns something truthy; return that."""
        deadline = time.monotonic() + timeout
        last_error = None
        while True:
            try:
                value = self.js(script, *args)
                if value:
                    return value
            except Exception as exc:  # noqa: BLE001 - the page may still be loading
                last_error = exc
            if time.monotonic() > deadline:
                raise TimeoutError(f"timed out after {timeout}s waiting for {what or script!r}"
                                   + (f"; last error: {last_error}" if last_error else ""))
            time.sleep(poll)

    def wait_until(self, predicate: Callable[[], Any], timeout: float = 30.0, poll: float = 0.1,
                   what: str = "a condition") -> Any:
        deadline = time.monotonic() + timeout
        while True:
            value = predicate()
            if value:
                return value
            if time.monotonic() > deadline:
                raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
            time.sleep(poll)

    # ---- console
    def read_console(self) -> list[dict]:
        """Fetch the browser log entries logged since the last call (and keep them in ``console``)."""
        entries = self.driver.get_log("browser")
        self.console.extend(entries)
        return entries

    def console_entries(self, levels: Iterable[str] = ("SEVERE", "WARNING"),
                        containing: Iterable[str] = ()) -> list[dict]:
        """All entries so far of these levels whose message has any of ``containing`` (all when empty)."""
        self.read_console()
        needles = [c.lower() for c in containing]
        return [e for e in self.console if e.get("level") in set(levels)
                and (not needles or any(n in str(e.get("message", "")).lower() for n in needles))]

    # ---- canvas
    def node_client_rect(self, node_id: int | str, pad: float = 0.0) -> dict:
        """The node's box (title included) in CSS pixels of the page: {x, y, width, height}."""
        return self.js("""
            const node = app.graph.getNodeById(arguments[0]);
            const pad = arguments[1];
            const ds = app.canvas.ds;
            const r = app.canvas.canvas.getBoundingClientRect();
            const title = LiteGraph.NODE_TITLE_HEIGHT;
            const x0 = (node.pos[0] + ds.offset[0]) * ds.scale + r.left;
            const y0 = (node.pos[1] - title + ds.offset[1]) * ds.scale + r.top;
            return {x: x0 - pad, y: y0 - pad, width: node.size[0] * ds.scale + 2 * pad,
                    height: (node.size[1] + title) * ds.scale + 2 * pad};
        """, node_id, pad)

    def widget_client_point(self, node_id: int | str, widget_name: str) -> dict:
        """The centre of a widget of a node, in CSS pixels of the page: {x, y}."""
        return self.js("""
            const node = app.graph.getNodeById(arguments[0]);
            const w = node.widgets.find(w => w.name === arguments[1]);
            const ds = app.canvas.ds;
            const r = app.canvas.canvas.getBoundingClientRect();
            const h = w.computedHeight ?? LiteGraph.NODE_WIDGET_HEIGHT;
            const y = (w.last_y ?? w.y) + Math.min(h, LiteGraph.NODE_WIDGET_HEIGHT) / 2;
            return {x: (node.pos[0] + node.size[0] / 2 + ds.offset[0]) * ds.scale + r.left,
                    y: (node.pos[1] + y + ds.offset[1]) * ds.scale + r.top};
        """, node_id, widget_name)

    def click_at(self, x: float, y: float, then_move_to: tuple[float, float] | None = None) -> None:
        """A real mouse click (pointer events) at page coordinates (CSS pixels).

        ``then_move_to``: move the mouse there afterwards (so no hover tooltip covers a screenshot).
        """
        from selenium.webdriver.common.actions.action_builder import ActionBuilder

        actions = ActionBuilder(self.driver)
        actions.pointer_action.move_to_location(round(x), round(y))
        actions.pointer_action.click()
        if then_move_to is not None:
            actions.pointer_action.move_to_location(round(then_move_to[0]), round(then_move_to[1]))
        actions.perform()

    def click_element(self, script: str, *args: Any, then_move_to: tuple[float, float] | None = None) -> None:
        """A real click (WebDriver element click: it fails when something covers the element) on the element a
        script returns (``return document.querySelector(...)``); ``then_move_to`` as for :meth:`click_at`."""
        element = self.js(script, *args)
        if element is None:
            raise RuntimeError(f"no element to click: {script!r}")
        element.click()
        if then_move_to is not None:
            from selenium.webdriver.common.actions.action_builder import ActionBuilder

            actions = ActionBuilder(self.driver)
            actions.pointer_action.move_to_location(round(then_move_to[0]), round(then_move_to[1]))
            actions.perform()

    def redraw(self) -> None:
        """Force a full canvas redraw and wait two animation frames."""
        self.js_async("""
            app.canvas.setDirty(true, true);
            app.canvas.draw(true, true);
            await new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)));
        """)

    def screenshot(self, path: str | os.PathLike, clip: dict | None = None) -> Path:
        """Save a PNG of the page, or of ``clip`` ({x, y, width, height} in CSS pixels)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        if clip is None:
            self.driver.save_screenshot(str(path))
            return path
        import base64

        shot = self.driver.execute_cdp_cmd("Page.captureScreenshot", {
            "format": "png", "clip": {"x": max(0.0, clip["x"]), "y": max(0.0, clip["y"]),
                                      "width": clip["width"], "height": clip["height"], "scale": 1}})
        path.write_bytes(base64.b64decode(shot["data"]))
        return path
