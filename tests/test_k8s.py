"""The Kubernetes manifests (deploy/k8s/): valid against the Kubernetes schemas, and true to what
the service, its image and PgBouncer need of them.

kubernetes-validate checks every document against the JSON schemas it bundles, offline, in
strict mode (an unknown or misspelled field is refused). The rest reads the manifests as data
and checks what they promise each other: the probes hit the service's own port and paths, the
grace period outlasts gunicorn's graceful stop, the secrets stay in Secrets, the connection
budget fits PgBouncer, and the settings the Deployment gives load as the service loads them.
"""

import ast
import configparser
import copy
import re
import shlex
import socket
from pathlib import Path

import kubernetes_validate
import psycopg2.extensions
import pytest
import yaml

from config import ConfigError, load_settings
from config.settings import VARIABLES
from service.db.budget import Budget

REPO = Path(__file__).resolve().parent.parent
K8S = REPO / "deploy" / "k8s"
# The Kubernetes release whose schemas the manifests must satisfy.
KUBERNETES_VERSION = "1.33"
# What a PostgreSQL with its default max_connections (100) leaves, less its 3 superuser slots:
# the server pgbouncer.yaml and app.yaml count on.
DEFAULT_SERVER_ALLOWED = 100 - 3
DUMMY_DATABASE_URL = "postgresql://app:dummy@pgbouncer:6432/app"
A_VALID_TOKEN = "a-token-of-32-characters-or-more"


def documents(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


MANIFESTS = sorted(path for path in K8S.glob("*.yaml") if path.name != "kustomization.yaml")
DOCUMENTS = [(path.name, doc) for path in MANIFESTS for doc in documents(path)]
KUSTOMIZATION = documents(K8S / "kustomization.yaml")[0]


def the(kind: str, name: str) -> dict:
    found = [doc for _, doc in DOCUMENTS if (doc["kind"], doc["metadata"]["name"]) == (kind, name)]
    assert len(found) == 1, f"{len(found)} {kind} named {name} in deploy/k8s/"
    return found[0]


APP = the("Deployment", "service")
PGBOUNCER = the("Deployment", "pgbouncer")


def pod(deployment: dict) -> dict:
    return deployment["spec"]["template"]["spec"]


def container(deployment: dict) -> dict:
    (only,) = pod(deployment)["containers"]
    return only


def plain_env(deployment: dict) -> dict[str, str]:
    """The variables the Deployment gives as values (not from a Secret)."""
    return {var["name"]: var["value"] for var in container(deployment)["env"] if "value" in var}


def port_number(deployment: dict, port: int | str) -> int:
    """A probe's or a Service's port: a number, or the name of a container port."""
    if isinstance(port, int):
        return port
    (number,) = [p["containerPort"] for p in container(deployment)["ports"] if p["name"] == port]
    return number


def mounted_files(deployment: dict) -> dict[str, tuple[str, str]]:
    """Each file mounted from a Secret or a ConfigMap: its path -> (the kind, the object's name)."""
    volumes = {volume["name"]: volume for volume in pod(deployment)["volumes"]}
    files = {}
    for mount in container(deployment)["volumeMounts"]:
        volume = volumes[mount["name"]]
        sources = volume["projected"]["sources"] if "projected" in volume else [volume]
        for source in sources:
            for kind, key in (("Secret", "secret"), ("ConfigMap", "configMap")):
                if key not in source:
                    continue
                name = source[key].get("secretName") or source[key].get("name")
                items = source[key].get("items") or [
                    {"key": k, "path": k} for k in example_data(kind, name)
                ]
                for item in items:
                    assert item["key"] in example_data(kind, name), (kind, name, item["key"])
                    files[f"{mount['mountPath']}/{item['path']}"] = (kind, name)
    return files


def example_data(kind: str, name: str) -> dict[str, str]:
    """A ConfigMap's data, or an example Secret's stringData (secrets.example.yaml)."""
    doc = the(kind, name)
    return doc["data"] if kind == "ConfigMap" else doc["stringData"]


def ini(text: str) -> configparser.ConfigParser:
    """PgBouncer's ini format, its `%include` lines left out."""
    parser = configparser.ConfigParser(interpolation=None)
    parser.read_string("\n".join(line for line in text.splitlines() if not line.startswith("%")))
    return parser


PGBOUNCER_INI_TEXT = example_data("ConfigMap", "pgbouncer")["pgbouncer.ini"]
PGBOUNCER_INI = ini(PGBOUNCER_INI_TEXT)["pgbouncer"]


def app_settings(tmp_path: Path, **overrides: str):
    """The settings the Deployment gives, loaded as the service loads them, with a dummy
    DATABASE_URL (from a Secret in the cluster) and a valid token file."""
    tokens = tmp_path / "valid-tokens"
    tokens.write_text(f"{A_VALID_TOKEN}\n")
    env = {**plain_env(APP), "DATABASE_URL": DUMMY_DATABASE_URL, "API_TOKENS_FILE": str(tokens)}
    return load_settings({**env, **overrides})


def cpus(quantity: str) -> float:
    return int(quantity[:-1]) / 1000 if quantity.endswith("m") else float(quantity)


def gunicorn_setting(name: str) -> object:
    """A constant that gunicorn.conf.py assigns, read without running the file."""
    for node in ast.parse((REPO / "gunicorn.conf.py").read_text()).body:
        if isinstance(node, ast.Assign) and [getattr(t, "id", None) for t in node.targets] == [
            name
        ]:
            return ast.literal_eval(node.value)
    raise AssertionError(f"gunicorn.conf.py assigns no constant {name}")


def drain_seconds() -> float:
    return float(plain_env(APP).get("DRAIN_SECONDS", 5))  # 5: the service's default


@pytest.fixture
def no_network(monkeypatch):
    """Any connection or name lookup fails the test: the validator must work offline."""

    def refuse(*args, **kwargs):
        raise AssertionError("the network was used")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


# -- the schemas ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "doc",
    [doc for _, doc in DOCUMENTS],
    ids=[f"{name}:{doc['kind']}/{doc['metadata']['name']}" for name, doc in DOCUMENTS],
)
def test_every_manifest_is_valid_against_the_kubernetes_schemas(doc, no_network):
    assert kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True) == KUBERNETES_VERSION


