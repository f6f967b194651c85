"""The API's own documentation pages work on a closed network: every asset comes from the app."""

from __future__ import annotations

import re

import pytest
from conftest import ARTEFACTS, Server, need_tool
from playwright.async_api import Route, async_playwright

ASSET = re.compile(r"""(?:src|href)\s*=\s*["']([^"']+)["']|url:\s*["']([^"']+)["']""")


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
async def test_a_docs_page_loads_everything_from_the_app_itself(sqlite_server: Server, page: str) -> None:
    async with sqlite_server.client() as http:
        html = await http.get(page)
        assert html.status_code == 200 and html.headers["content-type"].startswith("text/html")
        assets = [a or b for a, b in ASSET.findall(html.text)]
        assert any(a.endswith(".js") for a in assets), assets
        for asset in assets:
            assert asset.startswith("/") and not asset.startswith("//"), f"{asset} is on another host"
            fetched = await http.get(asset)
            assert fetched.status_code == 200 and fetched.content, asset
        assert "validator.swagger.io" not in html.text


async def test_the_docs_render_offline_in_chromium(sqlite_server: Server) -> None:
    """Every request to another host is cut, as on a closed network: /docs still shows every
    operation (a screenshot in tests/artefacts/ shows it)."""
    need_tool("chromium")
    async with sqlite_server.client() as http:
        operations = sum(len(path) for path in (await http.get("/openapi.json")).json()["paths"].values())
    elsewhere: list[str] = []

    async def only_the_server(route: Route) -> None:
        if route.request.url.startswith(sqlite_server.url + "/"):
            await route.continue_()
        else:
            elsewhere.append(route.request.url)
            await route.abort("internetdisconnected")

    async with async_playwright() as driver:
        browser = await driver.chromium.launch(executable_path="/usr/bin/chromium", args=["--no-sandbox"])
        try:
            context = await browser.new_context(viewport={"width": 1280, "height": 1000})
            await context.route("**/*", only_the_server)
            page = await context.new_page()
            await page.goto(sqlite_server.url + "/docs")
            await page.wait_for_selector(".opblock", timeout=20_000)
            shown = await page.locator(".opblock").count()
            ARTEFACTS.mkdir(exist_ok=True)
            await page.screenshot(path=ARTEFACTS / "docs-offline.png", full_page=True)
        finally:
            await browser.close()
    assert shown == operations, (shown, operations)
    assert elsewhere == []
