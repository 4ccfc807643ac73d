#!/usr/bin/env bash
# Checks `llmtune web` in headless Chromium: installs Debian's chromium when missing, sets up a
# Python venv with websocket-client, then runs scripts/web_check.py (type a question, click
# Send, read the streamed reply from the DOM, follow-up with history, clear history, and a
# screenshot saved to docs/web.png).
#
#   LLMTUNE_HOME=/tmp/llmtune-home scripts/web_check.sh [--model_name_or_path smollm2-135m]
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v chromium >/dev/null 2>&1; then
  echo "installing chromium (apt-get)"
  apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium
fi
VENV=${WEB_CHECK_VENV:-/work/venv-openai}
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
"$VENV/bin/python" -c "import websocket" 2>/dev/null || "$VENV/bin/pip" install -q websocket-client
exec "$VENV/bin/python" scripts/web_check.py "$@"
