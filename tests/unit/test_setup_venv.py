"""`make setup` / `make run` (deploy/local/setup.sh) with the wrong Python, and with a .venv that
another Python made or that no longer works: one line each, and nothing left to fail the rerun.

Interpreters are stand-ins (scripts answering the version probe), so no venv is built here.
"""

import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BASH = shutil.which("bash") or "bash"
# What the install is made from; setup.sh compares its stamp with them.
SOURCES = (
    "pyproject.toml",
    "setup.py",
    "service/core/engine/_native/treeshap.h",
    "service/core/engine/_native/shap.c",
)


@pytest.fixture
def checkout(tmp_path: Path) -> Path:
    """A copy of setup.sh at its place in a checkout that holds the install's sources."""
    (tmp_path / "deploy/local").mkdir(parents=True)
    shutil.copy(ROOT / "deploy/local/setup.sh", tmp_path / "deploy/local/setup.sh")
    for source in SOURCES:
        (tmp_path / source).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / source).write_text("")
    return tmp_path


def _script(path: Path, body: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def _python(path: Path, version: str, compiler: str = "true") -> Path:
    """An interpreter that answers the version probe with `version` and the compiler probe with
    `compiler`; its `-m venv` fails half-way (as without Debian's python3.11-venv), pip fails."""
    return _script(
        path,
        'case "$1 $2" in\n'
        f'  "-c "*sysconfig*) echo {compiler} ;;\n'
        f'  "-c "*) echo {version} ;;\n'
        '  "-m venv") mkdir -p "$3/bin"; echo "Error: ensurepip is not available" >&2; exit 1 ;;\n'
        '  *) echo "stand-in python: $*" >&2; exit 2 ;;\n'
        "esac",
    )


def _venv(checkout: Path, made_by: str, runs: str | None = "3.11") -> Path:
    """A .venv whose pyvenv.cfg says `made_by` and whose python answers `runs` (or is gone)."""
    venv = checkout / ".venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "pyvenv.cfg").write_text(f"home = /usr/bin\nversion = {made_by}\n")
    if runs is not None:
        _python(venv / "bin/python", runs)
    else:
        (venv / "bin/python").symlink_to(checkout / "no-such-python")
    for stamp in (".installed-run", ".installed-dev"):
        (venv / stamp).touch()
    return venv


def _setup(
    checkout: Path, python: Path, want: str = "run", env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """setup.sh with `python`; `dev` finds a stand-in Chromium and promtool unless `env` says
    otherwise, and systemd never runs (unless `env` names a SYSTEMD_RUN that exists)."""
    chromium = _script(checkout / "stand-in/chromium", "exit 0")
    promtool = _script(checkout / "stand-in/promtool", "exit 0")
    env = {
        "PATH": os.environ["PATH"],
        "PYTHON": str(python),
        "VENV": ".venv",
        "CHROMIUM": str(chromium),
        "PROMTOOL": str(promtool),
        "SYSTEMD_RUN": str(checkout / "no-systemd"),
        **(env or {}),
    }
    return subprocess.run(
        [BASH, "deploy/local/setup.sh", want],
        cwd=checkout,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_a_working_venv_is_left_alone(checkout: Path) -> None:
    venv = _venv(checkout, "3.11.7")
    done = _setup(checkout, _python(checkout / "py312", "3.12"))
    assert (done.returncode, done.stdout, done.stderr) == (0, "", "")
    assert (venv / "pyvenv.cfg").exists()


def test_the_wrong_python_is_named_before_anything_is_made(checkout: Path) -> None:
    done = _setup(checkout, _python(checkout / "python3", "3.12"))
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [
        f"shapstream setup: Python 3.11 is needed, and {checkout / 'python3'} is Python 3.12. "
        "Install it, or name it: make run PYTHON=/path/to/python3.11 (or make test ...)"
    ]
    assert not (checkout / ".venv").exists()


def test_no_python_at_all_is_named(checkout: Path) -> None:
    done = _setup(checkout, checkout / "python3.11")
    assert done.returncode == 1
    assert "does not run" in done.stderr
    assert not (checkout / ".venv").exists()


@pytest.mark.parametrize(
    ("made_by", "runs", "why"),
    [
        ("3.12.1", "3.12", "was made by Python 3.12, not 3.11"),
        # Another interpreter's venv whose python still starts as 3.11 (pyvenv.cfg edited).
        ("3.12.1", "3.11", "was made by Python 3.12, not 3.11"),
        ("3.11.7", None, "does not work (its Python does not start, or it has no pip)"),
    ],
    ids=["python-3.12", "cfg-3.12", "python-gone"],
)
def test_a_venv_of_another_python_is_rebuilt_saying_so(
    checkout: Path, made_by: str, runs: str | None, why: str
) -> None:
    _venv(checkout, made_by, runs)
    # The rerun of a newcomer who installed 3.11 after a first try with 3.12: the old venv goes,
    # then the new one is made (here the stand-in's `-m venv` fails, leaving nothing behind).
    done = _setup(checkout, _python(checkout / "python3.11", "3.11"))
    assert done.stderr.splitlines()[0] == f"==> .venv {why}: rebuilding it"
    assert "==> creating .venv with" in done.stderr
    assert done.returncode == 1
    assert "ensurepip is not available" in done.stderr
    assert "python3.11-venv" in done.stderr
    assert not (checkout / ".venv").exists(), "a half-made venv would fail the next run"


def test_a_changed_source_reinstalls(checkout: Path) -> None:
    venv = _venv(checkout, "3.11.7")
    for stamp in (".installed-run", ".installed-dev"):
        os.utime(venv / stamp, (1, 1))
    # The venv is kept and the install redone (which fails here: the stand-in has no pip).
    done = _setup(checkout, _python(checkout / "python3.11", "3.11"), want="dev")
    assert done.stdout == ""
    assert done.stderr.splitlines()[0] == (
        "==> installing shapstream with its test and lint tools into .venv"
    )
    assert done.returncode == 1
    assert "stand-in python: -m pip install --progress-bar off --no-compile -e .[dev]" in (
        done.stderr
    )
    assert "install failed: full log in .venv/install.log" in done.stderr
    assert (venv / "pyvenv.cfg").exists()
    assert not (venv / ".installed-dev").stat().st_mtime > 1


@pytest.mark.parametrize(
    ("variables", "expected"),
    [([], "--host 127.0.0.1 --port 8000"), (["PORT=8001"], "--host 127.0.0.1 --port 8001")],
)
def test_make_run_takes_its_port(variables: list[str], expected: str) -> None:
    env = {k: v for k, v in os.environ.items() if k not in {"PORT", "HOST"}}
    done = subprocess.run(
        ["make", "--no-print-directory", "-n", "run", *variables],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert done.stdout.splitlines() == [
        "bash deploy/local/setup.sh run",
        f".venv/bin/shapstream run {expected}",
    ]


def test_no_c_compiler_is_named_before_the_install(checkout: Path) -> None:
    venv = _venv(checkout, "3.11.7")
    _python(venv / "bin/python", "3.11", compiler="no-such-cc")
    for stamp in (".installed-run", ".installed-dev"):
        os.utime(venv / stamp, (1, 1))
    done = _setup(checkout, _python(checkout / "python3.11", "3.11"))
    assert done.returncode == 1
    assert done.stderr.splitlines() == [
        "shapstream setup: the TreeSHAP kernel is C, and no compiler was found (no-such-cc). "
        "Install one (e.g. apt install gcc, or xcode-select --install), or set CC"
    ]


# What setup.sh runs besides bash's builtins, apt-get, sudo, id and systemctl (stand-ins below);
# and what the stand-ins run.
TOOLS = ("dirname", "sed", "head", "grep", "tail", "touch", "mkdir", "chmod")


def _system(
    checkout: Path, *, uid: int, sudo: bool, apt: str, systemctl: str | None = None
) -> dict[str, str]:
    """A PATH of the tools setup.sh uses, with stand-ins for `id`, `sudo` (when `sudo`),
    `apt-get` (whose body is `apt`) and, with `systemctl` (its body), systemd running; each logs
    its arguments to calls.log. CHROMIUM and PROMTOOL point at where the stand-in apt installs
    them."""
    bin_dir = checkout / "system-bin"
    bin_dir.mkdir()
    for tool in TOOLS:
        found = shutil.which(tool)
        assert found is not None, tool
        (bin_dir / tool).symlink_to(found)
    calls = checkout / "calls.log"
    _script(bin_dir / "id", f'echo "id $*" >>{calls}; echo {uid}')
    if sudo:
        _script(bin_dir / "sudo", f'echo "sudo $*" >>{calls}; exec "$@"')
    _script(bin_dir / "apt-get", f'echo "apt-get $*" >>{calls}\n{apt}')
    systemd = checkout / "run/systemd/system"
    if systemctl is not None:
        _script(bin_dir / "systemctl", f'echo "systemctl $*" >>{calls}\n{systemctl}')
        systemd.mkdir(parents=True)
    return {
        "PATH": str(bin_dir),
        "CHROMIUM": str(checkout / "usr/bin/chromium"),
        "PROMTOOL": str(checkout / "usr/bin/promtool"),
        "SYSTEMD_RUN": str(systemd),
    }


def _calls(checkout: Path) -> list[str]:
    calls = checkout / "calls.log"
    return calls.read_text().splitlines() if calls.exists() else []


def _installed(env: dict[str, str], *tools: str) -> None:
    """Stand-ins for the tools (`CHROMIUM`, `PROMTOOL`) already at their places."""
    for tool in tools:
        Path(env[tool]).parent.mkdir(parents=True, exist_ok=True)
        _script(Path(env[tool]), "exit 0")


# A stand-in apt-get: `install` puts an executable at $CHROMIUM for chromium and at $PROMTOOL for
# prometheus.
INSTALLS = (
    'for p in "$@"; do case $p in chromium) f=$CHROMIUM ;; prometheus) f=$PROMTOOL ;; '
    '*) continue ;; esac; mkdir -p "$(dirname "$f")"; echo "#!/bin/sh" >"$f"; chmod +x "$f"; '
    "done"
)
INSTALL = "apt-get install -y --no-install-recommends"
PROMTOOL_USE = "promtool for the alert rules' tests (Debian's package prometheus)"
BOTH = f"Chromium for the browser tests and {PROMTOOL_USE}"


def test_dev_setup_with_chromium_and_promtool_present_says_nothing(checkout: Path) -> None:
    _venv(checkout, "3.11.7")
    env = _system(checkout, uid=0, sudo=False, apt="exit 1", systemctl="exit 1")
    _installed(env, "CHROMIUM", "PROMTOOL")
    done = _setup(checkout, _python(checkout / "python3.11", "3.11"), want="dev", env=env)
    assert (done.returncode, done.stdout, done.stderr) == (0, "", "")
    assert _calls(checkout) == []


def test_run_setup_never_looks_for_chromium_or_promtool(checkout: Path) -> None:
    _venv(checkout, "3.11.7")
    env = _system(checkout, uid=0, sudo=False, apt="exit 1")
    done = _setup(checkout, _python(checkout / "python3.11", "3.11"), env=env)
    assert (done.returncode, done.stdout, done.stderr) == (0, "", "")
    assert _calls(checkout) == []


@pytest.mark.parametrize(("uid", "sudo"), [(0, False), (1000, True)], ids=["root", "sudo"])
@pytest.mark.parametrize(
    ("present", "packages", "uses"),
    [
        ((), "chromium prometheus", BOTH),
        (("PROMTOOL",), "chromium", "Chromium for the browser tests"),
        (("CHROMIUM",), "prometheus", PROMTOOL_USE),
    ],
    ids=["both", "chromium", "promtool"],
)
def test_dev_setup_installs_what_is_missing_with_one_apt_call(
    checkout: Path, uid: int, sudo: bool, present: tuple[str, ...], packages: str, uses: str
) -> None:
    # An up-to-date venv: the stamp's early exit still checks for the tools.
    _venv(checkout, "3.11.7")
    env = _system(checkout, uid=uid, sudo=sudo, apt=f'case "$1" in install) {INSTALLS} ;; esac')
    _installed(env, *present)
    done = _setup(checkout, _python(checkout / "python3.11", "3.11"), want="dev", env=env)
    as_root = "sudo " if sudo else ""
    assert (done.returncode, done.stdout) == (0, ""), done.stderr
    assert done.stderr.splitlines() == [
        f"==> installing {uses}: {as_root}apt-get install {packages}"
    ]
    install = f"{INSTALL} {packages}"
    assert [c for c in _calls(checkout) if not c.startswith("id")] == (
        [f"sudo {install}", install] if sudo else [install]
    )
    assert os.access(env["CHROMIUM"], os.X_OK)
    assert os.access(env["PROMTOOL"], os.X_OK)
    # The second run finds both: a no-op.
    again = _setup(checkout, _python(checkout / "python3.11", "3.11"), want="dev", env=env)
    assert (again.returncode, again.stdout, again.stderr) == (0, "", "")


def test_apt_lists_are_fetched_only_when_they_lack_a_package(checkout: Path) -> None:
    _venv(checkout, "3.11.7")
    # No lists until `apt-get update` made them.
    lists = checkout / "apt-lists"
    apt = (
        'case "$1" in\n'
        f"  update) touch {lists} ;;\n"
        f"  install) [ -e {lists} ] || {{ echo 'E: Unable to locate package prometheus' >&2; "
        f"exit 100; }}; {INSTALLS} ;;\n"
        "esac"
    )
    env = _system(checkout, uid=0, sudo=False, apt=apt)
    done = _setup(checkout, _python(checkout / "python3.11", "3.11"), want="dev", env=env)
    assert (done.returncode, done.stdout) == (0, ""), done.stderr
    assert done.stderr.splitlines() == [
        f"==> installing {BOTH}: apt-get install chromium prometheus",
        "==> apt knows no chromium or prometheus package: apt-get update, then again",
    ]
    install = f"{INSTALL} chromium prometheus"
    assert [c for c in _calls(checkout) if not c.startswith("id")] == [
        install,
        "apt-get update",
        install,
    ]


def test_a_failed_install_says_what_to_install(checkout: Path) -> None:
    _venv(checkout, "3.11.7")
    env = _system(checkout, uid=0, sudo=False, apt="echo 'E: Could not get lock' >&2; exit 100")
    done = _setup(checkout, _python(checkout / "python3.11", "3.11"), want="dev", env=env)
    assert done.returncode == 1
    assert done.stderr.splitlines() == [
        f"==> installing {BOTH}: apt-get install chromium prometheus",
        "E: Could not get lock",
        "shapstream setup: installing Chromium and promtool failed (above): install them "
        "(apt-get install chromium prometheus), or set CHROMIUM=/path/to/chromium and "
        "PROMTOOL=/path/to/promtool",
    ]
    assert "apt-get update" not in _calls(checkout)


def test_a_failed_chromium_install_names_chromium_alone(checkout: Path) -> None:
    _venv(checkout, "3.11.7")
    env = _system(checkout, uid=0, sudo=False, apt="echo 'E: Could not get lock' >&2; exit 100")
    _installed(env, "PROMTOOL")
    done = _setup(checkout, _python(checkout / "python3.11", "3.11"), want="dev", env=env)
    assert done.returncode == 1
    assert done.stderr.splitlines()[-1] == (
        "shapstream setup: installing Chromium failed (above): install it (apt-get install "
        "chromium), or set CHROMIUM=/path/to/chromium"
    )


@pytest.mark.parametrize(
    ("present", "message"),
    [
        (
            (),
            "the browser tests need Chromium and the alert rules' tests need promtool, and "
            "installing them needs root: install them (apt-get install chromium prometheus), or "
            "set CHROMIUM=/path/to/chromium and PROMTOOL=/path/to/promtool",
        ),
        (
            ("CHROMIUM",),
            "the alert rules' tests need promtool, and installing it needs root: install it "
            "(apt-get install prometheus), or set PROMTOOL=/path/to/promtool",
        ),
    ],
    ids=["both", "promtool"],
)
def test_no_root_and_no_sudo_says_what_to_install(
    checkout: Path, present: tuple[str, ...], message: str
) -> None:
    _venv(checkout, "3.11.7")
    env = _system(checkout, uid=1000, sudo=False, apt="exit 1")
    _installed(env, *present)
    done = _setup(checkout, _python(checkout / "python3.11", "3.11"), want="dev", env=env)
    assert done.returncode == 1
    assert done.stderr.splitlines() == [f"shapstream setup: {message}"]
    assert [c for c in _calls(checkout) if not c.startswith("id")] == []


def test_no_apt_says_what_to_install(checkout: Path) -> None:
    _venv(checkout, "3.11.7")
    env = _system(checkout, uid=0, sudo=False, apt="exit 1")
    (Path(env["PATH"]) / "apt-get").unlink()
    _installed(env, "CHROMIUM")
    done = _setup(checkout, _python(checkout / "python3.11", "3.11"), want="dev", env=env)
    assert done.returncode == 1
    assert done.stderr.splitlines() == [
        "shapstream setup: the alert rules' tests need promtool, and there is no apt-get to "
        "install Debian's: install promtool and set PROMTOOL=/path/to/promtool"
    ]


# A stand-in systemctl: prometheus.service is neither enabled nor active before the install (as
# systemctl answers of an unknown unit), and `disable` works.
NEW_UNIT = 'case "$1" in is-enabled|is-active) exit 1 ;; esac'
DISABLE = "systemctl disable --now --quiet prometheus.service"


@pytest.mark.parametrize(("uid", "sudo"), [(0, False), (1000, True)], ids=["root", "sudo"])
def test_under_systemd_the_server_the_install_started_is_stopped(
    checkout: Path, uid: int, sudo: bool
) -> None:
    _venv(checkout, "3.11.7")
    apt = f'case "$1" in install) {INSTALLS} ;; esac'
    env = _system(checkout, uid=uid, sudo=sudo, apt=apt, systemctl=NEW_UNIT)
    _installed(env, "CHROMIUM")
    done = _setup(checkout, _python(checkout / "python3.11", "3.11"), want="dev", env=env)
    as_root = "sudo " if sudo else ""
    assert (done.returncode, done.stdout) == (0, ""), done.stderr
    assert done.stderr.splitlines()[1:] == [
        f"==> only promtool is wanted: {as_root}systemctl disable --now prometheus.service (the "
        "Prometheus server the package started)"
    ]
    calls = [c for c in _calls(checkout) if not c.startswith(("id", "sudo"))]
    assert calls == [
        "systemctl is-enabled --quiet prometheus.service",
        "systemctl is-active --quiet prometheus.service",
        f"{INSTALL} prometheus",
        DISABLE,
    ]
    if sudo:
        assert f"sudo {DISABLE}" in _calls(checkout)


@pytest.mark.parametrize(
    ("systemctl", "present"),
    [
        # A Prometheus server that ran before (promtool elsewhere than PROMTOOL says) is theirs.
        ('case "$1" in is-enabled) exit 1 ;; is-active) exit 0 ;; esac', ("CHROMIUM",)),
        ('case "$1" in is-enabled) exit 0 ;; esac', ("CHROMIUM",)),
        # Chromium alone: no Prometheus server at all.
        ("exit 1", ("PROMTOOL",)),
    ],
    ids=["active-before", "enabled-before", "chromium-only"],
)
def test_under_systemd_a_server_that_was_there_is_left_alone(
    checkout: Path, systemctl: str, present: tuple[str, ...]
) -> None:
    _venv(checkout, "3.11.7")
    apt = f'case "$1" in install) {INSTALLS} ;; esac'
    env = _system(checkout, uid=0, sudo=False, apt=apt, systemctl=systemctl)
    _installed(env, *present)
    done = _setup(checkout, _python(checkout / "python3.11", "3.11"), want="dev", env=env)
    assert (done.returncode, done.stdout) == (0, ""), done.stderr
    assert len(done.stderr.splitlines()) == 1, done.stderr
    assert DISABLE not in _calls(checkout)


def test_a_failed_disable_is_said_and_setup_goes_on(checkout: Path) -> None:
    _venv(checkout, "3.11.7")
    apt = f'case "$1" in install) {INSTALLS} ;; esac'
    systemctl = (
        'case "$1" in disable) echo "Failed to disable unit" >&2; exit 1 ;; *) exit 1 ;; esac'
    )
    env = _system(checkout, uid=0, sudo=False, apt=apt, systemctl=systemctl)
    _installed(env, "CHROMIUM")
    done = _setup(checkout, _python(checkout / "python3.11", "3.11"), want="dev", env=env)
    assert (done.returncode, done.stdout) == (0, ""), done.stderr
    assert done.stderr.splitlines()[-2:] == [
        "Failed to disable unit",
        "==> could not stop prometheus.service: it serves on :9090 until you do",
    ]
