"""firejail, exercised like bubblewrap (issue #5): its ``--seccomp.drop`` list refuses the baseline's
unconditional denies natively and via x32, but the suite finds that the list does not reach the i386
ABI (``int 0x80``): every dropped call is still ALLOWED there (compare firejail#86/#87). Nor does it reach
/dev/userfaultfd, which firejail leaves in place: as root, USERFAULTFD_IOC_NEW makes the userfaultfd that the
dropped userfaultfd(2) would have."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from exec_targets import id_prefix

from pytest_sandbox.catalogues.syscalls import DEVICE_PATHS
from pytest_sandbox.policy.load import load_policy
from pytest_sandbox.seccomp.launcher import Identity
from pytest_sandbox.session import may_open_setup_device

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(shutil.which("firejail") is None, reason="firejail is not installed (Debian: firejail)")


def test_firejail_seccomp_drop_misses_the_i386_abi(tmp_path):
    deny = load_policy("baseline").seccomp.deny
    requirement = tmp_path / "unconditional.toml"
    requirement.write_text("[seccomp]\ndeny = [" + ", ".join(f'"{name}"' for name in deny) + "]\n")
    launcher = f"firejail --noprofile --quiet --seccomp.drop={','.join(deny)} --"
    probe = subprocess.run([*launcher.split(), "/bin/true"], capture_output=True, timeout=60)
    if probe.returncode != 0:
        pytest.skip(f"firejail cannot start here: {probe.stderr.decode(errors='replace').strip()[:200]}")
    completed = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--sandbox", f"--sandbox-exec={launcher}",
         f"--sandbox-require={requirement}", "conformance/test_syscalls.py"],
        cwd=ROOT, capture_output=True, text=True, timeout=600, env={**os.environ, "COLUMNS": "1000"},
    )
    prefix = id_prefix(launcher)
    failed_ids = re.findall(r"^FAILED [^[]+\[(\S+)\]", completed.stdout, re.M)
    assert all(f.startswith(prefix) for f in failed_ids), (prefix, failed_ids)
    failed = {f.removeprefix(prefix) for f in failed_ids}
    assert completed.returncode == 1
    # And /dev/userfaultfd: firejail leaves the host's /dev, root opens the device, and USERFAULTFD_IOC_NEW reaches
    # the kernel natively, with high bits and through i386 (its x32 handling refuses the x32 call): a userfaultfd
    # without userfaultfd(2) (catalogues/syscalls.py DEVICE_PATHS; with --private-dev there is no such device).
    device = {f"userfaultfd-dev-{row}" for row in ("native", "native-hi32", "native-hi-ones", "i386")}
    opens = may_open_setup_device((f"open:{DEVICE_PATHS['userfaultfd'].device}",), Identity.current())
    assert failed == {f"{name}-i386" for name in deny} | (device if opens else set())
    assert "via i386 ABI" in completed.stdout and "ALLOWED" in completed.stdout
