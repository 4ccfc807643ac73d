#!/usr/bin/env bash
# Fetches Intel oneMKL's runtime libraries from PyPI (the `mkl` wheel, Intel Simplified
# Software License) into a cache folder and prints that folder: point LLMTUNE_MKL at it and
# llmtune's CPU linear products (f32, and bf16 with --dtype bf16 / bf16 compute) run through
# MKL (see crates/llmtune-ops/src/blas.rs). Nothing is linked at build time.
#
#   export LLMTUNE_MKL=$(scripts/setup_mkl.sh)
#
# Environment:
#   LLMTUNE_MKL_DIR   where to put the libraries (default ~/.cache/llmtune/mkl)
#   MKL_VERSION       the wheel's version (default 2026.2.0)
set -euo pipefail
dest=${LLMTUNE_MKL_DIR:-$HOME/.cache/llmtune/mkl}
ver=${MKL_VERSION:-2026.2.0}
# Written last: a folder from an interrupted or older fetch is fetched again.
marker="$dest/.complete-$ver-2"
if [[ -f "$marker" ]]; then
  echo "$dest"
  exit 0
fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
python3 -m pip download --quiet --no-deps --only-binary=:all: \
  --platform manylinux_2_28_x86_64 --python-version 3.12 "mkl==$ver" -d "$tmp" >&2
whl=$(ls "$tmp"/mkl-*.whl)
mkdir -p "$dest.part"
# libmkl_rt dispatches to the interface layer (lp64), the core, the threading layer and the
# CPU's kernel library, which it opens from its own folder: keep those (about 470 MB), not the
# ScaLAPACK/MPI/VML parts.
python3 - "$whl" "$dest.part" <<'PY'
import os, re, sys, zipfile
whl, out = sys.argv[1], sys.argv[2]
keep = re.compile(r"/lib/(libmkl_(rt|core|intel_lp64|gnu_thread|sequential|def|mc3|avx2|avx512|avx10)\.so\.\d+)$")
with zipfile.ZipFile(whl) as z:
    for n in z.namelist():
        m = keep.search(n)
        if m:
            with z.open(n) as src, open(os.path.join(out, m.group(1)), "wb") as dst:
                dst.write(src.read())
        elif n.endswith("LICENSE.txt"):
            with z.open(n) as src, open(os.path.join(out, "LICENSE.txt"), "wb") as dst:
                dst.write(src.read())
PY
touch "$dest.part/.complete-$ver-2"
rm -rf "$dest"
mv "$dest.part" "$dest"
echo "$dest"
