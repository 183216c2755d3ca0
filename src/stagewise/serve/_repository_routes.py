"""The model repository extension of the v2 protocol (as KServe and Triton define it), on a gateway app::

    POST /v2/repository/index                  every model's versions: [{name, version, state, reason}]
    POST /v2/repository/models/{name}/load     serve new weights: {"parameters": {"checkpoint": DIR, "version": V,
                                               "verify": "sha256" (default) or "size"}}
    POST /v2/repository/models/{name}/unload   stop serving the model (503) until its next load

``load`` answers once every replica serves the new version (``{"name", "version"}``), or 400 with the reason while
the old version goes on serving (see ``_live_update``). Both parameters are optional: a version alone reloads a known
version or a step of the model's checkpoint root (a rollback); neither loads that root's latest checkpoint. The
checkpoint is a path on the server's disk: set a bearer token on any server others can reach.
"""

from __future__ import annotations

import json
from typing import Any

from fastapi import FastAPI, Request

from ._protocol import BadRequestError
from ._registry import Gateway

__all__ = ["add_repository_routes", "load_parameters"]


def load_parameters(body: bytes) -> tuple[str | None, str | None, str]:
    """``(checkpoint, version, verify)`` from a load request's body (empty, or ``{"parameters": {...}}``)."""
    if not body.strip():
        return None, None, "sha256"
    try:
        doc = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BadRequestError(f"load request body is not JSON: {exc}") from None
    params = doc.get("parameters", {}) if isinstance(doc, dict) else None
    if not isinstance(params, dict):
        raise BadRequestError('load request body must be {"parameters": {"checkpoint": DIR, "version": V}}')
    unknown = sorted(set(params) - {"checkpoint", "version", "verify"})
    if unknown:
        raise BadRequestError(f"unknown load parameters {unknown}; give checkpoint, version and/or verify")
    out = []
    for key in ("checkpoint", "version", "verify"):
        value = params.get(key)
        if value is not None and (not isinstance(value, (str, int)) or isinstance(value, bool) or value == ""):
            raise BadRequestError(f"parameters.{key} must be a non-empty string, got {value!r}")
        out.append(None if value is None else str(value))
    if out[2] not in (None, "sha256", "size"):
        raise BadRequestError(f"parameters.verify must be 'sha256' (hash every file read) or 'size', got {out[2]!r}")
    return out[0], out[1], out[2] or "sha256"


def add_repository_routes(app: FastAPI, gw: Gateway) -> None:
    @app.post("/v2/repository/index")
    async def repository_index() -> list[dict[str, Any]]:
        return [row for backend in gw.backends.values() for row in backend.repository_index()]

    @app.post("/v2/repository/models/{name}/load")
    async def repository_load(name: str, request: Request) -> dict[str, str]:
        backend = gw.backend(name, None)
        checkpoint, version, verify = load_parameters(await request.body())
        served = await backend.load_version(checkpoint=checkpoint, version=version, verify=verify)
        return {"name": name, "version": served}

    @app.post("/v2/repository/models/{name}/unload")
    async def repository_unload(name: str) -> dict[str, str]:
        await gw.backend(name, None).unload()
        return {"name": name, "state": "UNAVAILABLE"}
