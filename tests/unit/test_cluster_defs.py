"""The cluster definitions under cluster/, checked offline and without a cluster.

The `ray up` config goes through the cluster launcher's own preparation and schema validation; the KubeRay
manifests are checked for what the operator and our jobs need; every RayJob's command is composed against the job's
Hydra schema and run through the job's config checks, so a misspelt override fails here instead of on a cluster.
"""

from __future__ import annotations

import copy
import importlib.util
import re
import shlex
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import ray
import yaml
from hydra import compose, initialize
from hydra.core.config_store import ConfigStore
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from cluster.submit import register_schema
from conf.jobs import JOBS

ROOT = Path(__file__).resolve().parents[2]
CLUSTER = ROOT / "cluster"
RAY_UP = CLUSTER / "aws" / "cluster.yaml"
RAYCLUSTER = CLUSTER / "kuberay" / "raycluster.yaml"
SERVICE_ACCOUNT = CLUSTER / "kuberay" / "serviceaccount.yaml"
RAYJOBS = sorted((CLUSTER / "kuberay").glob("rayjob-*.yaml"))
DOCKERFILE = CLUSTER / "image" / "Dockerfile"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
GPUS_PER_NODE = 8
DNS1035 = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")
MAX_RAYCLUSTER_NAME, MAX_RAYJOB_NAME = 53, 47  # KubeRay's limits (its service names get suffixes)


def load_one(path: Path) -> dict:
    (doc,) = yaml.safe_load_all(path.read_text())
    return doc


@pytest.fixture(scope="module")
def ray_up() -> dict:
    return load_one(RAY_UP)


@pytest.fixture(scope="module")
def raycluster() -> dict:
    return load_one(RAYCLUSTER)


# ---------------------------------------------------------------- `ray up` (cluster/aws/cluster.yaml)


