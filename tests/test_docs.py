"""The API's own documentation pages work on a closed network: every asset comes from the app."""

from __future__ import annotations

import re

import pytest
from conftest import Server

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
