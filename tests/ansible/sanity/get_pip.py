"""Stand-in for the pip bootstrap script that ansible-test downloads from its own file
server (unreachable here). ansible-test runs it with its venv's Python and the arguments
of the real get-pip.py ("pip==24.2 ... --no-setuptools --no-wheel"): put the Python's own
pip in with ensurepip, then install exactly the pinned versions asked for, from the package
index pip is configured to use."""
import ensurepip
import subprocess
import sys

ensurepip.bootstrap(upgrade=True)
args = [a for a in sys.argv[1:] if a not in ("--no-setuptools", "--no-wheel")]
subprocess.check_call([sys.executable, "-m", "pip", "install", "--upgrade", *args])
