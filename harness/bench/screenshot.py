"""Render an HTML report in headless chromium, offline: a PNG screenshot and a check that every image
rendered and that nothing was fetched from outside the file.

The check reads two things. Statically, every ``src``/``href``/``url()``/``@import`` in the HTML must be a
``data:`` URI or a ``#`` anchor. Dynamically, the page carries :data:`RENDER_PROBE` (the HTML report
includes it; other pages get it injected into a temporary copy): on load it writes into a hidden element
how many ``<img>`` there are, how many decoded (``naturalWidth > 0``), which resources the page requested
(``performance.getEntriesByType('resource')``, minus ``data:``) and the page height;
``chromium --headless --dump-dom`` then returns that element. Chromium runs with networking disabled (all
host names resolve to nothing, and a proxy to a closed local port), so a stray reference fails instead of
leaving the machine.
"""

from __future__ import annotations

import html as html_lib
import json
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

PROBE_ID = "render-probe"
RENDER_PROBE = (
    f'<div id="{PROBE_ID}" hidden></div>\n'
    "<script>\n"
    "window.addEventListener('load', function () {\n"
    "  var images = Array.from(document.images);\n"
    "  var rendered = images.filter(function (i) { return i.complete && i.naturalWidth > 0; }).length;\n"
    "  var requests = performance.getEntriesByType('resource').map(function (e) { return e.name; })\n"
    "    .filter(function (n) { return n.indexOf('data:') !== 0; });\n"
    f"  var probe = document.getElementById('{PROBE_ID}');\n"
    "  probe.setAttribute('data-images', images.length);\n"
    "  probe.setAttribute('data-rendered', rendered);\n"
    "  probe.setAttribute('data-requests', JSON.stringify(requests));\n"
    "  probe.setAttribute('data-height', document.documentElement.scrollHeight);\n"
    "});\n"
    "</script>\n"
)

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
OFFLINE_FLAGS = (
    "--host-resolver-rules=MAP * ~NOTFOUND",
    "--proxy-server=127.0.0.1:9",
    "--proxy-bypass-list=<-loopback>",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--no-default-browser-check",
)
TIMEOUT_S = 60
MAX_HEIGHT = 16000

_REFERENCE_PATTERNS = (
    re.compile(r"""\b(?:src|href|srcset|poster|action|data|background)\s*=\s*(?:"([^"]*)"|'([^']*)'|([^\s>]+))""",
               re.IGNORECASE),
    re.compile(r"""url\(\s*(?:"([^"]*)"|'([^']*)'|([^)\s]*))\s*\)""", re.IGNORECASE),
    re.compile(r"""@import\s+(?:"([^"]*)"|'([^']*)'|(\S+))""", re.IGNORECASE),
)


class ChromiumMissing(RuntimeError):
    """No headless chromium on this machine."""


def find_chromium() -> str:
    """The chromium executable ($CHROMIUM, else the first of :data:`CHROMIUM_NAMES` on PATH)."""
    candidates = [os.environ["CHROMIUM"]] if os.environ.get("CHROMIUM") else list(CHROMIUM_NAMES)
    for name in candidates:
        found = shutil.which(name)
        if found:
            return found
    raise ChromiumMissing(f"headless chromium not found (looked for {', '.join(candidates)} on PATH; set $CHROMIUM)")


def external_references(html_text: str) -> list[str]:
    """Every src/href/url()/@import value in the HTML that is not a ``data:`` URI or a ``#`` anchor."""
    found: list[str] = []
    for pattern in _REFERENCE_PATTERNS:
        for match in pattern.finditer(html_text):
            value = next((g for g in match.groups() if g is not None), "").strip()
            if value and not value.startswith(("data:", "#")) and value not in found:
                found.append(value)
    return found


def _run_chromium(args: list[str]) -> subprocess.CompletedProcess:
    with tempfile.TemporaryDirectory(prefix="gemma-chromium-") as profile:
        command = [find_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                   f"--user-data-dir={profile}", *OFFLINE_FLAGS, *args]
        done = subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT_S)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"chromium exited with {done.returncode}: {last}")
    return done


def _probe_attributes(dom: str) -> dict[str, str]:
    tag = re.search(rf'<div[^>]*\bid="{PROBE_ID}"[^>]*>', dom)
    if tag is None:
        raise RuntimeError("chromium's DOM has no render probe (the page did not load)")
    return {k: html_lib.unescape(v) for k, v in re.findall(r'\b(data-[a-z]+)="([^"]*)"', tag.group(0))}


def _with_probe(html_path: Path, scratch: Path) -> Path:
    """The page itself when it carries the probe, else a copy with the probe injected before </body>."""
    text = html_path.read_text(encoding="utf-8")
    if f'id="{PROBE_ID}"' in text:
        return html_path
    cut = text.lower().rfind("</body>")
    cut = len(text) if cut < 0 else cut
    copy = scratch / html_path.name
    copy.write_text(text[:cut] + RENDER_PROBE + text[cut:], encoding="utf-8")
    return copy


def check(html_path: str | os.PathLike) -> dict:
    """Load the page offline: {"images", "rendered", "external_requests", "height"}."""
    html_path = Path(html_path).resolve()
    if not html_path.exists():
        raise FileNotFoundError(f"{html_path}: no such HTML file")
    static = external_references(html_path.read_text(encoding="utf-8"))
    with tempfile.TemporaryDirectory(prefix="gemma-probe-") as scratch:
        page = _with_probe(html_path, Path(scratch))
        dom = _run_chromium(["--virtual-time-budget=5000", "--dump-dom", page.as_uri()]).stdout
    probe = _probe_attributes(dom)
    if "data-images" not in probe:
        raise RuntimeError("the render probe did not run (no load event within chromium's time budget)")
    requested = json.loads(probe.get("data-requests") or "[]")
    return {
        "images": int(probe["data-images"]),
        "rendered": int(probe["data-rendered"]),
        "external_requests": static + [r for r in requested if r not in static],
        "height": int(probe.get("data-height") or 0),
    }


def screenshot(html_path: str | os.PathLike, png_path: str | os.PathLike, width: int = 1400,
               height: int | None = None) -> dict:
    """A PNG of the page (``height`` None: the whole page, up to :data:`MAX_HEIGHT` px) plus :func:`check`'s
    counts: {"png", "width", "height", "bytes", "images", "rendered", "external_requests"}."""
    result = check(html_path)
    height = height or min(max(result["height"], 600), MAX_HEIGHT)
    png_path = Path(png_path).resolve()
    png_path.parent.mkdir(parents=True, exist_ok=True)
    _run_chromium([f"--window-size={width},{height}", f"--screenshot={png_path}",
                   Path(html_path).resolve().as_uri()])
    if not png_path.exists() or png_path.stat().st_size == 0:
        raise RuntimeError(f"chromium wrote no screenshot to {png_path}")
    return {"png": str(png_path), "width": width, "height": height, "bytes": png_path.stat().st_size, **result}


def main(argv: list[str] | None = None) -> int:
    """``python -m harness.bench.screenshot REPORT.html SHOT.png``: exit 1 unless every image rendered
    and no request left the file."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(prog="python -m harness.bench.screenshot", description=main.__doc__)
    parser.add_argument("html")
    parser.add_argument("png")
    args = parser.parse_args(argv)
    try:
        shot = screenshot(args.html, args.png)
    except (ChromiumMissing, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    ok = shot["rendered"] == shot["images"] and not shot["external_requests"]
    print(f"{shot['png']}: {shot['rendered']}/{shot['images']} images rendered, "
          f"{len(shot['external_requests'])} external requests ({shot['width']}x{shot['height']} px)")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
