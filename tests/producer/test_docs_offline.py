"""/docs and /redoc work without internet: their pages load only files the API serves itself."""

from __future__ import annotations

import re
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from pagedq.producer.api import create_app
from pagedq.shared.redis_server import LocalRedis
from pagedq.shared.settings import Settings

ASSET = re.compile(r"""(?:src|href|spec-url)\s*=\s*["']([^"']+)["']|url\s*:\s*["']([^"']+)["']""")


@pytest.fixture(scope="module")
def client(redis_server: LocalRedis) -> Iterator[TestClient]:
    with TestClient(create_app(Settings(redis_url=redis_server.url, api_keys=["k"]))) as c:
        yield c


def assets(html: str) -> list[str]:
    return [a or b for a, b in ASSET.findall(html)]


@pytest.mark.parametrize(("page", "kinds"), [("/docs", {".js", ".css"}), ("/redoc", {".js"})])
def test_docs_pages_reference_only_local_files_that_are_served(client: TestClient, page: str,
                                                                kinds: set[str]) -> None:
    html = client.get(page)
    assert html.status_code == 200 and html.headers["content-type"].startswith("text/html")
    urls = assets(html.text)
    assert "/openapi.json" in urls
    assert not any("://" in u or u.startswith("//") for u in urls), urls  # no CDN, no Google Fonts
    served = {u.rsplit(".", 1)[-1] for u in urls if u != "/openapi.json"}
    assert {k.lstrip(".") for k in kinds} <= served
    for url in urls:
        response = client.get(url)
        assert response.status_code == 200, url
        assert len(response.content) > 1000, url
    assert "fonts.googleapis" not in html.text and "cdn.jsdelivr" not in html.text


def test_swagger_ui_is_version_5_which_renders_openapi_3_1(client: TestClient) -> None:
    """Swagger UI 4 shows "Unable to render this definition" for an OpenAPI 3.1 document."""
    assert client.get("/openapi.json").json()["openapi"].startswith("3.1")
    bundle = client.get("/docs-static/swagger-ui-bundle.js")
    assert bundle.headers["content-type"] in ("text/javascript; charset=utf-8", "application/javascript")
    version = re.search(r'PACKAGE_VERSION:"(\d+)\.\d+\.\d+"', bundle.text)
    assert version is not None and int(version.group(1)) >= 5
    css = client.get("/docs-static/swagger-ui.css")
    assert css.status_code == 200 and css.headers["content-type"].startswith("text/css")


def test_docs_are_not_in_the_schema_and_need_no_key(client: TestClient) -> None:
    paths = client.get("/openapi.json").json()["paths"]
    assert not any(p.startswith(("/docs", "/redoc")) for p in paths)
