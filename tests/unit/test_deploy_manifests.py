"""Deployment artifacts, validated statically (no cluster, no Docker engine here): every
Kubernetes document deserializes into the official client model without losing a field, the
agent DaemonSet has what the agent needs, and the Compose file and Dockerfiles hang together."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "examples" / "k8s"
COMPOSE = REPO / "examples" / "docker-compose.yml"
DOCKERFILES = sorted((REPO / "examples" / "docker").glob("*.Dockerfile"))
# The demo's services: Compose service (and Dockerfile) name -> its source.
EXAMPLE_SERVICES = {
    "storefront": "examples/node/storefront/server.js",
    "orders": "examples/python/orders.py",
    "pricing": "examples/go/pricing/main.go",
    "inventory": "examples/java/inventory/Inventory.java",
}

kubernetes = pytest.importorskip("kubernetes")

_MODELS = {
    ("v1", "Namespace"): "V1Namespace",
    ("v1", "ConfigMap"): "V1ConfigMap",
    ("v1", "Service"): "V1Service",
    ("apps/v1", "Deployment"): "V1Deployment",
    ("apps/v1", "DaemonSet"): "V1DaemonSet",
}


def _docs() -> list[tuple[str, dict[str, Any]]]:
    out = []
    for f in sorted(K8S.glob("*.yaml")):
        for doc in yaml.safe_load_all(f.read_text()):
            if doc is not None:
                out.append((f.name, doc))
    return out


DOCS = _docs()


def _deserialize(doc: dict[str, Any]) -> Any:
    model = _MODELS[(doc["apiVersion"], doc["kind"])]
    # The private deserializer takes the decoded dict directly; the public deserialize()
    # changed signature between client releases.
    client = kubernetes.client.ApiClient()
    return client._ApiClient__deserialize(json.loads(json.dumps(doc)), model)


def test_every_expected_manifest_exists() -> None:
    names = {f.name for f in K8S.glob("*.yaml")}
    assert {"namespace.yaml", "agent-daemonset.yaml", "agent-daemonset-privileged.yaml",
            "agent-configmap.yaml", "collector.yaml"} <= names
    assert (K8S / "README.md").exists()


@pytest.mark.parametrize("doc", [d for _, d in DOCS],
                         ids=[f"{f}:{d['kind']}/{d['metadata']['name']}" for f, d in DOCS])
def test_manifest_round_trips_through_the_client_model(doc: dict[str, Any]) -> None:
    assert (doc["apiVersion"], doc["kind"]) in _MODELS, "unexpected kind: add it to _MODELS"
    obj = _deserialize(doc)
    again = kubernetes.client.ApiClient().sanitize_for_serialization(obj)
    # Unknown or misspelled fields are dropped by the model: the round trip must be exact.
    assert again == doc


def test_everything_is_namespaced_to_the_one_namespace() -> None:
    for _, d in DOCS:
        if d["kind"] != "Namespace":
            assert d["metadata"]["namespace"] == "ebpf-bridge", d["metadata"]["name"]


def _daemonsets() -> list[tuple[str, dict[str, Any]]]:
    return [(f, d) for f, d in DOCS if d["kind"] == "DaemonSet"]


def _agent(ds: dict[str, Any]) -> dict[str, Any]:
    (c,) = [c for c in ds["spec"]["template"]["spec"]["containers"] if c["name"] == "agent"]
    return c


def _mounts(c: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {m["mountPath"]: m for m in c["volumeMounts"]}


@pytest.mark.parametrize("name,ds", _daemonsets(), ids=[f for f, _ in _daemonsets()])
def test_daemonset_has_what_the_agent_needs(name: str, ds: dict[str, Any]) -> None:
    pod = ds["spec"]["template"]["spec"]
    assert pod["hostPID"] is True
    assert not pod.get("hostNetwork")
    c = _agent(ds)
    # Health endpoint: flags, container port and the three probes agree.
    args = c["args"]
    assert "--config=/etc/ebpf-bridge/config.yaml" in args
    port = int(next(a.split("=", 1)[1] for a in args if a.startswith("--health-port=")))
    assert "--health-address=0.0.0.0" in args
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports["health"] == port
    for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz"),
                        ("startupProbe", "/readyz")):
        get = c[probe]["httpGet"]
        assert get["path"] == path and get["port"] in ("health", port), probe
    res = c["resources"]
    assert res["requests"] == {"cpu": "100m", "memory": "256Mi"}
    assert res["limits"] == {"cpu": "1", "memory": "512Mi"}
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert env["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://otel-collector.ebpf-bridge:4317"
    m = _mounts(c)
    assert m["/sys/fs/bpf"].get("readOnly") is not True  # the context map is pinned there
    assert m["/sys/kernel/tracing"]
    assert m["/lib/modules"]["readOnly"] is True and m["/usr/src"]["readOnly"] is True
    assert m["/etc/ebpf-bridge"]["readOnly"] is True
    vols = {v["name"]: v for v in pod["volumes"]}
    host = {vols[mm["name"]]["hostPath"]["path"] for mm in m.values()
            if "hostPath" in vols[mm["name"]]}
    assert host == {"/sys/fs/bpf", "/sys/kernel/tracing", "/lib/modules", "/usr/src"}
    assert vols[m["/etc/ebpf-bridge"]["name"]]["configMap"]["name"] == "ebpf-bridge-agent"
    # Bidirectional propagation is only allowed for privileged containers.
    for cont in [*pod.get("initContainers", []), *pod["containers"]]:
        for mm in cont.get("volumeMounts", []):
            if mm.get("mountPropagation") == "Bidirectional":
                assert cont["securityContext"].get("privileged") is True, cont["name"]


def test_capability_daemonset_is_not_privileged() -> None:
    (ds,) = [d for f, d in _daemonsets() if f == "agent-daemonset.yaml"]
    sc = _agent(ds)["securityContext"]
    assert sc["privileged"] is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    # Exactly the measured set (tests/e2e/test_agent_lifecycle.py runs the agent with it):
    # an extra capability must come with a measured reason, here and in the README's table.
    add = sc["capabilities"]["add"]
    assert len(add) == len(set(add))
    assert set(add) == {"BPF", "PERFMON", "SYS_PTRACE", "DAC_READ_SEARCH", "SYS_RESOURCE"}
    readme = (K8S / "README.md").read_text()
    table = readme.split("## Capabilities", 1)[1].split("\n## ", 1)[0]
    rows = {m.group(1) for m in re.finditer(r"^\| `([A-Z_]+)` \|", table, re.M)}
    assert rows == set(add), rows
    assert "SYS_ADMIN" in table  # why it is not in the set
    assert sc["runAsUser"] == 0  # the agent checks for root
    assert _mounts(_agent(ds))["/sys/fs/bpf"]["mountPropagation"] == "HostToContainer"


def test_privileged_daemonset_is_the_documented_fallback() -> None:
    (ds,) = [d for f, d in _daemonsets() if f == "agent-daemonset-privileged.yaml"]
    assert _agent(ds)["securityContext"]["privileged"] is True
    head = (K8S / "agent-daemonset-privileged.yaml").read_text().split("apiVersion", 1)[0]
    assert "5.8" in head
    readme = (K8S / "README.md").read_text()
    assert "agent-daemonset-privileged.yaml" in readme and "RBAC" in readme


def test_agent_configmap_is_a_config_the_agent_accepts(tmp_path: Path) -> None:
    from kernel_side.config import build, load_yaml

    (cm,) = [d for f, d in DOCS if f == "agent-configmap.yaml"]
    f = tmp_path / "config.yaml"
    f.write_text(cm["data"]["config.yaml"])
    cfg = build({**load_yaml(f), "otlp_endpoint": "http://otel-collector.ebpf-bridge:4317"})
    assert cfg.resolved_exporters() == ("otlp",)


def test_collector_listens_where_the_agents_send() -> None:
    (cm,) = [d for f, d in DOCS if f == "collector.yaml" and d["kind"] == "ConfigMap"]
    conf = yaml.safe_load(cm["data"]["collector.yaml"])
    protos = conf["receivers"]["otlp"]["protocols"]
    assert protos["grpc"]["endpoint"] == "0.0.0.0:4317"
    assert protos["http"]["endpoint"] == "0.0.0.0:4318"
    traces = conf["service"]["pipelines"]["traces"]
    assert traces["receivers"] == ["otlp"] and "batch" in traces["processors"]
    assert traces["exporters"] == ["debug"]
    (dep,) = [d for f, d in DOCS if d["kind"] == "Deployment"]
    image = dep["spec"]["template"]["spec"]["containers"][0]["image"]
    assert re.fullmatch(r"otel/opentelemetry-collector-contrib:\d+\.\d+\.\d+", image)
    (svc,) = [d for f, d in DOCS if d["kind"] == "Service"]
    assert svc["metadata"]["name"] == "otel-collector"
    assert {p["port"] for p in svc["spec"]["ports"]} == {4317, 4318}


# -- Compose -------------------------------------------------------------------------------

def _compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(data, dict)
    return data


def test_compose_lists_every_service() -> None:
    services = _compose()["services"]
    assert {"agent", "otel-collector", *EXAMPLE_SERVICES, "postgres", "redis"} <= set(services)
    for src in EXAMPLE_SERVICES.values():
        assert (REPO / src).is_file(), src
    # examples/python/inventory.py is the e2e tests' stand-in for the Java inventory.
    existing = {p.stem for p in (REPO / "examples" / "python").glob("*.py")}
    assert existing <= set(services), "every example service has a Compose service"


def test_compose_agent_is_privileged_with_host_pids_and_mounts() -> None:
    agent = _compose()["services"]["agent"]
    assert agent["privileged"] is True
    assert agent["pid"] == "host"
    mounts = {v.split(":")[1]: v for v in agent["volumes"]}
    assert set(mounts) == {"/sys/fs/bpf", "/sys/kernel/tracing", "/lib/modules", "/usr/src"}
    for ro in ("/sys/kernel/tracing", "/lib/modules", "/usr/src"):
        assert mounts[ro].endswith(":ro"), ro
    assert not mounts["/sys/fs/bpf"].endswith(":ro")
    assert agent["environment"]["OTEL_EXPORTER_OTLP_ENDPOINT"].startswith(
        "http://otel-collector:")


def _volumes(svc: dict[str, Any]) -> dict[str, list[str]]:
    """Container path -> [host path, options...] of a service's short-syntax volumes."""
    out = {}
    for v in svc.get("volumes", []):
        host, target, *opts = str(v).split(":")
        out[target] = [host, *opts]
    return out


