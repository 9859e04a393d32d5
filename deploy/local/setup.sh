#!/usr/bin/env bash
# `make setup-run` / `make setup`: a working Python 3.11 venv in $VENV with shapstream installed
# (editable), for running only (`run`) or with the test and lint tools too (`dev`), and for
# `dev` the Chromium that tests/browser drives and the promtool that checks the alert rules
# (Debian's, installed with apt when missing).
#
# Fast when nothing changed (it is run by every `make run` and `make test`): it only checks that
# the venv still works, that its install is newer than pyproject.toml, setup.py and the C kernel,
# and (`dev`) that Chromium and promtool are there. A venv that another interpreter made, or
# that no longer works (its Python moved, a half-made venv), is rebuilt, with a line saying so:
# it would otherwise fail on every run until `make clean`.
set -euo pipefail
cd "$(dirname "$0")/../.."

want=${1:?usage: setup.sh run|dev}
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-$(command -v python3.11 || echo python3)}
NEEDED=3.11
PY=$VENV/bin/python
# The browser of tests/browser and bench/console.py (they read CHROMIUM too). Never `playwright
# install`: it downloads browsers from a CDN, and Debian's Chromium is what tests run on.
CHROMIUM=${CHROMIUM:-/usr/bin/chromium}
# Prometheus's rule checker, for tests/unit/test_prometheus_rules.py (deploy/prometheus): Debian
# ships it in the package prometheus (tests read PROMTOOL too).
PROMTOOL=${PROMTOOL:-/usr/bin/promtool}
# Where systemd keeps its runtime state while it runs as init (tests point it elsewhere).
SYSTEMD_RUN=${SYSTEMD_RUN:-/run/systemd/system}
# What the install is made from: a change to any of them reinstalls.
SOURCES=(pyproject.toml setup.py service/core/engine/_native/*.[ch])

case $want in
  run) extras="" ;;
  dev) extras="[dev]" ;;
  *) echo "setup.sh: run or dev, not $want" >&2; exit 2 ;;
esac

# On stderr, all of it: `eval "$(make -s services-env)"` reads stdout.
say() {
  echo "==> $*" >&2
}

fail() {
  echo "shapstream setup: $*" >&2
  exit 1
}

# Prints why $VENV cannot be used as it is, or nothing when it can (or does not exist).
venv_problem() {
  [ -e "$VENV" ] || return 0
  local runs made
  if ! runs=$("$PY" -c 'import sys, pip; print("%d.%d" % sys.version_info[:2])' 2>/dev/null); then
    echo "does not work (its Python does not start, or it has no pip)"
    return 0
  fi
  # pyvenv.cfg records the interpreter that made the venv (`version`, or `version_info`).
  made=$(sed -n 's/^version\(_info\)\{0,1\} *= *\([0-9]*\.[0-9]*\).*/\2/p' "$VENV/pyvenv.cfg" \
    2>/dev/null | head -1)
  if [ "$runs" != "$NEEDED" ] || [ "$made" != "$NEEDED" ]; then
    echo "was made by Python ${made:-$runs}, not $NEEDED"
  fi
}

