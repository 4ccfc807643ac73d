#!/usr/bin/env bash
# Makes a copy of candle-kernels 0.11.1 that builds only candle's PTX kernels, for
#   cargo --config 'patch.crates-io.candle-kernels.path="DIR"' build --features cuda ...
# (used by scripts/build_gpu_bundle.sh unless FULL_KERNELS=1).
#
#   bash scripts/candle_kernels_ptx_only.sh DIR
#
# Why: upstream's build.rs also compiles the GGUF MoE/MMQ/MMVQ kernels (15 .cu files, about
# 9 minutes EACH on 2 cores for sm_90a) into a static libmoe.a, which puts ~4 MB of machine
# code per file into every executable and links libcudart. llmtune never runs them: GGUF
# weights are dequantized on the CPU at load (llmtune-models/src/gguf.rs) and no model uses
# candle's QMatMul or MoE ops. Here those 50 `extern "C"` launchers of src/ffi.rs are defined
# in Rust as stubs that abort with a message if ever called, and nothing else changes: the
# PTX kernels (affine, binary, cast, conv, fill, indexing, quantized, reduce, sort, ternary,
# unary) are built exactly as upstream does.
set -euo pipefail
DIR=${1:?usage: candle_kernels_ptx_only.sh DIR}
SRC=$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/candle-kernels-0.11.1 2>/dev/null | head -1)
if [[ -z $SRC ]]; then
  echo "candle-kernels-0.11.1 not in the cargo registry: run 'cargo fetch' first" >&2
  exit 1
fi
# Built in a scratch copy and moved into place only when it differs from DIR, so that an
# unchanged DIR keeps its timestamps (no rebuild of candle-core and everything above it).
FINAL=$DIR
DIR=$(mktemp -d)
trap 'rm -rf "$DIR"' EXIT
cp -r "$SRC"/. "$DIR"/
chmod -R u+w "$DIR"
rm -rf "$DIR/src/moe" "$DIR/src/mmq_gguf" "$DIR/src/mmvq_gguf.cu"

cat >"$DIR/build.rs" <<'EOF'
// candle-kernels 0.11.1 build.rs, PTX part only (see llmtune scripts/candle_kernels_ptx_only.sh).
use cudaforge::{KernelBuilder, Result};
use std::env;
use std::path::PathBuf;

fn main() -> Result<()> {
    println!("cargo::rerun-if-changed=build.rs");
    println!("cargo::rerun-if-changed=src");
    let out_dir = PathBuf::from(env::var("OUT_DIR").unwrap());
    let bindings = KernelBuilder::new()
        .source_dir("src")
        .exclude(&["moe_*.cu", "mmvq_gguf.cu", "mmq_*.cu"])
        .arg("--expt-relaxed-constexpr")
        .arg("-std=c++17")
        .arg("-O3")
        .build_ptx()?;
    bindings.write(out_dir.join("ptx.rs"))?;
    Ok(())
}
EOF

python3 - "$DIR/src/ffi.rs" "$DIR/src/lib.rs" "$DIR/src/ffi_stubs.rs" <<'EOF'
import re, sys
ffi, lib, out = sys.argv[1:4]
names = sorted(set(re.findall(r"\bpub fn (\w+)\s*\(", open(ffi).read())))
assert len(names) >= 40, names
with open(out, "w") as f:
    f.write("//! Stubs for the GGUF MoE/MMQ/MMVQ launchers that this PTX-only build does not compile\n")
    f.write("//! (llmtune never calls them). Each aborts with its name if it is ever reached.\n\n")
    f.write("#[cold]\nfn not_built(name: &str) -> ! {\n")
    f.write('    eprintln!("candle-kernels: `{name}` is not in this PTX-only build (GGUF/MoE CUDA kernels)");\n')
    f.write("    std::process::abort()\n}\n")
    for n in names:
        f.write(f'\n#[no_mangle]\npub extern "C" fn {n}() {{\n    not_built("{n}")\n}}\n')
s = open(lib).read()
assert "pub mod ffi;" in s
open(lib, "w").write(s.replace("pub mod ffi;", "pub mod ffi;\nmod ffi_stubs;", 1))
print(f"{len(names)} launcher stubs")
EOF
if [[ -d $FINAL ]] && diff -rq "$DIR" "$FINAL" >/dev/null 2>&1; then
  echo "PTX-only candle-kernels in $FINAL (unchanged)"
else
  rm -rf "$FINAL"
  mkdir -p "$(dirname "$FINAL")"
  cp -r "$DIR" "$FINAL"
  echo "PTX-only candle-kernels in $FINAL"
fi
