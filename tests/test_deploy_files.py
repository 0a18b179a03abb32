"""The deployment files validate offline and refer only to things that exist.

No Docker engine and no cluster: docker-compose.yml is checked against the Compose
Specification schema that check-jsonschema vendors, the Kubernetes manifests against the
schemas kubernetes-validate ships (strict: unknown fields fail), and every command they run
against the real CLIs (batchbridge's typer app, Celery's click group, Flower's options), the
real settings (shared/settings.py) and the metrics the collector really exports.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path, PurePosixPath
from typing import Any

import kubernetes_validate
import pytest
import typer.main
import yaml
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from shared import task_names
from shared.models import BatchState
from shared.settings import ENV_PREFIX, Settings, unknown_variables
from tests.conftest import submit_requests
from worker.context import WorkerContext

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
K8S = ROOT / "deploy" / "k8s"
BASE = K8S / "base"
OVERLAY = K8S / "overlays" / "example"
# The Kubernetes version the manifests are checked against (its schemas ship with
# kubernetes-validate, so nothing is fetched).
K8S_VERSION = "1.29.0"
# Images of other projects that compose and the demo overlay run as they are.
THIRD_PARTY_IMAGES = {"redis:7", "postgres:16"}
# Variables batchbridge containers may set besides BATCHBRIDGE_* settings: the Together
# adapter's, and Flower's login (read by Flower itself).
OTHER_VARIABLES = {"TOGETHER_API_KEY", "TOGETHER_BASE_URL", "FLOWER_BASIC_AUTH"}
# Every request that reaches a network fails at once (the checks must never need one).
OFFLINE_ENV = {
    "HTTP_PROXY": "http://127.0.0.1:9",
    "HTTPS_PROXY": "http://127.0.0.1:9",
    "ALL_PROXY": "http://127.0.0.1:9",
    "NO_PROXY": "",
}


# ---------------------------------------------------------------------------- helpers


def load_yaml_docs(path: Path) -> list[dict[str, Any]]:
    with path.open() as f:
        return [doc for doc in yaml.safe_load_all(f) if doc]


def compose() -> dict[str, Any]:
    docs = load_yaml_docs(COMPOSE)
    assert len(docs) == 1
    return docs[0]


def interpolate(value: str, env: Mapping[str, str]) -> str:
    """Compose's ``${VAR}``, ``${VAR:-default}``, ``${VAR-default}``, ``${VAR:?error}``, ``$$``.

    Defaults may nest (``${A:-${B:-x}}``). A required variable that is unset raises.
    """
    out, i = [], 0
    while i < len(value):
        if value.startswith("$$", i):
            out.append("$")
            i += 2
        elif value.startswith("${", i):
            depth, j = 1, i + 2
            while depth:
                if j >= len(value):
                    raise ValueError(f"unclosed ${{ in {value!r}")
                if value.startswith("${", j):
                    depth, j = depth + 1, j + 2
                    continue
                depth += {"{": 1, "}": -1}.get(value[j], 0)
                j += 1
            inner = value[i + 2 : j - 1]
            name_match = re.match(r"[A-Za-z_][A-Za-z0-9_]*", inner)
            assert name_match, f"bad interpolation {value!r}"
            name, rest = name_match.group(), inner[name_match.end() :]
            given = env.get(name)
            if rest.startswith(":-"):
                out.append(given if given else interpolate(rest[2:], env))
            elif rest.startswith("-"):
                out.append(given if given is not None else interpolate(rest[1:], env))
            elif rest.startswith((":?", "?")):
                if not given:
                    raise KeyError(f"{name} is required: {rest.lstrip(':?')}")
                out.append(given)
            else:
                assert rest == "", f"unsupported interpolation {value!r}"
                out.append(given or "")
            i = j
        elif value[i] == "$" and re.match(r"\$[A-Za-z_]", value[i:]):
            raise AssertionError(f"unbraced variable in {value!r}: write ${{VAR}} or $$VAR")
        else:
            out.append(value[i])
            i += 1
    return "".join(out)


def argv_of(value: str | list[str] | None) -> list[str]:
    if value is None:
        return []
    return shlex.split(value) if isinstance(value, str) else [str(v) for v in value]


def dockerfile_final_stage() -> dict[str, Any]:
    """The final stage's ENTRYPOINT, CMD, WORKDIR and COPY (repo path -> image path)."""
    lines = DOCKERFILE.read_text().replace("\\\n", " ").splitlines()
    stages: list[list[str]] = []
    for line in lines:
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.upper().startswith("FROM "):
            stages.append([])
        if stages:
            stages[-1].append(line)
    final: dict[str, Any] = {"entrypoint": [], "cmd": [], "workdir": "/", "copies": {}}
    for line in stages[-1]:
        instruction, _, rest = line.partition(" ")
        instruction = instruction.upper()
        if instruction in ("ENTRYPOINT", "CMD"):
            final[instruction.lower()] = yaml.safe_load(rest)  # the JSON (exec) form
        elif instruction == "WORKDIR":
            final["workdir"] = str(PurePosixPath(final["workdir"]) / rest.strip())
        elif instruction == "COPY" and "--from=" not in rest:
            *sources, dest = rest.split()
            target = PurePosixPath(final["workdir"]) / dest
            for source in sources:
                final["copies"][source.rstrip("/")] = str(target)
    return final


