#!/usr/bin/env bash
# Fill .gpu-deps/ with the pure-Python packages that a bare GPU machine (torch and CuPy, no
# network) lacks, copied from the project's venv: .gpu-deps/site (SpikingJelly 2.x, snnTorch and
# what they import: loguru, nir, nirtorch) and .gpu-deps/sj-0.0.0.0.14 (the legacy line).
# tools/gpu_check.sh puts them on PYTHONPATH. About 9 MB; git ignores the folder.
#
#   bash tools/gpu_deps.sh                 # or: make gpu-deps
#   PY=/path/to/venv/bin/python bash tools/gpu_deps.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
DEST=${1:-.gpu-deps}
SITE=$("$PY" -c 'import os, snntorch; print(os.path.dirname(os.path.dirname(snntorch.__file__)))')
LEGACY=${SJ_LEGACY:-$(dirname "$(dirname "$PY")")/sj-0.0.0.0.14}
rm -rf "$DEST"
mkdir -p "$DEST/site"
for package in spikingjelly snntorch loguru nir nirtorch; do
    cp -r "$SITE/$package" "$SITE/$package"-*.dist-info "$DEST/site/"
done
if [ -d "$LEGACY/spikingjelly" ]; then
    cp -r "$LEGACY" "$DEST/sj-0.0.0.0.14"
else
    echo "note: no legacy SpikingJelly at $LEGACY (make .venv/sj-0.0.0.0.14/spikingjelly/__init__.py)"
fi
find "$DEST" -name __pycache__ -prune -exec rm -rf {} +
du -sh "$DEST"
