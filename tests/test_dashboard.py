"""The dashboard in a real Chromium against a real server: sign-in, the live views, one stream
per browser, text never run as HTML, and screenshots of the main views as artefacts."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
from conftest import ARTEFACTS, Server, auth, mint, need_tool, unique
from playwright.async_api import Browser, BrowserContext, Page, async_playwright

DESKTOP = {"width": 1360, "height": 860}
PHONE = {"width": 390, "height": 844}
HOSTILE = "<img src=x onerror=alert(1)>"
# Reported as console errors: CSP refusals in the page, and any script error.
WATCH_POLICY = """
document.addEventListener("securitypolicyviolation", (e) =>
  console.error(`CSP violation: ${e.violatedDirective} ${e.blockedURI}`));
"""


@pytest.fixture(scope="module")
async def browser() -> AsyncIterator[Browser]:
    need_tool("chromium")
    async with async_playwright() as driver:
        chromium = await driver.chromium.launch(executable_path="/usr/bin/chromium", args=["--no-sandbox"])
        yield chromium
        await chromium.close()


@dataclass
class Tabs:
    """One browser profile (cookies, SharedWorker) with its pages and everything they complained of."""

    context: BrowserContext
    server: Server
    problems: list[str] = field(default_factory=list)
    dialogs: list[str] = field(default_factory=list)

    async def open(self, path: str = "/") -> Page:
        page = await self.context.new_page()
        page.on("console", lambda m: m.type == "error" and self.problems.append(m.text))
        page.on("pageerror", lambda e: self.problems.append(f"page error: {e}"))
        page.on("dialog", self._dialog)
        await page.goto(self.server.url + path)
        return page

    async def _dialog(self, dialog: Any) -> None:
        self.dialogs.append(dialog.message)
        await dialog.dismiss()

    async def sign_in(self, token: str, path: str = "/") -> Page:
        page = await self.open(path)
        await page.fill("#token", token)
        await page.click("button[type=submit]")
        await page.wait_for_selector(".topbar")
        return page


@pytest.fixture
async def tabs(browser: Browser) -> AsyncIterator[Callable[..., Awaitable[Tabs]]]:
    made: list[Tabs] = []

    async def make(server: Server, viewport: dict[str, int] = DESKTOP, **options: Any) -> Tabs:
        context = await browser.new_context(viewport=viewport, **options)
        await context.add_init_script(WATCH_POLICY)
        made.append(Tabs(context, server))
        return made[-1]

    yield make
    for each in made:
        await each.context.close()


async def live(page: Page) -> None:
    await page.wait_for_selector('.topbar .conn[data-state="live"]', timeout=10_000)


async def queue_page(tabs: Tabs, token: str, queue: str) -> Page:
    page = await tabs.sign_in(token, f"/#/queues/{queue}")
    await page.wait_for_selector(".feed-card")
    await live(page)
    return page


async def feed_seqs(page: Page) -> list[int]:
    seqs = await page.eval_on_selector_all(".feed .event", "rows => rows.map(r => Number(r.dataset.seq))")
    return sorted(seqs)


async def wait_until(check: Callable[[], Awaitable[bool]], timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.05)


async def streams(server: Server) -> int:
    async with httpx.AsyncClient(base_url=server.url) as http:
        return int((await http.get("/healthz")).json()["streams"])


async def make_queue(server: Server, name: str | None = None, description: str = "") -> str:
    name = name or unique("dash")
    async with server.client() as http:
        created = await http.post("/api/v1/queues", json={"name": name, "description": description})
        assert created.status_code == 201, created.text
    return name


async def publish(server: Server, queue: str, body: Any, **extra: Any) -> dict[str, Any]:
    async with server.client() as http:
        if isinstance(body, str):
            sent = await http.post(
                f"/api/v1/queues/{queue}/messages", content=body, headers={"Content-Type": "text/plain"}
            )
        else:
            sent = await http.post(f"/api/v1/queues/{queue}/messages", json={"body": body, **extra})
        assert sent.status_code == 201, sent.text
        return dict(sent.json())


async def log_total(server: Server, queue: str) -> int:
    async with server.client() as http:
        return int((await http.get(f"/api/v1/queues/{queue}/events", params={"limit": 1})).json()["total"])


# Signing in -------------------------------------------------------------------------------------


async def test_sign_in_keeps_the_token_in_a_cookie_no_script_can_read(
    sqlite_server: Server, tabs: Any
) -> None:
    browser_tabs: Tabs = await tabs(sqlite_server)
    page = await browser_tabs.open()
    await page.fill("#token", "not-a-token")
    await page.click("button[type=submit]")
    await page.locator(".form-error", has_text="That token does not work").wait_for(timeout=5000)
    await page.fill("#token", mint("alice", "subscribe:*"))
    await page.click("button[type=submit]")
    await page.wait_for_selector(".topbar")
    [cookie] = await browser_tabs.context.cookies()
    assert cookie["name"] == "pombo_session" and cookie["httpOnly"] and cookie["sameSite"] == "Strict"
    assert cookie["secure"] is False  # plain HTTP here; Secure when the page came over HTTPS
    assert "pombo_session" not in await page.evaluate("document.cookie")
    assert await page.text_content(".who") == "alice"
    assert "token" not in page.url and "access_token" not in await page.content()

    await page.click("text=Sign out")
    await page.locator(".form-error", has_text="You signed out.").wait_for()
    assert await browser_tabs.context.cookies() == []
    await page.reload()
    await page.wait_for_selector("#token")
    # The one failed request was the bad token's sign-in.
    assert browser_tabs.problems == [
        "Failed to load resource: the server responded with a status of 401 (Unauthorized)"
    ]


async def test_an_expired_or_revoked_token_sends_the_page_back_to_sign_in(
    sqlite_server: Server, tabs: Any
) -> None:
    browser_tabs: Tabs = await tabs(sqlite_server)
    page = await browser_tabs.sign_in(mint("brief", "subscribe:*", ttl=3))
    await live(page)
    # The stream ends at the token's expiry and says why.
    message = await page.text_content(".form-error", timeout=8000)
    assert message == "Your token expired. Paste a new one to carry on."

    async with sqlite_server.client() as http:
        minted = (await http.post("/api/v1/tokens", json={"sub": "carol", "scope": "subscribe:*"})).json()
        page = await browser_tabs.sign_in(minted["token"])
        assert (await http.delete(f"/api/v1/tokens/{minted['id']}")).status_code == 200
    await page.reload()
    message = await page.text_content(".form-error", timeout=5000)
    assert message == "Your token was revoked. Ask an admin for a new one."


# Live views -------------------------------------------------------------------------------------


async def test_a_published_message_appears_in_the_open_queue_within_a_second(
    sqlite_server: Server, tabs: Any
) -> None:
    queue = await make_queue(sqlite_server)
    browser_tabs: Tabs = await tabs(sqlite_server)
    page = await queue_page(browser_tabs, mint(), queue)
    await page.evaluate(ARRIVALS)
    published: dict[str, float] = {}
    for n in range(10):
        published[(await publish(sqlite_server, queue, {"order": n}, type="order.paid"))["id"]] = time.time()
        await asyncio.sleep(0.1)
    await wait_until(lambda: _arrived(page, len(published)), timeout=5)
    arrived: dict[str, float] = await page.evaluate("window.arrivals")
    # From the publish's answer to the row in the page, on one clock (the same machine).
    assert set(arrived) == {id[-8:] for id in published}, (arrived, list(published))
    delays = sorted(arrived[id[-8:]] / 1000 - at for id, at in published.items())
    print(f"publish -> feed row: median {delays[5] * 1000:.0f} ms, max {delays[-1] * 1000:.0f} ms")
    assert delays[-1] < 1.0, delays
    # The table and the counts follow the stream too.
    last = list(published)[-1]
    await page.locator(f'tr[data-id="{last}"]').wait_for(timeout=1000)
    assert await page.text_content('.stats .chip[data-status="pending"] b') == "10"
    assert browser_tabs.problems == [] and browser_tabs.dialogs == []


# Notes the time each message's first feed row appears, by message id.
ARRIVALS = """() => {
  window.arrivals = {};
  new MutationObserver((changes) => {
    for (const change of changes) for (const row of change.addedNodes) {
      const id = row.dataset?.type === "message.created" && row.querySelector(".what .mono")?.textContent;
      if (id) window.arrivals[id.slice(1)] = Date.now();
    }
  }).observe(document.querySelector(".feed"), { childList: true });
}"""


async def _arrived(page: Page, count: int) -> bool:
    return bool(await page.evaluate("n => Object.keys(window.arrivals).length >= n", count))


async def test_the_unread_badge_follows_notifications_live(sqlite_server: Server, tabs: Any) -> None:
    subject = unique("reader")
    browser_tabs: Tabs = await tabs(sqlite_server)
    page = await browser_tabs.sign_in(mint(subject, "subscribe:none"))
    await live(page)
    badge = page.locator('[data-testid="unread"]')
    assert await badge.is_hidden()
    async with sqlite_server.client() as http:
        for n, priority in enumerate(("urgent", "low"), start=1):
            note = {"recipients": [subject], "type": "build.failed", "priority": priority, "title": f"n{n}"}
            assert (await http.post("/api/v1/notifications", json=note)).status_code == 201
            await page.wait_for_function(
                "n => document.querySelector('[data-testid=unread]').textContent === String(n)", arg=n
            )
        await page.click(".bell")
        await page.wait_for_selector(".note.priority-urgent.unread")
        await page.click("text=Mark all read")
        await badge.wait_for(state="hidden")
        left = await http.get("/api/v1/notifications/unread-count", headers=auth(mint(subject, "")))
        assert left.json() == {"unread_count": 0}
    assert await page.locator(".note.unread").count() == 0
    assert browser_tabs.problems == []


async def test_a_hostile_body_is_shown_as_text_and_runs_nothing(sqlite_server: Server, tabs: Any) -> None:
    queue = await make_queue(sqlite_server, description=HOSTILE)
    message = await publish(sqlite_server, queue, HOSTILE)
    browser_tabs: Tabs = await tabs(sqlite_server)
    subject = unique("victim")
    async with sqlite_server.client() as http:
        note = {
            "recipients": [subject],
            "type": "x",
            "title": HOSTILE,
            "message": HOSTILE,
            "action_url": "/x",
        }
        assert (await http.post("/api/v1/notifications", json=note)).status_code == 201
    page = await queue_page(browser_tabs, mint(subject, f"subscribe:{queue} manage:{queue}"), queue)
    await page.locator('.feed .event[data-type="message.created"] .what', has_text=HOSTILE).wait_for()
    await page.locator(".body-cell", has_text=HOSTILE).wait_for()
    await page.click(f'tr[data-id="{message["id"]}"] button')
    assert await page.text_content("dialog pre.code") == HOSTILE
    await page.keyboard.press("Escape")
    await page.click(".bell")
    await page.locator(".note-title", has_text=HOSTILE).wait_for()
    await page.goto(f"{sqlite_server.url}/#/queues")
    await page.locator(".queue-row .muted", has_text=HOSTILE).first.wait_for()
    await page.wait_for_timeout(300)  # an image that failed to load would have fired its handler
    assert await page.locator("img").count() == 0
    assert browser_tabs.dialogs == [] and browser_tabs.problems == []
    # And should code one day hand a string to an HTML sink, the page refuses it (Trusted Types).
    tried = "() => { try { document.body.insertAdjacentHTML('beforeend', '<b>x</b>'); return 'ran' }"
    assert await page.evaluate(tried + " catch (e) { return e.name } }") == "TypeError"


async def test_a_manager_creates_changes_deletes_and_restores_a_queue(
    sqlite_server: Server, tabs: Any
) -> None:
    name = unique("made")
    browser_tabs: Tabs = await tabs(sqlite_server)
    page = await browser_tabs.sign_in(mint("maker", "manage:made-* subscribe:made-*"))
    await page.click("text=New queue")
    await page.fill("dialog input[name=name]", name)
    await page.fill("dialog textarea[name=description]", "made in the browser")
    await page.fill("dialog input[name=max_attempts]", "3")
    await page.click("dialog button[type=submit]")
    row = page.locator(f'.queue-row[data-queue="{name}"]')
    await row.locator("text=made in the browser").wait_for()
    await row.locator("text=Edit").click()
    await page.fill("dialog textarea[name=description]", "changed")
    await page.click("dialog button[type=submit]")
    await row.locator("text=changed").wait_for()
    async with sqlite_server.client() as http:
        queue = (await http.get(f"/api/v1/queues/{name}")).json()
        assert (queue["description"], queue["max_attempts"], queue["owner"]) == ("changed", 3, "maker")
        await row.locator("text=Delete").click()
        await page.click("dialog >> text=Delete queue")
        await row.wait_for(state="detached")
        assert (await http.get(f"/api/v1/queues/{name}")).status_code == 404
        await page.check("text=Show deleted")
        await row.locator("text=Restore").click()
        await row.locator("a.queue-name").wait_for()
        assert (await http.get(f"/api/v1/queues/{name}")).status_code == 200
    # A token that may only read sees the queue, and no way to change it.
    reader_tabs: Tabs = await tabs(sqlite_server)
    reader = await reader_tabs.sign_in(mint("reader", "subscribe:made-*"))
    await reader.locator(f'.queue-row[data-queue="{name}"]').wait_for()
    assert await reader.locator("text=New queue").count() == 0
    assert await reader.locator(".row-actions button").count() == 0
    assert browser_tabs.problems == [] and reader_tabs.problems == []


async def test_publish_detail_redrive_and_export_from_the_queue_page(
    sqlite_server: Server, tabs: Any
) -> None:
    queue = unique("ops")
    async with sqlite_server.client() as http:
        await http.post("/api/v1/queues", json={"name": queue, "max_attempts": 1})
        dead = await publish(sqlite_server, queue, "will fail")
        [claimed] = (await http.post(f"/api/v1/queues/{queue}/claim", json={})).json()["items"]
        nack = {"lease_id": claimed["lease_id"], "error": "exit status 3"}
        await http.post(f"/api/v1/queues/{queue}/messages/{dead['id']}/nack", json=nack)
    browser_tabs: Tabs = await tabs(sqlite_server)
    page = await queue_page(browser_tabs, mint(), queue)

    await page.click("text=Publish")
    await page.check("dialog input[value=json]")
    await page.fill("dialog textarea[name=body]", '{"order": 7, "items": ["a", "b"]}')
    await page.fill("dialog input[name=type]", "order.paid")
    await page.select_option("dialog select[name=priority]", "high")
    await page.click("dialog button[type=submit]")
    row = page.locator(".table tbody tr", has_text="order.paid")
    await row.locator("text=high").wait_for()
    await row.locator("button").click()
    pretty = '{\n  "order": 7,\n  "items": [\n    "a",\n    "b"\n  ]\n}'
    assert await page.text_content("dialog pre.code") == pretty
    await page.locator("dialog .timeline", has_text="message.created").wait_for()
    await page.keyboard.press("Escape")

    await page.click(f'tr[data-id="{dead["id"]}"] button')
    assert await page.text_content("dialog .error-text") == "exit status 3"
    await page.keyboard.press("Escape")
    await page.click("text=Redrive dead")
    await page.click('dialog button:text-is("Redrive")')
    await page.locator(f'tr[data-id="{dead["id"]}"] .chip.pending').wait_for()

    await page.select_option("select[name=priority]", "high")
    href = await page.get_attribute("a:has-text('CSV')", "href")
    assert href == f"/api/v1/queues/{queue}/messages?priority=high&format=csv"
    export = await page.request.get(sqlite_server.url + href)  # the session cookie goes with it
    assert export.ok and "order.paid" in await export.text() and "will fail" not in await export.text()
    assert browser_tabs.problems == []


async def test_after_a_restart_the_feed_resumes_with_every_event_once(make_server: Any, tabs: Any) -> None:
    server = make_server(retry_ms="300").start()
    queue = await make_queue(server)
    for n in range(3):
        await publish(server, queue, {"before": n})
    browser_tabs: Tabs = await tabs(server)
    page = await queue_page(browser_tabs, mint(), queue)
    await publish(server, queue, {"live": 1})
    await wait_until(lambda: _shows(page, 5))

    server.stop()
    await page.wait_for_selector('.feed-card .conn[data-state="reconnecting"]', timeout=5000)
    server.start()
    for n in range(3):  # published before the browser is back: it must catch up on them
        await publish(server, queue, {"after": n})
    await live(page)
    for n in range(2):
        await publish(server, queue, {"later": n})
    total = await log_total(server, queue)
    assert total == 10  # queue.created and nine messages
    await wait_until(lambda: _shows(page, total))
    await page.wait_for_timeout(500)  # nothing arrives twice, even late
    assert await feed_seqs(page) == list(range(1, total + 1))
    assert await page.text_content('[data-testid="feed-count"]') == f"{total} events"
    browser_tabs.problems = [p for p in browser_tabs.problems if "ERR_CONNECTION_REFUSED" not in p]
    assert browser_tabs.problems == []


async def _shows(page: Page, count: int) -> bool:
    return await page.locator(".feed .event").count() >= count


async def test_a_stream_the_server_refuses_is_said_out_loud(sqlite_server: Server, tabs: Any) -> None:
    # A scope the token may hold but the stream takes as no queue name or pattern: the page can
    # follow nothing less that would do, so it says why and waits.
    browser_tabs: Tabs = await tabs(sqlite_server)
    page = await browser_tabs.sign_in(mint(unique("odd"), "subscribe:Orders"))
    toast = page.locator(".toast.error", has_text="Live updates paused")
    await toast.wait_for(timeout=10_000)
    assert "not a queue name or pattern: 'Orders'" in (await toast.text_content() or "")
    assert await page.get_attribute(".topbar .conn", "data-state") != "live"
    assert await page.locator('[data-testid="overview"]').is_hidden()


# Past the bound on logs: an overview ------------------------------------------------------------

POLL_SECONDS = 5  # dashboard/js/queues.js


async def make_queues(server: Server, names: list[str]) -> None:
    async with server.client() as http:
        for name in names:
            created = await http.post("/api/v1/queues", json={"name": name})
            assert created.status_code == 201, created.text


def pending(page: Page, queue: str) -> Any:
    return page.locator(f'.queue-row[data-queue="{queue}"] .chip[data-status="pending"] b')


async def test_more_queues_than_a_stream_follows_polls_counts_and_keeps_the_open_queue_live(
    make_server: Any, tabs: Any
) -> None:
    server = make_server(stream_max_logs="3").start()
    names = [f"ov-{n:03}" for n in range(60)]
    await make_queues(server, names[:2])  # two queues and the notifications: three logs, live
    admin = unique("admin")
    browser_tabs: Tabs = await tabs(server)
    page = await browser_tabs.sign_in(mint(admin, "admin"))
    await live(page)
    note = page.locator('[data-testid="overview"]')
    assert await note.is_hidden()
    await make_queues(server, names[2:])  # the stream takes on a third queue: `stream.limit`
    await note.wait_for(timeout=5000)
    assert f"every {POLL_SECONDS} s" in (await note.text_content() or "")
    await live(page)
    await page.locator(".queue-row").nth(49).wait_for()
    assert await page.locator(".queue-row").count() == 50
    assert await page.text_content(".view-head .muted") == "60 queues"

    # A queue the stream does not follow: its count moves within the poll interval.
    sent = time.monotonic()
    await publish(server, names[1], "polled")
    await wait_until(lambda: _text_is(pending(page, names[1]), "1"), timeout=POLL_SECONDS + 3)
    polled = time.monotonic() - sent
    print(f"publish -> count in the list, polled: {polled:.2f} s")
    assert polled < POLL_SECONDS + 1.5

    # Paging and the filter reach the queues past the first page.
    await page.click(".list-pager button:text('Next')")
    await page.locator(f'.queue-row[data-queue="{names[55]}"]').wait_for()
    assert await page.text_content(".list-pager .muted") == "51\u201360 of 60"
    await page.click(".list-pager button:text('Previous')")
    await page.fill("input[name=filter]", "ov 05")  # no queue name holds a space
    await page.locator(".queue-list .empty").wait_for()
    await page.fill("input[name=filter]", names[58].upper())  # names are lowercase
    await page.locator(".queue-row").first.wait_for()
    await wait_until(lambda: _rows_are(page, [names[58]]))

    # The open queue is followed live, by name; the notifications too.
    await page.click(f'a.queue-name:text-is("{names[58]}")')
    await page.wait_for_selector(".feed-card")
    await live(page)
    await page.evaluate(ARRIVALS)
    message = await publish(server, names[58], "live")
    sent = time.time()
    await wait_until(lambda: _arrived(page, 1), timeout=3)
    arrived: dict[str, float] = await page.evaluate("window.arrivals")
    delay = arrived[message["id"][-8:]] / 1000 - sent
    print(f"publish -> feed row, overview: {delay * 1000:.0f} ms")
    assert delay < 1.0
    await notify_one(server, admin)
    await page.wait_for_function("document.querySelector('[data-testid=unread]').textContent === '1'")
    assert await streams(server) == 1

    # A browser that signs in now is refused the whole plan (422 `too_many_logs`): same overview.
    phone_tabs: Tabs = await tabs(server, PHONE)
    phone = await phone_tabs.sign_in(mint(admin, "admin"))
    await phone.locator('[data-testid="overview"]').wait_for(timeout=5000)
    await live(phone)
    await phone.locator(".queue-row").nth(49).wait_for()
    ARTEFACTS.mkdir(exist_ok=True)
    await page.goto(f"{server.url}/#/queues")
    await page.locator(".queue-row").first.wait_for()
    await page.screenshot(path=ARTEFACTS / "queues-overview-desktop-light.png")
    await phone.screenshot(path=ARTEFACTS / "queues-overview-phone-light.png")
    for each in (browser_tabs, phone_tabs):
        refused = [p for p in each.problems if "status of 422" in p]
        assert [p for p in each.problems if p not in refused] == []


@pytest.mark.parametrize("sharing", ["SharedWorker", "BroadcastChannel"])
async def test_in_overview_each_tab_keeps_its_open_queue_live(
    make_server: Any, tabs: Any, sharing: str
) -> None:
    server = make_server(stream_max_logs="3").start()
    names = [f"two-{n}" for n in range(4)]
    await make_queues(server, names)
    browser_tabs: Tabs = await tabs(server)
    if sharing == "BroadcastChannel":
        await browser_tabs.context.add_init_script("delete window.SharedWorker;")
    first = await queue_page(browser_tabs, mint(), names[0])
    second = await browser_tabs.open(f"/#/queues/{names[3]}")
    await second.wait_for_selector(".feed-card")
    await live(second)
    for page, queue in ((first, names[0]), (second, names[3]), (first, names[0])):
        message = await publish(server, queue, f"to {queue}")
        await page.locator(".feed .event", has_text=message["id"][-8:]).wait_for(timeout=3000)
    assert await streams(server) == 1
    # The other tab leaves its queue: the stream follows what is still open.
    await second.goto(f"{server.url}/#/queues")
    await second.locator('[data-testid="overview"]').wait_for()
    message = await publish(server, names[0], "still live")
    await first.locator(".feed .event", has_text=message["id"][-8:]).wait_for(timeout=3000)
    assert await feed_seqs(first) == [1, 2, 3, 4]
    for page in (first, second):
        assert await page.locator(".toast.error").count() == 0
    browser_tabs.problems = [p for p in browser_tabs.problems if "status of 422" not in p]
    assert browser_tabs.problems == []


@pytest.mark.parametrize("sharing", ["SharedWorker", "BroadcastChannel"])
async def test_overview_ends_once_the_queues_fit_one_stream_again(
    make_server: Any, tabs: Any, sharing: str
) -> None:
    server = make_server(stream_max_logs="3").start()
    names = [f"fit-{n}" for n in range(3)]
    await make_queues(server, names)  # three queues and the notifications: four logs
    browser_tabs: Tabs = await tabs(server)
    if sharing == "BroadcastChannel":
        await browser_tabs.context.add_init_script("delete window.SharedWorker;")
    page = await browser_tabs.sign_in(mint(unique("admin"), "admin"))
    note = page.locator('[data-testid="overview"]')
    await note.wait_for(timeout=5000)
    async with server.client() as http:
        assert (await http.delete(f"/api/v1/queues/{names[2]}")).status_code == 200
    await note.wait_for(state="hidden", timeout=(POLL_SECONDS + 3) * 1000)
    await live(page)
    sent = time.monotonic()
    await publish(server, names[1], "live again")  # not open in any tab: counted live, not polled
    await wait_until(lambda: _text_is(pending(page, names[1]), "1"), timeout=3)
    print(f"overview ended; publish -> count in the list: {time.monotonic() - sent:.2f} s")
    assert await streams(server) == 1
    browser_tabs.problems = [p for p in browser_tabs.problems if "status of 422" not in p]
    assert browser_tabs.problems == []


async def _text_is(locator: Any, text: str) -> bool:
    return await locator.count() > 0 and await locator.text_content() == text


async def _rows_are(page: Page, names: list[str]) -> bool:
    shown = await page.eval_on_selector_all(".queue-row", "rows => rows.map(r => r.dataset.queue)")
    return bool(shown == names)


async def notify_one(server: Server, subject: str) -> None:
    async with server.client() as http:
        note = {"recipients": [subject], "type": "note", "title": "hello"}
        assert (await http.post("/api/v1/notifications", json=note)).status_code == 201


async def test_a_queue_named_in_the_scopes_appears_once_created_without_a_reload(
    sqlite_server: Server, tabs: Any
) -> None:
    queue = unique("soon")
    browser_tabs: Tabs = await tabs(sqlite_server)
    page = await browser_tabs.sign_in(mint(unique("watcher"), f"subscribe:{queue}"))
    await live(page)
    await page.locator(".queue-list .empty").wait_for()
    await make_queue(sqlite_server, queue)
    row = page.locator(f'.queue-row[data-queue="{queue}"]')
    await row.wait_for(timeout=3000)
    await publish(sqlite_server, queue, "first")
    await pending(page, queue).filter(has_text="1").wait_for(timeout=2000)
    await row.locator("a.queue-name").click()
    await page.wait_for_selector(".feed-card")
    message = await publish(sqlite_server, queue, "second")
    await page.locator(".feed .event", has_text=message["id"][-8:]).wait_for(timeout=2000)
    assert await feed_seqs(page) == [1, 2, 3]
    assert browser_tabs.problems == []


# One connection per browser ---------------------------------------------------------------------


@pytest.mark.parametrize("sharing", ["SharedWorker", "BroadcastChannel"])
async def test_three_tabs_hold_one_stream(make_server: Any, tabs: Any, sharing: str) -> None:
    server = make_server().start()
    queue = await make_queue(server)
    browser_tabs: Tabs = await tabs(server)
    if sharing == "BroadcastChannel":  # a browser without SharedWorker: one tab leads
        await browser_tabs.context.add_init_script("delete window.SharedWorker;")
    first = await queue_page(browser_tabs, mint(), queue)
    held = await streams(server)
    assert held == 1  # one multiplexed stream: every queue the token follows and its notifications
    others = [await browser_tabs.open(f"/#/queues/{queue}") for _ in range(2)]
    for page in others:
        await page.wait_for_selector(".feed-card")
        await live(page)
    await asyncio.sleep(0.5)
    assert await streams(server) == held

    message = await publish(server, queue, "to every tab")
    for page in [first, *others]:
        await page.locator(".feed .event", has_text=message["id"][-8:]).wait_for(timeout=2000)
    await first.close()  # the leader, or one of the SharedWorker's tabs
    second = await publish(server, queue, "after the first tab closed")
    for page in others:
        await page.locator(".feed .event", has_text=second["id"][-8:]).wait_for(timeout=5000)
    await wait_until(lambda: _streams_are(server, held))
    assert browser_tabs.problems == []


async def _streams_are(server: Server, count: int) -> bool:
    return await streams(server) == count


# Screenshots ------------------------------------------------------------------------------------


async def test_screenshots_of_the_main_views(make_server: Any, tabs: Any) -> None:
    """Written to tests/artefacts/ for a person to look at, at desktop and phone widths, light and dark."""
    server = make_server().start()
    queues = await _sample_data(server)
    traffic = asyncio.create_task(_traffic(server, queues[0]))
    ARTEFACTS.mkdir(exist_ok=True)
    try:
        for width, viewport in (("desktop", DESKTOP), ("phone", PHONE)):
            for scheme in ("light", "dark"):
                browser_tabs: Tabs = await tabs(server, viewport, color_scheme=scheme)
                await _shoot(browser_tabs, queues[0], f"{width}-{scheme}")
                assert browser_tabs.problems == []
    finally:
        traffic.cancel()


async def _shoot(browser_tabs: Tabs, queue: str, name: str) -> None:
    page = await browser_tabs.open()
    await page.wait_for_selector("#token")
    await page.screenshot(path=ARTEFACTS / f"signin-{name}.png")
    await page.fill("#token", mint("ops", "admin"))
    await page.click("button[type=submit]")
    await page.wait_for_selector(".queue-row")
    await live(page)
    await page.wait_for_timeout(6000)  # a few chart buckets of live traffic
    await page.screenshot(path=ARTEFACTS / f"queues-{name}.png")
    await page.click(f'a.queue-name:text-is("{queue}")')
    await page.wait_for_selector(".feed .event")
    await page.wait_for_timeout(1500)
    await page.screenshot(path=ARTEFACTS / f"queue-{name}.png", full_page=True)
    await page.click(".table tbody tr:nth-child(1) button")
    await page.wait_for_selector("dialog .meta")
    await page.screenshot(path=ARTEFACTS / f"message-{name}.png")
    await page.keyboard.press("Escape")
    await page.click(".bell")
    await page.wait_for_selector(".note")
    await page.screenshot(path=ARTEFACTS / f"notifications-{name}.png")
    await page.close()


async def _sample_data(server: Server) -> list[str]:
    names = [
        ("builds", "Nightly CI builds, one message per finished job"),
        ("billing.invoices", "Invoices to render and mail"),
        ("emails.outbound", "Transactional mail for the web shop"),
        ("reports", ""),
    ]
    for name, description in names:
        await make_queue(server, name, description)
    async with server.client() as http:
        for n in range(18):
            body = {"job": f"build-{1200 + n}", "branch": "main", "ok": n % 5 != 0}
            await publish(
                server, "builds", body, type="build.finished", priority="high" if n % 7 == 0 else "normal"
            )
        await publish(server, "billing.invoices", {"invoice": "INV-2041", "amount": 129.5}, type="invoice")
        claimed = (await http.post("/api/v1/queues/builds/claim", json={"max": 6})).json()["items"]
        for message in claimed[:4]:
            await http.post(
                f"/api/v1/queues/builds/messages/{message['id']}/ack", json={"lease_id": message["lease_id"]}
            )
        await http.post(
            f"/api/v1/queues/builds/messages/{claimed[4]['id']}/nack",
            json={"lease_id": claimed[4]["lease_id"], "error": "exit status 2: tests failed", "delay": 0},
        )
        notes = [
            ("urgent", "builds has 3 dead messages", "build-1205 failed three times: exit status 2"),
            ("high", "billing.invoices is backing up", "The oldest pending invoice is 14 minutes old"),
            ("medium", "Nightly export ready", "reports/2026-12-02.xlsx"),
            ("low", "Token for ci-runner expires in 7 days", ""),
        ]
        for priority, title, text in notes:
            note = {
                "recipients": ["ops"],
                "type": "pombo.alert",
                "priority": priority,
                "title": title,
                "message": text,
            }
            await http.post("/api/v1/notifications", json=note)
    return [name for name, _ in names]


async def _traffic(server: Server, queue: str) -> None:
    """Publishes and acks a few messages a second, so the charts have something to show."""
    async with server.client() as http:
        n = 0
        while True:
            n += 1
            await http.post(f"/api/v1/queues/{queue}/messages", json={"body": {"job": f"build-{2000 + n}"}})
            if n % 2 == 0:
                claimed = (await http.post(f"/api/v1/queues/{queue}/claim", json={"max": 2})).json()["items"]
                for message in claimed:
                    await http.post(
                        f"/api/v1/queues/{queue}/messages/{message['id']}/ack",
                        json={"lease_id": message["lease_id"]},
                    )
            await asyncio.sleep(0.25)
