"""A real OpenID Connect provider for the sign-in tests: panva/oidc-provider (npm), run by
tests/oidc_provider/provider.mjs on 127.0.0.1.

Its packages are installed on first use with `npm ci` (the versions in package-lock.json) into
tests/oidc_provider/node_modules (git-ignored), again whenever package-lock.json is newer. Needs Node.js 20
or later with npm: the tests skip without them on a developer machine and fail in CI (conftest.require).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from cds_devtools.devservers import ManagedProcess, free_port, http_ok
from conftest import require

PROVIDER_DIR = Path(__file__).resolve().parent / "oidc_provider"
INSTALLED = PROVIDER_DIR / "node_modules" / ".package-lock.json"  # npm writes it after an install


def install_provider() -> None:
    """`npm ci` once (and after package-lock.json changed); a failure names the command and its output."""
    require(shutil.which("node") and shutil.which("npm"), "Node.js with npm not found (the OIDC provider of the tests "
                                                           "runs on Node.js 20 or later)")
    lock = PROVIDER_DIR / "package-lock.json"
    if INSTALLED.exists() and INSTALLED.stat().st_mtime >= lock.stat().st_mtime:
        return
    done = subprocess.run(["npm", "ci", "--no-audit", "--no-fund", "--loglevel=error"], cwd=PROVIDER_DIR,
                          capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        raise RuntimeError(f"npm ci in {PROVIDER_DIR} failed:\n{done.stdout}\n{done.stderr}")


@dataclass
class OidcProvider:
    process: ManagedProcess
    port: int
    issuer: str

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def set_clock_skew(self, seconds: int) -> None:
        """The token endpoint issues as if its clock were `seconds` off (-7200: ID tokens that expired an hour ago)."""
        answer = httpx.post(f"{self.url}/test/clock", params={"skew_s": str(seconds)}, trust_env=False, timeout=10)
        answer.raise_for_status()

    def stop(self) -> None:
        self.process.stop()


def client(client_id: str, secret: str, service_url: str) -> dict[str, Any]:
    """The registration of one of our services at the provider (what a site's IdP administrator sets up)."""
    return {"client_id": client_id, "client_secret": secret, "redirect_uris": [f"{service_url}/auth/callback"],
            "post_logout_redirect_uris": [f"{service_url}/auth/signed-out"],
            "grant_types": ["authorization_code"], "response_types": ["code"],
            "token_endpoint_auth_method": "client_secret_basic"}


def start_provider(logdir: Path, clients: list[dict[str, Any]], accounts: dict[str, Any], *,
                   issuer: str | None = None, port: int | None = None) -> OidcProvider:
    """oidc-provider on 127.0.0.1 (a free port), once its discovery document answers."""
    install_provider()
    port = port or free_port()
    env = {**os.environ, "OIDC_PORT": str(port), "OIDC_CLIENTS": json.dumps(clients),
           "OIDC_ACCOUNTS": json.dumps(accounts), **({"OIDC_ISSUER": issuer} if issuer else {})}
    process = ManagedProcess("oidc-provider", ["node", str(PROVIDER_DIR / "provider.mjs")], url=f"http://127.0.0.1:{port}",
                             log_path=logdir / f"oidc-provider-{port}.log", env=env, cwd=PROVIDER_DIR).start()
    try:
        process.wait_ready(lambda: http_ok(f"http://127.0.0.1:{port}/.well-known/openid-configuration"), timeout=60)
    except BaseException:
        process.stop()
        raise
    return OidcProvider(process, port, issuer or f"http://127.0.0.1:{port}")