def test_compose_annotating_service_reaches_the_pinned_context_map() -> None:
    """orders calls bridge.annotate: it opens /sys/fs/bpf/ebpf_bridge/... on the host's bpffs
    (bridge/_env.py) and calls bpf(), which Docker's default seccomp profile allows only with
    CAP_BPF or CAP_SYS_ADMIN. The zero-code services need neither."""
    from bridge import _abi

    services = _compose()["services"]
    orders = services["orders"]
    assert _abi.PIN_DIR.startswith("/sys/fs/bpf/")
    assert _volumes(orders)["/sys/fs/bpf"][0] == "/sys/fs/bpf"
    caps = {c.removeprefix("CAP_") for c in orders.get("cap_add", [])}
    assert "BPF" in caps or "SYS_ADMIN" in caps, orders.get("cap_add")
    assert not orders.get("privileged")
    for name in ("storefront", "pricing", "inventory"):
        assert "/sys/fs/bpf" not in _volumes(services[name]), name
        assert not services[name].get("cap_add"), name


def test_compose_waits_for_health_where_there_is_a_healthcheck() -> None:
    services = _compose()["services"]
    for name, svc in services.items():
        deps = svc.get("depends_on", {})
        assert isinstance(deps, dict), f"{name}: use the long depends_on syntax with conditions"
        for dep, spec in deps.items():
            want = "service_healthy" if "healthcheck" in services[dep] else "service_started"
            assert spec["condition"] == want, (name, dep)
    assert {"agent", "postgres", "redis"} <= {n for n, s in services.items()
                                              if "healthcheck" in s}


