"""The build before the pinned maps got layout versions, taken from git history, for
upgrade tests: its agent/ and bpf/ trees in a temporary directory.

    with old_build() as tree:
        subprocess.run([sys.executable, ...], env={"PYTHONPATH": f"{tree}/agent"})
"""
from __future__ import annotations

import contextlib
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# The last commit whose pins have no layout versions: conntrack without the ICMP type,
# endpoints without link-local addresses, counters with 11 reasons.
UPGRADE_FROM = "d29c1d03810d370c2c143a325b1c9e31a6baed35"
# Its agent, started with PYTHONPATH=<tree>/agent (``stockade agent ...`` arguments follow).
RUN_AGENT = [sys.executable, "-c", "import sys; from stockade.cli.main import main; sys.exit(main())"]


@contextlib.contextmanager
def old_build():
    tmp = Path(tempfile.mkdtemp(prefix="stockade-upgrade-from-", dir="/run"))
    try:
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", UPGRADE_FROM, "agent", "bpf"],
                                 capture_output=True, check=False)
        if archive.returncode != 0:
            raise RuntimeError(f"cannot read {UPGRADE_FROM} from git history (a shallow "
                               f"clone?): {archive.stderr.decode().strip()}")
        subprocess.run(["tar", "-x", "-C", str(tmp)], input=archive.stdout, check=True)
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
