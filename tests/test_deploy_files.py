"""The deployment files, checked without Docker (no daemon or compose plugin here): the Dockerfile's instructions
and what it copies, the compose file's structure and the agreement between its services, Prometheus' targets and
the vLLM pin, and the vLLM service's start script run by a real shell."""

import json
import re
import subprocess
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
INSTRUCTIONS = {"FROM", "ARG", "WORKDIR", "COPY", "ADD", "RUN", "ENV", "ENTRYPOINT", "CMD", "EXPOSE", "LABEL",
                "USER", "VOLUME", "HEALTHCHECK", "SHELL", "STOPSIGNAL", "ONBUILD"}  # fmt: skip


def dockerfile_instructions() -> list[tuple[str, str]]:
    lines, joined = [], ""
    for raw in (ROOT / "Dockerfile").read_text().splitlines():
        if not joined and (not raw.strip() or raw.lstrip().startswith("#")):
            continue
        joined += raw.rstrip("\\").strip() + " "
        if not raw.rstrip().endswith("\\"):
            word, _, rest = joined.strip().partition(" ")
            lines.append((word, rest))
            joined = ""
    assert not joined, "the Dockerfile ends inside a continued line"
    return lines


def test_dockerfile_is_well_formed_and_pins_the_supported_vllm():
    instructions = dockerfile_instructions()
    assert all(word in INSTRUCTIONS for word, _ in instructions), instructions
    assert [w for w, _ in instructions if w != "ARG"][0] == "FROM"
    for word, rest in instructions:
        if word == "COPY":
            for source in rest.split()[:-1]:
                assert (ROOT / source).exists(), f"COPY {source}: not in the repository"
        if word in ("ENTRYPOINT", "CMD"):
            json.loads(rest)  # exec form
    base = dict(instructions)["ARG"].split("=", 1)[1]
    pin = re.search(r'gpu = \["vllm>=(\d+\.\d+),<', (ROOT / "pyproject.toml").read_text()).group(1)
    assert base.startswith("vllm/vllm-openai:v" + pin + "."), (base, pin)
    assert '".[gpu]"' in dict(instructions)["RUN"]


def test_compose_services_agree():
    compose = yaml.safe_load((ROOT / "deploy" / "compose.yaml").read_text())
    services = compose["services"]
    assert set(services) == {"vllm", "guard", "prometheus"}
    vllm, guard = services["vllm"], services["guard"]
    for svc in (vllm, guard):
        assert svc["image"] == "align-then-unlearn:gpu" and svc["build"]["dockerfile"] == "Dockerfile"
        assert (ROOT / "deploy" / svc["build"]["context"] / "Dockerfile").is_file()
        for volume in svc["volumes"]:
            name = volume.split(":")[0]
            assert name.startswith(("$", ".", "/")) or name in compose["volumes"], volume
    socket = vllm["environment"]["ATU_CAPTURE_SOCKET"]
    assert f"--capture-socket {socket}" in guard["command"]
    shared = {v.split(":")[1] for v in vllm["volumes"]} & {v.split(":")[1] for v in guard["volumes"]}
    assert str(Path(socket).parent) in shared  # the socket lives on a volume both containers mount
    script = vllm["command"][0]
    assert "--no-enable-prefix-caching" in script and "--enforce-eager" in script  # what the capture plugin needs
    assert "--upstream http://vllm:8000" in guard["command"] and "--port 8000" in script
    assert guard["depends_on"]["vllm"]["condition"] == "service_healthy"
    assert "/ready" in " ".join(guard["healthcheck"]["test"]) and "/health" in " ".join(vllm["healthcheck"]["test"])
    assert vllm["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]


def test_prometheus_scrapes_both():
    compose = yaml.safe_load((ROOT / "deploy" / "compose.yaml").read_text())
    prom = yaml.safe_load((ROOT / "deploy" / "prometheus.yml").read_text())
    targets = {job["job_name"]: job["static_configs"][0]["targets"] for job in prom["scrape_configs"]}
    assert targets == {"vllm": ["vllm:8000"], "guard": ["guard:8080"]}
    assert "8080:8080" in compose["services"]["guard"]["ports"]
    mount = compose["services"]["prometheus"]["volumes"][0].split(":")
    assert (ROOT / "deploy" / mount[0]).resolve() == (ROOT / "deploy" / "prometheus.yml").resolve()


def test_vllm_start_script_reads_the_hook_layer(tmp_path):
    """Run the vLLM service's script with sh, the export path pointed at a stand-in manifest and vLLM replaced by
    printenv: the hook layer must reach vLLM's environment."""
    compose = yaml.safe_load((ROOT / "deploy" / "compose.yaml").read_text())
    script = compose["services"]["vllm"]["command"][0].replace("$$", "$")  # compose's escape for a literal $
    (tmp_path / "manifest.json").write_text(json.dumps({"guard": {"hook_layer": 29}}))
    script = script.replace("/export", str(tmp_path)).replace("exec vllm serve", "exec printenv ATU_CAPTURE_LAYER #")
    out = subprocess.run(["sh", "-c", script], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "29"