def repo_path_in_image(path: str, workdir: str, copies: Mapping[str, str]) -> Path | None:
    """The repository file an image path comes from, via the final stage's COPY lines."""
    absolute = PurePosixPath(workdir) / path
    for source, target in copies.items():
        try:
            relative = absolute.relative_to(target)
        except ValueError:
            continue
        return ROOT / source / relative
    return None


# Celery's commands are click's; typer's are those of the click it vendors. Both have the
# same shape, so commands and options are told apart by their attributes, not their classes.
def is_group(command: Any) -> bool:
    return hasattr(command, "commands")


def options_of(command: Any) -> dict[str, Any]:
    return {
        name: param
        for param in command.params
        if param.param_type_name == "option"
        for name in (*param.opts, *param.secondary_opts)
    }


def option_names(command: Any) -> set[str]:
    return set(options_of(command))


def split_options(command: Any, args: list[str], where: str) -> tuple[list[str], list[str]]:
    """(options, positionals) of ``args`` for ``command``; unknown options fail, naming them.

    Stops at the first positional (a subcommand or an action) and returns the rest.
    """
    known = options_of(command)
    options, i = [], 0
    while i < len(args) and args[i].startswith("-"):
        name, has_value, _ = args[i].partition("=")
        assert name in known, f"{where}: {command.name} has no option {name} (has {sorted(known)})"
        options.append(name)
        param = known[name]
        takes_value = not (param.is_flag or param.count)
        i += 2 if takes_value and not has_value else 1
    return options, args[i:]


def check_batchbridge(args: list[str], where: str) -> None:
    group: Any = typer.main.get_command(typer_app())
    path = ["batchbridge"]
    while is_group(group):
        _, rest = split_options(group, args, where)
        assert rest, f"{where}: `{' '.join(path)}` needs a command"
        name, args = rest[0], rest[1:]
        assert name in group.commands, (
            f"{where}: `{' '.join(path)} {name}` is not a command (has {sorted(group.commands)})"
        )
        group, path = group.commands[name], [*path, name]
    # Every option given must be one the command has.
    for token in args:
        if token.startswith("-"):
            name = token.partition("=")[0]
            assert name in option_names(group), f"{where}: `{' '.join(path)}` has no {name}"


def typer_app() -> typer.Typer:
    from worker.cli import app

    return app


