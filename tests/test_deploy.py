"""deploy/: every manifest against its real schema, offline, and the container entrypoint.

Kubernetes objects go through kubernetes-validate (Kubernetes' own OpenAPI schemas, vendored in
the wheel) in strict mode, as `kubeconform --strict` does: an unknown field fails. The
RayService goes against KubeRay's CRD schema and the Helm overlays against their charts'
values.schema.json, both vendored in tests/data/deploy (README.md there says from where), made
strict the same way. Each check has a typo'd twin that must fail. Nothing here starts vLLM or
Ray: the entrypoint runs with DRY_RUN=1 and a fake `vllm` first on PATH.
"""

from __future__ import annotations

import copy
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

from vllm_evict.__main__ import check
from vllm_evict.core.config import EvictionConfig

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
SCHEMAS = Path(__file__).parent / "data" / "deploy"
K8S = "1.37.0"  # the Kubernetes release whose schemas kubernetes-validate==1.37.0 ships
NAME_MAPS = ("properties", "patternProperties", "definitions", "$defs")


def load(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def strict(schema):
    """Every object schema that lists its properties allows no others (kubeconform --strict;
    the charts' own default values pass this). Fields marked preserve-unknown stay open."""
    if isinstance(schema, list):
        return [strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: ({n: strict(s) for n, s in v.items()} if k in NAME_MAPS else strict(v))
           for k, v in schema.items()}
    if "properties" in schema and not schema.get("x-kubernetes-preserve-unknown-fields") \
            and schema.get("additionalProperties", True) is True:
        out["additionalProperties"] = False
    return out


def validator(name: str) -> jsonschema.protocols.Validator:
    schema = strict(json.loads((SCHEMAS / name).read_text()))
    return jsonschema.validators.validator_for(schema)(schema)


def errors(v: jsonschema.protocols.Validator, doc: dict) -> list[str]:
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in v.iter_errors(doc)]


def k8s_errors(doc: dict) -> str | None:
    try:
        kubernetes_validate.validate(doc, K8S, strict=True)
    except kubernetes_validate.ValidationError as exc:
        return f"{'/'.join(map(str, exc.path))}: {exc.message}"
    return None


def pod_template(template: dict, name: str) -> dict:
    """A pod template (as a RayService embeds them) as a Kubernetes PodTemplate object."""
    return {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": name},
            "template": template}


def eviction_flags(args: list[str]) -> list[str]:
    """The --kv-* / --additional-config pairs of a `vllm serve` argument list."""
    out = []
    for flag, value in zip(args, args[1:], strict=False):
        if flag.startswith("--kv-") or flag == "--additional-config":
            out += [flag, value]
    return out


# ------------------------------------------------------------------ plain Kubernetes

MANIFESTS = sorted((DEPLOY / "kubernetes").glob("*.yaml"))
K8S_OBJECTS = [p for p in MANIFESTS if "values" not in p.name]


@pytest.mark.parametrize("path", K8S_OBJECTS, ids=lambda p: p.name)
def test_kubernetes_manifest_is_valid(path):
    for doc in load(path):
        assert k8s_errors(doc) is None, path.name


def _deployment() -> dict:
    return load(DEPLOY / "kubernetes" / "deployment.yaml")[0]


@pytest.mark.parametrize("typo", ["container", "pod", "probe"])
def test_kubernetes_typo_fails(typo):
    doc = _deployment()
    pod = doc["spec"]["template"]["spec"]
    target = {"container": pod["containers"][0], "pod": pod,
              "probe": pod["containers"][0]["readinessProbe"]}[typo]
    key = next(iter(target))
    target[key + "s"] = target.pop(key)  # e.g. names, containerss, httpGets
    assert k8s_errors(doc) is not None


