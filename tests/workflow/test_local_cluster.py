"""The test cluster's script never stops what it did not start (no root or SLURM needed for this one).

That a whole up/down cycle writes nothing under /etc, /run or /var and leaves no daemon behind is checked
on the machine, where SLURM runs: test_slurm.py.
"""

import shutil
import subprocess
import time
from pathlib import Path

CLUSTER = Path(__file__).resolve().parent / "slurm" / "local_cluster.sh"


def _impostor(tmp_path, name):
    """A process whose name is `name` (as pkill -x would match it), started here, not by the script."""
    binary = tmp_path / name
    shutil.copy(shutil.which("sleep"), binary)
    return subprocess.Popen([str(binary), "30"])


def test_down_leaves_processes_it_did_not_start(tmp_path):
    """Before: `pkill -x slurmd|slurmctld|munged` killed any such daemon, a real cluster's included."""
    state = tmp_path / "state"
    state.mkdir()
    others = [_impostor(tmp_path, name) for name in ("slurmd", "slurmctld", "munged")]
    try:
        # A PID file naming a process that is not ours (as after PID reuse) is not acted on either.
        (state / "slurmd.pid").write_text(str(others[0].pid))
        result = subprocess.run(["bash", str(CLUSTER), "down", str(state)], capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
        time.sleep(0.2)
        assert all(p.poll() is None for p in others), "a process the script did not start was stopped"
    finally:
        for p in others:
            p.kill()
            p.wait()