def check_celery(args: list[str], where: str) -> None:
    from celery.bin.celery import celery as celery_cli
    from celery.worker.control import Panel

    options, rest = split_options(celery_cli, args, where)
    assert "-A" in options or "--app" in options, f"{where}: celery without -A"
    app_index = next(i for i, a in enumerate(args) if a in ("-A", "--app"))
    module, _, attribute = args[app_index + 1].partition(":")
    assert module == "worker.app" and attribute in ("", "app"), f"{where}: app {module}"
    assert importlib.util.find_spec(module) is not None, f"{where}: no module {module}"
    assert rest, f"{where}: celery without a command"
    name, sub_args = rest[0], rest[1:]
    assert name in celery_cli.commands, f"{where}: celery has no command {name}"
    sub = celery_cli.commands[name]
    if name == "flower":
        # Flower hands its arguments to tornado's options, which flower.options defines.
        import flower.options  # noqa: F401  (defines the options)
        import tornado.options

        for token in sub_args:
            option = token.partition("=")[0].lstrip("-").replace("-", "_")
            assert option in tornado.options.options, f"{where}: Flower has no --{option}"
        return
    _, positionals = split_options(sub, sub_args, where)
    if name in ("inspect", "control"):
        assert positionals, f"{where}: celery {name} without an action"
        action, rest_args = positionals[0], positionals[1:]
        meta = Panel.meta.get(action)
        assert meta is not None and meta.type == name, f"{where}: celery {name} has no {action}"
        # Options may also follow the action's arguments.
        for token in rest_args:
            if token.startswith("-"):
                assert token.partition("=")[0] in option_names(sub), f"{where}: {token}"
        if action == "cancel_consumer":
            assert rest_args and rest_args[0] == task_names.QUEUE, where
    else:
        assert not positionals, f"{where}: celery {name} takes no {positionals}"
    if name == "worker":
        queue = sub_args[sub_args.index("-Q") + 1] if "-Q" in sub_args else None
        assert queue == task_names.QUEUE, f"{where}: the worker must consume {task_names.QUEUE}"


def check_python(args: list[str], where: str, image: dict[str, Any]) -> None:
    assert args and not args[0].startswith("-"), f"{where}: python without a script"
    script, script_args = args[0], args[1:]
    source = repo_path_in_image(script, image["workdir"], image["copies"])
    assert source is not None, f"{where}: {script} is not copied into the image"
    assert source.is_file(), f"{where}: {script} would be {source}, which does not exist"
    spec = importlib.util.spec_from_file_location(f"_deploy_script_{source.stem}", source)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    parser = getattr(module, "build_parser", None)
    if parser is not None:
        try:
            parser().parse_args(script_args)
        except SystemExit:
            pytest.fail(f"{where}: {script} refuses the arguments {script_args}")


def invocations(argv: list[str]) -> Iterator[list[str]]:
    """Each simple command in ``argv``; a ``sh -c`` script is split into its commands."""
    while argv and argv[0] in ("tini", "--", "exec"):
        argv = argv[1:]
    if len(argv) >= 3 and argv[0] in ("sh", "bash", "/bin/sh") and argv[1] == "-c":
        # A newline ends a command, as a semicolon does.
        lexer = shlex.shlex(argv[2].replace("\n", ";"), posix=True, punctuation_chars=";&|()<>")
        lexer.whitespace_split = True
        lexer.commenters = "#"
        current: list[str] = []
        for token in [*lexer, ";"]:
            if token and set(token) <= set(";&|()<>"):
                if current:
                    yield from invocations(current)
                current = []
            else:
                current.append(token)
        return
    # Shell keywords around a command (while/if ... do) are not commands of their own.
    while argv and argv[0] in ("while", "if", "until", "do", "then", "!"):
        argv = argv[1:]
    if argv:
        yield argv


def check_argv(argv: list[str], where: str, image: dict[str, Any]) -> int:
    """Check every batchbridge / celery / python command in ``argv``; how many were ours."""
    checked = 0
    for command in invocations(argv):
        program = PurePosixPath(command[0]).name
        if program == "batchbridge":
            check_batchbridge(command[1:], where)
        elif program == "celery":
            check_celery(command[1:], where)
        elif program in ("python", "python3") and command[1:2] != ["-c"]:
            check_python(command[1:], where, image)
        else:
            continue
        checked += 1
    return checked


def k8s_files() -> list[Path]:
    return sorted(p for p in K8S.rglob("*.yaml") if p.name != "kustomization.yaml")


def k8s_docs(directory: Path = K8S) -> list[tuple[Path, dict[str, Any]]]:
    return [
        (path, doc)
        for path in sorted(directory.rglob("*.yaml"))
        if path.name != "kustomization.yaml"
        for doc in load_yaml_docs(path)
    ]