def test_deployment_probes_metrics_and_config():
    doc = _deployment()
    pod = doc["spec"]["template"]
    container = pod["spec"]["containers"][0]
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        assert container[probe]["httpGet"]["path"] == "/health"
    annotations = pod["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/path"] == "/metrics"
    assert annotations["prometheus.io/port"] == str(container["ports"][0]["containerPort"])
    env = {e["name"]: e for e in container["env"]}
    ref = env["ADDITIONAL_CONFIG"]["valueFrom"]["configMapKeyRef"]
    configmap = load(DEPLOY / "kubernetes" / "configmap.yaml")[0]
    assert configmap["metadata"]["name"] == ref["name"]
    additional = json.loads(configmap["data"][ref["key"]])
    assert EvictionConfig.from_additional_config(additional).evicts
    service = load(DEPLOY / "kubernetes" / "service.yaml")[0]
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()


# ------------------------------------------------------------------ Helm overlays

OVERLAYS = {"production-stack-values.yaml": "production-stack-values.schema.json",
            "llm-d-values.yaml": "llm-d-modelservice-values.schema.json"}


def _vllm_args(name: str, values: dict) -> list[str]:
    if name.startswith("production-stack"):
        return values["servingEngineSpec"]["modelSpec"][0]["vllmConfig"]["extraArgs"]
    return values["decode"]["containers"][0]["args"]


@pytest.mark.parametrize("name", OVERLAYS)
def test_helm_overlay_matches_chart_schema(name):
    values = load(DEPLOY / "kubernetes" / name)[0]
    assert errors(validator(OVERLAYS[name]), values) == []
    flags = eviction_flags(_vllm_args(name, values))
    assert "--additional-config" in flags
    assert check(flags) == 0  # the plugin accepts the config the chart passes to vllm serve


@pytest.mark.parametrize("name", OVERLAYS)
def test_helm_overlay_typo_fails(name):
    values = load(DEPLOY / "kubernetes" / name)[0]
    if name.startswith("production-stack"):
        spec = values["servingEngineSpec"]["modelSpec"][0]["vllmConfig"]
        spec["extraArg"] = spec.pop("extraArgs")
    else:
        values["modelArtifacts"]["nmae"] = values["modelArtifacts"].pop("name")
    assert errors(validator(OVERLAYS[name]), values)


def test_llm_d_containers_are_kubernetes_containers():
    """The chart's schema leaves containers open; it renders them into the pod after taking out
    its own keys, so check the rest as a Kubernetes Container."""
    values = load(DEPLOY / "kubernetes" / "llm-d-values.yaml")[0]
    for container in values["decode"]["containers"]:
        container = {k: v for k, v in container.items()
                     if k not in ("modelCommand", "mountModelVolume")}
        pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "decode"},
               "spec": {"containers": [container]}}
        assert k8s_errors(pod) is None
        container["imagePullPolcy"] = "Always"
        assert k8s_errors(pod) is not None


# ------------------------------------------------------------------ Ray

def _rayservice() -> dict:
    return load(DEPLOY / "ray" / "rayservice.yaml")[0]


def _serve_config() -> dict:
    return yaml.safe_load((DEPLOY / "ray" / "serve_config.yaml").read_text())


def test_rayservice_matches_kuberay_crd():
    doc = _rayservice()
    assert (doc["apiVersion"], doc["kind"]) == ("ray.io/v1", "RayService")
    assert errors(validator("kuberay-rayservice-v1.schema.json"), doc) == []
    cluster = doc["spec"]["rayClusterConfig"]
    groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    for i, group in enumerate(groups):  # the CRD embeds Kubernetes pod templates
        assert k8s_errors(pod_template(group["template"], f"group-{i}")) is None


