"""The production stack's files, checked without Docker: the compose file's services, health checks,
start order and the addresses they give each other; the Dockerfile against `make install`; the
Kubernetes work-pool template against Prefect's own validator and renderer."""

from __future__ import annotations

import fnmatch
import json
import re
import shlex
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
INFRA = ROOT / "infra"
COMPOSE = INFRA / "docker-compose.yml"
ENV_EXAMPLE = INFRA / ".env.example"
TEMPLATE = INFRA / "k8s-base-job-template.json"

SERVICES = {
    "prefect-db",
    "prefect-server",
    "mlflow-db",
    "minio",
    "minio-init",
    "mlflow",
    "prefect-worker",
    "model-server",
}
ONE_SHOT = {"minio-init"}  # exits once its job is done; everything else stays up
INTERPOLATION = re.compile(r"\$\{(\w+)(?:(:?[-?])([^}]*))?\}")


def env_example() -> dict[str, str]:
    pairs = [
        line.split("=", 1)
        for line in ENV_EXAMPLE.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    return {k.strip(): v.strip() for k, v in pairs}


def interpolate(text: str, env: dict[str, str]) -> str:
    """Compose's ``${VAR}``, ``${VAR:-default}`` and ``${VAR:?error}`` (``$$`` escapes a ``$``)."""

    def value(match: re.Match[str]) -> str:
        name, op, arg = match.groups()
        if env.get(name):
            return env[name]
        if op and op.endswith("-"):
            return arg
        raise KeyError(f"{name} is neither in {ENV_EXAMPLE.name} nor given a default")

    return INTERPOLATION.sub(value, text.replace("$$", "\0")).replace("\0", "$")


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(interpolate(COMPOSE.read_text(), env_example()))


@pytest.fixture(scope="module")
def services(compose: dict) -> dict[str, dict]:
    return compose["services"]


def command(service: dict) -> list[str]:
    cmd = service.get("command") or service.get("entrypoint")
    return shlex.split(cmd) if isinstance(cmd, str) else [str(c) for c in cmd]


def flag(cmd: list[str], name: str) -> str:
    """The value of ``--name V`` or ``--name=V`` in ``cmd``."""
    for i, arg in enumerate(cmd):
        if arg == name:
            return cmd[i + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    raise AssertionError(f"{name} not in {cmd}")


def env(service: dict) -> dict[str, str]:
    return {k: str(v) for k, v in (service.get("environment") or {}).items()}


def test_compose_has_the_stacks_services(services: dict[str, dict]) -> None:
    assert set(services) == SERVICES


def test_every_service_has_a_health_check_and_waits_for_what_it_needs(
    services: dict[str, dict],
) -> None:
    for name, service in services.items():
        if name not in ONE_SHOT:
            assert service["healthcheck"]["test"], name
            assert service["restart"] == "unless-stopped", name
        for needed, how in (service.get("depends_on") or {}).items():
            assert needed in services, f"{name} depends on unknown {needed}"
            if how["condition"] == "service_healthy":
                assert "healthcheck" in services[needed], f"{needed} has no health check"
            else:
                assert how["condition"] == "service_completed_successfully"
                assert needed in ONE_SHOT
    needs = {
        "prefect-server": {"prefect-db"},
        "mlflow": {"mlflow-db", "minio-init"},
        "minio-init": {"minio"},
        "prefect-worker": {"prefect-server", "mlflow"},
        "model-server": {"mlflow"},
    }
    for name, wanted in needs.items():
        assert set(services[name]["depends_on"]) == wanted, name


def test_every_variable_is_in_the_env_example_and_none_there_is_stale() -> None:
    used = {m.group(1) for m in INTERPOLATION.finditer(COMPOSE.read_text())}
    assert used == set(env_example()), "variables of docker-compose.yml vs .env.example"
    assert "infra/.env" in (ROOT / ".gitignore").read_text().splitlines()  # secrets stay local


def test_services_reach_each_other_where_the_servers_listen(services: dict[str, dict]) -> None:
    prefect_port = flag(command(services["prefect-server"]), "--port")
    mlflow_cmd = command(services["mlflow"])
    mlflow_port = flag(mlflow_cmd, "--port")
    minio_port = flag(command(services["minio"]), "--address").lstrip(":")

    api = urlsplit(env(services["prefect-worker"])["PREFECT_API_URL"])
    assert (api.hostname, str(api.port), api.path) == ("prefect-server", prefect_port, "/api")
    for name in ("prefect-worker", "model-server"):
        tracking = urlsplit(env(services[name])["MLFLOW_TRACKING_URI"])
        assert (tracking.hostname, str(tracking.port)) == ("mlflow", mlflow_port), name
        assert f"mlflow:{mlflow_port}" in flag(mlflow_cmd, "--allowed-hosts").split(",")
    s3 = urlsplit(env(services["mlflow"])["MLFLOW_S3_ENDPOINT_URL"])
    assert (s3.hostname, str(s3.port)) == ("minio", minio_port)
    assert f"http://minio:{minio_port}" in " ".join(command(services["minio-init"]))


def test_database_and_bucket_settings_agree(services: dict[str, dict]) -> None:
    def matches(url: str, db_service: str) -> None:
        parts, db = urlsplit(url), env(services[db_service])
        assert parts.hostname == db_service
        assert parts.username == db["POSTGRES_USER"]
        assert parts.password == db["POSTGRES_PASSWORD"]
        assert parts.path.lstrip("/") == db["POSTGRES_DB"]

    prefect_db = env(services["prefect-server"])["PREFECT_API_DATABASE_CONNECTION_URL"]
    assert prefect_db.startswith("postgresql+asyncpg://")
    matches(prefect_db, "prefect-db")
    mlflow_cmd = command(services["mlflow"])
    matches(flag(mlflow_cmd, "--backend-store-uri"), "mlflow-db")

    bucket = env(services["minio-init"])["MLFLOW_BUCKET"]
    assert urlsplit(flag(mlflow_cmd, "--artifacts-destination"))[:2] == ("s3", bucket)
    assert "--serve-artifacts" in mlflow_cmd  # clients go through the server: no S3 keys there
    minio, mlflow = env(services["minio"]), env(services["mlflow"])
    assert mlflow["AWS_ACCESS_KEY_ID"] == minio["MINIO_ROOT_USER"]
    assert mlflow["AWS_SECRET_ACCESS_KEY"] == minio["MINIO_ROOT_PASSWORD"]
    for name in ("prefect-worker", "model-server"):
        assert not {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} & set(env(services[name]))


def test_mlflow_server_flags_exist_in_the_installed_mlflow(services: dict[str, dict]) -> None:
    from mlflow.cli import server

    known = {opt for param in server.params for opt in param.opts + param.secondary_opts}
    cmd = command(services["mlflow"])
    assert cmd[:2] == ["mlflow", "server"]
    used = {arg.split("=", 1)[0] for arg in cmd[2:] if arg.startswith("--")}
    assert used <= known, used - known


def test_worker_and_model_server_commands(services: dict[str, dict]) -> None:
    from flows.cli import build_parser

    worker = command(services["prefect-worker"])
    assert worker[:3] == ["prefect", "worker", "start"]
    assert flag(worker, "--type") == "process"
    assert flag(worker, "--pool") == env_example()["WORK_POOL"]
    for name in ("prefect-server", "prefect-worker", "model-server"):
        assert env(services[name])["PREFECT_SERVER_ANALYTICS_ENABLED"] == "false", name

    serve = command(services["model-server"])
    assert serve[0] == "transfer-pipeline"
    args = build_parser().parse_args(serve[1:])  # the project's own CLI accepts it
    assert args.model_uri == f"models:/{env_example()['MODEL_NAME']}@champion"
    assert (args.host, str(args.port)) == ("0.0.0.0", "8080")


def test_ports_are_published_on_loopback_only(services: dict[str, dict]) -> None:
    published = [p for s in services.values() for p in s.get("ports", [])]
    assert published
    assert all(str(p).startswith("127.0.0.1:") for p in published), published


def test_build_contexts_and_dockerfiles_exist() -> None:
    raw = yaml.safe_load(COMPOSE.read_text())
    builds = [s["build"] for s in raw["services"].values() if "build" in s]
    assert len(builds) >= 4  # the project image (three services) and the MLflow image
    for build in builds:
        context = (INFRA / build["context"]).resolve()
        assert context.is_dir(), context
        assert (context / build["dockerfile"]).is_file(), build


def install_commands(lines: list[str]) -> list[list[str]]:
    """Every ``pip install`` of ``lines`` as its argument list (``'.[test]'`` unquoted)."""
    found = []
    for line in lines:
        for part in re.split(r"&&|;", line):
            words = shlex.split(part.strip())
            if len(words) >= 2 and words[0].endswith("pip") and words[1] == "install":
                found.append(words[2:])
    return found


def makefile_install() -> list[list[str]]:
    text = (ROOT / "Makefile").read_text()
    recipe = re.search(r"^\$\(STAMP\):.*\n((?:\t.*\n)+)", text, re.MULTILINE)
    assert recipe, "the $(STAMP) recipe is gone from the Makefile"
    return install_commands(recipe.group(1).splitlines())


def dockerfile_install(path: Path) -> list[list[str]]:
    text = path.read_text().replace("\\\n", " ")
    return install_commands([line[4:] for line in text.splitlines() if line.startswith("RUN ")])


def test_dockerfile_installs_the_way_make_install_does() -> None:
    make, docker = makefile_install(), dockerfile_install(ROOT / "Dockerfile")
    assert len(make) == len(docker) == 2
    assert make[0] == docker[0]  # torch and torchvision, pinned alike
    pins = dict(arg.split("==") for arg in make[0])
    pyproject = (ROOT / "pyproject.toml").read_text()
    for name, version in pins.items():
        assert f'"{name}=={version}"' in pyproject, name
    strip_extras = [re.sub(r"\[.*\]$", "", arg) for arg in make[1]]
    assert docker[1] == strip_extras  # the project, editable, without the test extra


def test_dockerignore_keeps_what_the_install_needs() -> None:
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]

    def ignored(path: str) -> bool:
        return any(fnmatch.fnmatch(path, p.removeprefix("**/")) for p in patterns)

    for path in (".venv", "transfer-runs", "mlruns", ".pytest_prefect", "infra/.env"):
        assert ignored(path), path
    packages = re.search(r"include = \[(.*)\]", (ROOT / "pyproject.toml").read_text()).group(1)
    needed = [p.strip(' "*') for p in packages.split(",")] + ["pyproject.toml", "README.md"]
    for path in needed:
        assert (ROOT / path).exists() and not ignored(path), path


def test_mlflow_image_matches_the_projects_mlflow() -> None:
    spec = re.search(r'"(mlflow[^"]*)"', (ROOT / "pyproject.toml").read_text()).group(1)
    installs = dockerfile_install(INFRA / "mlflow.Dockerfile")
    assert len(installs) == 1
    assert {spec, "psycopg2-binary", "boto3"} == set(installs[0])


@pytest.fixture(scope="module")
def template() -> dict:
    return json.loads(TEMPLATE.read_text())


def test_k8s_template_passes_prefects_own_validation(template: dict) -> None:
    from prefect.server.schemas.actions import validate_base_job_template
    from prefect.utilities.templating import find_placeholders

    assert set(template) == {"job_configuration", "variables"}
    validate_base_job_template(template)  # raises on an undeclared placeholder
    declared = set(template["variables"]["properties"])
    used = {p.name for p in find_placeholders(template["job_configuration"])}
    assert used == declared, declared ^ used  # nothing declared that the jobs never see
    expected = {"command", "env", "labels", "name", "namespace", "job_manifest", "stream_output"}
    assert expected <= set(template["job_configuration"])


def render(template: dict, **values: object) -> dict:
    """The job manifest as the worker fills it: variables' defaults, then ``values``."""
    from prefect.utilities.templating import apply_values

    props = template["variables"]["properties"]
    filled = {k: v["default"] for k, v in props.items() if v.get("default") is not None}
    return apply_values(template["job_configuration"], filled | values)["job_manifest"]


def test_k8s_template_renders_a_job_with_the_projects_volumes(template: dict) -> None:
    manifest = render(template, name="retrain", command="prefect flow-run execute")
    assert "{{" not in json.dumps(manifest)
    pod = manifest["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["image"] == "transfer-pipeline:latest"
    assert container["env"]["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    assert container["env"]["PREFECT_SERVER_ANALYTICS_ENABLED"] == "false"
    assert "nvidia.com/gpu" not in container["resources"]["limits"]  # CPU unless asked
    claims = {v["name"]: v.get("persistentVolumeClaim") for v in pod["volumes"]}
    assert claims["data"]["claimName"] == "transfer-data"
    assert claims["runs"]["claimName"] == "transfer-runs"
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert mounts["runs"] == "/app/transfer-runs"  # output_dir, relative to the image's /app
    assert set(mounts) == set(claims)

    gpu = render(template, name="retrain", gpu_limit=1)["spec"]["template"]["spec"]
    assert gpu["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1


def test_docs_describe_every_service_and_the_readme_links_them(services: dict[str, dict]) -> None:
    page = (ROOT / "docs" / "production.md").read_text()
    for name in services:
        assert f"`{name}`" in page, name
    assert "docs/production.md" in (ROOT / "README.md").read_text()
