"""tools/setup.sh: without root, missing Debian packages stop set-up with the exact command to run."""

import os
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_non_root_missing_packages_names_them(tmp_path):
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "id").write_text("#!/bin/sh\necho 1000\n")
    (fake / "dpkg-query").write_text("#!/bin/sh\nexit 1\n")  # nothing is installed
    for f in fake.iterdir():
        f.chmod(0o755)
    env = dict(os.environ, PATH=f"{fake}:{os.environ['PATH']}")
    r = subprocess.run(["bash", str(REPO / "tools/setup.sh")], cwd=REPO, env=env, capture_output=True, text=True)
    assert r.returncode == 1
    wanted = [ln.strip() for ln in (REPO / "tools/apt-packages.txt").read_text().splitlines()
              if ln.strip() and not ln.startswith("#")]
    assert f"sudo apt-get install -y {' '.join(wanted)}" in r.stderr
    assert "needs root" in r.stderr
