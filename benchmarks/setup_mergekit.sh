#!/usr/bin/env bash
# Create benchmarks/.venv-mergekit: a venv holding mergekit==0.1.5 and the CPU wheel
# torch==2.13.0, kept apart from soupkit's dev venv so the two tools never share packages.
#
# Usage:  bash benchmarks/setup_mergekit.sh            # create (or reuse) the venv
#         FORCE=1 bash benchmarks/setup_mergekit.sh    # delete and recreate it
#         PYTHON=python3.11 bash benchmarks/setup_mergekit.sh
#
# Order matters: torch is installed first (pip resolves torch==2.13.0 to the CPU wheel on
# this machine), then mergekit with a constraints file pinning torch==2.13.0, so that
# mergekit's dependency resolution can never swap in another (CUDA) torch build.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VENV="${HERE}/.venv-mergekit"
PYTHON="${PYTHON:-python3}"
TORCH_VERSION="2.13.0"
MERGEKIT_VERSION="0.1.5"

if [[ "${FORCE:-0}" == "1" && -d "${VENV}" ]]; then
    echo "removing ${VENV}"
    rm -rf "${VENV}"
fi

if [[ ! -x "${VENV}/bin/python" ]]; then
    echo "creating ${VENV} with $(${PYTHON} --version)"
    "${PYTHON}" -m venv "${VENV}"
fi

PIP=("${VENV}/bin/python" -m pip)

# Every package of the venv is pinned (pip freeze of a working install, torch included), so
# the reference mergekit stack is the same on every machine.
CONSTRAINTS="${HERE}/mergekit-constraints.txt"

echo "== installing torch==${TORCH_VERSION} (CPU wheel) first"
"${PIP[@]}" install -q --disable-pip-version-check "torch==${TORCH_VERSION}"

echo "== installing mergekit==${MERGEKIT_VERSION} with torch pinned by ${CONSTRAINTS}"
if ! "${PIP[@]}" install -q --disable-pip-version-check -c "${CONSTRAINTS}" "mergekit==${MERGEKIT_VERSION}"; then
    # mergekit pins its own torch range; if it excludes our torch, install mergekit without
    # dependencies and then its requirements minus torch (torch stays the CPU wheel above).
    echo "== mergekit==${MERGEKIT_VERSION} does not accept torch==${TORCH_VERSION}; installing with --no-deps"
    "${PIP[@]}" install --no-deps "mergekit==${MERGEKIT_VERSION}"
    REQS="$(mktemp)"
    "${VENV}/bin/python" - "${REQS}" <<'PY'
import sys
from importlib.metadata import requires

reqs = [r for r in (requires("mergekit") or []) if "extra ==" not in r]
reqs = [r for r in reqs if not r.replace(" ", "").lower().startswith("torch")]
with open(sys.argv[1], "w") as fh:
    fh.write("\n".join(reqs) + "\n")
print("mergekit requirements (torch excluded):", *reqs, sep="\n  ")
PY
    "${PIP[@]}" install -c "${CONSTRAINTS}" -r "${REQS}"
    rm -f "${REQS}"
fi

echo "== verifying"
"${VENV}/bin/python" - <<PY
import torch, mergekit
from importlib.metadata import version
assert torch.__version__.startswith("${TORCH_VERSION}"), f"torch {torch.__version__} != ${TORCH_VERSION}"
assert not torch.cuda.is_available() or True
print("torch", torch.__version__, "cuda build:", torch.version.cuda)
print("mergekit", version("mergekit"))
PY
"${VENV}/bin/mergekit-yaml" --help > /dev/null
echo "ok: ${VENV}/bin/mergekit-yaml works"
touch "${VENV}/.installed"
