#!/usr/bin/env python3
"""Drives `llmtune web` in headless Chromium over the DevTools protocol (no puppeteer).

Starts `llmtune web` (loopback, free port) and `chromium --headless --remote-debugging-port`,
opens the page, sets the sliders (temperature 0, a short max_new_tokens), types a question,
clicks Send, reads the reply from the DOM while it streams (it must grow in several steps),
asks a follow-up (the history must be sent: the second request's prompt is longer), saves a
screenshot, then clicks "Clear history" and checks the conversation is gone.

Needs: chromium, and Python with `websocket-client` (scripts/web_check.sh sets both up).
"""

import argparse
import base64
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request

import websocket

sys.path.insert(0, os.path.dirname(__file__))
from serve_util import Server  # noqa: E402


class Cdp:
    def __init__(self, ws_url):
        self.ws = websocket.create_connection(ws_url, timeout=60, suppress_origin=True)
        self.n = 0

    def call(self, method, **params):
        self.n += 1
        me = self.n
        self.ws.send(json.dumps({"id": me, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv())
            if msg.get("id") == me:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})

    def eval(self, expr):
        r = self.call("Runtime.evaluate", expression=expr, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in r:
            raise RuntimeError(f"{expr}: {r['exceptionDetails']}")
        return r["result"].get("value")

    def wait(self, expr, timeout=120, what=None):
        t0 = time.time()
        while time.time() - t0 < timeout:
            v = self.eval(expr)
            if v:
                return v
            time.sleep(0.1)
        raise SystemExit(f"timed out waiting for {what or expr}")

    def click(self, selector):
        box = self.eval(
            f"(() => {{ const r = document.querySelector({json.dumps(selector)}).getBoundingClientRect();"
            " return [r.x + r.width / 2, r.y + r.height / 2]; })()"
        )
        for kind in ("mousePressed", "mouseReleased"):
            self.call("Input.dispatchMouseEvent", type=kind, x=box[0], y=box[1], button="left", clickCount=1)


def ask(cdp, question, k):
    """Types `question`, clicks Send, and follows the k-th assistant reply until it is done.
    Returns (final text, distinct partial lengths seen while streaming)."""
    cdp.click("#q")
    cdp.call("Input.insertText", text=question)
    assert cdp.eval("document.querySelector('#q').value") == question
    cdp.click("#send")
    sel = f"document.querySelectorAll('.msg.assistant')[{k}]"
    cdp.wait(f"!!{sel}", 30, "the reply element")
    seen = []
    t0 = time.time()
    while time.time() - t0 < 300:
        text, done = cdp.eval(f"[{sel}.querySelector('p').textContent, {sel}.dataset.done === 'true']")
        if not seen or len(text) != seen[-1]:
            seen.append(len(text))
        if done:
            return text, seen
        time.sleep(0.02)
    raise SystemExit("the reply did not finish")


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model_name_or_path", default="smollm2-135m")
    ap.add_argument("--template", default=None)
    ap.add_argument("--chromium", default=shutil.which("chromium") or shutil.which("chromium-browser"))
    ap.add_argument("--screenshot", default="docs/web.png")
    ap.add_argument("--max_new_tokens", type=int, default=40)
    a = ap.parse_args()
    if not a.chromium:
        raise SystemExit("no chromium found (apt-get install -y chromium)")

    args = ["--model_name_or_path", a.model_name_or_path]
    if a.template:
        args += ["--template", a.template]
    port = 9300 + os.getpid() % 500
    profile = tempfile.mkdtemp(prefix="llmtune-web-chromium-")
    with Server(args, cmd="web") as srv:
        print(f"llmtune web at {srv.base}/ ({srv.bin})")
        chrome = subprocess.Popen(
            [a.chromium, "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run",
             "--disable-dev-shm-usage", f"--remote-debugging-port={port}", "--remote-debugging-address=127.0.0.1",
             f"--user-data-dir={profile}", "--window-size=1000,1000", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        try:
            targets = None
            for _ in range(100):
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=2) as r:
                        targets = [t for t in json.load(r) if t.get("type") == "page"]
                    if targets:
                        break
                except OSError:
                    pass
                time.sleep(0.2)
            if not targets:
                raise SystemExit("chromium did not open its DevTools port")
            cdp = Cdp(targets[0]["webSocketDebuggerUrl"])
            version = cdp.call("Browser.getVersion")["product"]
            print(f"browser: {version}")
            cdp.call("Page.enable")
            cdp.call("Emulation.setDeviceMetricsOverride", width=1000, height=1000, deviceScaleFactor=1, mobile=False)
            cdp.call("Page.navigate", url=srv.base + "/")
            cdp.wait("document.readyState === 'complete'", 30, "the page to load")
            model = cdp.wait(
                "(() => { const t = document.querySelector('#model').textContent; return t !== '…' && t; })()",
                30, "the model name")
            print(f"page title {cdp.eval('document.title')!r}, model {model!r}")
            # Sliders: greedy, short replies (set like a user would, firing input events).
            for name, value in (("temperature", 0), ("max_new_tokens", a.max_new_tokens), ("top_p", 0.9)):
                cdp.eval(
                    f"(() => {{ const e = document.querySelector('#{name}'); e.value = {value};"
                    " e.dispatchEvent(new Event('input', {bubbles: true})); })()"
                )
                shown = cdp.eval(f"document.querySelector('#{name}-v').value")
                assert float(shown) == float(value), (name, shown)
            # Count the requests and their prompt sizes (history must grow).
            cdp.eval(
                "(() => { window.__bodies = []; const f = window.fetch; window.fetch = (u, o) => {"
                " if (o && o.body) window.__bodies.push(JSON.parse(o.body)); return f(u, o); }; })()"
            )
            q1 = "What is the capital of France?"
            t0 = time.time()
            r1, seen1 = ask(cdp, q1, 0)
            print(f"reply 1 ({time.time() - t0:.1f} s, {len(seen1)} distinct lengths while streaming): {r1!r}")
            assert r1.strip(), "empty reply"
            assert len(seen1) >= 3, f"the reply did not stream: lengths {seen1}"
            q2 = "And of Italy?"
            r2, seen2 = ask(cdp, q2, 1)
            print(f"reply 2 ({len(seen2)} distinct lengths): {r2!r}")
            bodies = cdp.eval("window.__bodies")
            assert len(bodies) == 2, bodies
            m2 = bodies[1]["messages"]
            assert [m["role"] for m in m2] == ["user", "assistant", "user"], m2
            assert m2[0]["content"] == q1 and m2[1]["content"] == r1 and m2[2]["content"] == q2, m2
            assert bodies[1]["stream"] is True and bodies[1]["temperature"] == 0
            assert bodies[1]["max_tokens"] == a.max_new_tokens and bodies[1]["top_p"] == 0.9, bodies[1]
            print("history: the second request carried [user, assistant, user]")
            shot = cdp.call("Page.captureScreenshot", format="png")["data"]
            os.makedirs(os.path.dirname(os.path.abspath(a.screenshot)), exist_ok=True)
            with open(a.screenshot, "wb") as f:
                f.write(base64.b64decode(shot))
            print(f"screenshot: {a.screenshot}")
            cdp.click("#clear")
            cdp.wait("document.querySelectorAll('.msg').length === 0", 10, "the history to clear")
            r3, _ = ask(cdp, q2, 0)
            bodies = cdp.eval("window.__bodies")
            assert len(bodies[2]["messages"]) == 1, bodies[2]
            print("clear history: the log is empty and the next request carries one message")
        finally:
            chrome.terminate()
            try:
                chrome.wait(timeout=10)
            except subprocess.TimeoutExpired:
                chrome.kill()
            shutil.rmtree(profile, ignore_errors=True)
    print("web check: OK")


if __name__ == "__main__":
    main()
