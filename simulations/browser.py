"""Headless Chromium for the reports: check a page offline (every image decoded, no request left the file) and take screenshots.

The check loads an instrumented copy of the page with a Content-Security-Policy that allows only
inline styles, inline scripts and data: images; anything else the page tries to load (a font, a
stylesheet, a script, an image file, a web address) is blocked and reported by the
`securitypolicyviolation` events, and the resource-timing list names whatever was fetched. Name
resolution and the proxy point nowhere as well, so nothing can reach a network either way.
"""

from __future__ import annotations

import html
import json
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")
OFFLINE = ("--host-resolver-rules=MAP * ~NOTFOUND", "--proxy-server=http://127.0.0.1:9", "--proxy-bypass-list=<-loopback>")
QUIET = ("--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-extensions", "--mute-audio",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-default-apps", "--hide-scrollbars", "--force-device-scale-factor=1")
CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'"
RESULT_ID = "histofed-browser-check"
PROBE = """<script>(function(){var blocked=[];
document.addEventListener('securitypolicyviolation',function(e){blocked.push(e.blockedURI||e.violatedDirective);});
window.addEventListener('load',function(){setTimeout(function(){
var images=[].slice.call(document.images).map(function(i){return {alt:i.alt,complete:i.complete,width:i.naturalWidth,height:i.naturalHeight};});
var fetched=performance.getEntriesByType('resource').map(function(e){return e.name;});
var out=document.createElement('pre');out.id='%s';
out.textContent=JSON.stringify({images:images,fetched:fetched,blocked:blocked,
height:document.documentElement.scrollHeight,sections:[].slice.call(document.querySelectorAll('section[id]')).map(function(s){return [s.id,s.getBoundingClientRect().top+window.scrollY];})});
document.body.appendChild(out);},300);});})();</script>""" % RESULT_ID


class BrowserError(RuntimeError):
    """Chromium is missing or did not produce a result."""


@dataclass(frozen=True)
class PageCheck:
    """What a real browser saw when it opened a page offline."""

    images: list[dict[str, Any]]
    fetched: list[str]  # resource-timing entries other than data: URIs
    blocked: list[str]  # loads the page attempted that were not inline / data:
    height: int
    section_tops: dict[str, float]  # section id → CSS pixels from the top of the page, in page order

    @property
    def sections(self) -> list[str]:
        """The ids of the page's sections, in order."""
        return list(self.section_tops)

    @property
    def undecoded(self) -> list[str]:
        """Images that did not decode (natural width 0)."""
        return [i["alt"] for i in self.images if not i["complete"] or i["width"] <= 0]

    @property
    def self_contained(self) -> bool:
        """Nothing left the file: no fetch, no blocked attempt."""
        return not self.fetched and not self.blocked


def find_chromium() -> str:
    """Path of a Chromium/Chrome executable ($HISTOFED_CHROMIUM first); BrowserError naming the fix when none."""
    for name in (os.environ.get("HISTOFED_CHROMIUM", ""), *CANDIDATES):
        path = shutil.which(name) if name else None
        if path:
            return path
    raise BrowserError("no Chromium found: install it (Debian/Ubuntu: apt-get install -y chromium) or set HISTOFED_CHROMIUM")


def _run(args: list[str], timeout: float) -> str:
    with tempfile.TemporaryDirectory(prefix="histofed-chromium-") as profile:
        cmd = [find_chromium(), *QUIET, *OFFLINE, f"--user-data-dir={profile}", *args]
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
        except subprocess.TimeoutExpired:
            raise BrowserError(f"chromium did not finish within {timeout:.0f} s") from None
    if done.returncode != 0:
        raise BrowserError(f"chromium exited {done.returncode}: {done.stderr.strip()[-500:]}")
    return done.stdout


def check_page(page: Path, *, width: int = 1220, timeout: float = 60.0) -> PageCheck:
    """Open an instrumented copy of the page (beside it, removed after) offline, `width` CSS pixels wide; report what the browser saw."""
    page = Path(page).resolve()
    text = page.read_text(encoding="utf-8")
    head = re.search(r"<head[^>]*>", text, flags=re.IGNORECASE)
    if head is None:
        raise BrowserError(f"{page} has no <head>")
    inject = f'<meta http-equiv="Content-Security-Policy" content="{CSP}">{PROBE}'
    probe = page.with_name(f".check-{page.name}")
    probe.write_text(text[: head.end()] + inject + text[head.end():], encoding="utf-8")
    try:
        dom = _run([f"--window-size={width},900", "--virtual-time-budget=15000", "--dump-dom", probe.as_uri()], timeout)
    finally:
        probe.unlink(missing_ok=True)
    found = re.search(rf'<pre id="{RESULT_ID}">(.*?)</pre>', dom, flags=re.DOTALL)
    if found is None:
        raise BrowserError(f"the probe script did not report for {page} (did the page load?)")
    seen = json.loads(html.unescape(found.group(1)))
    return PageCheck(
        images=seen["images"], fetched=[u for u in seen["fetched"] if not u.startswith("data:")],
        blocked=seen["blocked"], height=int(seen["height"]), section_tops={k: float(v) for k, v in seen["sections"]},
    )


def screenshot(page: Path, out: Path, *, width: int = 1200, height: int | None = None, timeout: float = 60.0) -> Path:
    """PNG of the page at `width` CSS pixels, as tall as the page (or `height`), rendered offline."""
    page = Path(page).resolve()
    height = height or check_page(page, width=width, timeout=timeout).height
    out = Path(out).resolve()
    _run([f"--window-size={width},{height}", "--virtual-time-budget=5000", f"--screenshot={out}", page.as_uri()],
         timeout)
    if not out.is_file():
        raise BrowserError(f"chromium wrote no screenshot for {page}")
    return out
