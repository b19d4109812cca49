# Over 400 lines on purpose: the one settings object, every CDS_ variable read, parsed and checked in one place.
"""The one settings object: every knob comes from an environment variable prefixed CDS_.

Read once at start-up (`Settings.from_env()`) and passed down; nothing else reads the
environment. Each field's default fits the local demo; the README lists them all.
"""

from __future__ import annotations

import enum
import ipaddress
import logging
import os
import re
from dataclasses import Field, dataclass, field, fields
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping
from urllib.parse import urlsplit

from cds_service.core.domain import (DEFAULT_FHIR_CANONICAL_BASE, AiLabelMode, HooksAuth, InferenceRuntime, PacsResult, Priority,
                                     TaskMode, Task, UnknownPatientPolicy, WorklistAuth)
from cds_service.core.viewer import template_problem, viewer_link

if TYPE_CHECKING:
    from cds_service.core.site_thresholds import SiteThresholds

PREFIX = "CDS_"


class SettingsError(ValueError):
    """A setting that cannot be used. The message starts with the variable's name (`CDS_PORT='abc' is …`):
    `cds-triage` prints it as one line and exits 2."""


# the settings that name an HTTP(S) server: checked at start-up, and named when that server cannot be reached
HTTP_URL_SETTINGS = ("fhir_base_url", "dicomweb_url", "public_url", "fhir_smart_token_url")
QUEUE_URL_SCHEMES = ("redis://", "rediss://", "unix://")  # jobs.REDIS_SCHEMES
TRUE_WORDS = ("1", "true", "yes", "on")
FALSE_WORDS = ("0", "false", "no", "off", "")


def http_url_problem(value: str) -> str | None:
    """Why `value` is not an http(s) URL with a host (None: it is one)."""
    try:
        parts = urlsplit(value)
        _ = parts.port  # a port that is not a number raises here
    except ValueError as exc:
        return f"is not a URL ({exc})"
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return "is not an http(s) URL with a host (like http://fhir.example.org/fhir)"
    return None

DEFAULT_PRIORITY_RULES: dict[str, Priority] = {
    "any": Priority.STAT,
    "epidural": Priority.STAT,
    "intraparenchymal": Priority.STAT,
    "intraventricular": Priority.STAT,
    "subarachnoid": Priority.STAT,
    "subdural": Priority.STAT,
    "pneumothorax": Priority.STAT,
    "glioma": Priority.URGENT,
    "meningioma": Priority.URGENT,
    "pituitary": Priority.URGENT,
}


# On a CPU, small batches are faster per slice: EfficientNet-B0's activations at 128 px for ~6
# images fit a core's L2 cache (2 MB here), 16 images' do not. Measured on 2 cores, in one run:
# the bare model 3.2-3.3 ms per image at batch 6-7 against 3.9-4.9 at 16, and the whole
# 40-slice CT pipeline 350 against 436 ms per study (bench/README.md).
CPU_BATCH_SIZE = 6


def _repo_weights_dir() -> Path:
    return Path(__file__).resolve().parents[2] / "weights"


def parse_priority_rules(text: str) -> dict[str, Priority]:
    """Parse `label=priority,label=priority` (e.g. `glioma=asap`) over the defaults."""
    rules = dict(DEFAULT_PRIORITY_RULES)
    for item in filter(None, (part.strip() for part in text.split(","))):
        label, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"CDS_PRIORITY_RULES item {item!r} is not label=priority")
        rules[label.strip()] = Priority(value.strip().lower())
    return rules


def parse_task_modes(text: str) -> dict[Task, TaskMode]:
    """Parse `task=mode,task=mode` (e.g. `head_ct_ich=shadow`); a task not named keeps its card's default."""
    modes: dict[Task, TaskMode] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        task, sep, value = item.partition("=")
        try:
            modes[Task(task.strip())] = TaskMode(value.strip().lower())
        except ValueError:
            raise ValueError(f"CDS_TASK_MODES item {item!r} is not task=off|shadow|active with a task of "
                             f"{', '.join(t.value for t in Task)}") from None
        if not sep:
            raise ValueError(f"CDS_TASK_MODES item {item!r} is not task=mode")
    return modes


