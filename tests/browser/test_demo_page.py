"""The /demo page in headless Chromium: it streams observations over WebSocket with the
TypeScript client, shows acks, credits and backpressure, recalls, and survives a gateway kill
(it reconnects and resumes the session; the space then holds every id once)."""

from __future__ import annotations

import asyncio
import signal

from engram.launcher.cluster import LocalCluster
from engram_client.client import EngramClient

QUERY = "dim=32&batch=40&rate=25&k=5&autostart=1"


async def list_ids(cluster: LocalCluster, space: str) -> list[str]:
    async with EngramClient(cluster.gateway_address) as client:
        return await client.list_ids(space)


async def open_demo(browser, cluster: LocalCluster, space: str):
    page = await browser.new_page(viewport={"width": 1200, "height": 900})
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    await page.goto(f"http://127.0.0.1:{cluster.http_port}/demo?space={space}&{QUERY}")
    await page.wait_for_function("window.engramDemo !== undefined", timeout=10_000)
    return page, errors


async def acked(page) -> int:
    return int(await page.evaluate("engramDemo.state.ackedBatches"))


async def stop_and_check(page, cluster: LocalCluster, space: str) -> list[str]:
    """Stops the page's stream, waits for every ack, compares the space with the page's ids."""
    await asyncio.wait_for(page.evaluate("engramDemo.stop()"), 90)
    state = await page.evaluate(
        "({sent: engramDemo.state.sentBatches, acked: engramDemo.state.ackedBatches,"
        " failed: engramDemo.state.failed})"
    )
    assert state["failed"] == 0
    assert state["acked"] == state["sent"]
    sent_ids = await page.evaluate("engramDemo.ids()")
    stored = await list_ids(cluster, space)
    assert len(stored) == len(sent_ids), "an observation is missing or stored twice"
    assert sorted(stored) == sorted(sent_ids)
    return stored


async def test_demo_streams_shows_acks_and_recalls(make_cluster, browser, artifacts):
    cluster = await asyncio.to_thread(make_cluster, shards=2)
    space = "browser-demo"
    page, errors = await open_demo(browser, cluster, space)
    await page.wait_for_function("engramDemo.state.ackedBatches >= 20", timeout=30_000)
    assert await page.text_content("#conn") == "connected"
    assert (await page.text_content("#session")).startswith("s-")
    assert int(await page.text_content("#max-in-flight")) >= 1
    await page.wait_for_function(
        "document.querySelector('#bp-state').textContent === 'active'", timeout=10_000
    )

    await page.click("#recall")
    await page.wait_for_function("engramDemo.state.recalls >= 1", timeout=10_000)
    cue = await page.evaluate("engramDemo.state.lastRecallCue")
    rows = await page.locator("#results tbody tr").count()
    assert rows == 5
    top_id = await page.text_content("#results tbody tr:first-child td:nth-child(2)")
    assert top_id == cue  # the nearest memory of a cue made from a just-sent vector is itself
    score = float(await page.text_content("#results tbody tr:first-child td:nth-child(4)"))
    assert score > 0.99
    await page.wait_for_timeout(600)  # one more render of the counters
    await page.screenshot(path=str(artifacts / "demo.png"), full_page=True)

    stored = await stop_and_check(page, cluster, space)
    assert len(stored) >= 20 * 40
    assert errors == []


async def test_demo_resumes_after_the_gateway_is_killed(make_cluster, browser, artifacts):
    cluster = await asyncio.to_thread(make_cluster, shards=2)
    space = "browser-kill"
    page, errors = await open_demo(browser, cluster, space)
    await page.wait_for_function("engramDemo.state.ackedBatches >= 15", timeout=30_000)
    old_pid = cluster.kill("gateway", signal.SIGKILL)  # the launcher restarts it
    before = await acked(page)
    await page.wait_for_function("engramDemo.stream.reconnects >= 1", timeout=30_000)
    await page.wait_for_function(f"engramDemo.state.ackedBatches >= {before + 25}", timeout=60_000)
    assert cluster.pid("gateway") != old_pid
    assert await page.text_content("#conn") == "resumed"
    assert int(await page.text_content("#reconnects")) >= 1
    await page.screenshot(path=str(artifacts / "demo-after-gateway-kill.png"), full_page=True)

    await stop_and_check(page, cluster, space)
    events = await page.evaluate("engramDemo.state.events.map(e => e.kind)")
    assert "disconnected" in events and "resumed" in events
    assert errors == []
