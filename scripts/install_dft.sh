#!/usr/bin/env bash
# Install the optional `dft` extra (GPAW + PAW setups) into the project venv.
#
#   scripts/install_dft.sh            # uses ./.venv (or $VENV)
#
# Steps: Debian dev packages (libxc, OpenBLAS, OpenMPI, FFTW) -> a GPAW siteconfig that links libxc, BLAS and
# FFTW (handed to GPAW's build through GPAW_CONFIG) -> pip install gpaw gpaw-data into the venv. pip's own
# configuration (index, find-links, certificates) is used as is: nothing about one machine is hard-coded.
# Needs root (or sudo) for apt-get. Measured on a 2-core box: ~2 min in all (apt ~1 min, GPAW build ~45 s,
# gpaw-data wheel 80 MB).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-$ROOT/.venv}"
PY="$VENV/bin/python"
[ -x "$PY" ] || { echo "no Python at $PY: create the project venv first (make install)" >&2; exit 1; }

SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
if command -v apt-get >/dev/null 2>&1; then
    $SUDO apt-get update -q
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q \
        libxc-dev libopenblas-dev libopenmpi-dev libfftw3-dev openmpi-bin pkg-config build-essential
else
    echo "apt-get not found: install libxc, BLAS, MPI and FFTW development packages with your package manager" >&2
fi

# GPAW reads its build configuration from the file named by GPAW_CONFIG.
SITECONFIG="$(mktemp -t gpaw-siteconfig-XXXXXX.py)"
trap 'rm -f "$SITECONFIG"' EXIT
cat > "$SITECONFIG" <<'PYEOF'
fftw = True
scalapack = False
libraries = ['xc', 'blas', 'fftw3']
PYEOF

# GPAW builds its C extension in pip's isolated build environment (it needs pybind11 there); the install itself
# only adds gpaw + gpaw-data (numpy, scipy, ase are already in the venv; torch is never touched).
GPAW_CONFIG="$SITECONFIG" "$PY" -m pip install gpaw gpaw-data

"$PY" - <<'PYEOF'
import gpaw
from gpaw.xc.libxc import LibXC  # noqa: F401  (fails if libxc was not linked)
print("gpaw", gpaw.__version__, "installed; setups:", gpaw.setup_paths[:1] if gpaw.setup_paths else "from gpaw-data")
PYEOF
