#!/usr/bin/env bash
# The GPU check: every GPU figure docs/RESULTS.md is missing, in one run of under 8 minutes
# (step time, MFU and peak memory of supervised / unimatch / uccl at the Pascal setting in
# float32 and bfloat16, the uccl-over-unimatch overhead with both anchor modes, the training
# loop's device idle fraction, bf16 training against float32 on the demo). What each part
# measures, and its share of the time: uccl_jax/benchmark/gpu_check.py.
#
# Usage (from anywhere):
#   launch/gpu_check.sh [--parts=float32,bfloat16,bf16_training,input,pasted] [--smoke]
#                       [--budget_s=465] [--methods=supervised,unimatch,uccl] [--out=DIR]
# Output: --out, else $GPU_CHECK_OUT, else $OUT (set on a lent device machine: its files come
# back), else <repo>/runs/gpu_check; three files: gpu_check.json, summary.txt, log.txt.
# Environment:
#   PYTHON                      interpreter (default: python3)
#   JAX_COMPILATION_CACHE_DIR   compiled programs (default: .cache/jax_gpu_check); a second run on
#                               the same machine reuses them, so a cut-off run finishes quickly
#                               with --parts=<the parts the summary lists as missing>
# A machine that cannot reach a package index: put wheels of the missing packages in .whl/;
# they are installed into a temporary folder (no dependencies resolved) before the check.
# Exit status: the check's (0: every part done and the bf16 check passed; 1: not; 2: bad flag or
# missing package).
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
python_bin=${PYTHON:-python3}
args=("$@")
if [[ " $* " != *" --out="* ]]; then
  args=(--out="${GPU_CHECK_OUT:-${OUT:-$repo/runs/gpu_check}}" "${args[@]}")
fi

if compgen -G "$repo/.whl/*.whl" > /dev/null; then
  site=$(mktemp -d)
  "$python_bin" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" \
    "$repo"/.whl/*.whl
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"

missing=$("$python_bin" -c '
import importlib
names = ("jax", "flax", "optax", "orbax.checkpoint", "grain", "ml_collections", "tensorboardX",
         "cv2", "PIL", "absl", "tqdm")
failed = []
for name in names:
  try:
    importlib.import_module(name)
  except Exception as error:  # ImportError, or a dependency of the package missing
    failed.append(f"{name} ({type(error).__name__}: {error})")
print("; ".join(failed))' 2>/dev/null)
if [[ -n "$missing" ]]; then
  echo "error: missing Python packages: $missing (install them, or put their wheels in .whl/)" >&2
  exit 2
fi

export PYTHONUNBUFFERED=1
exec "$python_bin" -m uccl_jax.benchmark gpu_check "${args[@]}"