def parse_results_to_pacs(text: str) -> frozenset[PacsResult]:
    """Parse `sr,sc` (any of them; empty or `none`: nothing) into the set of results stored in the PACS."""
    items = {part.strip().lower() for part in text.split(",")} - {"", "none"}
    try:
        return frozenset(PacsResult(item) for item in items)
    except ValueError:
        unknown = sorted(item for item in items if item not in {r.value for r in PacsResult})
        raise ValueError(f"CDS_RESULTS_TO_PACS={text!r}: {', '.join(unknown)} is not one of "
                         f"{', '.join(r.value for r in PacsResult)} (comma-separated, or none)") from None


#: The settings whose values form a closed set, and that set (checked and converted in Settings.__post_init__).
ENUM_SETTINGS: dict[str, type[enum.StrEnum]] = {
    "inference_runtime": InferenceRuntime, "worklist_auth": WorklistAuth, "cds_hooks_auth": HooksAuth,
    "pacs_unknown_patient": UnknownPatientPolicy, "ai_security_label_mode": AiLabelMode,
}
#: CDS_DEVICE: a CPU or a CUDA device (`cuda`, `cuda:1`).
DEVICE_PATTERN = re.compile(r"cpu|cuda(:[0-9]+)?")

DRIFT_WINDOW_MAX = 5000  # the job store indexes this many recent triages per task (jobs.RECENT_TRIAGES_KEPT)


def parse_drift_bands(text: str) -> dict[Task, tuple[float, float]]:
    """Parse `task=low-high,…` (shares, e.g. `head_ct_ich=0.05-0.6`); a task not named keeps its card's band."""
    bands: dict[Task, tuple[float, float]] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        task, _, band = item.partition("=")
        low, _, high = band.partition("-")
        try:
            bands[Task(task.strip())] = (float(low), float(high))
        except ValueError:
            raise ValueError(f"CDS_DRIFT_BANDS item {item!r} is not task=low-high (shares from 0 to 1) with a task of "
                             f"{', '.join(t.value for t in Task)}") from None
        if not 0.0 <= float(low) <= float(high) <= 1.0:
            raise ValueError(f"CDS_DRIFT_BANDS item {item!r}: needs 0 <= low <= high <= 1")
    return bands


def parse_coding(text: str) -> tuple[str, str, str]:
    """`system|code` or `system|code|display` (CDS_AI_SECURITY_LABEL) as (system, code, display)."""
    parts = [part.strip() for part in text.split("|")]
    if len(parts) not in (2, 3) or not all(parts[:2]):
        raise ValueError("is not system|code or system|code|display")
    if ":" not in parts[0] or any(c.isspace() for c in parts[0] + parts[1]):
        raise ValueError(f"system {parts[0]!r} is not a URI or code {parts[1]!r} has spaces")
    return parts[0], parts[1], parts[2] if len(parts) == 3 else ""


def canonical_base_problem(value: str) -> str | None:
    """Why `value` cannot be the canonical base of our FHIR definitions (None: it can)."""
    problem = http_url_problem(value)
    if problem:
        return problem
    parts = urlsplit(value)
    if parts.query or parts.fragment or value.endswith("/"):
        return "must be a plain http(s) URL without a query, a fragment or a trailing slash (like https://fhir.hospital.example/ai)"
    return None


