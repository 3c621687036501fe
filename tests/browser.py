"""Open a local HTML file in headless Chromium over the DevTools protocol (`--remote-debugging-pipe`: JSON messages,
NUL-terminated, written to the browser's fd 3 and read from its fd 4) and report what a reader's browser would do:
every request the page made, every console error and uncaught exception, the values of a few JavaScript
expressions once the page has loaded, and a PNG screenshot. No extra Python package: the protocol is plain JSON.
"""

from __future__ import annotations

import base64
import json
import os
import select
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

CHROMIUM = Path("/usr/bin/chromium")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars",
         "--remote-debugging-pipe"]


@dataclass
class PageVisit:
    requests: list[str] = field(default_factory=list)  # every URL the page asked for, its own file included
    errors: list[str] = field(default_factory=list)  # console errors, uncaught exceptions, failed loads
    values: dict[str, object] = field(default_factory=dict)  # expression -> its value after load
    png: bytes = b""


class _Pipe:
    def __init__(self, write_fd: int, read_fd: int, timeout: float):
        self.w, self.r, self.buf, self.next_id = write_fd, read_fd, b"", 0
        self.deadline = time.monotonic() + timeout
        self.events: list[dict] = []

    def send(self, method: str, params: dict | None = None, session: str | None = None) -> dict:
        self.next_id += 1
        msg = {"id": self.next_id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        os.write(self.w, json.dumps(msg).encode() + b"\0")
        while True:
            reply = self._read()
            if reply.get("id") == self.next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self.events.append(reply)

    def wait_for(self, method: str) -> dict:
        for i, event in enumerate(self.events):
            if event.get("method") == method:
                return self.events[i]
        while True:
            event = self._read()
            self.events.append(event)
            if event.get("method") == method:
                return event

    def _read(self) -> dict:
        while b"\0" not in self.buf:
            left = self.deadline - time.monotonic()
            if left <= 0 or not select.select([self.r], [], [], left)[0]:
                raise TimeoutError("Chromium did not answer in time")
            chunk = os.read(self.r, 1 << 20)
            if not chunk:
                raise RuntimeError("Chromium closed the DevTools pipe")
            self.buf += chunk
        msg, self.buf = self.buf.split(b"\0", 1)
        return json.loads(msg)


def visit(page: Path, expressions: tuple[str, ...] = (), width: int = 1200, height: int = 2000,
          settle_s: float = 1.0, timeout: float = 90.0, profile: Path | None = None) -> PageVisit:
    """Load `page`, wait for its load event and `settle_s` more, evaluate `expressions`, take a screenshot."""
    to_browser, from_browser = os.pipe(), os.pipe()

    def child_fds():  # the browser reads commands on fd 3 and writes replies on fd 4 (copies first: no clash)
        read, write = os.dup(to_browser[0]), os.dup(from_browser[1])
        os.dup2(read, 3)
        os.dup2(write, 4)

    args = [str(CHROMIUM), *FLAGS, f"--user-data-dir={profile or page.parent / '.chromium-profile'}"]
    # close_fds=False: fds 3 and 4 exist only after child_fds; Python's own fds are non-inheritable (PEP 446)
    proc = subprocess.Popen(args, preexec_fn=child_fds, close_fds=False,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    os.close(to_browser[0]), os.close(from_browser[1])
    pipe = _Pipe(to_browser[1], from_browser[0], timeout)
    try:
        return _visit(pipe, page, expressions, width, height, settle_s)
    finally:
        try:
            pipe.send("Browser.close")
        except (OSError, RuntimeError, TimeoutError):
            pass
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        os.close(to_browser[1]), os.close(from_browser[0])


def _visit(pipe: _Pipe, page: Path, expressions: tuple[str, ...], width: int, height: int,
           settle_s: float) -> PageVisit:
    target = pipe.send("Target.createTarget", {"url": "about:blank"})["targetId"]
    session = pipe.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
    for domain in ("Page", "Network", "Runtime", "Log"):
        pipe.send(f"{domain}.enable", session=session)
    pipe.send("Emulation.setDeviceMetricsOverride",
              {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False}, session=session)
    pipe.send("Page.navigate", {"url": page.resolve().as_uri()}, session=session)
    pipe.wait_for("Page.loadEventFired")
    end = time.monotonic() + settle_s
    while time.monotonic() < end:  # events that arrive after load: late requests, errors from timers
        pipe.send("Runtime.evaluate", {"expression": "0"}, session=session)
        time.sleep(0.1)
    out = PageVisit()
    for expr in expressions:
        result = pipe.send("Runtime.evaluate", {"expression": expr, "returnByValue": True}, session=session)
        if "exceptionDetails" in result:
            out.errors.append(f"{expr}: {result['exceptionDetails'].get('text')}")
        out.values[expr] = result.get("result", {}).get("value")
    shot = pipe.send("Page.captureScreenshot", {"format": "png"}, session=session)
    out.png = base64.b64decode(shot["data"])
    _collect(pipe.events, out)
    return out


def _collect(events: list[dict], out: PageVisit) -> None:
    for e in events:
        method, p = e.get("method"), e.get("params", {})
        if method == "Network.requestWillBeSent":
            out.requests.append(p["request"]["url"])
        elif method == "Network.loadingFailed":
            out.errors.append(f"load failed: {p.get('errorText')}")
        elif method == "Runtime.exceptionThrown":
            details = p.get("exceptionDetails", {})
            out.errors.append(f"exception: {details.get('exception', {}).get('description') or details.get('text')}")
        elif method == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
            out.errors.append("console: " + " ".join(str(a.get("value", a.get("description"))) for a in p["args"]))
        elif method == "Log.entryAdded" and p["entry"].get("level") == "error":
            out.errors.append(f"log: {p['entry'].get('text')} {p['entry'].get('url', '')}")