def prepared(config: dict) -> dict:
    """What `ray up` does to the file before it talks to AWS: merge the provider defaults, then validate."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = prepare_config(copy.deepcopy(config))
    validate_config(config)
    return config


def test_ray_up_config_passes_the_launchers_validation(ray_up):
    prepared(ray_up)


def test_ray_up_validation_rejects_a_misspelt_field(ray_up):
    import jsonschema

    broken = copy.deepcopy(ray_up)
    broken["available_node_types"][ray_up["head_node_type"]]["min_worker"] = 0
    with pytest.raises(jsonschema.ValidationError, match="min_worker"):
        prepared(broken)


def ray_up_workers(config: dict) -> tuple[dict, dict]:
    """The CPU and the GPU worker type."""
    workers = [t for name, t in config["available_node_types"].items() if name != config["head_node_type"]]
    gpu = [t for t in workers if t["resources"].get("GPU")]
    cpu = [t for t in workers if not t["resources"].get("GPU")]
    assert len(gpu) == 1 and len(cpu) == 1, "expected one CPU and one GPU worker type"
    return cpu[0], gpu[0]


def start_flags(commands: list[str]) -> dict[str, str]:
    tokens = [token for command in commands for token in shlex.split(command)]
    return dict(token[2:].split("=", 1) for token in tokens if token.startswith("--") and "=" in token)


def test_ray_up_node_types(ray_up):
    config = prepared(ray_up)
    head = config["available_node_types"][config["head_node_type"]]
    assert head["resources"].get("CPU") == 0, "the head must advertise no CPUs so no task or actor lands on it"
    cpu, gpu = ray_up_workers(config)
    assert cpu["min_workers"] == 0 and gpu["min_workers"] == 0, "worker types scale from zero"
    assert gpu["resources"]["GPU"] == GPUS_PER_NODE
    assert ray.__version__ in config["docker"]["image"], "the cluster's Ray must match the submitting Ray"


def test_ray_up_dashboard_is_loopback_only(ray_up):
    flags = start_flags(ray_up["head_start_ray_commands"])
    assert flags.get("dashboard-host") == "127.0.0.1", "reach the dashboard with `ray dashboard` (an SSH tunnel)"
    for rule in ray_up["provider"].get("security_group", {}).get("IpPermissions", []):
        assert not rule.get("FromPort", 0) <= 8265 <= rule.get("ToPort", -1), f"{rule} opens the dashboard"


def test_ray_up_nodes_use_instance_profiles(ray_up):
    assert "aws_credentials" not in ray_up["provider"], "no keys in the config: nodes use IAM instance profiles"
    for name, node_type in ray_up["available_node_types"].items():
        assert "Arn" in node_type["node_config"].get("IamInstanceProfile", {}), f"{name} has no instance profile"


def test_ray_up_installs_the_synced_checkout(ray_up):
    (target,) = [target for target, source in ray_up["file_mounts"].items() if source in (".", "./")]
    setup = ray_up["setup_commands"]
    assert any("pip install" in c and target in c for c in setup), f"setup_commands do not install {target}"
    assert not any("constraints" in c for c in setup), "the constraints file pins the CPU build of torch"


SPOT_NOTICE_S = 120  # AWS announces a spot reclaim this long ahead


def drain_deadline(command: str | list[str]) -> float:
    """The `--deadline-s` of a `python -m cluster.drain` command (fails when there is none)."""
    tokens = shlex.split(command) if isinstance(command, str) else command
    start = tokens.index("cluster.drain")
    return float(tokens[tokens.index("--deadline-s", start) + 1])


def test_ray_up_gpu_workers_run_on_spot_and_drain_before_the_reclaim(ray_up):
    """A spot GPU worker turns the 120 s interruption notice into a Ray drain whose deadline leaves the instance time
    to stop; its own setup commands replace the shared ones (Ray's launcher), so they must repeat them."""
    config = prepared(ray_up)
    _, gpu = ray_up_workers(config)
    assert gpu["node_config"]["InstanceMarketOptions"]["MarketType"] == "spot"
    setup = gpu["worker_setup_commands"]
    assert all(command in setup for command in ray_up["setup_commands"]), "the shared setup commands are missing"
    (watcher,) = [c for c in setup if "cluster.drain" in c]
    assert "spot/instance-action" in watcher and "nohup" in watcher
    deadline = drain_deadline(watcher[watcher.index("python -m cluster.drain"):].split("'")[0])
    assert 60 <= deadline < SPOT_NOTICE_S


def test_drain_command_parses_its_arguments():
    from cluster import drain

    with pytest.raises(SystemExit) as shown:
        drain.main(["--help"])
    assert shown.value.code == 0
    with pytest.raises(SystemExit) as missing:
        drain.main([])
    assert missing.value.code == 2


# ---------------------------------------------------------------- KubeRay RayCluster


def pod_specs(raycluster: dict) -> Iterator[tuple[str, dict]]:
    spec = raycluster["spec"]
    yield "head", spec["headGroupSpec"]["template"]["spec"]
    for group in spec["workerGroupSpecs"]:
        yield group["groupName"], group["template"]["spec"]


def gpus(container: dict) -> tuple[int, int]:
    r = container["resources"]
    return int(r["requests"].get("nvidia.com/gpu", 0)), int(r["limits"].get("nvidia.com/gpu", 0))


def cpu_quantity(quantity: str) -> float:
    return int(quantity[:-1]) / 1000 if quantity.endswith("m") else float(quantity)


def kuberay_groups(raycluster: dict) -> tuple[dict, dict]:
    """The CPU and the GPU worker group."""
    groups = raycluster["spec"]["workerGroupSpecs"]
    gpu = [g for g in groups if any(gpus(c)[1] for c in g["template"]["spec"]["containers"])]
    cpu = [g for g in groups if g not in gpu]
    assert len(gpu) == 1 and len(cpu) == 1, "expected one CPU and one GPU worker group"
    return cpu[0], gpu[0]


def test_raycluster_structure(raycluster):
    assert raycluster["apiVersion"] == "ray.io/v1" and raycluster["kind"] == "RayCluster"
    name = raycluster["metadata"]["name"]
    assert DNS1035.fullmatch(name) and len(name) <= MAX_RAYCLUSTER_NAME
    spec = raycluster["spec"]
    assert spec["rayVersion"] == ray.__version__, "the cluster's Ray must match the submitting Ray"
    assert spec["enableInTreeAutoscaling"] is True and spec["autoscalerOptions"]["version"] == "v2"
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0", "no tasks or actors on the head"
    groups = spec["workerGroupSpecs"]
    assert len({g["groupName"] for g in groups}) == len(groups)
    for g in groups:
        assert 0 <= g["minReplicas"] <= g["maxReplicas"], g["groupName"]
        assert isinstance(g["rayStartParams"], dict), g["groupName"]
    for group, pod in pod_specs(raycluster):
        assert pod.get("restartPolicy", "Never") == "Never", f"{group}: autoscaler v2 needs restartPolicy Never"
        for c in pod["containers"]:
            assert c["image"] and c["resources"]["requests"] and c["resources"]["limits"], f"{group}: {c['name']}"
            assert "/tmp/ray" in {m["mountPath"] for m in c["volumeMounts"]}, f"{group}: Ray's logs need a volume"


def test_raycluster_worker_groups(raycluster):
    cpu, gpu = kuberay_groups(raycluster)
    assert cpu["minReplicas"] == 0 and gpu["minReplicas"] == 0, "worker groups scale from zero"
    pod = gpu["template"]["spec"]
    for c in pod["containers"]:
        assert gpus(c) == (GPUS_PER_NODE, GPUS_PER_NODE), "nvidia.com/gpu in requests and limits"
        (shm,) = [m["name"] for m in c["volumeMounts"] if m["mountPath"] == "/dev/shm"]
        (volume,) = [v for v in pod["volumes"] if v["name"] == shm]
        assert volume["emptyDir"]["medium"] == "Memory", "NCCL and DeepSpeed need a real /dev/shm"
    assert any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"])


def test_raycluster_gpu_pods_drain_for_a_checkpoint_before_they_stop(raycluster):
    """A deleted or evicted GPU pod runs `cluster.drain` (Ray's drain, then a wait for the training workers) before
    its container, `ray start --block`, gets SIGTERM; the grace period covers that deadline with room to stop."""
    _, gpu = kuberay_groups(raycluster)
    pod = gpu["template"]["spec"]
    (container,) = pod["containers"]
    command = container["lifecycle"]["preStop"]["exec"]["command"]
    deadline = drain_deadline([str(part) for part in command])
    assert deadline >= 60 and pod["terminationGracePeriodSeconds"] >= deadline + 15
    assert "block" not in gpu["rayStartParams"] or gpu["rayStartParams"]["block"] in (True, "true")


def test_raycluster_head_is_internal(raycluster):
    head = raycluster["spec"]["headGroupSpec"]
    assert head["serviceType"] == "ClusterIP", "dashboard and job API: `kubectl port-forward`, not a public address"
    assert not head.get("enableIngress")
    assert head.get("headService", {}).get("spec", {}).get("type", "ClusterIP") == "ClusterIP"


def test_raycluster_runs_our_image_and_identity(raycluster):
    images = {c["image"] for _, pod in pod_specs(raycluster) for c in pod["containers"]}
    (image,) = images
    assert image.rsplit(":", 1)[1] == PYPROJECT["project"]["version"], "tag the image with the project version"
    assert f"-t {image} " in DOCKERFILE.read_text(), "the Dockerfile's build command names the same image"
    accounts = {pod.get("serviceAccountName") for _, pod in pod_specs(raycluster)}
    assert accounts == {load_one(SERVICE_ACCOUNT)["metadata"]["name"]}, "every pod runs as the storage identity"


# ---------------------------------------------------------------- RayJobs and their commands


def check_train(cfg) -> None:
    from workloads.train import driver as train

    train.check(cfg)


def check_sweep(cfg) -> None:
    from workloads.sweep import driver as sweep
    from workloads.sweep import studies
    from workloads.train import driver as train

    for params in studies.trial_params(cfg):
        train.check(sweep.trial_train_conf(cfg, params))


def check_reproduce(cfg) -> None:
    """Every check of `workloads.reproduce` but the bucket's existence (that needs the store)."""
    from unittest import mock

    from workloads.reproduce import driver as reproduce

    with mock.patch.object(reproduce, "require_bucket"):
        reproduce.check(cfg)


def check_preprocess(cfg) -> None:
    from conf.checks import validate
    from pipelines.decode import parse_buckets

    validate(cfg)
    parse_buckets(cfg.resolution, cfg.buckets)


def check_dedup(cfg) -> None:
    from conf.checks import validate

    validate(cfg)


# The checks of a job's config that need no data or network, by the module a RayJob runs.
CHECKS: dict[str, Callable[[Any], None]] = {
    "workloads.train": check_train,
    "workloads.sweep": check_sweep,
    "workloads.reproduce": check_reproduce,
    "pipelines.preprocess": check_preprocess,
    "pipelines.dedup": check_dedup,
}


def job_command(path: Path) -> tuple[str, list[str]]:
    """`python -m <module> <overrides...>` from the RayJob's entrypoint, split the way a shell splits it."""
    tokens = shlex.split(load_one(path)["spec"]["entrypoint"])
    assert tokens[:2] == ["python", "-m"], f"{path.name}: the entrypoint must be `python -m <module> ...`"
    return tokens[2], tokens[3:]


def compose_job(module: str, overrides: list[str]) -> Any:
    """The job's config, its schema registered the way `cluster.submit` registers it."""
    (job,) = [job for job in JOBS.values() if job.module == module]
    register_schema(job)
    with initialize(version_base=None):
        cfg = compose(config_name=job.config, overrides=overrides)
    return OmegaConf.to_object(cfg)


def gpu_demand(module: str, cfg: Any) -> tuple[int, float]:
    """(GPUs the job holds at once, CPUs next to each GPU)."""
    if module == "workloads.train":
        t = cfg.trainer
        return (t.num_workers if t.use_gpu else 0), t.cpus_per_worker
    if module == "workloads.sweep":
        t = cfg.train.trainer
        return (t.num_workers * (cfg.max_concurrent_trials or 1) if t.use_gpu else 0), t.cpus_per_worker
    if module == "workloads.reproduce":
        t = cfg.train.trainer
        return (t.num_workers * (cfg.concurrent_trials or 1) if t.use_gpu else 0), t.cpus_per_worker
    if module == "pipelines.dedup":
        return (cfg.embedder.stage.max_actors if cfg.use_gpu else 0), cfg.embedder.stage.num_cpus
    stages = (cfg.compute.caption, cfg.compute.vae, cfg.compute.text)
    return (sum(s.max_actors for s in stages) if cfg.compute.use_gpu else 0), max(s.num_cpus for s in stages)


def test_rayjobs_exist():
    assert {job_command(path)[0] for path in RAYJOBS} == set(CHECKS)


@pytest.mark.parametrize("job", JOBS.values(), ids=lambda job: job.name)
def test_every_registered_job_is_a_packaged_module_that_composes_its_config(job):
    """What `cluster.submit` relies on: the module is shipped, registering its schema stores the config it composes,
    and its `cli(...)` composes that config."""
    spec = importlib.util.find_spec(job.module)
    assert spec is not None and Path(spec.origin).is_relative_to(ROOT), f"{job.module} is not in this repository"
    packaged = [p.rstrip("*") for p in PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"]]
    assert job.module.split(".")[0] in packaged, f"{job.module} is not installed into the image"
    sources = [Path(spec.origin)] if spec.submodule_search_locations is None else \
        sorted(Path(spec.origin).parent.glob("*.py"))
    assert any(f'cli("{job.config}"' in path.read_text() for path in sources), (
        f"{job.module} does not call cli({job.config!r})")
    register_schema(job)
    assert f"{job.config}.yaml" in ConfigStore.instance().repo, f"{job.register} does not store {job.config!r}"


@pytest.mark.parametrize("path", RAYJOBS, ids=lambda p: p.stem)
def test_rayjob_runs_on_the_raycluster(path, raycluster):
    job = load_one(path)
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    name = job["metadata"]["name"]
    assert DNS1035.fullmatch(name) and len(name) <= MAX_RAYJOB_NAME, name
    spec = job["spec"]
    assert spec["clusterSelector"] == {"ray.io/cluster": raycluster["metadata"]["name"]}
    assert "rayClusterSpec" not in spec, "the cluster spec lives once, in raycluster.yaml"
    assert not spec.get("backoffLimit") and not spec.get("shutdownAfterJobFinishes"), "not with clusterSelector"


@pytest.mark.parametrize("path", RAYJOBS, ids=lambda p: p.stem)
def test_rayjob_command_composes_and_checks(path):
    module, overrides = job_command(path)
    spec = importlib.util.find_spec(module)
    assert spec is not None and Path(spec.origin).is_relative_to(ROOT), f"{module} is not in this repository"
    packaged = [p.rstrip("*") for p in PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"]]
    assert module.split(".")[0] in packaged, f"{module} is not installed into the image"
    CHECKS[module](compose_job(module, overrides))


def test_a_misspelt_override_fails_composition():
    module, overrides = job_command(CLUSTER / "kuberay" / "rayjob-train.yaml")
    misspelt = [o.replace("trainer.num_workers=", "trainer.num_worker=") for o in overrides]
    assert misspelt != overrides
    with pytest.raises(ConfigCompositionException, match=r"trainer\.num_worker\b"):
        compose_job(module, misspelt)


@pytest.mark.parametrize("path", RAYJOBS, ids=lambda p: p.stem)
def test_rayjob_fits_the_gpu_nodes(path, raycluster, ray_up):
    """GPU groups start at zero nodes: jobs must ask for GPUs outright, and what they ask for must fit."""
    module, overrides = job_command(path)
    cfg = compose_job(module, overrides)
    if module == "workloads.sweep":
        assert cfg.max_concurrent_trials, "the default concurrency counts the GPUs present at start: none"
    if module == "workloads.reproduce":
        assert cfg.concurrent_trials, "the default concurrency counts the GPUs present at start: none"
    want, cpus_per_gpu = gpu_demand(module, cfg)
    assert want > 0, f"{path.name}: set use_gpu=true; a cluster at rest has no GPUs to detect"
    _, group = kuberay_groups(raycluster)
    (container,) = group["template"]["spec"]["containers"]
    assert want <= group["maxReplicas"] * GPUS_PER_NODE, f"{want} GPUs do not fit the GPU group"
    assert GPUS_PER_NODE * cpus_per_gpu <= cpu_quantity(container["resources"]["limits"]["cpu"])
    _, node_type = ray_up_workers(ray_up)
    assert want <= node_type["max_workers"] * node_type["resources"]["GPU"], f"{want} GPUs do not fit `ray up`"
    assert GPUS_PER_NODE * cpus_per_gpu <= node_type["resources"]["CPU"]


# ---------------------------------------------------------------- the image


def dockerfile_instructions() -> list[str]:
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    return [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def test_image_builds_on_the_matching_ray_and_holds_every_package():
    instructions = dockerfile_instructions()
    (base,) = [i.split()[1] for i in instructions if i.startswith("FROM ")]
    assert base.startswith(f"rayproject/ray:{ray.__version__}-") and base.endswith("-gpu"), base
    copied = {i.split()[-1] for i in instructions if i.startswith("COPY ")}
    packaged = {p.rstrip("*") for p in PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"]}
    assert packaged <= copied, f"the image misses {packaged - copied}"
    runs = " ".join(i for i in instructions if i.startswith("RUN "))
    assert "pip install" in runs and "constraints" not in runs, "the constraints file pins the CPU build of torch"


# ---------------------------------------------------------------- no credentials anywhere under cluster/

SECRET_NAME = re.compile(r"(?i)secret|password|passwd|token|access_key|private_key|credential")
SECRET_TEXT = [
    re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b"),  # AWS access key ids
    re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
    re.compile(r"\bhf_[A-Za-z0-9]{30,}"),  # Hugging Face tokens
    re.compile(r"(?i)(secret|password|passwd|token|access_key)\w*[\"']?\s*[:=]\s*[\"']?[A-Za-z0-9/+_\-]{12,}"),
]


def secrets_in_yaml(node: Any, where: str = "") -> Iterator[str]:
    """Secret-looking keys with literal values, and container env entries that carry one instead of a reference."""
    if isinstance(node, dict):
        if "name" in node and "value" in node and SECRET_NAME.search(str(node["name"])):
            yield f"{where}: env {node['name']} has a literal value (use valueFrom)"
        for key, value in node.items():
            if SECRET_NAME.search(str(key)) and isinstance(value, str | int) and value != "":
                yield f"{where}.{key}"
            yield from secrets_in_yaml(value, f"{where}.{key}")
    elif isinstance(node, list):
        for i, item in enumerate(node):
            yield from secrets_in_yaml(item, f"{where}[{i}]")


def secrets_in_text(text: str) -> list[str]:
    return [m.group(0) for pattern in SECRET_TEXT for m in pattern.finditer(text)]


def test_no_credentials_under_cluster():
    files = [p for p in CLUSTER.rglob("*") if p.is_file() and "__pycache__" not in p.parts]
    assert RAY_UP in files and DOCKERFILE in files
    found = []
    for path in files:
        text = path.read_text()
        found += [f"{path.relative_to(ROOT)}: {hit}" for hit in secrets_in_text(text)]
        if path.suffix in (".yaml", ".yml"):
            for doc in yaml.safe_load_all(text):
                found += [f"{path.relative_to(ROOT)}: {hit}" for hit in secrets_in_yaml(doc)]
    assert not found, found


@pytest.mark.parametrize(("text", "found"), [
    ("aws_secret_access_key = wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
     "secret_access_key = wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"),
    ("key id AKIAIOSFODNN7EXAMPLE here", "AKIAIOSFODNN7EXAMPLE"),  # each of these matches one pattern alone
    ("-----BEGIN RSA PRIVATE KEY-----\nMIIE", "-----BEGIN RSA PRIVATE KEY-----"),
    ("login with hf_" + "aB3" * 12, "hf_" + "aB3" * 12),
    ("password: hunter2hunter2x", "password: hunter2hunter2x"),
])
def test_the_credential_scan_finds_each_kind_of_planted_key(text, found):
    assert secrets_in_text(text) == [found]


def test_the_credential_scan_passes_clean_text_and_flags_literal_secrets_in_yaml():
    assert secrets_in_text("image: rayproject/ray:2.9.0-py311-gpu\nserviceAccountName: sd3-storage") == []
    env = {"env": [{"name": "AWS_SECRET_ACCESS_KEY", "value": "x"}, {"name": "HF_TOKEN", "valueFrom": {}}]}
    assert list(secrets_in_yaml(env)) == [".env[0]: env AWS_SECRET_ACCESS_KEY has a literal value (use valueFrom)"]
    assert list(secrets_in_yaml({"metadata": {"aws_secret_access_key": "abc", "token": ""}})) == [
        ".metadata.aws_secret_access_key"]