def is_builtin_kind(doc: Mapping[str, Any]) -> bool:
    """A kind the Kubernetes API itself serves (core or *.k8s.io groups), not a CRD's."""
    group = str(doc.get("apiVersion", "")).rpartition("/")[0]
    return group in ("", "apps", "batch", "policy", "autoscaling") or group.endswith(".k8s.io")


def pod_specs(doc: Mapping[str, Any]) -> list[dict[str, Any]]:
    if doc.get("kind") in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
        return [doc["spec"]["template"]["spec"]]
    return []


def kustomize_build(directory: Path) -> list[dict[str, Any]]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl (with its built-in kustomize) is not installed")
    done = subprocess.run(
        [kubectl, "kustomize", str(directory)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **OFFLINE_ENV},
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return [doc for doc in yaml.safe_load_all(done.stdout) if doc]


def run_check_jsonschema(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "check_jsonschema",
            "--builtin-schema",
            "vendor.compose-spec",
            str(path),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **OFFLINE_ENV},
        check=False,
    )


# ---------------------------------------------------------------------------- compose


def test_the_compose_file_matches_the_compose_specification_and_a_wrong_one_does_not(
    tmp_path: Path,
) -> None:
    done = run_check_jsonschema(COMPOSE)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "version" not in compose(), "the Compose Specification has no `version:` key"

    # The same check refuses a file with a misspelt key and one with a wrong condition.
    for name, mistake in {
        "misspelt": ("    stop_grace_period: 660s\n", "    stop_grace_perod: 660s\n"),
        "condition": ("condition: service_healthy", "condition: service_happy"),
    }.items():
        text = COMPOSE.read_text()
        assert mistake[0] in text
        broken = tmp_path / f"{name}.yml"
        broken.write_text(text.replace(mistake[0], mistake[1], 1))
        refused = run_check_jsonschema(broken)
        assert refused.returncode != 0, f"the schema accepted the {name} mistake"


def test_every_compose_service_builds_from_files_that_exist_and_runs_real_commands() -> None:
    image = dockerfile_final_stage()
    assert image["entrypoint"][:2] == ["tini", "--"]
    assert check_argv(image["cmd"], "Dockerfile CMD", image) == 1
    # The final stage runs as the non-root user the manifests name.
    assert re.search(r"^USER 10001(:10001)?$", DOCKERFILE.read_text(), re.M)

    ours = 0
    for name, service in compose()["services"].items():
        where = f"compose service {name}"
        build = service.get("build")
        if build is None:
            assert service.get("image") in THIRD_PARTY_IMAGES, f"{where}: image without build"
            continue
        build = {"context": build} if isinstance(build, str) else build
        context = (COMPOSE.parent / build.get("context", ".")).resolve()
        assert context.is_dir(), f"{where}: build context {context} does not exist"
        dockerfile = context / build.get("dockerfile", "Dockerfile")
        assert dockerfile.is_file(), f"{where}: {dockerfile} does not exist"
        assert dockerfile == DOCKERFILE, f"{where}: builds from {dockerfile}"

        entrypoint = argv_of(service.get("entrypoint")) or image["entrypoint"]
        command = argv_of(service.get("command"))
        if "entrypoint" in service:
            argv = [*entrypoint, *command]
        else:
            argv = [*entrypoint, *(command or image["cmd"])]
        argv = [interpolate(a, {}) for a in argv]
        assert check_argv(argv, where, image) == 1, f"{where}: runs no batchbridge command"
        ours += 1

        test = service.get("healthcheck", {}).get("test")
        if test and test[0] in ("CMD", "CMD-SHELL"):
            probe = test[1:] if test[0] == "CMD" else ["sh", "-c", test[1]]
            check_argv([interpolate(a, {}) for a in probe], f"{where} healthcheck", image)
    assert ours >= 6  # worker, beat, flower, metrics, local-api, producer