@pytest.mark.parametrize("where", ["spec", "cluster", "worker"])
def test_rayservice_typo_fails(where):
    doc = _rayservice()
    target = {"spec": doc["spec"], "cluster": doc["spec"]["rayClusterConfig"],
              "worker": doc["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]}[where]
    key = next(iter(target))
    target[key.lower() + "x"] = target.pop(key)
    assert errors(validator("kuberay-rayservice-v1.schema.json"), doc)


def test_rayservice_serves_the_serve_config_app():
    """serveConfigV2 is serve_config.yaml's app (the replica count aside)."""
    embedded = yaml.safe_load(_rayservice()["spec"]["serveConfigV2"])
    local = _serve_config()
    for cfg in (embedded, local):
        for app in cfg["applications"]:
            for llm in app["args"]["llm_configs"]:
                llm["deployment_config"].pop("num_replicas")
    assert embedded == local


def test_serve_config_engine_kwargs_parse():
    for app in _serve_config()["applications"]:
        assert app["import_path"] == "ray.serve.llm:build_openai_app"
        for llm in app["args"]["llm_configs"]:
            cfg = EvictionConfig.from_additional_config(llm["engine_kwargs"]["additional_config"])
            assert cfg is not None and cfg.evicts


def test_serve_config_is_a_ray_serve_llm_config():
    """With Ray installed: Ray's own models accept the config and pick vLLM's mp executor (the
    CPU path of ray PR 58334). Pure validation: no Ray cluster starts."""
    pytest.importorskip("ray.serve.llm")
    import ray
    from ray.serve.llm import LLMConfig
    from ray.serve.schema import ServeDeploySchema

    ServeDeploySchema.model_validate(_serve_config())
    for llm in _serve_config()["applications"][0]["args"]["llm_configs"]:
        engine = LLMConfig(**llm).get_engine_config()
        kwargs = engine.get_initialization_kwargs()
        assert kwargs["distributed_executor_backend"] == "mp"
        assert "kv_eviction" in kwargs["additional_config"]
    assert not ray.is_initialized()


# ------------------------------------------------------------------ images and entrypoint

@pytest.mark.parametrize("target", ["cuda", "cpu"])
def test_dockerfile_installs_through_setup_sh(target):
    text = (DEPLOY / "docker" / f"Dockerfile.{target}").read_text()
    assert f"VLLM_EVICT_TARGET={target} VLLM_EVICT_SYSTEM=1" in text
    assert "bash scripts/setup.sh" in text
    assert 'ENTRYPOINT ["vllm-evict-entrypoint"]' in text
    if target == "cuda":
        assert "FROM vllm/vllm-openai:v0.32.0" in text


@pytest.fixture
def entrypoint(tmp_path):
    """Run deploy/docker/entrypoint.sh with a fake `vllm` first on PATH that records a call."""
    marker = tmp_path / "vllm-was-run"
    fake = tmp_path / "bin" / "vllm"
    fake.parent.mkdir()
    fake.write_text(f"#!/bin/sh\ntouch {marker}\nexit 1\n")
    fake.chmod(0o755)

    def run(**env: str) -> subprocess.CompletedProcess:
        full = {k: v for k, v in os.environ.items() if not k.startswith("KV_")}
        full.update(PATH=f"{fake.parent}:{os.environ['PATH']}", PYTHON=sys.executable, **env)
        proc = subprocess.run(["bash", str(DEPLOY / "docker" / "entrypoint.sh"), "--seed", "0"],
                              env=full, capture_output=True, text=True, timeout=120)
        proc.vllm_ran = marker.exists()
        return proc
    return run


def test_entrypoint_builds_the_vllm_serve_command(entrypoint):
    additional = json.dumps({"kv_eviction": {"window": 16, "allowed_policies": ["h2o"]}})
    proc = entrypoint(MODEL="/models/tiny", DRY_RUN="1", KV_EVICTION="streaming",
                      KV_BUDGET="64", KV_SINK_TOKENS="2", KV_SLACK="8",
                      KV_POLICY_ARGS='{"snapkv": {"pool_kernel": 7}}',
                      KV_REQUEST_OVERRIDE="allow", KV_ALLOWED_POLICIES="h2o,snapkv",
                      KV_BUDGET_MIN="40", KV_BUDGET_MAX="512", ADDITIONAL_CONFIG=additional,
                      EXTRA="--enforce-eager --max-model-len 512", PORT="9000")
    assert proc.returncode == 0, proc.stderr
    assert not proc.vllm_ran
    cmd = shlex.split(proc.stdout)
    assert cmd[:3] == ["vllm", "serve", "/models/tiny"]
    assert cmd[-5:] == ["--enforce-eager", "--max-model-len", "512", "--seed", "0"]
    pairs = dict(zip(cmd[3::2], cmd[4::2], strict=False))
    assert pairs["--port"] == "9000" and pairs["--kv-budget"] == "64"
    assert pairs["--kv-allowed-policies"] == "h2o,snapkv"
    assert json.loads(pairs["--additional-config"]) == json.loads(additional)
    assert json.loads(pairs["--kv-policy-args"]) == {"snapkv": {"pool_kernel": 7}}
    # The plugin's summary of what it will run, on stderr.
    assert "policy=streaming budget=64 sink_tokens=2 window=16 slack=8" in proc.stderr


def test_entrypoint_without_eviction_env(entrypoint):
    proc = entrypoint(MODEL="m", DRY_RUN="1")
    assert proc.returncode == 0, proc.stderr
    assert shlex.split(proc.stdout) == ["vllm", "serve", "m", "--host", "0.0.0.0", "--port",
                                        "8000", "--seed", "0"]


BAD_ENV = [
    ({"KV_BUDGET": "lots"}, "argument --kv-budget: invalid int value: 'lots'"),
    ({"KV_EVICTION": "lru"}, "argument --kv-eviction: invalid choice: 'lru'"),
    ({"KV_EVICTION": "streaming", "KV_BUDGET": "20"},
     "kv_eviction: budget must be > sink_tokens + window = 4 + 32 = 36; got budget=20"),
    ({"KV_EVICTION": "h2o", "KV_BUDGET_MIN": "0"}, "kv_eviction.budget_min: must be an integer > 0"),
    ({"KV_ALLOWED_POLICIES": "h2o,lru"}, "kv_eviction.allowed_policies: unknown policies ['lru']"),
    ({"KV_POLICY_ARGS": '{"snapkv": {"pool_kernal": 7}}'}, "kv_eviction.policy_args"),
    ({"ADDITIONAL_CONFIG": '{"kv_eviction": {"budgt": 64}}'}, "kv_eviction.budgt: unknown field"),
    ({"ADDITIONAL_CONFIG": "{not json"}, "--additional-config is not JSON"),
]


@pytest.mark.parametrize(("env", "message"), BAD_ENV, ids=[next(iter(e)) for e, _ in BAD_ENV])
def test_entrypoint_refuses_bad_values(entrypoint, env, message):
    proc = entrypoint(MODEL="m", DRY_RUN="1", **env)
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert message in proc.stderr
    assert proc.stdout == "" and not proc.vllm_ran


def test_entrypoint_bad_value_never_reaches_vllm(entrypoint):
    """Without DRY_RUN the entrypoint would exec vllm: a bad value must stop it first."""
    proc = entrypoint(MODEL="m", KV_EVICTION="streaming", KV_BUDGET="20")
    assert proc.returncode == 2 and "budget must be >" in proc.stderr
    assert not proc.vllm_ran
    good = entrypoint(MODEL="m", KV_EVICTION="streaming")
    assert good.vllm_ran  # the fake vllm: the same run with a good value does exec it


def test_entrypoint_needs_a_model(entrypoint):
    proc = entrypoint(DRY_RUN="1", MODEL="")
    assert proc.returncode != 0 and "MODEL" in proc.stderr and not proc.vllm_ran


def test_rayservice_and_kubernetes_share_the_config():
    """One eviction config everywhere: the ConfigMap, the overlays and the Ray configs."""
    configmap = load(DEPLOY / "kubernetes" / "configmap.yaml")[0]
    reference = EvictionConfig.from_additional_config(
        json.loads(configmap["data"]["additional_config.json"]))
    configs = [llm["engine_kwargs"]["additional_config"]
               for llm in _serve_config()["applications"][0]["args"]["llm_configs"]]
    for name in OVERLAYS:
        args = eviction_flags(_vllm_args(name, load(DEPLOY / "kubernetes" / name)[0]))
        configs.append(json.loads(args[args.index("--additional-config") + 1]))
    for additional in copy.deepcopy(configs):
        assert EvictionConfig.from_additional_config(additional) == reference