def _misspell_a_field(spec: dict) -> None:
    spec["readynessProbe"] = spec.pop("readinessProbe")


def _probe_port_as_a_list(spec: dict) -> None:
    spec["livenessProbe"]["httpGet"]["port"] = [spec["livenessProbe"]["httpGet"]["port"]]


def _env_value_as_a_number(spec: dict) -> None:
    spec["env"][0]["value"] = int(spec["env"][0]["value"])  # YAML's unquoted 8000


@pytest.mark.parametrize(
    "breaks", [_misspell_a_field, _probe_port_as_a_list, _env_value_as_a_number]
)
def test_a_broken_deployment_is_refused(breaks, no_network):
    broken = copy.deepcopy(APP)
    breaks(container(broken))
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSION, strict=True)


def test_the_kustomization_applies_every_manifest_but_the_example_secrets():
    expected = [path.name for path in MANIFESTS if not path.name.endswith(".example.yaml")]
    assert sorted(KUSTOMIZATION["resources"]) == expected
    applied = [doc for name, doc in DOCUMENTS if name in expected]
    assert not [doc for doc in applied if doc["kind"] == "Secret"]
    images = {image["name"] for image in KUSTOMIZATION["images"]}
    assert {container(d)["image"].rsplit(":", 1)[0] for d in (APP, PGBOUNCER)} == images


# -- the probes and the stop ------------------------------------------------------------------


