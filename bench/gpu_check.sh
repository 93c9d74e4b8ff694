#!/usr/bin/env bash
# The GPU check (bench/gpu_check.py) with the project's virtualenv; without CUDA it runs a reduced CPU version.
exec "$(dirname "$0")/../.venv/bin/python" "$(dirname "$0")/gpu_check.py" "$@"
