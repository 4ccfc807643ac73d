# Setup shared by scripts/bench_vs_torch.sh, scripts/llamacpp_check.sh and
# scripts/build_llamacpp.sh; sourced (after `set -euo pipefail`), not run.
#
# Sets REPO (the repository root) and the llama.cpp cache settings, each from the environment
# when given there:
#   BENCH_CACHE                 cache folder (default ~/.cache/llmtune-bench)
#   LLAMA_CPP_PYTHON_VERSION    llama-cpp-python sdist whose vendored llama.cpp is built
#                               (default 0.3.36, which vendors llama.cpp 0c1e57098)
#   LLAMA_SRC                   where that llama.cpp is unpacked and built
#                               ($BENCH_CACHE/llama.cpp-$LLAMA_CPP_PYTHON_VERSION)
#   REF_VENV                    the reference venv (default <repo>/.venv-ref, git-ignored)
# and defines log (a "== " line on stderr) and llama_bin_dir (below).
# shellcheck shell=bash disable=SC2034  # the variables are for the scripts that source this

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BENCH_CACHE="${BENCH_CACHE:-$HOME/.cache/llmtune-bench}"
LLAMA_CPP_PYTHON_VERSION="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
LLAMA_SRC="$BENCH_CACHE/llama.cpp-$LLAMA_CPP_PYTHON_VERSION"
REF_VENV="${REF_VENV:-$REPO/.venv-ref}"

log() { echo "== $*" >&2; }

# llama_bin_dir TARGET...: the folder holding llama.cpp's TARGETs, fetched and built by
# scripts/build_llamacpp.sh with the settings above when missing.
llama_bin_dir() {
  BENCH_CACHE="$BENCH_CACHE" LLAMA_CPP_PYTHON_VERSION="$LLAMA_CPP_PYTHON_VERSION" \
    REF_VENV="$REF_VENV" "$REPO/scripts/build_llamacpp.sh" "$@"
}
