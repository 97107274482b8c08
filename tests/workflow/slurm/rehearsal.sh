#!/usr/bin/env bash
# The rehearsal (README: Resources for the real study) through a private single-node SLURM, with the shipped
# profile filled for it as the SLURM test fills it (tests/workflow/test_slurm.py: local_profile):
#
#   tests/workflow/slurm/rehearsal.sh [moaflow rehearse arguments ...]
#   e.g. tests/workflow/slurm/rehearsal.sh --plates Week5_29301 Week2_24121 Week3_25421 --data-path-only
#
# As the test: root, Debian's munge and slurm-wlm installed (local_cluster.sh install). The cluster's state lives
# in a temporary folder, and only the daemons this script started are stopped when it ends.
set -euo pipefail
repo=$(cd "$(dirname "$0")/../../.." && pwd)
bin=$repo/.venv/bin
cluster=$repo/tests/workflow/slurm/local_cluster.sh
state=$(mktemp -d /tmp/moaflow-slurm-rehearsal.XXXXXX)
trap 'bash "$cluster" down "$state"; rm -rf "$state"' EXIT
conf=$(bash "$cluster" up "$state")
cd "$repo"
"$bin/python" -c 'import sys; from pathlib import Path; from tests.workflow.test_slurm import local_profile
local_profile(Path(sys.argv[1]))' "$state/profile"
SLURM_CONF=$conf PATH="$state/bin:$bin:$PATH" "$bin/moaflow" rehearse --profile "$state/profile" "$@"