# For `dev`: Debian's Chromium at $CHROMIUM and promtool at $PROMTOOL, installed with apt when
# missing (one apt-get call for both; as root, else with sudo). A no-op when they are there;
# apt's lists are fetched only when they lack a package.
ensure_tools() {
  local packages=() needs=() names=() uses=() overrides=() log sudo="" it
  if [ ! -x "$CHROMIUM" ]; then
    packages+=(chromium)
    needs+=("the browser tests need Chromium")
    names+=(Chromium)
    uses+=("Chromium for the browser tests")
    overrides+=("CHROMIUM=/path/to/chromium")
  fi
  if [ ! -x "$PROMTOOL" ]; then
    packages+=(prometheus)
    needs+=("the alert rules' tests need promtool")
    names+=(promtool)
    uses+=("promtool for the alert rules' tests (Debian's package prometheus)")
    overrides+=("PROMTOOL=/path/to/promtool")
  fi
  [ ${#packages[@]} -gt 0 ] || return 0
  if [ ${#packages[@]} -gt 1 ]; then it=them; else it=it; fi
  local all="${packages[*]}"
  local what="install $it (apt-get install $all), or set $(joined "${overrides[@]}")"
  command -v apt-get >/dev/null ||
    fail "$(joined "${needs[@]}"), and there is no apt-get to install Debian's:" \
      "install $(joined "${names[@]}") and set $(joined "${overrides[@]}")"
  if [ "$(id -u)" != 0 ]; then
    command -v sudo >/dev/null ||
      fail "$(joined "${needs[@]}"), and installing $it needs root: $what"
    sudo=sudo
  fi
  # Where systemd runs, the package prometheus starts its server (:9090) and enables it at
  # boot: the tests need only promtool, so a service that this install brings is stopped and
  # disabled (never one that was there before). In a container without an init nothing starts
  # (invoke-rc.d knows no runlevel; Docker images' policy-rc.d refuses too). A SysV-init host
  # would start it from /etc/init.d/prometheus: rare enough to leave to its owner.
  local systemd="" unit=prometheus.service
  if [[ " $all " == *" prometheus "* ]] && [ -d "$SYSTEMD_RUN" ] &&
    command -v systemctl >/dev/null && ! systemctl is-enabled --quiet $unit 2>/dev/null &&
    ! systemctl is-active --quiet $unit 2>/dev/null; then
    systemd=yes
  fi
  say "installing $(joined "${uses[@]}"): ${sudo:+sudo }apt-get install $all"
  if ! log=$($sudo apt-get install -y --no-install-recommends "${packages[@]}" 2>&1); then
    # A fresh image has no package lists yet: fetch them, then try once more.
    if grep -q -e "Unable to locate package" -e "has no installation candidate" <<<"$log"; then
      say "apt knows no ${all// / or } package: ${sudo:+sudo }apt-get update, then again"
      log=$($sudo apt-get update 2>&1 &&
        $sudo apt-get install -y --no-install-recommends "${packages[@]}" 2>&1) || {
        tail -20 <<<"$log" >&2
        fail "installing $(joined "${names[@]}") failed (above): $what"
      }
    else
      tail -20 <<<"$log" >&2
      fail "installing $(joined "${names[@]}") failed (above): $what"
    fi
  fi
  if [ -n "$systemd" ]; then
    say "only promtool is wanted: ${sudo:+sudo }systemctl disable --now $unit (the Prometheus" \
      "server the package started)"
    $sudo systemctl disable --now --quiet $unit >&2 ||
      say "could not stop $unit: it serves on :9090 until you do"
  fi
  [ -x "$CHROMIUM" ] || fail "apt installed chromium, yet CHROMIUM=$CHROMIUM is missing" \
    "(Debian's is /usr/bin/chromium)"
  [ -x "$PROMTOOL" ] || fail "apt installed prometheus, yet PROMTOOL=$PROMTOOL is missing" \
    "(Debian's is /usr/bin/promtool)"
}

# Its arguments joined by commas, the last by "and": "a", "a and b", "a, b and c".
joined() {
  local out=$1
  shift
  while [ $# -gt 1 ]; do
    out+=", $1"
    shift
  done
  [ $# -eq 0 ] || out+=" and $1"
  echo "$out"
}

# True when the install stamp $1 is newer than every source of the install.
fresh() {
  local source
  [ -f "$1" ] || return 1
  for source in "${SOURCES[@]}"; do
    [ "$1" -nt "$source" ] || return 1
  done
}

problem=$(venv_problem)
if [ -n "$problem" ]; then
  say "$VENV $problem: rebuilding it"
  rm -rf "$VENV"
fi

# A dev install holds everything a run needs.
if fresh "$VENV/.installed-$want" || { [ "$want" = run ] && fresh "$VENV/.installed-dev"; }; then
  if [ "$want" = dev ]; then ensure_tools; fi
  exit 0
fi

if [ ! -e "$VENV" ]; then
  version=$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null) || true
  if [ "$version" != "$NEEDED" ]; then
    found=${version:+is Python $version}
    fail "Python $NEEDED is needed, and $PYTHON ${found:-does not run}. Install it, or" \
      "name it: make run PYTHON=/path/to/python$NEEDED (or make test ...)"
  fi
  say "creating $VENV with $PYTHON (Python $version)"
  if ! log=$("$PYTHON" -m venv "$VENV" 2>&1); then
    # A half-made venv would fail every later run: leave none.
    rm -rf "$VENV"
    fail "$PYTHON -m venv failed: $(tail -1 <<<"$log") (on Debian or Ubuntu:" \
      "apt install python$NEEDED-venv)"
  fi
  "$PY" -m pip install --quiet --upgrade pip >&2
fi

# setuptools builds the TreeSHAP kernel with the compiler Python was built with (or $CC).
compiler=$("$PY" -c 'import os, sysconfig
print((os.environ.get("CC") or sysconfig.get_config_var("CC") or "cc").split()[0])')
command -v "$compiler" >/dev/null ||
  fail "the TreeSHAP kernel is C, and no compiler was found ($compiler). Install one (e.g." \
    "apt install gcc, or xcode-select --install), or set CC"

if [ "$want" = run ]; then
  say "installing what running needs into $VENV (make test adds the test and lint tools)"
else
  say "installing shapstream with its test and lint tools into $VENV"
fi
# The build backend is verbose: its log is shown only if the install fails. Bytecode is
# compiled on first import rather than for every file of every package now.
if ! "$PY" -m pip install --progress-bar off --no-compile -e ".$extras" >"$VENV/install.log" 2>&1
then
  tail -40 "$VENV/install.log" >&2
  fail "install failed: full log in $VENV/install.log"
fi
rm -f "$VENV/.installed" # the stamp the Makefile used before this script
touch "$VENV/.installed-$want"
if [ "$want" = dev ]; then touch "$VENV/.installed-run"; fi
if [ "$want" = dev ]; then ensure_tools; fi