def test_the_compose_stack_has_its_parts_and_workers_scale_without_sharing_a_disk() -> None:
    services = compose()["services"]
    assert {
        "redis",
        "postgres",
        "worker",
        "beat",
        "flower",
        "metrics",
        "local-api",
        "producer",
    } <= set(services)

    redis = argv_of(services["redis"]["command"])
    assert services["redis"]["image"].startswith("redis:7")
    assert redis[redis.index("--appendonly") + 1] == "yes"
    assert redis[redis.index("--maxmemory-policy") + 1] == "noeviction"

    # `docker compose up --scale worker=N`: nothing in the worker may be unique per host.
    worker = services["worker"]
    assert "container_name" not in worker and "ports" not in worker
    named_volumes = set(compose().get("volumes") or {})
    for name in ("worker", "beat"):
        for volume in services[name].get("volumes", []):
            # An anonymous volume (a container path alone) is each container's own.
            assert isinstance(volume, str) and ":" not in volume, (
                f"{name} mounts {volume!r}: workers must not share a volume"
            )
            assert volume not in named_volumes

    # One beat only; the producer is an example and does not start with `up`.
    assert "deploy" not in services["beat"] or services["beat"]["deploy"].get("replicas", 1) == 1
    assert services["producer"].get("profiles") == ["example"]
    assert [n for n, s in services.items() if "profiles" in s] == ["producer"]

    # Waiting for a healthy service needs a service with a health check.
    for name, service in services.items():
        depends = service.get("depends_on") or {}
        assert isinstance(depends, dict), f"{name}: depends_on without conditions"
        for other, rule in depends.items():
            assert other in services, f"{name} depends on unknown {other}"
            if rule.get("condition") == "service_healthy":
                assert "healthcheck" in services[other], f"{name} waits on {other}'s health"
    for name in ("worker", "beat", "metrics", "flower"):
        assert services[name]["depends_on"]["redis"]["condition"] == "service_healthy"

    # Published ports listen on loopback only (the defaults are demo secrets).
    for name, service in services.items():
        for port in service.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name} publishes {port} to the world"


# ---------------------------------------------------------------------------- settings


def compose_environment(service: Mapping[str, Any]) -> dict[str, str | None]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.partition("=")[::2] if "=" in item else (item, None) for item in env)
    return {k: None if v is None else interpolate(str(v), {}) for k, v in env.items()}


def k8s_env_names(directory: Path = K8S) -> dict[str, set[str]]:
    """Variable name -> the files that set it (ConfigMaps, Secrets, container env)."""
    names: dict[str, set[str]] = {}
    for path, doc in k8s_docs(directory):
        keys: list[str] = []
        if doc.get("kind") == "ConfigMap":
            keys = list(doc.get("data") or {})
        elif doc.get("kind") == "Secret":
            keys = [*(doc.get("stringData") or {}), *(doc.get("data") or {})]
        for spec in pod_specs(doc):
            for container in spec["containers"]:
                if batchbridge_image(container["image"]):
                    keys += [e["name"] for e in container.get("env", [])]
        if doc.get("kind") == "Secret" and doc["metadata"]["name"] == "demo-datastores":
            keys = [k for k in keys if k.startswith(ENV_PREFIX)]  # the datastores' own
        for key in keys:
            names.setdefault(key, set()).add(str(path.relative_to(ROOT)))
    return names


def batchbridge_image(image: str) -> bool:
    return image.split(":")[0].rsplit("/", 1)[-1] == "batchbridge"


def read_by_code(variable: str) -> bool:
    """Whether batchbridge's code (or Flower, for FLOWER_*) reads ``variable`` by name."""
    if variable.startswith("FLOWER_"):
        import flower.options  # noqa: F401  (defines Flower's options)
        import tornado.options

        return variable.removeprefix("FLOWER_").lower() in tornado.options.options
    return any(
        variable in path.read_text()
        for package in ("shared", "worker", "producer")
        for path in (ROOT / package).rglob("*.py")
    )


def check_variable(name: str, where: str) -> None:
    if name.startswith(ENV_PREFIX):
        setting = name.removeprefix(ENV_PREFIX).lower()
        if setting in Settings.model_fields:
            return
        assert name.startswith(f"{ENV_PREFIX}LOCAL_") and read_by_code(name), (
            f"{where}: {name} is not a batchbridge setting"
        )
        return
    assert name in OTHER_VARIABLES and read_by_code(name), f"{where}: {name} is read by nobody"