def test_readiness_is_readyz_and_liveness_is_healthz_on_the_service_port(tmp_path):
    settings = app_settings(tmp_path)
    spec = container(APP)
    paths = {
        probe: (spec[probe]["httpGet"]["path"], port_number(APP, spec[probe]["httpGet"]["port"]))
        for probe in ("startupProbe", "readinessProbe", "livenessProbe")
    }
    assert paths == {
        "startupProbe": ("/healthz", settings.port),
        "readinessProbe": ("/readyz", settings.port),
        "livenessProbe": ("/healthz", settings.port),
    }


def test_the_public_service_reaches_the_http_port_and_not_the_metrics_port(tmp_path):
    settings = app_settings(tmp_path)
    assert settings.metrics_port and settings.metrics_port != settings.port
    service = the("Service", "service")
    assert service["spec"]["selector"] == APP["spec"]["selector"]["matchLabels"]
    targets = {port_number(APP, port["targetPort"]) for port in service["spec"]["ports"]}
    assert targets == {settings.port}
    assert {p["containerPort"] for p in container(APP)["ports"]} == {
        settings.port,
        settings.metrics_port,
    }


def test_the_grace_period_outlasts_gunicorns_graceful_stop():
    """gunicorn ends every worker `graceful_timeout` after the SIGTERM, the drain included: the
    kubelet's SIGKILL must come later, and the drain must leave the requests in flight time
    (the master refuses to start otherwise)."""
    from service.server.worker import FORCED_STOP_S

    graceful_timeout = gunicorn_setting("graceful_timeout")
    assert pod(APP)["terminationGracePeriodSeconds"] > graceful_timeout
    assert drain_seconds() < graceful_timeout - FORCED_STOP_S


def test_liveness_never_kills_a_pod_during_its_drain():
    """The service stops accepting DRAIN_SECONDS after the SIGTERM; from its first missed probe
    the kubelet waits (failureThreshold - 1) periods, which must reach past the SIGKILL."""
    probe = container(APP)["livenessProbe"]
    after_the_drain = pod(APP)["terminationGracePeriodSeconds"] - drain_seconds()
    assert (probe["failureThreshold"] - 1) * probe["periodSeconds"] >= after_the_drain


def test_the_startup_probe_lets_the_service_wait_for_its_database():
    """A starting master waits START_WAIT_S for the database, then exits with a message: the
    startup probe must not kill it first."""
    from service.db.schema import START_WAIT_S

    probe = container(APP)["startupProbe"]
    assert probe["failureThreshold"] * probe["periodSeconds"] > START_WAIT_S


def test_the_readiness_probe_waits_for_readyz_own_deadline():
    from service.api.health import READY_DEADLINE_S

    assert container(APP)["readinessProbe"]["timeoutSeconds"] > READY_DEADLINE_S


# -- the secrets ------------------------------------------------------------------------------


def test_the_database_url_comes_from_a_secret():
    (var,) = [var for var in container(APP)["env"] if var["name"] == "DATABASE_URL"]
    assert set(var) == {"name", "valueFrom"}
    ref = var["valueFrom"]["secretKeyRef"]
    assert ref["key"] in example_data("Secret", ref["name"])


def test_the_replica_urls_come_from_the_same_secret_and_may_be_left_out():
    env = {var["name"]: var for var in container(APP)["env"]}
    replicas = env["DATABASE_REPLICA_URLS"]
    assert set(replicas) == {"name", "valueFrom"}
    ref = replicas["valueFrom"]["secretKeyRef"]
    assert ref["optional"] is True
    assert ref["name"] == env["DATABASE_URL"]["valueFrom"]["secretKeyRef"]["name"]
    assert ref["key"] in example_data("Secret", ref["name"])


def test_the_example_replica_urls_load_as_one_replica_each(tmp_path):
    urls = example_data("Secret", "service-database")["DATABASE_REPLICA_URLS"]
    settings = app_settings(tmp_path, DATABASE_REPLICA_URLS=urls)
    assert len(settings.database_replica_urls) == len(urls.split()) > 1


