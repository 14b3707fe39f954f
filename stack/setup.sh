#!/usr/bin/env bash
# Installs everything cryptotui needs on Debian/Ubuntu, idempotently:
#   1. apt packages (PostgreSQL 15 + server headers, build tools, OpenJDK 17 JRE, kcat, tmux)
#   2. TimescaleDB (Apache-2 edition built from Debian's source package) when no extension is installed
#   3. the virtual environment .venv with cryptotui and its dev extras
# Each step says what it does and skips itself when already done.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PG_MAJOR=15
PG_CONFIG="/usr/lib/postgresql/${PG_MAJOR}/bin/pg_config"
CACHE_DIR="${CRYPTOTUI_BUILD_CACHE:-/var/cache/cryptotui}"
PYTHON="${PYTHON:-python3}"
APT_PACKAGES=(postgresql-${PG_MAJOR} postgresql-server-dev-${PG_MAJOR} postgresql-client-${PG_MAJOR}
              build-essential cmake libssl-dev openjdk-17-jre-headless kcat tmux ca-certificates)

say() { printf '\033[1;34m[setup]\033[0m %s\n' "$*"; }
die() { printf '\033[1;31m[setup] error:\033[0m %s\n' "$*" >&2; exit 1; }

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null 2>&1 || die "not root and no 'sudo' found: run 'make setup' as root or install sudo"
    SUDO="sudo"
fi

# --- 1. apt packages -------------------------------------------------------------------------
missing=()
for pkg in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
    command -v apt-get >/dev/null 2>&1 || die "apt-get not found: install ${missing[*]} with your package manager"
    say "installing apt packages: ${missing[*]}"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
else
    say "apt packages already installed"
fi
[ -x "$PG_CONFIG" ] || die "PostgreSQL ${PG_MAJOR} server headers missing ($PG_CONFIG)"
command -v java >/dev/null 2>&1 || die "java (OpenJDK 17) not found on PATH"

# --- 2. TimescaleDB ---------------------------------------------------------------------------
SHAREDIR="$("$PG_CONFIG" --sharedir)"
if [ -f "$SHAREDIR/extension/timescaledb.control" ]; then
    say "TimescaleDB extension already installed"
elif [ "${CRYPTOTUI_SKIP_TIMESCALEDB:-0}" = "1" ]; then
    say "CRYPTOTUI_SKIP_TIMESCALEDB=1: not installing TimescaleDB (plain PostgreSQL tables will be used)"
else
    $SUDO mkdir -p "$CACHE_DIR"
    build_dir="$(ls -d "$CACHE_DIR"/timescaledb-*/build 2>/dev/null | head -1 || true)"
    if [ -z "$build_dir" ]; then
        say "building TimescaleDB (Apache-2 edition) from Debian's source package (about a minute)"
        # The mirror URI is read from this machine's apt configuration, never written into the repo.
        uri="$(grep -h '^URIs:' /etc/apt/sources.list.d/*.sources 2>/dev/null | awk '{print $2}' | grep -v security | head -1 || true)"
        [ -n "$uri" ] || uri="$(grep -h '^deb ' /etc/apt/sources.list 2>/dev/null | awk '{print $2}' | head -1 || true)"
        [ -n "$uri" ] || die "cannot find this machine's Debian mirror in /etc/apt/sources.list.d/*.sources or /etc/apt/sources.list"
        apt_tmp="$(mktemp -d)"
        mkdir -p "$apt_tmp/lists/partial"
        echo "deb-src $uri trixie main" > "$apt_tmp/sources.list"
        $SUDO apt-get -qq -o Dir::Etc::SourceList="$apt_tmp/sources.list" -o Dir::Etc::SourceParts=/dev/null \
            -o Dir::State::Lists="$apt_tmp/lists" update
        (cd "$CACHE_DIR" && $SUDO apt-get -qq -o Dir::Etc::SourceList="$apt_tmp/sources.list" \
            -o Dir::Etc::SourceParts=/dev/null -o Dir::State::Lists="$apt_tmp/lists" \
            source --download-only timescaledb >/dev/null)
        rm -rf "$apt_tmp"
        tarball="$(ls "$CACHE_DIR"/timescaledb_*.orig.tar.* | head -1)" || die "TimescaleDB source not downloaded"
        $SUDO tar -C "$CACHE_DIR" -xf "$tarball"
        src_dir="$(ls -d "$CACHE_DIR"/timescaledb-*/ | head -1)"
        build_dir="${src_dir%/}/build"
        $SUDO cmake -S "$src_dir" -B "$build_dir" -DPG_CONFIG="$PG_CONFIG" -DAPACHE_ONLY=ON \
            -DREGRESS_CHECKS=OFF -DTAP_CHECKS=OFF -DUSE_TELEMETRY=OFF -DWARNINGS_AS_ERRORS=OFF >/dev/null
        $SUDO make -C "$build_dir" -j"$(nproc)" >/dev/null
    else
        say "using the cached TimescaleDB build in $build_dir"
    fi
    $SUDO make -C "$build_dir" install >/dev/null
    say "TimescaleDB installed into $SHAREDIR/extension"
fi

# --- 3. Python virtual environment -------------------------------------------------------------
cd "$ROOT"
stamp=".venv/.cryptotui-installed"
want="$(sha256sum pyproject.toml | cut -d' ' -f1)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    say "virtual environment .venv is up to date"
else
    say "creating .venv and installing cryptotui with its dev extras (pyspark is large: about a minute)"
    [ -d .venv ] || "$PYTHON" -m venv .venv || die "python3 venv module missing (apt-get install python3-venv)"
    .venv/bin/pip install -q --upgrade pip
    .venv/bin/pip install -q -e '.[dev]'
    echo "$want" > "$stamp"
fi
say "done"