def test_compose_and_kubernetes_set_only_variables_batchbridge_reads() -> None:
    seen_compose: set[str] = set()
    for name, service in compose()["services"].items():
        if "build" not in service:
            continue  # redis and postgres take their own variables
        for variable in compose_environment(service):
            check_variable(variable, f"compose service {name}")
            seen_compose.add(variable)
    seen_k8s = k8s_env_names()
    for variable, files in seen_k8s.items():
        check_variable(variable, ", ".join(sorted(files)))
    # Both say where Redis and the database are, by the same names.
    for essential in ("BATCHBRIDGE_REDIS_URL", "BATCHBRIDGE_DATABASE_URL", "TOGETHER_API_KEY"):
        assert essential in seen_compose and essential in seen_k8s, essential

    # A misspelt setting is caught (the check can fail).
    with pytest.raises(AssertionError, match="not a batchbridge setting"):
        check_variable("BATCHBRIDGE_MAX_WAIT_SECOND", "a typo")
    with pytest.raises(AssertionError, match="read by nobody"):
        check_variable("TOGETHER_KEY", "a typo")


def test_the_shipped_configuration_is_a_valid_set_of_settings(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # compose: the worker's environment with every default taken.
    worker_env = {
        k: v for k, v in compose_environment(compose()["services"]["worker"]).items() if v
    }
    # Kubernetes: the demo overlay's ConfigMap and Secrets, as kustomize merges them.
    k8s_env: dict[str, str] = {}
    for directory in (BASE, OVERLAY):
        for _, doc in k8s_docs(directory):
            if doc.get("kind") in ("ConfigMap", "Secret") and doc["metadata"]["name"].startswith(
                "batchbridge-"
            ):
                k8s_env.update(doc.get("data") or {})
                k8s_env.update(doc.get("stringData") or {})
    for env in (worker_env, k8s_env):
        for name in list(os.environ):
            if name.startswith(ENV_PREFIX) or name.startswith("TOGETHER_"):
                monkeypatch.delenv(name)
        for name, value in env.items():
            monkeypatch.setenv(name, str(value))
        assert unknown_variables(os.environ) == []
        settings = Settings.load()  # raises SettingsError naming a bad value
        assert settings.sqlalchemy_url.startswith("postgresql+psycopg://")
        assert settings.redis_url is not None
        assert settings.default_provider == "together"

    # The worker pod waits out the longest task before Kubernetes kills it.
    limit = int(k8s_env.get("BATCHBRIDGE_TASK_TIME_LIMIT_SECONDS", 600))
    worker = deployment("batchbridge-worker")
    assert worker["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] >= limit
    assert compose()["services"]["worker"]["stop_grace_period"] == f"{limit + 60}s"


# ---------------------------------------------------------------------------- kubernetes


def deployment(name: str) -> dict[str, Any]:
    found = [
        doc
        for _, doc in k8s_docs(BASE)
        if doc.get("kind") == "Deployment" and doc["metadata"]["name"] == name
    ]
    assert len(found) == 1, f"no Deployment {name} in the base"
    return found[0]


def test_every_kubernetes_manifest_validates_strictly_against_the_kubernetes_schemas() -> None:
    validated = 0
    for path, doc in k8s_docs():
        if not is_builtin_kind(doc):
            continue  # CRD kinds (KEDA): see the ScaledObject test
        try:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{path.relative_to(ROOT)}: {doc['kind']}: {exc.message} at {exc.path}")
        validated += 1
    assert validated >= 15

    # Strict validation refuses a field Kubernetes does not have.
    broken = deployment("batchbridge-worker")
    broken["spec"]["template"]["spec"]["containers"][0]["livenessProbes"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSION, strict=True)


@pytest.mark.parametrize("directory", [BASE, OVERLAY], ids=["base", "example-overlay"])
def test_kustomize_renders_what_validates(directory: Path) -> None:
    docs = kustomize_build(directory)
    kinds = {(d["kind"], d["metadata"]["name"]) for d in docs}
    for doc in docs:
        if is_builtin_kind(doc):
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
            if doc["kind"] != "Namespace":
                assert doc["metadata"].get("namespace") == "batchbridge", doc["metadata"]
    assert ("Deployment", "batchbridge-worker") in kinds
    if directory == OVERLAY:
        assert ("Deployment", "local-api") in kinds
        images = {
            c["image"]
            for d in docs
            for spec in pod_specs(d)
            for c in spec["containers"]
            if batchbridge_image(c["image"])
        }
        assert images == {"batchbridge:demo"}
        rendered = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Deployment"}
        assert rendered["batchbridge-worker"]["spec"]["replicas"] == 2


def test_every_kustomization_names_files_that_exist_and_every_file_is_used() -> None:
    used: set[Path] = set()
    for kustomization in sorted(K8S.rglob("kustomization.yaml")):
        where = kustomization.relative_to(ROOT)
        spec = load_yaml_docs(kustomization)[0]
        assert spec["kind"] == "Kustomization"
        for resource in spec.get("resources", []):
            target = (kustomization.parent / resource).resolve()
            assert target.exists(), f"{where}: resource {resource} does not exist"
            if target.is_dir():
                assert (target / "kustomization.yaml").is_file(), f"{where}: {resource}"
            used.add(target)
        for patch in spec.get("patches", []):
            assert "path" in patch or "patch" in patch, f"{where}: empty patch"
            if "path" in patch:
                target = (kustomization.parent / patch["path"]).resolve()
                assert target.is_file(), f"{where}: patch {patch['path']} does not exist"
                used.add(target)
    unused = [p.relative_to(ROOT) for p in k8s_files() if p.resolve() not in used]
    assert not unused, f"manifests no kustomization uses: {unused}"


def test_kubernetes_pods_run_real_commands_with_config_that_exists() -> None:
    image = dockerfile_final_stage()
    objects = {(doc["kind"], doc["metadata"]["name"]) for _, doc in k8s_docs()}
    secrets = {
        doc["metadata"]["name"]: {*(doc.get("stringData") or {}), *(doc.get("data") or {})}
        for _, doc in k8s_docs()
        if doc.get("kind") == "Secret"
    }
    checked = 0
    for path, doc in k8s_docs():
        for spec in pod_specs(doc):
            volumes = {v["name"]: v for v in spec.get("volumes", [])}
            for container in spec["containers"]:
                where = f"{path.relative_to(ROOT)} {doc['metadata']['name']}/{container['name']}"
                if not batchbridge_image(container["image"]):
                    assert container["image"] in THIRD_PARTY_IMAGES, where
                    continue
                entrypoint = container.get("command") or image["entrypoint"]
                argv = [*entrypoint, *(container.get("args") or image["cmd"])]
                assert check_argv(argv, where, image) == 1, f"{where}: runs nothing of ours"
                checked += 1
                for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                    if "exec" in container.get(probe, {}):
                        check_argv(container[probe]["exec"]["command"], f"{where} {probe}", image)
                hook = container.get("lifecycle", {}).get("preStop", {}).get("exec")
                if hook:
                    assert check_argv(hook["command"], f"{where} preStop", image) >= 2
                for source in container.get("envFrom", []):
                    for kind, key in (("ConfigMap", "configMapRef"), ("Secret", "secretRef")):
                        if key in source:
                            assert (kind, source[key]["name"]) in objects, where
                for env in container.get("env", []):
                    ref = env.get("valueFrom", {}).get("secretKeyRef")
                    if ref:
                        assert ref["key"] in secrets.get(ref["name"], set()), f"{where}: {ref}"
                # The data directory is the pod's own scratch space, never a shared volume.
                for mount in container.get("volumeMounts", []):
                    assert "emptyDir" in volumes[mount["name"]], f"{where}: {mount}"
    assert checked >= 5


def test_the_worker_deployment_drains_is_probed_and_has_resources() -> None:
    worker = deployment("batchbridge-worker")
    spec = worker["spec"]["template"]["spec"]
    container = spec["containers"][0]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        command = " ".join(container[probe]["exec"]["command"])
        assert "inspect ping" in command and '"celery@$HOSTNAME"' in command, probe
        # The probe's own timeout outlasts celery's --timeout, so a slow answer is a miss.
        assert container[probe]["timeoutSeconds"] > 10
    pre_stop = " ".join(container["lifecycle"]["preStop"]["exec"]["command"])
    assert "cancel_consumer" in pre_stop and "inspect active" in pre_stop
    for kind in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(container["resources"][kind]), kind
    assert all("emptyDir" in v for v in spec["volumes"])
    assert spec["securityContext"]["runAsNonRoot"] is True

    beat = deployment("batchbridge-beat")
    assert beat["spec"]["replicas"] == 1 and beat["spec"]["strategy"]["type"] == "Recreate"
    for name in ("batchbridge-metrics",):
        template = deployment(name)["spec"]["template"]
        assert template["metadata"]["annotations"]["prometheus.io/scrape"] == "true"


# ---------------------------------------------------------------------------- KEDA


def scaled_objects() -> list[tuple[Path, dict[str, Any]]]:
    return [(p, d) for p, d in k8s_docs() if d.get("kind") == "ScaledObject"]


def exported_metrics(ctx: WorkerContext) -> dict[str, set[str]]:
    """Metric family name -> its label names, scraped from a real collector with data."""
    from worker.metrics import BatchbridgeCollector
    from worker.packing import pack_due_buffers

    ctx.settings = ctx.settings.model_copy(update={"max_batch_requests": 10})
    submit_requests(ctx, 10)
    pack_due_buffers(ctx, force=True)  # a batch, so batch states have samples
    submit_requests(ctx, 3)  # and pending requests
    collector = BatchbridgeCollector(ctx.settings)
    try:
        registry = CollectorRegistry()
        registry.register(collector)
        text = generate_latest(registry).decode()
    finally:
        collector.close()
    families: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            families.setdefault(sample.name, set()).update(sample.labels)
        families.setdefault(family.name, set())
    return families


def test_the_scaled_object_scales_the_worker_on_metrics_that_are_exported(
    ctx: WorkerContext,
) -> None:
    found = scaled_objects()
    assert len(found) == 1
    path, scaled = found[0]
    assert scaled["apiVersion"] == "keda.sh/v1alpha1"
    spec = scaled["spec"]
    # The CRD's required fields (spec.scaleTargetRef.name, spec.triggers[].type, .metadata).
    target = spec["scaleTargetRef"]
    assert target.get("kind", "Deployment") == "Deployment"
    assert target.get("apiVersion", "apps/v1") == "apps/v1"
    assert deployment(target["name"])  # names a Deployment of the base
    assert target["name"] == "batchbridge-worker"
    assert 1 <= spec["minReplicaCount"] <= spec["maxReplicaCount"]
    assert spec["triggers"], "no triggers"

    metrics = exported_metrics(ctx)
    assert "batchbridge_pending_requests" in metrics
    states = {state.value for state in BatchState}
    config = next(d for _, d in k8s_docs(BASE) if d.get("kind") == "ConfigMap")["data"]
    per_pod = int(config["BATCHBRIDGE_WORKER_CONCURRENCY"])
    thresholds: dict[str, float] = {}
    for trigger in spec["triggers"]:
        assert trigger["type"] == "prometheus", trigger
        meta = trigger["metadata"]
        # The CRD's metadata is a map of strings: a bare number would be refused.
        assert all(isinstance(v, str) for v in meta.values()), meta
        assert {"serverAddress", "query", "threshold"} <= set(meta)
        assert meta["serverAddress"].startswith(("http://", "https://"))
        thresholds[trigger["name"]] = float(meta["threshold"])
        query = meta["query"]
        used = set(re.findall(r"\bbatchbridge_[a-z_]+\b", query))
        assert used, f"{path}: {trigger['name']} reads no batchbridge metric"
        for name in used:
            assert name in metrics, f"{trigger['name']}: {name} is not exported ({sorted(metrics)})"
        # `by (...)` groups by labels those metrics have.
        for labels, name in re.findall(r"by \(([^)]*)\) \((batchbridge_[a-z_]+)", query):
            wanted = {label.strip() for label in labels.split(",")}
            assert wanted <= metrics[name], f"{name} has no label {wanted - metrics[name]}"
        # Label values matched are real batch states.
        for values in re.findall(r'state=~"([^"]+)"', query):
            assert set(values.split("|")) <= states, values
    # One pod carries one batch per pool process; a pending backlog of that many full batches.
    assert thresholds["batches-in-work"] == per_pod
    assert thresholds["pending-requests"] == per_pod * int(config["BATCHBRIDGE_MAX_BATCH_REQUESTS"])
