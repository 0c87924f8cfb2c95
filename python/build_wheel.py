"""Packs the static sticky-cluster binary into a wheel, so `pip install sticky-cluster` needs no Rust.

The binary is the one docker/Dockerfile ships (glibc linked statically, no loader), built once:
    RUSTFLAGS='-C target-feature=+crt-static' cargo build --release --target x86_64-unknown-linux-gnu \
        -p sticky-cluster -p sticky-cluster-examples --bin sticky-cluster --bin hello-worker
A binary without a dynamic loader runs on any x86_64 Linux, glibc or musl, so the wheel carries both
manylinux and musllinux tags. pip installs it as the `sticky-cluster` command of the environment, and
`python -m sticky_cluster` runs the same binary.

Usage: python3 python/build_wheel.py BINARY OUT_DIR      (prints the wheel's path)
"""

import base64
import hashlib
import os
import re
import shutil
import stat
import struct
import subprocess
import sys
import tempfile
import zipfile

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
NAME = "sticky_cluster"
# glibc 2.17 and musl 1.1 are the oldest each tag scheme names; a static binary needs neither.
PLATFORMS = "manylinux_2_17_x86_64.manylinux2014_x86_64.musllinux_1_1_x86_64"
TAG = "py3-none-" + PLATFORMS

INIT = '''"""sticky-cluster: a sticky-session connection router (the static binary, packed for pip)."""

import os
import sysconfig

__version__ = "{version}"


def binary():
    """The path of the sticky-cluster executable this package installed."""
    return os.path.join(sysconfig.get_path("scripts"), "sticky-cluster")
'''

MAIN = '''"""`python -m sticky_cluster ...` runs the installed binary with the same arguments."""

import os
import sys

from . import binary

os.execv(binary(), [binary()] + sys.argv[1:])
'''


def workspace_version():
    with open(os.path.join(REPO, "Cargo.toml")) as file:
        text = file.read()
    section = text.split("[workspace.package]", 1)[1]
    return re.search(r'^version\s*=\s*"([^"]+)"', section, re.M).group(1)


def check_static_x86_64(path):
    """Refuses a binary a manylinux/musllinux tag would misdescribe: not x86_64 ELF, or with an
    interpreter (dynamically linked, so tied to one libc)."""
    with open(path, "rb") as file:
        head = file.read(64)
        if head[:4] != b"\x7fELF" or head[4] != 2 or struct.unpack_from("<H", head, 18)[0] != 62:
            raise SystemExit("%s: not an x86_64 ELF executable" % path)
        phoff = struct.unpack_from("<Q", head, 32)[0]
        phentsize, phnum = struct.unpack_from("<HH", head, 54)
        file.seek(phoff)
        table = file.read(phentsize * phnum)
    for i in range(phnum):
        if struct.unpack_from("<I", table, i * phentsize)[0] == 3:  # PT_INTERP
            raise SystemExit("%s is dynamically linked (it names a loader): build it with crt-static" % path)


def record_line(name, data):
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return "%s,sha256=%s,%d" % (name, digest, len(data))


def build(binary, out_dir):
    check_static_x86_64(binary)
    version = workspace_version()
    dist_info = "%s-%s.dist-info" % (NAME, version)
    data = "%s-%s.data" % (NAME, version)
    with tempfile.TemporaryDirectory() as scratch:
        # Debug symbols are most of an unstripped binary; binutils' strip when there is one.
        stripped = os.path.join(scratch, "sticky-cluster")
        shutil.copyfile(binary, stripped)
        if shutil.which("strip"):
            subprocess.run(["strip", stripped], check=True)
        with open(stripped, "rb") as file:
            executable = file.read()
    with open(os.path.join(REPO, "README.md")) as file:
        readme = file.read()
    metadata = "\n".join([
        "Metadata-Version: 2.1",
        "Name: sticky-cluster",
        "Version: " + version,
        "Summary: Sticky-session TCP connection router: every client address reaches the same worker process",
        "License: MIT",
        "Requires-Python: >=3.7",
        "Classifier: Operating System :: POSIX :: Linux",
        "Classifier: Programming Language :: Rust",
        "Description-Content-Type: text/markdown",
        "",
        readme,
    ])
    wheel = "\n".join(["Wheel-Version: 1.0", "Generator: sticky-cluster build_wheel.py", "Root-Is-Purelib: false",
                       "Tag: " + TAG, ""])
    files = [
        ("%s/__init__.py" % NAME, INIT.format(version=version).encode(), 0o644),
        ("%s/__main__.py" % NAME, MAIN.encode(), 0o644),
        ("%s/scripts/sticky-cluster" % data, executable, 0o755),
        ("%s/METADATA" % dist_info, metadata.encode(), 0o644),
        ("%s/WHEEL" % dist_info, wheel.encode(), 0o644),
    ]
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "%s-%s-%s.whl" % (NAME, version, TAG))
    records = [record_line(name, content) for name, content, _ in files] + ["%s/RECORD,," % dist_info]
    files.append(("%s/RECORD" % dist_info, ("\n".join(records) + "\n").encode(), 0o644))
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, content, mode in files:
            info = zipfile.ZipInfo(name, date_time=(2026, 1, 1, 0, 0, 0))
            info.external_attr = (stat.S_IFREG | mode) << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            archive.writestr(info, content)
    return path


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit(__doc__)
    print(build(sys.argv[1], sys.argv[2]))
