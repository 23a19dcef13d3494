"""The API description pages, served with no network: ``/docs`` (Swagger UI) and ``/redoc``
(ReDoc) load their scripts and styles from this server, never from a CDN.

The assets come from the ``fastapi-offline`` package (part of the ``serve`` extra), which
ships Swagger UI's and ReDoc's bundles; they are mounted at :data:`ASSETS` and FastAPI's own
page builders (``get_swagger_ui_html``, ``get_redoc_html``) are pointed at them. Without that
package the two pages say how to install it and where the schema is (``/openapi.json``).
"""

from __future__ import annotations

import html
import logging
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

log = logging.getLogger(__name__)

#: Where the Swagger UI and ReDoc files are served (public, like the page's own files).
ASSETS = "/docs-assets"
#: Swagger UI settings: no validator badge (it would call validator.swagger.io).
SWAGGER_PARAMETERS = {"validatorUrl": None}


def assets_dir() -> Path | None:
    """The folder of ``swagger-ui-bundle.js``, ``swagger-ui.css``, ``redoc.standalone.js``
    and ``favicon.png`` (package ``fastapi-offline``); None when it is not installed."""
    try:
        import fastapi_offline
    except ImportError:
        return None
    folder = Path(fastapi_offline.__file__).parent / "static"
    return folder if (folder / "swagger-ui-bundle.js").is_file() else None


def add_docs(app: FastAPI) -> None:
    """``/docs``, ``/docs/oauth2-redirect`` and ``/redoc`` on ``app`` (built with
    ``docs_url=None, redoc_url=None``), their files under :data:`ASSETS`."""
    folder = assets_dir()
    openapi = app.openapi_url or "/openapi.json"
    if folder is not None:
        app.mount(ASSETS, StaticFiles(directory=str(folder)), name="docs-assets")
    else:
        log.warning("package fastapi-offline is not installed: /docs and /redoc only say where the schema is "
                    "(pip install 'lakead[serve]')")

    def missing(title: str, root: str) -> HTMLResponse:
        return HTMLResponse(
            f"<!doctype html><title>{html.escape(title)}</title><p>The API description page needs the package "
            "<code>fastapi-offline</code>, which ships Swagger UI and ReDoc (<code>pip install 'lakead[serve]'</code>). "
            f"The schema itself is at <a href=\"{html.escape(root + openapi)}\">{html.escape(openapi)}</a>.</p>")

    @app.get("/docs", include_in_schema=False)
    def swagger(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "")
        if folder is None:
            return missing(f"{app.title} - Swagger UI", root)
        return get_swagger_ui_html(
            openapi_url=root + openapi, title=f"{app.title} - Swagger UI",
            oauth2_redirect_url=root + "/docs/oauth2-redirect",
            swagger_js_url=f"{root}{ASSETS}/swagger-ui-bundle.js", swagger_css_url=f"{root}{ASSETS}/swagger-ui.css",
            swagger_favicon_url=f"{root}{ASSETS}/favicon.png", swagger_ui_parameters=SWAGGER_PARAMETERS,
        )

    @app.get("/docs/oauth2-redirect", include_in_schema=False)
    def oauth2_redirect() -> HTMLResponse:
        return get_swagger_ui_oauth2_redirect_html()

    @app.get("/redoc", include_in_schema=False)
    def redoc(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "")
        if folder is None:
            return missing(f"{app.title} - ReDoc", root)
        return get_redoc_html(
            openapi_url=root + openapi, title=f"{app.title} - ReDoc", redoc_js_url=f"{root}{ASSETS}/redoc.standalone.js",
            redoc_favicon_url=f"{root}{ASSETS}/favicon.png", with_google_fonts=False,
        )