def test_compose_builds_have_dockerfiles_and_ports_are_unique() -> None:
    services = _compose()["services"]
    published: list[str] = []
    for name, svc in services.items():
        if "build" in svc:
            ctx = (COMPOSE.parent / svc["build"]["context"]).resolve()
            assert (ctx / svc["build"]["dockerfile"]).is_file(), name
        for p in svc.get("ports", []):
            published.append(str(p).split(":")[0])
        if "image" in svc and "build" not in svc:
            assert not svc["image"].endswith(":latest") and ":" in svc["image"], name
    assert len(published) == len(set(published)), published


def test_compose_app_services_name_themselves() -> None:
    services = _compose()["services"]
    for name in EXAMPLE_SERVICES:
        assert services[name]["environment"]["OTEL_SERVICE_NAME"] == name
        assert services[name]["build"]["dockerfile"] == f"examples/docker/{name}.Dockerfile"


def _cmd(name: str) -> list[str]:
    ins = _instructions(REPO / "examples" / "docker" / f"{name}.Dockerfile")
    cmd: list[str] = json.loads([rest for word, rest in ins if word == "CMD"][-1])
    return cmd


def _flag(argv: list[str], flag: str) -> str:
    return argv[argv.index(flag) + 1]


def test_compose_wires_the_demo_services_together() -> None:
    services = _compose()["services"]
    # The services bind loopback: they share the storefront's network namespace.
    for name in ("orders", "pricing", "inventory"):
        assert services[name]["network_mode"] == "service:storefront", name
        assert "storefront" in services[name]["depends_on"], name
    ports = {name: int(_flag(_cmd(name), "--port")) for name in EXAMPLE_SERVICES}
    assert len(set(ports.values())) == 4, ports
    front, orders = _cmd("storefront"), _cmd("orders")
    assert _flag(front, "--orders") == f"http://127.0.0.1:{ports['orders']}"
    assert _flag(orders, "--inventory") == f"http://127.0.0.1:{ports['inventory']}"
    assert _flag(orders, "--pricing") == f"http://127.0.0.1:{ports['pricing']}"
    dsn = dict(kv.split("=", 1) for kv in _flag(orders, "--postgres").split())
    pg_env = services["postgres"]["environment"]
    assert dsn["host"] == "postgres" and dsn["dbname"] == pg_env["POSTGRES_DB"]
    assert dsn["password"] == pg_env["POSTGRES_PASSWORD"]
    assert _flag(orders, "--redis").startswith("redis://redis:6379/")
    jdbc = _flag(_cmd("inventory"), "--jdbc")
    assert jdbc.startswith(f"jdbc:postgresql://postgres:5432/{pg_env['POSTGRES_DB']}?")
    assert {"postgres", "redis"} <= set(services["orders"]["depends_on"])
    # The agent selects all four by executable name.
    command = services["agent"]["command"]
    exes = {command[i + 1] for i, a in enumerate(command) if a == "--exe"}
    assert exes == {"node", "python*", "pricing", "java"}


