"""kill -9 chaos test (short CI version; run `bash scripts/chaos_resume.sh 20` for the long one)."""
import subprocess
import sys

from conftest import ROOT


def test_kill9_at_random_points_then_resume_is_exact(tmp_path):
    p = subprocess.run([sys.executable, str(ROOT / "scripts/chaos_resume.py"), "3", "--seed", "1",
                        "--workdir", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=1500)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "exact: 3/3" in p.stdout
    assert "inside checkpoint write" in p.stdout