def test_no_secret_value_is_in_plain_text_in_the_deployments():
    database = example_data("Secret", "service-database")
    urls = [database["DATABASE_URL"], *database["DATABASE_REPLICA_URLS"].split()]
    secrets = [psycopg2.extensions.parse_dsn(url)["password"] for url in urls]
    secrets += [
        line.strip()
        for line in example_data("Secret", "service-api-tokens")["tokens"].splitlines()
        if line.strip() and not line.startswith("#")
    ]
    secrets += [
        shlex.split(line)[1]
        for line in example_data("Secret", "pgbouncer")["userlist.txt"].splitlines()
    ]
    applied = "\n".join(
        yaml.safe_dump(doc) for doc in (APP, PGBOUNCER, the("ConfigMap", "pgbouncer"))
    )
    assert secrets and not [secret for secret in secrets if secret in applied]
    env = plain_env(APP)
    assert "API_TOKENS" not in env
    assert not [name for name, value in env.items() if "://" in value or "password=" in value]


def test_the_api_tokens_file_is_mounted_from_a_secret():
    path = plain_env(APP)["API_TOKENS_FILE"]
    assert mounted_files(APP)[path] == ("Secret", "service-api-tokens")


def test_the_example_token_is_refused_until_replaced(tmp_path):
    """An unedited secrets.example.yaml cannot open the API to a known token."""
    tokens = tmp_path / "example-tokens"
    tokens.write_text(example_data("Secret", "service-api-tokens")["tokens"])
    with pytest.raises(ConfigError, match="API_TOKENS"):
        app_settings(tmp_path, API_TOKENS_FILE=str(tokens))


# -- the settings and the connection budget ---------------------------------------------------


def test_every_variable_the_deployment_sets_is_one_the_service_reads():
    names = [var["name"] for var in container(APP)["env"]]
    assert len(names) == len(set(names))
    assert set(names) <= set(VARIABLES), set(names) - set(VARIABLES)


def test_the_deployments_settings_load_as_given(tmp_path):
    settings = app_settings(tmp_path)
    for name, value in plain_env(APP).items():
        kind = VARIABLES[name].annotation
        if kind in (int, float):
            assert getattr(settings, name.lower()) == kind(value), name
    assert settings.api_tokens == (A_VALID_TOKEN,)


def test_web_concurrency_is_the_cpu_limit(tmp_path):
    """Left to itself the service would count the node's CPUs, not the pod's share."""
    limit = cpus(container(APP)["resources"]["limits"]["cpu"])
    assert app_settings(tmp_path).web_concurrency == limit


def test_app_instances_counts_every_pod_a_rolling_update_runs(tmp_path):
    rolling = APP["spec"]["strategy"]["rollingUpdate"]
    assert rolling["maxUnavailable"] == 0
    peak = APP["spec"]["replicas"] + rolling["maxSurge"]
    assert app_settings(tmp_path).app_instances == peak


def test_every_pods_pools_fit_in_pgbouncer_and_in_a_default_server(tmp_path):
    """docs/scaling.md: the pools are PgBouncer's clients; while they would fit in the server
    too, APP_INSTANCES counts the real pods and the start-up check keeps its meaning."""
    s = app_settings(tmp_path)
    budget = s.web_concurrency * s.db_pool_max * s.app_instances
    assert budget <= int(PGBOUNCER_INI["max_client_conn"])
    assert s.app_instances == 1 or budget <= DEFAULT_SERVER_ALLOWED


def test_every_pods_pools_and_monitors_fit_with_replicas(tmp_path):
    """With replicas each worker holds one monitor connection more to every server, and the
    start-up check counts them (service/db/budget.py): the pods' connections must still fit in
    PgBouncer's clients and in a default replica, which the pods reach directly."""
    urls = example_data("Secret", "service-database")["DATABASE_REPLICA_URLS"]
    wanted = Budget.of(app_settings(tmp_path, DATABASE_REPLICA_URLS=urls))
    assert wanted.monitors == 1
    assert wanted.connections <= int(PGBOUNCER_INI["max_client_conn"])
    assert wanted.connections <= DEFAULT_SERVER_ALLOWED


