"""A real headless browser for the report tests: Debian's Chromium (`apt-get install chromium`; scripts/test.sh
installs it when it runs as root and it is missing).

`inspect_page` loads a page in Chromium inside a small harness page (an iframe, read with
--allow-file-access-from-files), lets the browser lay it out, and returns what it drew: per
`figure.plot`, the SVG's rendered size and how many of its shapes have a non-empty box; the resources the
page fetched or points to (a self-contained page has none: no image, script, style sheet or frame
source, no `<use>` of another file); and the console messages Chromium logged for the page.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import pytest

REQUIRED_ENV = "BRIDGEREC_BROWSER_REQUIRED"  # set by scripts/test.sh where it could install Chromium

HARNESS = """<!DOCTYPE html><html><head><meta charset="utf-8"></head><body>
<iframe id="page" src="PAGE_URL" style="width: 1280px; height: 3000px; border: 0"></iframe>
<pre id="result">not loaded</pre>
<script>
const frame = document.getElementById("page");
frame.addEventListener("load", () => {
  const doc = frame.contentDocument, win = frame.contentWindow;
  const plots = [...doc.querySelectorAll("figure.plot")].map((figure) => {
    const svg = figure.querySelector("svg");
    const box = svg ? svg.getBoundingClientRect() : { width: 0, height: 0 };
    const shapes = svg ? [...svg.querySelectorAll("path, line, rect, polyline, polygon, use, text")] : [];
    const drawn = shapes.filter((e) => { const b = e.getBBox(); return b.width > 0 || b.height > 0; });
    return { id: figure.id, width: box.width, height: box.height, shapes: shapes.length, drawn: drawn.length };
  });
  // What the page loads besides itself: fetched resources, and every element that points elsewhere.
  const refs = [...doc.querySelectorAll("[src], link[href], image, use, object, embed")]
    .map((e) => e.getAttribute("src") || e.getAttribute("href") || e.getAttribute("xlink:href") || e.getAttribute("data") || "")
    .filter((u) => u && !u.startsWith("#"));
  const resources = [...win.performance.getEntriesByType("resource").map((e) => e.name), ...refs];
  document.getElementById("result").textContent = JSON.stringify(
    { title: doc.title, plots, resources, text: doc.body.innerText.length });
});
</script></body></html>
"""


def chromium() -> str:
    """The Chromium binary; skips the test where there is none, unless the test command said one must be
    there (then it fails)."""
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found:
        return found
    if os.environ.get(REQUIRED_ENV) or os.environ.get("CI"):
        pytest.fail("Chromium is missing: scripts/test.sh installs it (apt-get install chromium) as root")
    pytest.skip("Chromium is not installed (apt-get install chromium); scripts/test.sh installs it in CI")


def _flags() -> list[str]:
    return ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run"]


def inspect_page(page: Path) -> dict[str, Any]:
    """What Chromium drew for `page` (see the module's doc), plus `console`: its console lines."""
    binary = chromium()
    with tempfile.TemporaryDirectory() as tmp:
        harness = Path(tmp) / "harness.html"
        harness.write_text(HARNESS.replace("PAGE_URL", page.resolve().as_uri()))
        done = subprocess.run(
            [
                binary,
                *_flags(),
                "--allow-file-access-from-files",
                "--enable-logging=stderr",
                "--v=0",
                f"--user-data-dir={tmp}/profile",
                "--virtual-time-budget=10000",
                "--dump-dom",
                harness.as_uri(),
            ],
            capture_output=True,
            text=True,
            timeout=180,
        )
    found = re.search(r'<pre id="result">(.*?)</pre>', done.stdout, re.S)
    assert found, f"Chromium gave no DOM (exit {done.returncode}): {done.stderr[-2000:]}"
    text = (
        found.group(1).replace("&quot;", '"').replace("&lt;", "<").replace("&gt;", ">").replace("&amp;", "&")
    )
    assert text != "not loaded", "the page did not load in Chromium"
    result: dict[str, Any] = json.loads(text)
    result["console"] = [line for line in done.stderr.splitlines() if ":CONSOLE" in line]
    return result


def screenshot(page: Path, out: Path, width: int = 1280, height: int = 2400) -> Path:
    """A PNG of `page` as Chromium draws it at `width` x `height` CSS pixels."""
    binary = chromium()
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            [
                binary,
                *_flags(),
                "--hide-scrollbars",
                f"--user-data-dir={tmp}/profile",
                f"--window-size={width},{height}",
                f"--screenshot={out}",
                page.resolve().as_uri(),
            ],
            capture_output=True,
            text=True,
            timeout=180,
            check=True,
        )
    return out
