#!/usr/bin/env bash
# Python environment for this repo: PyTorch, then requirements.txt, requirements-extra.txt (optional
# packages the tests use) and requirements-dev.txt (pytest, the linters), in .venv (or the active virtualenv).
#
#   ./setup_amd.sh             ROCm PyTorch from the PyTorch ROCm wheel index (AMD GPUs)
#   ./setup_amd.sh --gfx942    the same, plus a GPU architecture override (see below; rarely needed)
#   ./setup_amd.sh --cpu       CPU-only PyTorch from the default package index (no GPU, no PyTorch index)
#
# --gfxNNN makes the venv's Python see HSA_OVERRIDE_GFX_VERSION (gfx942 -> 9.4.2): the ROCm runtime then
# treats the GPU as that architecture and runs the kernels the wheel ships for it. Needed only when your GPU's
# own architecture is missing from the wheel (rocminfo | grep gfx, then compare with
# python -c "import torch; print(torch.cuda.get_arch_list())"); "invalid device function" or "no kernel image"
# errors are the symptom. It also sets PYTORCH_ROCM_ARCH=gfxNNN, the target when compiling extensions
# (e.g. flash-attention). Both go into .venv/bin/activate and into a startup file in site-packages, so that
# ./.venv/bin/python and torchrun see them without activation; a value already in the environment wins.
# Each run sets the venv up as its own flags say: run it without --gfxNNN to drop an earlier override.
# Running it again is fast: what is already installed is kept.
set -euo pipefail

ROCM_VERSION=7.1           # PyTorch ROCm wheel index: https://download.pytorch.org/whl/rocm${ROCM_VERSION}
TORCH_VERSION=2.13.0       # the version tested; pick a ROCm version the PyTorch install page lists for it
CPU_INDEX_URL=""           # --cpu: empty = the default index; where that serves CUDA builds (PyPI on Linux),
                           # set https://download.pytorch.org/whl/cpu
PYTHON=${PYTHON:-python3}  # the interpreter that creates .venv (3.10 or newer)

mode=rocm gfx=""
for arg in "$@"; do
  case "$arg" in
    --cpu) mode=cpu ;;
    --gfx[0-9]*) gfx=${arg#--} ;;
    -h|--help) sed -n '2,/^set /s/^# \{0,1\}//p' "$0"; exit 0 ;;
    *) echo "setup_amd.sh: unknown option $arg; use --cpu, --gfxNNN (e.g. --gfx942) or --help" >&2; exit 2 ;;
  esac
done
if [[ $mode == cpu && -n $gfx ]]; then
  echo "setup_amd.sh: --$gfx is a ROCm override; drop --cpu or --$gfx" >&2; exit 2
fi
if [[ -n $gfx && ! $gfx =~ ^gfx[0-9a-f]{3,4}$ ]]; then
  echo "setup_amd.sh: --$gfx is not an architecture name like gfx942, gfx90a or gfx1100" >&2; exit 2
fi

cd "$(dirname "$0")"
venv=${VIRTUAL_ENV:-$PWD/.venv}
if [[ ! -x $venv/bin/python ]]; then
  "$PYTHON" -c 'import sys; assert sys.version_info >= (3, 10), sys.version' 2>/dev/null || {
    echo "setup_amd.sh: $PYTHON is missing or older than 3.10; set PYTHON=/path/to/python3.10+" >&2; exit 1; }
  echo "creating $venv"
  "$PYTHON" -m venv "$venv"
fi
py=$venv/bin/python
pip=("$py" -m pip install --disable-pip-version-check)

# PyTorch: kept when the installed one is this version and kind (a ROCm build, or one with neither ROCm nor CUDA)
if [[ $mode == cpu ]]; then want='not (torch.version.hip or torch.version.cuda)'; else want='torch.version.hip'; fi
if "$py" -c "import torch, sys; sys.exit(not (torch.__version__.split('+')[0] == '$TORCH_VERSION' and $want))" \
    2>/dev/null; then
  echo "torch $TORCH_VERSION ($mode) already installed"
else
  if [[ $mode == rocm ]]; then  # the +rocm label: a torch of another kind does not satisfy it
    index=https://download.pytorch.org/whl/rocm$ROCM_VERSION
    "${pip[@]}" "torch==$TORCH_VERSION+rocm$ROCM_VERSION" --index-url "$index" || {
      echo "setup_amd.sh: could not install torch $TORCH_VERSION+rocm$ROCM_VERSION from $index; set ROCM_VERSION and" \
           "TORCH_VERSION at the top of setup_amd.sh to a pair https://pytorch.org/get-started/locally/ lists" >&2
      exit 1; }
  else
    index=(); [[ -n $CPU_INDEX_URL ]] && index=(--index-url "$CPU_INDEX_URL")
    "$py" -m pip uninstall --yes --quiet torch 2>/dev/null || true  # a ROCm torch 2.13.0 would satisfy torch==2.13.0
    # never a CUDA build: ask pip what it would install before it downloads gigabytes
    plan=$("${pip[@]}" "torch==$TORCH_VERSION" ${index[@]+"${index[@]}"} --dry-run --quiet --report -)
    if grep -q '"name": "nvidia-' <<<"$plan"; then
      echo "setup_amd.sh: the package index offers a CUDA build of torch $TORCH_VERSION; set" \
           "CPU_INDEX_URL=https://download.pytorch.org/whl/cpu at the top of setup_amd.sh" >&2; exit 1
    fi
    "${pip[@]}" "torch==$TORCH_VERSION" ${index[@]+"${index[@]}"}
  fi
fi
"${pip[@]}" --quiet -r requirements.txt -r requirements-extra.txt -r requirements-dev.txt

# the --gfxNNN override, rewritten on every run (removed when no --gfxNNN is given)
site=$("$py" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
sed -i '/# setup_amd.sh gfx override/d' "$venv/bin/activate"
rm -f "$site/setup_amd_gfx.pth"
if [[ -n $gfx ]]; then
  arch=${gfx#gfx}  # major, then one hex digit each for minor and stepping: gfx942 -> 9.4.2, gfx90a -> 9.0.10
  hsa="$((10#${arch:0:-2})).$((16#${arch: -2:1})).$((16#${arch: -1}))"
  for var in "HSA_OVERRIDE_GFX_VERSION=$hsa" "PYTORCH_ROCM_ARCH=$gfx"; do
    echo "export ${var%%=*}=\"\${${var%%=*}:-${var#*=}}\"  # setup_amd.sh gfx override" >>"$venv/bin/activate"
  done
  echo "import os; os.environ.setdefault('HSA_OVERRIDE_GFX_VERSION', '$hsa');" \
       "os.environ.setdefault('PYTORCH_ROCM_ARCH', '$gfx')" >"$site/setup_amd_gfx.pth"
  echo "override: HSA_OVERRIDE_GFX_VERSION=$hsa PYTORCH_ROCM_ARCH=$gfx" \
       "(in $venv/bin/activate and $site/setup_amd_gfx.pth)"
fi

"$py" - <<'EOF'
import os
import torch
print(f"torch {torch.__version__}  hip {torch.version.hip}  cuda {torch.version.cuda}  "
      f"HSA_OVERRIDE_GFX_VERSION={os.environ.get('HSA_OVERRIDE_GFX_VERSION')}")
n = torch.cuda.device_count()
print("devices: cpu" + "".join(f", cuda:{i} {torch.cuda.get_device_name(i)}" for i in range(n)))
EOF
echo "ready: $py"
