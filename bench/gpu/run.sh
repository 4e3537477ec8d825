#!/usr/bin/env bash
# The GPU proof kit's one command, on a GPU machine with no network, from the repository root:
#     bash bench/gpu/run.sh [--device cuda|cpu] [more bench/gpu/kit.py options]
# Makes two venvs that see the machine's own torch, transformers, ... (--system-site-packages) and
# installs the carried wheels (bench/gpu/pack.py made them) with no index and no dependency
# resolution: builder/ (compressed-tensors 0.17, hydra, jsonschema) and llmc/ (llm-compressor 0.14,
# compressed-tensors 0.19, datasets). Then runs bench/gpu/kit.py with the builder's venv, handing it
# llm-compressor's python, and prints its table. Environment: PYTHON (default: python3 or python,
# whichever imports torch), WHEELS (default bench/gpu/wheels), VENVS (default a fresh temporary
# folder, removed at the end unless KEEP_VENVS is set).
set -euo pipefail
cd "$(dirname "$0")/../.."
if [ -z "${PYTHON:-}" ]; then  # the machine's python: the first that imports torch
    for PYTHON in python3 python; do "$PYTHON" -c 'import torch' 2>/dev/null && break; done
fi
WHEELS=${WHEELS:-bench/gpu/wheels}
VENVS=${VENVS:-$(mktemp -d /tmp/gpu-kit-venvs.XXXXXX)}
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1
start=$(date +%s)
"$PYTHON" -c 'import sys, torch; print(f"python {sys.version.split()[0]}, torch {torch.__version__}, "
                                     f"CUDA {torch.cuda.is_available()}")'
for set in builder llmc; do
    if ! ls "$WHEELS/$set"/*.whl >/dev/null 2>&1; then
        echo "no wheels in $WHEELS/$set: run python bench/gpu/pack.py where there is a network" >&2
        exit 2
    fi
    "$PYTHON" -m venv --system-site-packages "$VENVS/$set"
    # and the site-packages of $PYTHON itself, after the venv's own: --system-site-packages alone
    # reaches only the base interpreter's when the machine's python is itself a venv
    "$PYTHON" -c 'import site; print("\n".join(site.getsitepackages() + [site.getusersitepackages()]))' \
        > "$("$VENVS/$set/bin/python" -c 'import sysconfig; print(sysconfig.get_path("purelib"))')/machine.pth"
    "$VENVS/$set/bin/python" -m pip install --quiet --no-index --no-deps "$WHEELS/$set"/*.whl
done
echo "venvs ready in $(( $(date +%s) - start )) s"
status=0
"$VENVS/builder/bin/python" bench/gpu/kit.py --llmc "$VENVS/llmc/bin/python" "$@" || status=$?
[ -n "${KEEP_VENVS:-}" ] || rm -rf "$VENVS"
echo "kit: exit $status, $(( $(date +%s) - start )) s in all"
exit $status
