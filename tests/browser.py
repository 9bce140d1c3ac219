"""A headless Chromium driven over the DevTools protocol (websocket via aiohttp), for tests that
check pages the project writes the way a browser shows them."""
from __future__ import annotations

import asyncio
import base64
import itertools
import json
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import aiohttp


class Chromium:
    """One headless Chromium process; `inspect(url, expression, screenshot)` opens a tab."""

    def __init__(self, binary: str | None = None, timeout: float = 60.0):
        self.binary = binary or shutil.which("chromium") or shutil.which("chromium-browser")
        if not self.binary:
            raise FileNotFoundError("chromium is not installed (Debian package 'chromium'; "
                                    "scripts/setup_system.sh installs it)")
        self.profile = tempfile.mkdtemp(prefix="tsdsae-chromium-")
        self.proc = subprocess.Popen(
            [self.binary, "--headless=new", "--no-sandbox", "--disable-gpu",
             "--disable-dev-shm-usage", "--no-first-run", "--mute-audio",
             "--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0",
             f"--user-data-dir={self.profile}", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        port_file = Path(self.profile) / "DevToolsActivePort"
        deadline = time.monotonic() + timeout
        while not (port_file.exists() and len(port_file.read_text().splitlines()) >= 2):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.close()
                raise RuntimeError("chromium did not open its DevTools port")
            time.sleep(0.1)
        port, path = port_file.read_text().splitlines()[:2]
        self.ws_url = f"ws://127.0.0.1:{port}{path}"
        self.timeout = timeout

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.profile, ignore_errors=True)

    def inspect(self, url: str, expression: str, screenshot: str | Path | None = None,
                width: int = 1200):
        """Load `url` in a new tab, wait for its load event, return the JSON value of the
        (awaited) JavaScript `expression`, and write a full-page PNG to `screenshot`."""
        return asyncio.run(asyncio.wait_for(
            self._inspect(url, expression, screenshot, width), self.timeout))

    async def _inspect(self, url, expression, screenshot, width):
        ids = itertools.count(1)
        async with aiohttp.ClientSession() as http, http.ws_connect(
                self.ws_url, max_msg_size=0) as ws:
            pending: dict[int, asyncio.Future] = {}
            events: asyncio.Queue = asyncio.Queue()

            async def reader():
                async for msg in ws:
                    data = json.loads(msg.data)
                    if "id" in data and data["id"] in pending:
                        pending.pop(data["id"]).set_result(data)
                    elif "method" in data:
                        await events.put(data)

            task = asyncio.create_task(reader())

            async def send(method, params=None, session=None):
                i = next(ids)
                fut = asyncio.get_running_loop().create_future()
                pending[i] = fut
                msg = {"id": i, "method": method, "params": params or {}}
                if session:
                    msg["sessionId"] = session
                await ws.send_str(json.dumps(msg))
                reply = await fut
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]

            target = (await send("Target.createTarget", {"url": "about:blank"}))["targetId"]
            session = (await send("Target.attachToTarget",
                                  {"targetId": target, "flatten": True}))["sessionId"]
            await send("Page.enable", session=session)
            await send("Emulation.setDeviceMetricsOverride",
                       {"width": width, "height": 900, "deviceScaleFactor": 1, "mobile": False},
                       session=session)
            await send("Page.navigate", {"url": url}, session=session)
            while True:
                event = await events.get()
                if event.get("method") == "Page.loadEventFired":
                    break
            value = await send("Runtime.evaluate", {"expression": expression,
                                                    "awaitPromise": True,
                                                    "returnByValue": True}, session=session)
            if "exceptionDetails" in value:
                raise RuntimeError(f"page script failed: {value['exceptionDetails']}")
            if screenshot:
                size = (await send("Page.getLayoutMetrics", session=session))["cssContentSize"]
                shot = await send("Page.captureScreenshot", {
                    "format": "png", "captureBeyondViewport": True,
                    "clip": {"x": 0, "y": 0, "width": size["width"], "height": size["height"],
                             "scale": 1}}, session=session)
                Path(screenshot).write_bytes(base64.b64decode(shot["data"]))
            await send("Target.closeTarget", {"targetId": target})
            task.cancel()
            return value["result"].get("value")
