"""An OCI bundle for runc whose seccomp profile is a checked-in upstream profile, and a launcher script
that runs ``PREFIX python3 -S -`` in a fresh container per call (``--sandbox-exec``; issue #13).

The rootfs is an empty directory with the host's /usr, /lib, /lib64, /bin, /sbin and /etc bound read-only
(offline: no image to fetch); /proc, /dev and /tmp are the container's own. The container gets Docker's
defaults: the default capability set, its own pid/ipc/uts/mount/network namespaces (loopback only),
no_new_privileges, and the profile as Docker hands it to runc (from_oci.runtime_profile)."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

from pytest_sandbox.policy.from_oci import DOCKER_DEFAULT_CAPS, runtime_profile

RUNC = shutil.which("runc")
HOST_DIRS = ("/usr", "/lib", "/lib64", "/bin", "/sbin", "/etc")


def bundle_config(profile: Path) -> dict[str, object]:
    caps = list(DOCKER_DEFAULT_CAPS)
    mounts = [{"destination": "/proc", "type": "proc", "source": "proc"},
              {"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "strictatime",
                                                                                    "mode=755", "size=65536k"]},
              {"destination": "/tmp", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "nodev"]}]
    mounts += [{"destination": d, "type": "bind", "source": d, "options": ["rbind", "ro"]}
               for d in HOST_DIRS if Path(d).is_dir() and not Path(d).is_symlink()]
    return {
        "ociVersion": "1.0.2",
        "process": {"terminal": False, "user": {"uid": 0, "gid": 0}, "args": ["python3", "-S", "-"],
                    "env": ["PATH=/usr/bin:/bin:/usr/sbin:/sbin", "LC_ALL=C"], "cwd": "/",
                    "capabilities": {k: caps for k in ("bounding", "effective", "permitted")},
                    "noNewPrivileges": True},
        "root": {"path": "rootfs", "readonly": True},
        "hostname": "runc-probe",
        "mounts": mounts,
        "linux": {"namespaces": [{"type": t} for t in ("pid", "ipc", "uts", "mount", "network")],
                  "seccomp": runtime_profile(profile),
                  "maskedPaths": ["/proc/kcore", "/proc/keys", "/proc/timer_list"],
                  "readonlyPaths": ["/proc/sys", "/proc/sysrq-trigger"]},
    }


LAUNCHER = '''#!{python}
"""runc launcher for --sandbox-exec: one container per call, its process the arguments given."""
import json, os, shutil, subprocess, sys, tempfile
template = json.load(open({config!r}))
template["process"]["args"] = sys.argv[1:]
work = tempfile.mkdtemp(prefix="runc-bundle-")
try:
    os.mkdir(os.path.join(work, "rootfs"))
    for d in {dirs!r}:
        os.makedirs(os.path.join(work, "rootfs", d.lstrip("/")), exist_ok=True)
    for d, target in {links!r}.items():  # merged /usr: /bin -> usr/bin, /lib64 -> usr/lib64
        os.symlink(target, os.path.join(work, "rootfs", d.lstrip("/")))
    for d in ("proc", "dev", "tmp"):
        os.makedirs(os.path.join(work, "rootfs", d), exist_ok=True)
    json.dump(template, open(os.path.join(work, "config.json"), "w"))
    name = "psb-" + os.path.basename(work).replace("_", "-").lower()
    status = subprocess.call([{runc!r}, "--root", {state!r}, "run", "--bundle", work, name])
    subprocess.call([{runc!r}, "--root", {state!r}, "delete", "--force", name], stderr=subprocess.DEVNULL)
    sys.exit(status)
finally:
    shutil.rmtree(work, ignore_errors=True)
'''


def runc_launcher(directory: Path, profile: Path) -> str:
    assert RUNC is not None
    config = directory / "config.json"
    config.write_text(json.dumps(bundle_config(profile)))
    state = directory / "runc-state"
    state.mkdir(exist_ok=True)
    dirs = [d for d in HOST_DIRS if Path(d).is_dir() and not Path(d).is_symlink()]
    script = directory / "runc-launcher"
    links = {d: os.readlink(d) for d in HOST_DIRS if Path(d).is_symlink()}
    script.write_text(LAUNCHER.format(python=sys.executable, config=str(config), dirs=dirs, links=links, runc=RUNC,
                                      state=str(state)))
    script.chmod(0o755)
    return str(script)
