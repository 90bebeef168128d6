"""The collection as a user gets it: `make collection` builds the tarball, ansible-galaxy
installs it into a directory of the user's own, ansible-doc reads the installed copy and
`ansible-test sanity --python 3.11` passes on it with no --skip-test and no ignore file.

ansible-test creates one virtualenv per sanity test and puts pip in it with a bootstrap
script it downloads from its own file server, which is out of reach here. The script is
replaced by tests/ansible/sanity/get_pip.py, placed where ansible-test looks first (its
cache, under a HOME of its own); the sanity tests' pinned requirements then come from the
package index as usual. The virtualenvs stay cached under that HOME between runs."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
MODULES = sorted(p.stem for p in (ROOT / "ansible_collections/stockade/fleet/plugins/modules").glob("*.py"))
TEST_HOME = Path("/var/tmp/stockade-ansible-test")


def env(**extra):
    e = {k: v for k, v in os.environ.items() if not k.startswith("ANSIBLE_")}
    e.update(PATH=f"{BIN}:{os.environ.get('PATH', '')}", ANSIBLE_NOCOLOR="1", NO_COLOR="1", **extra)
    return e


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """make collection, then ansible-galaxy collection install into a user's directory."""
    tmp = tmp_path_factory.mktemp("collection")
    r = subprocess.run(["make", "-s", "collection", f"COLLECTION_OUT={tmp}"], cwd=ROOT, env=env(),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    tarball = tmp / "stockade-fleet-0.1.0.tar.gz"
    assert tarball.is_file(), list(tmp.iterdir())
    user = tmp / "user"
    user.mkdir()
    r = subprocess.run([str(BIN / "ansible-galaxy"), "collection", "install", str(tarball), "-p", "collections"],
                       cwd=user, env=env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "stockade.fleet:0.1.0 was installed successfully" in r.stdout, r.stdout + r.stderr
    return user / "collections"


def test_tarball_holds_the_collection_and_no_tests_or_ignores(installed):
    top = installed / "ansible_collections/stockade/fleet"
    for path in ("MANIFEST.json", "FILES.json", "meta/runtime.yml", "plugins/module_utils/stockade.py",
                 "plugins/doc_fragments/agent.py", "roles/stockade_agent/tasks/main.yml",
                 "roles/stockade_policy/tasks/main.yml", "playbooks/site.yml"):
        assert (top / path).exists(), path
    assert sorted(p.stem for p in (top / "plugins/modules").glob("*.py")) == MODULES
    assert not list(top.glob("tests/sanity/ignore-*.txt"))
    assert "requires_ansible: \">=2.14.18\"" in (top / "meta/runtime.yml").read_text()


@pytest.mark.parametrize("module", MODULES, ids=MODULES)
def test_ansible_doc_from_the_installed_collection(installed, module):
    r = subprocess.run([str(BIN / "ansible-doc"), f"stockade.fleet.{module}"], cwd=installed.parent,
                       env=env(ANSIBLE_COLLECTIONS_PATH=str(installed)), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert f"> MODULE stockade.fleet.{module} ({installed}/ansible_collections/stockade/fleet/" in r.stdout
    # the shared fragment's socket option and check-mode attribute are rendered
    assert "socket" in r.stdout and "check_mode:" in r.stdout, r.stdout


@pytest.mark.parametrize("kind,name", [("filter", "stockade_services_for"), ("role", "stockade_agent"),
                                       ("role", "stockade_policy")])
def test_ansible_doc_of_the_filter_and_roles(installed, kind, name):
    r = subprocess.run([str(BIN / "ansible-doc"), "-t", kind, f"stockade.fleet.{name}"], cwd=installed.parent,
                       env=env(ANSIBLE_COLLECTIONS_PATH=str(installed)), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and f"stockade.fleet.{name}" in r.stdout, r.stdout + r.stderr


@pytest.mark.timeout(900)
def test_ansible_test_sanity_passes(installed):
    cache = TEST_HOME / ".ansible/test/cache"
    cache.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(ROOT / "tests/ansible/sanity/get_pip.py", cache / "get_pip_24_2.py")
    top = installed / "ansible_collections/stockade/fleet"
    r = subprocess.run([str(BIN / "ansible-test"), "sanity", "--python", "3.11", "--color", "no"], cwd=top,
                       env=env(HOME=str(TEST_HOME)), capture_output=True, text=True, timeout=900)
    out = r.stdout + r.stderr
    assert r.returncode == 0, "\n".join(line for line in out.splitlines() if "ERROR" in line or "FATAL" in line) or out[-4000:]
    assert "Running sanity test \"validate-modules\"" in out and "Running sanity test \"pylint\"" in out
    assert "--skip-test" not in " ".join(r.args)
