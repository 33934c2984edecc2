#!/usr/bin/env bash
# The install route of a user with the source archive: sdist -> unpack -> compile a wheel -> install it,
# then check the installation from outside the source tree (tests/install/check_installed.py).
#
#   tests/install/build_from_sdist.sh PYTHON WORKDIR target|venv [--cuda]
#
# PYTHON   the interpreter whose torch the extension compiles against (no build isolation, as the README says)
# WORKDIR  scratch folder, emptied first: dist/ (the sdist), src/ (unpacked), wheel/, site/
# target   install the wheel into WORKDIR/site (pip --target), leaving PYTHON's environment untouched
# venv     install the wheel into PYTHON's own environment (replacing any ptm_kernels there)
# --cuda   build with PTM_KERNELS_BUILD_CUDA=1 and require ptm_kernels._C.cuda to be complete
#
# Compiling the extension takes minutes on 2 cores; it runs under `nice` so that it yields to other work.
set -euo pipefail

python=$(cd "$(dirname "$1")" && pwd)/$(basename "$1")  # absolute, not resolved: a venv's python is a symlink
work=$2
install=$3
cuda=${4:-}
repo=$(cd "$(dirname "$0")/../.." && pwd)
case $install in target|venv) ;; *) echo "third argument: target or venv, got '$install'" >&2; exit 2 ;; esac

rm -rf "$work"
mkdir -p "$work/dist" "$work/src" "$work/wheel"
work=$(realpath "$work")
export MAX_JOBS=${MAX_JOBS:-2}
export PATH="$(dirname "$python"):$PATH"  # the environment's own tools (ninja), as if it were activated
if [ "$cuda" = "--cuda" ]; then export PTM_KERNELS_BUILD_CUDA=1; else export PTM_KERNELS_BUILD_CUDA=0; fi

step() { printf '\n== %s (%s)\n' "$1" "$(date -u +%T)"; }

step "sdist"
(cd "$repo" && "$python" -m build --sdist --no-isolation --outdir "$work/dist" . > "$work/sdist.log" 2>&1) \
    || { tail -30 "$work/sdist.log"; exit 1; }
tar -xzf "$work"/dist/*.tar.gz -C "$work/src"
src=$(echo "$work"/src/*/)

step "wheel from the unpacked sdist (PTM_KERNELS_BUILD_CUDA=$PTM_KERNELS_BUILD_CUDA, MAX_JOBS=$MAX_JOBS)"
(cd "$src" && nice -n 10 "$python" -m pip wheel -v --no-build-isolation --no-deps -w "$work/wheel" . \
    > "$work/wheel.log" 2>&1) || { tail -40 "$work/wheel.log"; exit 1; }
grep -h "ptm_kernels setup:" "$work/wheel.log" || true
wheel=$(echo "$work"/wheel/*.whl)
echo "$(basename "$wheel") ($(du -h "$wheel" | cut -f1))"

step "install ($install)"
if [ "$install" = target ]; then
    "$python" -m pip install -q --no-deps --target "$work/site" "$wheel"
    export PYTHONPATH="$work/site"
else
    "$python" -m pip install -q --no-deps --force-reinstall "$wheel"
fi

step "check the installation from $work"
cd "$work"
"$python" "$repo/tests/install/check_installed.py" --source "$src" $cuda
