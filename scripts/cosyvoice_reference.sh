#!/usr/bin/env bash
# Build the CosyVoice2 *reference* venv used by parity tests (random weights only).
#
# Idempotent: re-running re-installs the pins (pip skips what is already there),
# rewrites the stubs and re-runs the smoke check. Everything lives in
# /work/main/.cosyvoice_ref (git-ignored); nothing touches the project package.
#
# Why a scratch venv: the reference (PyPI cosyvoice-minicpmo, upstream's CosyVoice2-era
# code) drags in CUDA torchaudio, whisper, lightning, hydra... We reuse the project's
# torch/transformers through a .pth file and install only the pure-Python pins below
# with --no-deps (see /work/shared/COSYVOICE.md for the traps these pins avoid).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
REF="${COSYVOICE_REF:-$ROOT/.cosyvoice_ref}"
PROJECT_PY="$ROOT/.venv/bin/python"

die() { echo "cosyvoice_reference.sh: ERROR: $*" >&2; exit 1; }
say() { echo "[cosyvoice-ref] $*"; }

[ -x "$PROJECT_PY" ] || die "project venv not found at $ROOT/.venv (create it first)"

# The project venv's site-packages, computed (not hard-coded to a python version).
PROJECT_SITE="$("$PROJECT_PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" \
  || die "cannot ask the project venv for its site-packages"
[ -d "$PROJECT_SITE/torch" ] || die "torch not found in $PROJECT_SITE"
say "project site-packages: $PROJECT_SITE"

# 1. The scratch venv, made from the same base interpreter as the project venv
#    (so compiled wheels in the project site-packages match its ABI).
if [ ! -x "$REF/bin/python" ]; then
  say "creating venv $REF"
  "$PROJECT_PY" -m venv "$REF" || die "python -m venv failed"
else
  say "venv $REF exists, reusing it"
fi
PY="$REF/bin/python"
REF_SITE="$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"

# 2. Reuse torch / transformers / numpy / onnx... from the project venv.
#    The .pth appends the project site-packages AFTER ours, so our pins win.
echo "$PROJECT_SITE" > "$REF_SITE/zz_edge_runtime_project_venv.pth"
say "wrote $REF_SITE/zz_edge_runtime_project_venv.pth -> $PROJECT_SITE"

# 3. The pins, exactly as COSYVOICE.md lists them, without their dependency trees.
PINS=(
  cosyvoice-minicpmo==0.1.0 hyperpyyaml==1.2.3 ruamel.yaml==0.18.10 ruamel.yaml.clib
  omegaconf==2.3.0 antlr4-python3-runtime==4.9.3 x-transformers==2.11.24 einx loguru
  frozendict conformer==0.3.2 diffusers==0.29.0 requests urllib3 idna certifi charset-normalizer
)
say "pip install --no-deps ${PINS[*]}"
"$PY" -m pip install --disable-pip-version-check -q --no-deps "${PINS[@]}" \
  || die "pip install of the reference pins failed (network to PyPI?)"

# 4. Stubs, scratch venv only.
#  a) matcha.utils.__init__ imports hydra/lightning/rich; the reference only needs
#     matcha.utils.pylogger etc. as submodules, so the package init becomes empty.
MATCHA_UTILS="$REF_SITE/matcha/utils/__init__.py"
[ -f "$MATCHA_UTILS" ] || die "matcha/utils/__init__.py missing after install"
if [ -s "$MATCHA_UTILS" ]; then
  cp "$MATCHA_UTILS" "$MATCHA_UTILS.orig"
  : > "$MATCHA_UTILS"
  say "emptied matcha/utils/__init__.py (original kept as __init__.py.orig)"
fi
#     matcha.utils.pylogger (used by the CFM base class) imports lightning only for a
#     rank-zero decorator: a plain logging.getLogger does the same on one process.
PYLOGGER="$REF_SITE/matcha/utils/pylogger.py"
if grep -q "^from lightning" "$PYLOGGER"; then
  cp "$PYLOGGER" "$PYLOGGER.orig"
  cat > "$PYLOGGER" <<'EOF'
# Replaced by scripts/cosyvoice_reference.sh: no lightning in the reference venv.
import logging


def get_pylogger(name: str = __name__) -> logging.Logger:
    return logging.getLogger(name)
EOF
  say "replaced matcha/utils/pylogger.py with a lightning-free logger (original kept as .orig)"
fi
#  b) torchaudio: the PyPI build is CUDA-only here, and the model path imports it only
#     via cosyvoice.utils.file_utils (Kaldi fbank / wav loading, unused with random
#     weights). sitecustomize puts a stub in sys.modules unless a real one imports.
cat > "$REF_SITE/sitecustomize.py" <<'EOF'
"""Scratch-venv-only shims for the CosyVoice2 reference (written by scripts/cosyvoice_reference.sh)."""
import importlib.machinery
import sys
import types


def _stub_torchaudio():
    try:  # a working torchaudio wins
        import torchaudio  # noqa: F401
        return
    except Exception:
        for name in [m for m in sys.modules if m == "torchaudio" or m.startswith("torchaudio.")]:
            del sys.modules[name]

    def _missing(*_a, **_k):
        raise RuntimeError("torchaudio is stubbed in the CosyVoice reference venv")

    def _mod(name, pkg=True):
        # a __spec__ keeps importlib.util.find_spec (used by transformers) happy; no
        # dist-info exists, so transformers still reports torchaudio as unavailable
        m = types.ModuleType(name)
        m.__spec__ = importlib.machinery.ModuleSpec(name, None, is_package=pkg)
        if pkg:
            m.__path__ = []
        return m

    ta = _mod("torchaudio")
    ta.__cosyvoice_stub__ = True
    ta.load = ta.save = ta.info = _missing
    comp = _mod("torchaudio.compliance")
    kaldi = _mod("torchaudio.compliance.kaldi", pkg=False)
    kaldi.fbank = _missing
    transforms = _mod("torchaudio.transforms", pkg=False)
    transforms.Resample = _missing
    comp.kaldi = kaldi
    ta.compliance, ta.transforms = comp, transforms
    sys.modules.update({
        "torchaudio": ta, "torchaudio.compliance": comp,
        "torchaudio.compliance.kaldi": kaldi, "torchaudio.transforms": transforms,
    })


_stub_torchaudio()
EOF
say "wrote $REF_SITE/sitecustomize.py (torchaudio stub)"

# 5. Smoke check: the three reference classes import and construct (tiny dims).
say "smoke import/construct"
"$PY" "$ROOT/scripts/cosyvoice_testmodel.py" --smoke || die "smoke check failed (see above)"
say "OK: reference venv ready at $REF (python: $PY)"