def test_each_service_image_copies_its_own_source() -> None:
    for name, src in EXAMPLE_SERVICES.items():
        ins = _instructions(REPO / "examples" / "docker" / f"{name}.Dockerfile")
        copied = [s for word, rest in ins if word == "COPY" for s in rest.split()[:-1]]
        assert src in copied, (name, copied)

def test_go_pricing_is_a_module_requiring_the_x_net_it_is_built_against() -> None:
    mod = (REPO / "examples" / "go" / "pricing" / "go.mod").read_text()
    assert re.search(r"^module \S+/pricing$", mod, re.M)
    assert re.search(r"^go 1\.\d+$", mod, re.M)
    (net,) = re.findall(r"^require golang\.org/x/net (v\S+)$", mod, re.M)
    imports = (REPO / "examples" / "go" / "pricing" / "main.go").read_text()
    assert '"golang.org/x/net/http2/h2c"' in imports
    assert net == "v0.7.0"  # Debian bookworm's golang-golang-x-net-dev, which build.sh uses
    ins = _instructions(REPO / "examples" / "docker" / "pricing.Dockerfile")
    copied = [s for word, rest in ins if word == "COPY" for s in rest.split()[:-1]]
    assert "examples/go/pricing/go.mod" in copied


# -- Dockerfiles ----------------------------------------------------------------------------

def _instructions(path: Path) -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", path.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def test_there_is_a_dockerfile_per_example_service_and_the_agent() -> None:
    names = {p.name for p in DOCKERFILES}
    assert "agent.Dockerfile" in names
    for svc in (REPO / "examples" / "python").glob("*.py"):
        assert f"{svc.stem}.Dockerfile" in names, svc


@pytest.mark.parametrize("path", DOCKERFILES, ids=[p.name for p in DOCKERFILES])
def test_dockerfile_is_well_formed(path: Path) -> None:
    ins = _instructions(path)
    assert ins[0][0] == "FROM", "FROM must come first"
    known = {"FROM", "RUN", "COPY", "ADD", "ENV", "WORKDIR", "ENTRYPOINT", "CMD", "EXPOSE",
             "ARG", "LABEL", "USER", "VOLUME", "HEALTHCHECK", "SHELL", "STOPSIGNAL"}
    for word, _ in ins:
        assert word in known, word
    for word, rest in ins:
        if word == "FROM":
            image = rest.split()[0]
            assert ":" in image and not image.endswith(":latest"), image
        if word in ("ENTRYPOINT", "CMD") and rest.startswith("["):
            json.loads(rest)
        if word in ("COPY", "ADD") and not rest.startswith("--from="):
            for src in rest.split()[:-1]:
                if not src.startswith("--"):
                    assert (REPO / src).exists(), f"{path.name}: COPY {src} does not exist"
    assert any(w in ("ENTRYPOINT", "CMD") for w, _ in ins)


def test_agent_image_runs_the_agent() -> None:
    ins = dict(_instructions(REPO / "examples" / "docker" / "agent.Dockerfile"))
    assert json.loads(ins["ENTRYPOINT"]) == ["ebpf-bridge", "agent"]
    assert ins["FROM"].startswith("debian:bookworm")
