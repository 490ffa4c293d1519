#!/usr/bin/env bash
# Install para-train with the exact stack its test suite passes with (constraints.txt) into the
# Python on PATH (a venv if one is active).
#
#   bash install.sh                  para-train and its dependencies, pinned
#   bash install.sh --dev            the same plus the test tools (pytest, moto)
#   bash install.sh --refresh-lock   re-resolve constraints.txt from setup.py's ranges (newest releases
#                                    allowed) in a scratch venv; then run the tests before committing it
#
# Why a constraints file: setup.py keeps honest ranges so para-train installs into a user's own
# environment; constraints.txt pins every package of the tested environment (pip included), so pip
# resolves it without backtracking and every machine gets the same stack. It is plain pip
# (`pip install -c constraints.txt -e .` does the same as this script, only slower, see below).
#
# Why not plain `pip install`: pip byte-compiles the ~40,000 modules of the stack one after another
# (about 3 of the 5 minutes on 2 cores). This script installs with --no-compile and then compiles
# on every core; compiling up front matters where PYTHONDONTWRITEBYTECODE is set, since then every
# process would compile everything it imports from source at start-up.
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
LOCK=constraints.txt
say() { printf '[install.sh] %s\n' "$*"; }

compile_site_packages() {
  # Byte-compile the environment's packages and this checkout on all cores, with progress.
  "$PYTHON" - "$@" <<'EOF'
import compileall, os, sys, sysconfig, time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

roots = {sysconfig.get_path("purelib"), sysconfig.get_path("platlib"), *sys.argv[1:]}
files = [str(p) for root in sorted(roots) for p in Path(root).rglob("*.py")]
workers = os.cpu_count() or 1
print(f"[install.sh] byte-compiling {len(files):,} modules on {workers} cores", flush=True)
start, done, failed, shown = time.monotonic(), 0, 0, 0
with ProcessPoolExecutor(workers) as pool:
    for ok in pool.map(compileall.compile_file, files, [None] * len(files), [False] * len(files),
                       [None] * len(files), [2] * len(files), chunksize=64):
        done += 1
        failed += not ok  # test fixtures and templates that are not Python 3 (pip skips them too)
        if done * 10 // len(files) > shown:
            shown = done * 10 // len(files)
            print(f"[install.sh]   {shown * 10:3d}%  {time.monotonic() - start:5.0f} s", flush=True)
print(f"[install.sh] compiled {done - failed:,} modules ({failed} not Python 3, skipped)", flush=True)
EOF
}

install() {
  local target=$1
  say "1/4 pip from $LOCK"
  "$PYTHON" -m pip install -q -c "$LOCK" pip
  say "2/4 $target and its pinned dependencies (about 7 GB with torch's CUDA build; 2 minutes here)"
  "$PYTHON" -m pip install --no-compile -c "$LOCK" -e "$target"
  say "3/4 byte-compile"
  compile_site_packages para_train kernels tests benchmarks
  say "4/4 pip check"
  "$PYTHON" -m pip check
  say "done: $("$PYTHON" -m pip --version | cut -d' ' -f1-2), para-train $("$PYTHON" -c 'import importlib.metadata as m; print(m.version("para-train"))')"
}

refresh_lock() {
  local out=${1:-$LOCK} scratch
  scratch=$(mktemp -d)
  trap 'rm -rf "$scratch"' RETURN
  say "resolving setup.py's ranges (newest releases allowed) in a scratch venv; pip may backtrack for minutes"
  "$PYTHON" -m venv "$scratch/venv"
  "$scratch/venv/bin/python" -m pip install -q --upgrade pip
  "$scratch/venv/bin/python" -m pip install --no-compile -e ".[dev]"
  "$scratch/venv/bin/python" -m pip check
  {
    echo "# The exact environment para-train's test suite passes with. \`bash install.sh\`, the README's commands and"
    echo "# .ci/run install from it. Made by \`bash install.sh --refresh-lock\` on $(date -u +%Y-%m-%d) with"
    echo "# $("$scratch/venv/bin/python" -V) on $(uname -sm): the newest releases setup.py's ranges allowed that day."
    echo "# Run the tests before committing a refreshed lock."
    "$scratch/venv/bin/python" -m pip freeze --all --exclude-editable | grep -v '^para-train'
  } > "$out.new"
  mv "$out.new" "$out"
  say "wrote $out ($(grep -vc '^#' "$out") packages); review \`git diff $out\`, then run the tests"
}

case "${1:-}" in
  "") install . ;;
  --dev) install ".[dev]" ;;
  --refresh-lock) refresh_lock "${2:-}" ;;
  *) echo "usage: bash install.sh [--dev | --refresh-lock [OUT]]" >&2; exit 2 ;;
esac