def _items(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def check_access_settings(settings: "Settings") -> None:
    """The settings of who may see patient data, together: each mode has what it needs (SettingsError naming it)."""
    for item in _items(settings.trusted_proxies):
        try:
            ipaddress.ip_network(item, strict=False)
        except ValueError:
            raise SettingsError(f"CDS_TRUSTED_PROXIES: {item!r} is not an address or network (like 10.0.0.5 or "
                                "10.0.0.0/24)") from None
    mode = settings.worklist_auth
    if mode is WorklistAuth.PROXY_HEADER and not _items(settings.trusted_proxies):
        raise SettingsError("CDS_WORKLIST_AUTH=proxy-header needs CDS_TRUSTED_PROXIES: the addresses of the "
                            "authenticating proxy (a request from anywhere else is refused)")
    if mode is WorklistAuth.BEARER and not settings.worklist_bearer_token:
        raise SettingsError("CDS_WORKLIST_AUTH=bearer needs CDS_WORKLIST_BEARER_TOKEN")
    if mode is WorklistAuth.OIDC:
        for name in ("oidc_issuer", "oidc_client_id", "oidc_session_secret"):
            if not getattr(settings, name):
                raise SettingsError(f"CDS_WORKLIST_AUTH=oidc needs {env_name(name)}")
        if problem := http_url_problem(settings.oidc_issuer):
            raise SettingsError(f"CDS_OIDC_ISSUER={settings.oidc_issuer!r} {problem}")
        if len(settings.oidc_session_secret) < 32:
            raise SettingsError("CDS_OIDC_SESSION_SECRET is shorter than 32 characters (it signs the session cookies)")
        for name in ("oidc_issuer", "public_url"):  # sign-in over plain http only on this machine (development)
            url = getattr(settings, name)
            if urlsplit(url).scheme != "https" and not is_loopback_url(url):
                raise SettingsError(f"{env_name(name)}={url!r} must be https:// with CDS_WORKLIST_AUTH=oidc "
                                    "(http only on 127.0.0.1 or localhost)")
        if "openid" not in settings.oidc_scopes.split():
            raise SettingsError(f"CDS_OIDC_SCOPES={settings.oidc_scopes!r} must include openid")
    if settings.oidc_session_lifetime_s < 1:
        raise SettingsError(f"CDS_OIDC_SESSION_LIFETIME_S={settings.oidc_session_lifetime_s} is not a number of seconds "
                            "(1 or more)")
    if settings.oidc_idle_timeout_s < 0:
        raise SettingsError(f"CDS_OIDC_IDLE_TIMEOUT_S={settings.oidc_idle_timeout_s} is not a number of seconds "
                            "(0 for no idle timeout, or more)")
    if settings.access_log_retention_days < 1:
        raise SettingsError(f"CDS_ACCESS_LOG_RETENTION_DAYS={settings.access_log_retention_days} is not a number of days "
                            "(1 or more)")


def is_loopback_url(url: str) -> bool:
    """Whether a URL's host is this machine (localhost, 127.0.0.0/8, ::1)."""
    host = urlsplit(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def env_name(field_name: str) -> str:
    """The variable a Settings field is read from (`port` → `CDS_PORT`)."""
    return PREFIX + Settings.__dataclass_fields__[field_name].metadata["env"]


def _parse_value(f: "Field[Any]", name: str, raw: str) -> object:
    """One variable's text as its field's type; a SettingsError naming the variable when it is not."""
    try:
        if f.name == "priority_rules":
            return parse_priority_rules(raw)
        if f.name == "task_modes":
            return parse_task_modes(raw)
        if f.name == "drift_bands":
            return parse_drift_bands(raw)
        if f.name == "results_to_pacs":
            return parse_results_to_pacs(raw)
    except ValueError as exc:
        message = str(exc)
        raise SettingsError(message if message.startswith(name) else f"{name}={raw!r}: {message}") from None
    if f.type in ("int", int):
        try:
            return int(raw.strip())
        except ValueError:
            raise SettingsError(f"{name}={raw!r} is not a whole number") from None
    if f.type in ("float", float):
        try:
            return float(raw.strip())
        except ValueError:
            raise SettingsError(f"{name}={raw!r} is not a number") from None
    if f.type in ("bool", bool):
        word = raw.strip().lower()
        if word not in TRUE_WORDS + FALSE_WORDS:
            raise SettingsError(f"{name}={raw!r} is not on or off (1/0, true/false, yes/no, on/off)")
        return word in TRUE_WORDS
    if f.type in ("Path", Path):
        return Path(raw)
    return raw


@dataclass(frozen=True)
class Settings:
    """Everything configurable, with the variable each field is read from in `env`."""

    fhir_base_url: str = field(default="http://127.0.0.1:8080/fhir", metadata={"env": "FHIR_BASE_URL"})
    fhir_bearer_token: str = field(default="", metadata={"env": "FHIR_BEARER_TOKEN", "secret": True})
    dicomweb_url: str = field(default="http://127.0.0.1:8042/dicom-web", metadata={"env": "DICOMWEB_URL"})
    dicomweb_allowed_endpoints: str = field(default="", metadata={"env": "DICOMWEB_ALLOWED_ENDPOINTS"})
    dicomweb_username: str = field(default="", metadata={"env": "DICOMWEB_USERNAME"})
    dicomweb_password: str = field(default="", metadata={"env": "DICOMWEB_PASSWORD", "secret": True})
    dicomweb_bearer_token: str = field(default="", metadata={"env": "DICOMWEB_BEARER_TOKEN", "secret": True})
    public_url: str = field(default="http://127.0.0.1:8000", metadata={"env": "PUBLIC_URL"})
    host: str = field(default="127.0.0.1", metadata={"env": "HOST"})
    port: int = field(default=8000, metadata={"env": "PORT"})
    data_dir: Path = field(default=Path("var"), metadata={"env": "DATA_DIR"})
    weights_dir: Path = field(default_factory=_repo_weights_dir, metadata={"env": "WEIGHTS_DIR"})
    queue_url: str = field(default="", metadata={"env": "QUEUE_URL"})
    workers: int = field(default=1, metadata={"env": "WORKERS"})
    device: str = field(default="cpu", metadata={"env": "DEVICE"})
    torch_threads: int = field(default=0, metadata={"env": "TORCH_THREADS"})
    inference_runtime: InferenceRuntime = field(default=InferenceRuntime.AUTO, metadata={"env": "INFERENCE_RUNTIME"})
    batch_size: int = field(default=0, metadata={"env": "BATCH_SIZE"})
    # processes that decode a series' slices while the model scores (0: none, the worker's own thread
    # decodes; -1: decoding.default_processes, none on up to 3 cores, else cores - 2)
    decode_processes: int = field(default=-1, metadata={"env": "DECODE_PROCESSES"})
    # threads that decode a thin-slice series read as slabs where there are no decoder processes (0:
    # none; -1: decoding.default_threads, one per core up to 4 where JPEG-LS is decoded without the GIL)
    decode_threads: int = field(default=-1, metadata={"env": "DECODE_THREADS"})
    max_body_bytes: int = field(default=2_000_000, metadata={"env": "MAX_BODY_BYTES"})
    notification_lookback_s: int = field(default=600, metadata={"env": "NOTIFICATION_LOOKBACK_S"})
    max_instances: int = field(default=400, metadata={"env": "MAX_INSTANCES"})
    http_timeout_s: float = field(default=30.0, metadata={"env": "HTTP_TIMEOUT_S"})
    job_retries: int = field(default=5, metadata={"env": "JOB_RETRIES"})
    job_retry_delay_s: float = field(default=2.0, metadata={"env": "JOB_RETRY_DELAY_S"})
    subscription_secret: str = field(default="", metadata={"env": "SUBSCRIPTION_SECRET", "secret": True})
    priority_rules: Mapping[str, Priority] = field(
        default_factory=lambda: dict(DEFAULT_PRIORITY_RULES), metadata={"env": "PRIORITY_RULES"}
    )
    # per task: off / shadow / active; a task not named here runs as its model card's default_mode says
    task_modes: Mapping[Task, TaskMode] = field(default_factory=dict, metadata={"env": "TASK_MODES"})
    # a site's own operating thresholds (`cds-triage validate --write-thresholds`), used instead of the cards'
    site_thresholds_file: str = field(default="", metadata={"env": "SITE_THRESHOLDS"})
    # Drift alarm (cds_service/drift.py): the share of each task's last CDS_DRIFT_WINDOW triages that were raised
    # against the band its card expects (CDS_DRIFT_BANDS overrides it per task: `task=low-high`)
    drift_window: int = field(default=50, metadata={"env": "DRIFT_WINDOW"})
    drift_min_studies: int = field(default=20, metadata={"env": "DRIFT_MIN_STUDIES"})
    drift_bands: Mapping[Task, tuple[float, float]] = field(default_factory=dict, metadata={"env": "DRIFT_BANDS"})
    log_level: str = field(default="INFO", metadata={"env": "LOG_LEVEL"})
    # PACS-side trigger (POST /pacs/studies): off while the secret is empty.
    pacs_trigger_secret: str = field(default="", metadata={"env": "PACS_TRIGGER_SECRET", "secret": True})
    patient_identifier_system: str = field(default="urn:demo:mrn", metadata={"env": "PATIENT_IDENTIFIER_SYSTEM"})
    pacs_unknown_patient: UnknownPatientPolicy = field(default=UnknownPatientPolicy.REJECT, metadata={"env": "PACS_UNKNOWN_PATIENT"})

    # Results in the PACS beside FHIR (adapters/secondary_capture.py, structured_report.py), and the link to the
    # site's viewer on the worklist and the cards (core/viewer.py: a URL template with {study_uid}).
    results_to_pacs: frozenset[PacsResult] = field(default=frozenset(), metadata={"env": "RESULTS_TO_PACS"})
    heatmap_to_pacs: bool = field(default=False, metadata={"env": "HEATMAP_TO_PACS"})  # the older switch: true adds sc
    viewer_url: str = field(default="", metadata={"env": "VIEWER_URL", "old_env": "PACS_VIEWER_URL"})
    # Worklist page (cds_service/web/worklist.py).
    worklist_refresh_s: float = field(default=5.0, metadata={"env": "WORKLIST_REFRESH_S"})
    worklist_max_orders: int = field(default=200, metadata={"env": "WORKLIST_MAX_ORDERS"})
    worklist_auth: WorklistAuth = field(default=WorklistAuth.NONE, metadata={"env": "WORKLIST_AUTH"})
    worklist_auth_header: str = field(default="X-Forwarded-User", metadata={"env": "WORKLIST_AUTH_HEADER"})
    worklist_bearer_token: str = field(default="", metadata={"env": "WORKLIST_BEARER_TOKEN", "secret": True})
    # Who may see patient data, and the record of who did (cds_service/web/access.py, sign_in.py,
    # adapters/access_log.py; docs/security.md). Checked together in check_access_settings.
    # development only: with CDS_WORKLIST_AUTH=none, `serve` listens beyond loopback and serves anyone (logged loudly)
    worklist_open_to_network: bool = field(default=False, metadata={"env": "WORKLIST_OPEN_TO_NETWORK"})
    # proxy-header: the authenticating proxy's addresses (CIDRs); the direct peer must be one of them
    trusted_proxies: str = field(default="", metadata={"env": "TRUSTED_PROXIES"})
    proxy_secret: str = field(default="", metadata={"env": "PROXY_SECRET", "secret": True})
    proxy_secret_header: str = field(default="X-CDS-Proxy-Secret", metadata={"env": "PROXY_SECRET_HEADER"})
    # oidc: authorization code flow with PKCE at the site's identity provider
    oidc_issuer: str = field(default="", metadata={"env": "OIDC_ISSUER"})
    oidc_client_id: str = field(default="", metadata={"env": "OIDC_CLIENT_ID"})
    oidc_client_secret: str = field(default="", metadata={"env": "OIDC_CLIENT_SECRET", "secret": True})
    oidc_scopes: str = field(default="openid profile email", metadata={"env": "OIDC_SCOPES"})
    oidc_required_group: str = field(default="", metadata={"env": "OIDC_REQUIRED_GROUP"})
    oidc_groups_claim: str = field(default="groups", metadata={"env": "OIDC_GROUPS_CLAIM"})
    oidc_user_claim: str = field(default="preferred_username", metadata={"env": "OIDC_USER_CLAIM"})
    oidc_session_secret: str = field(default="", metadata={"env": "OIDC_SESSION_SECRET", "secret": True})
    oidc_session_lifetime_s: int = field(default=8 * 3600, metadata={"env": "OIDC_SESSION_LIFETIME_S"})
    # a session also ends after this long without a page opened (the worklist's own refresh does not count); 0: never
    oidc_idle_timeout_s: int = field(default=30 * 60, metadata={"env": "OIDC_IDLE_TIMEOUT_S"})
    # the access log of patient data views: rows older than this are pruned
    access_log_retention_days: int = field(default=6 * 365, metadata={"env": "ACCESS_LOG_RETENTION_DAYS"})

    # CDS Hooks: inbound JWT (see cds_service/adapters/security.py), CORS, limits, system actions.
    cds_hooks_auth: HooksAuth = field(default=HooksAuth.JWT, metadata={"env": "HOOKS_AUTH"})
    cds_hooks_issuers: str = field(default="", metadata={"env": "HOOKS_ISSUERS"})
    cds_hooks_jku_allowlist: str = field(default="", metadata={"env": "HOOKS_JKU_ALLOWLIST"})
    cds_hooks_jwks_file: str = field(default="", metadata={"env": "HOOKS_JWKS_FILE"})
    cds_hooks_jwks_cache_s: int = field(default=300, metadata={"env": "HOOKS_JWKS_CACHE_S"})
    cds_hooks_cors_origins: str = field(default="", metadata={"env": "HOOKS_CORS_ORIGINS"})
    cds_hooks_rate_limit: str = field(default="120/minute", metadata={"env": "HOOKS_RATE_LIMIT"})
    rate_limit_storage_url: str = field(default="memory://", metadata={"env": "RATE_LIMIT_STORAGE_URL"})
    max_json_depth: int = field(default=64, metadata={"env": "MAX_JSON_DEPTH"})
    cds_hooks_system_actions: bool = field(default=False, metadata={"env": "HOOKS_SYSTEM_ACTIONS"})
    # FHIR servers a hook's `fhirServer` may name: comma-separated base URLs, each optionally as
    # `issuer|url` to allow it for one trusted issuer only. Anything else is never called.
    cds_hooks_fhir_servers: str = field(default="", metadata={"env": "HOOKS_FHIR_SERVERS"})
    # a loopback fhirServer (127.0.0.1, localhost) is refused even when listed, unless this is on (development)
    cds_hooks_allow_loopback_fhir: bool = field(default=False, metadata={"env": "HOOKS_ALLOW_LOOPBACK_FHIR"})
    # Outbound to the FHIR server: SMART Backend Services (client credentials, private_key_jwt).
    fhir_smart_client_id: str = field(default="", metadata={"env": "FHIR_SMART_CLIENT_ID"})
    fhir_smart_private_key_file: str = field(default="", metadata={"env": "FHIR_SMART_PRIVATE_KEY_FILE"})
    fhir_smart_key_id: str = field(default="", metadata={"env": "FHIR_SMART_KEY_ID"})
    fhir_smart_token_url: str = field(default="", metadata={"env": "FHIR_SMART_TOKEN_URL"})
    fhir_smart_scope: str = field(default="system/*.rs system/*.cu", metadata={"env": "FHIR_SMART_SCOPE"})
    # Jobs that survive crashes (cds_service/jobs/), size limits, operations (metrics.py, ops.py).
    job_lease_s: float = field(default=30.0, metadata={"env": "JOB_LEASE_S"})
    job_redeliver_s: float = field(default=300.0, metadata={"env": "JOB_REDELIVER_S"})
    job_timeout_s: float = field(default=900.0, metadata={"env": "JOB_TIMEOUT_S"})
    max_series_bytes: int = field(default=1_000_000_000, metadata={"env": "MAX_SERIES_BYTES"})
    worker_metrics_port: int = field(default=0, metadata={"env": "WORKER_METRICS_PORT"})
    operator_token: str = field(default="", metadata={"env": "OPERATOR_TOKEN", "secret": True})
    # development only: without CDS_OPERATOR_TOKEN, let direct loopback calls (no proxy headers) use
    # /jobs, /audit, /metrics and the /readyz details; off, they need the token (default deny)
    operator_open_on_loopback: bool = field(default=False, metadata={"env": "OPERATOR_OPEN_ON_LOOPBACK"})
    # What the FHIR write-back mints (docs/fhir.md): the canonical base of our code systems, extensions,
    # identifier systems, tags and profiles (`cds-triage fhir-package` writes their definitions under it), and a
    # site's own AI security label (system|code|display), added to HL7's AIAST or written instead of it.
    fhir_canonical_base: str = field(default=DEFAULT_FHIR_CANONICAL_BASE, metadata={"env": "FHIR_CANONICAL_BASE"})
    ai_security_label: str = field(default="", metadata={"env": "AI_SECURITY_LABEL"})
    ai_security_label_mode: AiLabelMode = field(default=AiLabelMode.ADD, metadata={"env": "AI_SECURITY_LABEL_MODE"})

    def __post_init__(self) -> None:
        for name, kind in ENUM_SETTINGS.items():  # a string from the environment or a caller becomes its enum member
            value = getattr(self, name)
            try:
                object.__setattr__(self, name, kind(str(value).strip().lower()))
            except ValueError:
                raise SettingsError(f"{env_name(name)}={value!r} is not one of {', '.join(m.value for m in kind)}") from None
        results = self.results_to_pacs
        try:
            results = parse_results_to_pacs(results) if isinstance(results, str) else frozenset(PacsResult(r) for r in results)
        except ValueError as exc:
            raise SettingsError(str(exc)) from None
        results |= {PacsResult.SC} if self.heatmap_to_pacs else frozenset()
        object.__setattr__(self, "results_to_pacs", results)  # the one switch read; CDS_HEATMAP_TO_PACS follows it
        object.__setattr__(self, "heatmap_to_pacs", PacsResult.SC in results)
        if self.viewer_url and (problem := template_problem(self.viewer_url)):
            raise SettingsError(f"CDS_VIEWER_URL={self.viewer_url!r} {problem}")
        for name in ("cds_hooks_system_actions",):
            value = getattr(self, name)
            if isinstance(value, str):
                word = value.strip().lower()
                if word not in TRUE_WORDS + FALSE_WORDS:
                    raise SettingsError(f"{env_name(name)}={value!r} is not on or off (1/0, true/false, yes/no, on/off)")
                object.__setattr__(self, name, word in TRUE_WORDS)
        if not DEVICE_PATTERN.fullmatch(self.device):
            raise SettingsError(f"CDS_DEVICE={self.device!r} is not a device (cpu, cuda or cuda:<index>)")
        for name in HTTP_URL_SETTINGS:
            value = getattr(self, name)
            problem = http_url_problem(value) if value or name != "fhir_smart_token_url" else None
            if problem:
                raise SettingsError(f"{env_name(name)}={value!r} {problem}")
        for url in filter(None, (u.strip() for u in self.dicomweb_allowed_endpoints.split(","))):
            if problem := http_url_problem(url):
                raise SettingsError(f"CDS_DICOMWEB_ALLOWED_ENDPOINTS: {url!r} {problem}")
        if self.queue_url and not self.queue_url.startswith(QUEUE_URL_SCHEMES):
            raise SettingsError(f"CDS_QUEUE_URL={self.queue_url!r} is not a Redis URL (redis://host:6379/0, "
                                "rediss://… or unix://…); leave it empty for the SQLite queue")
        for name in ("port", "worker_metrics_port"):
            if not 0 <= getattr(self, name) <= 65535:
                raise SettingsError(f"{env_name(name)}={getattr(self, name)} is not a port (0-65535)")
        if not isinstance(logging.getLevelName(self.log_level.upper()), int):
            raise SettingsError(f"CDS_LOG_LEVEL={self.log_level!r} is not a log level "
                                "(DEBUG, INFO, WARNING, ERROR or CRITICAL)")
        for name in ("decode_processes", "decode_threads"):
            if not -1 <= getattr(self, name) <= 64:
                raise SettingsError(f"{env_name(name)}={getattr(self, name)} is not from -1 (this machine's "
                                    "default) to 64")
        if not 1 <= self.drift_window <= DRIFT_WINDOW_MAX:
            raise ValueError(f"CDS_DRIFT_WINDOW must be from 1 to {DRIFT_WINDOW_MAX} studies, not {self.drift_window}")
        if not 1 <= self.drift_min_studies <= self.drift_window:
            raise ValueError(f"CDS_DRIFT_MIN_STUDIES must be from 1 to CDS_DRIFT_WINDOW ({self.drift_window}), "
                             f"not {self.drift_min_studies}: the drift alarm could never fire")
        if problem := canonical_base_problem(self.fhir_canonical_base):
            raise SettingsError(f"CDS_FHIR_CANONICAL_BASE={self.fhir_canonical_base!r} {problem}")
        if self.ai_security_label:
            try:
                parse_coding(self.ai_security_label)
            except ValueError as exc:
                raise SettingsError(f"CDS_AI_SECURITY_LABEL={self.ai_security_label!r} {exc}") from None
        elif self.ai_security_label_mode is AiLabelMode.REPLACE:
            raise SettingsError("CDS_AI_SECURITY_LABEL_MODE=replace needs CDS_AI_SECURITY_LABEL (system|code|display): "
                                "without it nothing would mark the results as AI-asserted")
        check_access_settings(self)
        if self.site_thresholds_file:
            _ = self.site_thresholds  # checked at start-up: a bad file stops the process with an error naming the setting

    @cached_property
    def trusted_proxy_networks(self) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
        """CDS_TRUSTED_PROXIES as networks (checked at start-up)."""
        return tuple(ipaddress.ip_network(item, strict=False) for item in _items(self.trusted_proxies))

    @cached_property
    def site_thresholds(self) -> "SiteThresholds | None":
        """CDS_SITE_THRESHOLDS, read and checked against the cards in CDS_WEIGHTS_DIR (None: the cards decide)."""
        if not self.site_thresholds_file:
            return None
        from cds_service.core.site_thresholds import load_site_thresholds

        return load_site_thresholds(Path(self.site_thresholds_file), self.weights_dir)

    @property
    def ai_security_coding(self) -> tuple[str, str, str] | None:
        """CDS_AI_SECURITY_LABEL as (system, code, display), None when unset (checked at start-up)."""
        return parse_coding(self.ai_security_label) if self.ai_security_label else None

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: object) -> "Settings":
        """Build settings from `environ` (default: os.environ); explicit overrides win."""
        env = os.environ if environ is None else environ
        values: dict[str, object] = {}
        for f in fields(cls):
            name = PREFIX + f.metadata["env"]
            raw = env.get(name)
            if raw is None and f.metadata.get("old_env"):  # a setting's earlier name still works
                raw = env.get(PREFIX + f.metadata["old_env"])
            if raw is None and f.metadata.get("secret") and name + "_FILE" in env:
                # A secret may come from a file named by CDS_<NAME>_FILE (Docker/Kubernetes secrets).
                try:
                    raw = Path(env[name + "_FILE"]).read_text().strip()
                except OSError as exc:
                    raise SettingsError(f"{name}_FILE={env[name + '_FILE']!r} cannot be read: "
                                        f"{exc.strerror or exc}") from None
            if raw is None:
                continue
            values[f.name] = _parse_value(f, name, raw)
        values.update(overrides)
        return cls(**values)  # type: ignore[arg-type]

    def to_env(self) -> dict[str, str]:
        """The CDS_ variables that reproduce these settings (to start a child process)."""
        env: dict[str, str] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "priority_rules":
                value = ",".join(f"{k}={v.value}" for k, v in value.items())
            elif f.name == "task_modes":
                value = ",".join(f"{k.value}={v.value}" for k, v in value.items())
            elif f.name == "drift_bands":
                value = ",".join(f"{k.value}={low!r}-{high!r}" for k, (low, high) in value.items())
            elif f.name == "results_to_pacs":
                value = ",".join(sorted(result.value for result in value))
            env[PREFIX + f.metadata["env"]] = str(value)
        return env

    def viewer_link(self, study_uid: str | None) -> str | None:
        """The site's viewer opened at a study (CDS_VIEWER_URL); None when no viewer is configured."""
        return viewer_link(self.viewer_url, study_uid)

    def mode_for(self, task: Task, card_default: TaskMode = TaskMode.ACTIVE) -> TaskMode:
        """The task's mode: CDS_TASK_MODES where it names the task, else the card's default."""
        return self.task_modes.get(task, card_default)

    @property
    def inference_batch_size(self) -> int:
        """Slices per inference batch: CDS_BATCH_SIZE, else CPU_BATCH_SIZE on a CPU and 16 on CUDA."""
        return self.batch_size or (16 if self.device.startswith("cuda") else CPU_BATCH_SIZE)

    @property
    def inference_threads(self) -> int:
        """Intra-op threads per worker: all cores by default, fewer when several workers share them."""
        return self.torch_threads or max(1, (os.cpu_count() or 1) // max(1, self.workers))

    @property
    def allowed_dicomweb_urls(self) -> set[str]:
        """DICOMweb bases an ImagingStudy.endpoint may point us to: the default and the listed ones."""
        listed = {u.strip().rstrip("/") for u in self.dicomweb_allowed_endpoints.split(",") if u.strip()}
        return listed | {self.dicomweb_url.rstrip("/")}

    @property
    def job_db_path(self) -> Path:
        return self.data_dir / "jobs.sqlite3"

    @property
    def queue_db_path(self) -> Path:
        return self.data_dir / "queue.sqlite3"

    @property
    def metrics_dir(self) -> Path:
        """prometheus_client multiprocess files of this machine's processes."""
        return self.data_dir / "metrics"

    @property
    def audit_db_path(self) -> Path:
        return self.data_dir / "audit.sqlite3"
