#!/usr/bin/env bash
# Builds llama.cpp from the source vendored in the PyPI sdist of llama-cpp-python (CPU only,
# Release, -DGGML_NATIVE=ON) and prints the folder holding the binaries.
#
# Usage: scripts/build_llamacpp.sh [TARGET...]     (default: llama-bench llama-simple llama-completion)
#
# Environment:
#   BENCH_CACHE                 cache folder (default ~/.cache/llmtune-bench)
#   LLAMA_CPP_PYTHON_VERSION    sdist version (default 0.3.36, which vendors llama.cpp 0c1e57098)
#   LLAMA_CPP_SDIST             a local copy of the sdist tarball (skips `pip download`)
#   CMAKE                       cmake binary (default: cmake on PATH, else apt-get, else PyPI)
#   REF_VENV                    venv for a PyPI cmake (default <repo>/.venv-ref)
#   LLAMA_BIN_DIR               an existing build's bin folder (same sdist) to use when it
#                               holds every target: nothing is fetched or built then
#
# Source: `pip download --no-deps --no-binary llama-cpp-python llama-cpp-python==VER`, its
# vendor/llama.cpp unpacked to $BENCH_CACHE/llama.cpp-VER (the vendored commit, read from the
# sdist's CHANGELOG.md, is kept in VENDORED_COMMIT and baked into the build info). Targets that
# are already built are not rebuilt (cmake decides). Nothing lands in the repo.
#
# Used by scripts/bench_vs_torch.sh (llama-bench) and scripts/llamacpp_check.sh
# (llama-completion). Note: on CPUs with AMX, llama.cpp 0c1e57098 can crash with SIGILL in
# prompt processing on repacked weights; pass `--repack 0` (llama-bench) or `--no-repack`
# (llama-completion) there.
set -euo pipefail

# shellcheck source=lib.sh source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
TARGETS=("$@")
[[ ${#TARGETS[@]} -gt 0 ]] || TARGETS=(llama-bench llama-simple llama-completion)

ensure_cmake() {
  if [[ -n "${CMAKE:-}" ]]; then return; fi
  if command -v cmake >/dev/null; then CMAKE=cmake; return; fi
  if [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null; then
    log "installing cmake with apt-get"
    apt-get update -qq && apt-get install -y -qq cmake >/dev/null && { CMAKE=cmake; return; }
  fi
  if [[ ! -x "$REF_VENV/bin/pip" ]]; then python3 -m venv "$REF_VENV"; fi
  log "installing cmake from PyPI into $REF_VENV"
  "$REF_VENV/bin/pip" install --quiet cmake
  CMAKE="$REF_VENV/bin/cmake"
}

fetch_source() {
  if [[ -f "$LLAMA_SRC/CMakeLists.txt" ]]; then return; fi
  local dl="$BENCH_CACHE/dl"
  mkdir -p "$dl"
  local tgz="$dl/llama_cpp_python-$LLAMA_CPP_PYTHON_VERSION.tar.gz"
  if [[ -n "${LLAMA_CPP_SDIST:-}" ]]; then
    cp "$LLAMA_CPP_SDIST" "$tgz"
  elif [[ ! -f "$tgz" ]]; then
    log "fetching the llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION sdist from PyPI"
    # --no-binary for this package only: the build requirements (cmake, ninja) stay wheels.
    python3 -m pip download --quiet --no-deps --no-binary llama-cpp-python \
      "llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION" -d "$dl"
  fi
  rm -rf "$dl/src" && mkdir -p "$dl/src"
  tar xzf "$tgz" -C "$dl/src"
  rm -rf "$LLAMA_SRC"
  mv "$dl/src/llama_cpp_python-$LLAMA_CPP_PYTHON_VERSION/vendor/llama.cpp" "$LLAMA_SRC"
  # The sdist has no .git: keep the vendored commit from its changelog for the build info.
  grep -m1 -o 'llama.cpp@[0-9a-f]*' "$dl/src/llama_cpp_python-$LLAMA_CPP_PYTHON_VERSION/CHANGELOG.md" \
    | cut -d@ -f2 > "$LLAMA_SRC/VENDORED_COMMIT" || true
  rm -rf "$dl/src"
}

if [[ -n "${LLAMA_BIN_DIR:-}" ]]; then
  have=1
  for t in "${TARGETS[@]}"; do [[ -x "$LLAMA_BIN_DIR/$t" ]] || have=0; done
  if [[ $have == 1 ]]; then echo "$LLAMA_BIN_DIR"; exit 0; fi
  log "LLAMA_BIN_DIR=$LLAMA_BIN_DIR lacks some of ${TARGETS[*]}; building into $LLAMA_SRC"
fi
missing=()
for t in "${TARGETS[@]}"; do
  [[ -x "$LLAMA_SRC/build/bin/$t" ]] || missing+=("$t")
done
if [[ ${#missing[@]} -gt 0 ]]; then
  fetch_source
  ensure_cmake
  commit="$(cat "$LLAMA_SRC/VENDORED_COMMIT" 2>/dev/null || echo unknown)"
  log "building ${missing[*]} (llama.cpp $commit; several minutes on 2 cores)"
  "$CMAKE" -S "$LLAMA_SRC" -B "$LLAMA_SRC/build" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON \
    -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF \
    -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_BUILD_COMMIT="$commit" -DLLAMA_BUILD_NUMBER=0 >/dev/null
  "$CMAKE" --build "$LLAMA_SRC/build" -j"${LLAMA_BUILD_JOBS:-$(nproc)}" --target "${missing[@]}" >/dev/null
fi
echo "$LLAMA_SRC/build/bin"