def test_pgbouncers_server_connections_fit_in_a_default_server():
    rolling = PGBOUNCER["spec"]["strategy"]["rollingUpdate"]
    pods = PGBOUNCER["spec"]["replicas"] + rolling["maxSurge"]
    pool_size = int(PGBOUNCER_INI["default_pool_size"])
    assert int(PGBOUNCER_INI["max_db_connections"]) <= pool_size
    assert pool_size * pods <= DEFAULT_SERVER_ALLOWED


# -- PgBouncer --------------------------------------------------------------------------------


def test_pgbouncer_pools_transactions_on_the_port_its_service_names():
    assert PGBOUNCER_INI["pool_mode"] == "transaction"
    assert PGBOUNCER_INI["auth_type"] in ("scram-sha-256", "md5")
    service = the("Service", "pgbouncer")
    assert service["spec"]["selector"] == PGBOUNCER["spec"]["selector"]["matchLabels"]
    (port,) = service["spec"]["ports"]
    assert port_number(PGBOUNCER, port["targetPort"]) == int(PGBOUNCER_INI["listen_port"])


def test_the_database_url_goes_through_pgbouncer_as_a_user_it_knows():
    url = psycopg2.extensions.parse_dsn(example_data("Secret", "service-database")["DATABASE_URL"])
    (port,) = the("Service", "pgbouncer")["spec"]["ports"]
    assert (url["host"], int(url["port"])) == ("pgbouncer", port["port"])
    secret = example_data("Secret", "pgbouncer")
    users = {shlex.split(line)[0] for line in secret["userlist.txt"].splitlines()}
    assert url["user"] in users
    assert url["dbname"] in ini(secret["databases.ini"])["databases"]


def test_pgbouncer_finds_its_files_where_they_are_mounted():
    """The image runs `pgbouncer /etc/pgbouncer/pgbouncer.ini`; that file names the others."""
    files = mounted_files(PGBOUNCER)
    assert files["/etc/pgbouncer/pgbouncer.ini"] == ("ConfigMap", "pgbouncer")
    assert files[PGBOUNCER_INI["auth_file"]] == ("Secret", "pgbouncer")
    includes = re.findall(r"^%include\s+(\S+)", PGBOUNCER_INI_TEXT, re.MULTILINE)
    assert includes and all(files[path] == ("Secret", "pgbouncer") for path in includes)


# -- the pods' security -----------------------------------------------------------------------


@pytest.mark.parametrize("deployment", [APP, PGBOUNCER], ids=["service", "pgbouncer"])
def test_the_pods_run_unprivileged_on_a_read_only_root(deployment):
    context = {**pod(deployment)["securityContext"], **container(deployment)["securityContext"]}
    assert context["runAsNonRoot"] is True and context["runAsUser"] != 0
    assert context["readOnlyRootFilesystem"] is True
    assert context["allowPrivilegeEscalation"] is False
    assert context["capabilities"]["drop"] == ["ALL"]
    assert "add" not in context["capabilities"]


def test_the_service_runs_as_its_images_user_with_a_writable_tmp():
    (user,) = re.findall(r"^USER\s+(\d+)", (REPO / "Dockerfile").read_text(), re.MULTILINE)
    assert container(APP)["securityContext"]["runAsUser"] == int(user)
    volumes = {volume["name"]: volume for volume in pod(APP)["volumes"]}
    (tmp,) = [mount for mount in container(APP)["volumeMounts"] if mount["mountPath"] == "/tmp"]
    assert "emptyDir" in volumes[tmp["name"]] and not tmp.get("readOnly")


def test_every_container_has_requests_and_limits():
    for deployment in (APP, PGBOUNCER):
        resources = container(deployment)["resources"]
        for kind in ("requests", "limits"):
            assert set(resources[kind]) == {"cpu", "memory"}, (deployment["metadata"]["name"], kind)
        assert cpus(resources["requests"]["cpu"]) <= cpus(resources["limits"]["cpu"])
