"""Writes a root filesystem (a tar for `docker import`) holding this machine's Python, pip and the
distributions a requirements file names, with every shared library they load: a stand-in for the
`python` image from Docker Hub, which a test machine without registry access cannot pull.

The interpreter keeps its own prefix (its console scripts' shebangs and its rpath name it), so the
image's PATH must start with PREFIX/bin; the last line printed is that directory. The distributions are
the ones installed here, at the versions installed, so `pip install -r` of the same file in the image
finds each one satisfied and needs no network.

Usage: python3 docker/python_base.py REQUIREMENTS OUT.tar
"""

import importlib.metadata
import io
import os
import re
import subprocess
import sys
import sysconfig
import tarfile

try:
    from packaging.requirements import Requirement
except ImportError:  # pip always carries a copy
    from pip._vendor.packaging.requirements import Requirement

# Parts of the standard library no server needs (tests, GUI, the build's static library).
SKIPPED_DIRS = {"site-packages", "test", "tests", "idlelib", "tkinter", "turtledemo", "ensurepip", "__pycache__",
                "lib2to3", "pydoc_data"}
# PEP 668's marker would make pip refuse to install anything, as a distribution's python does.
SKIPPED_FILES = {"EXTERNALLY-MANAGED"}
# Extension modules for terminals and Tk (they would bring X11 and Tcl along).
SKIPPED_MODULES = ("_tkinter.", "_curses.", "_curses_panel.", "readline.")


def required(names):
    """The distributions `names` need, themselves included, with pip: each one's requirements whose
    markers hold here (extras are not followed)."""
    seen = {}
    pending = list(names) + ["pip"]
    while pending:
        name = pending.pop()
        key = re.sub(r"[-_.]+", "-", name).lower()
        if key in seen:
            continue
        try:
            distribution = importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            sys.exit("python_base: %s is not installed here (pip install -r the requirements first)" % name)
        seen[key] = distribution
        for text in distribution.requires or []:
            requirement = Requirement(text)
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                pending.append(requirement.name)
    return seen.values()


def stdlib_files():
    """The interpreter, its shared library if it has one, and the standard library."""
    files = [os.path.realpath(sys.executable)]
    libdir, library = sysconfig.get_config_var("LIBDIR"), sysconfig.get_config_var("LDLIBRARY")
    if libdir and library and ".so" in library:
        stem = library.split(".so")[0] + ".so"
        for name in os.listdir(libdir):
            if name.startswith(stem):
                files.append(os.path.join(libdir, name))
    stdlib = sysconfig.get_path("stdlib")
    for top, dirs, names in os.walk(stdlib):
        dirs[:] = [d for d in dirs if d not in SKIPPED_DIRS and not d.startswith("config-")]
        files.extend(os.path.join(top, n) for n in names
                     if n not in SKIPPED_FILES and not n.startswith(SKIPPED_MODULES))
    return files


def distribution_files(distributions):
    files = []
    for distribution in distributions:
        for path in distribution.files or []:
            located = os.path.normpath(str(distribution.locate_file(path)))
            if os.path.isfile(located) and "__pycache__" not in located:
                files.append(located)
    return files


def shared_libraries(files):
    """Every library the ELF files among `files` load, as ldd resolves them here, and the loader."""
    libraries = set()
    for path in files:
        if not (path.endswith(".so") or ".so." in path or os.access(path, os.X_OK)):
            continue
        with open(path, "rb") as file:
            if file.read(4) != b"\x7fELF":
                continue
        listing = subprocess.run(["ldd", path], capture_output=True, text=True).stdout
        for line in listing.splitlines():
            match = re.search(r"(?:=>\s*)?(/\S+)\s+\(0x", line)
            if match:
                libraries.add(match.group(1))
    return sorted(libraries)


def write_tar(out, files, prefix_bin):
    directories = set()
    for path in files:
        parent = os.path.dirname(path)
        while parent not in ("/", ""):
            directories.add(parent)
            parent = os.path.dirname(parent)
    with tarfile.open(out, "w") as tar:
        # Every directory readable by the image's non-root user (a prefix under /root included).
        for directory in sorted(directories | {"/tmp"}):
            info = tarfile.TarInfo(directory.lstrip("/"))
            info.type, info.mode = tarfile.DIRTYPE, 0o1777 if directory == "/tmp" else 0o755
            tar.addfile(info)
        for path in sorted(set(files)):
            if os.path.islink(path) and os.path.dirname(os.path.realpath(path)) == os.path.dirname(path):
                info = tarfile.TarInfo(path.lstrip("/"))   # libpython3.11.so -> libpython3.11.so.1.0
                info.type, info.linkname = tarfile.SYMTYPE, os.readlink(path)
                tar.addfile(info)
                continue
            info = tar.gettarinfo(os.path.realpath(path), arcname=path.lstrip("/"))
            info.mode = 0o755 if os.access(path, os.X_OK) else 0o644
            info.uid = info.gid = 0
            info.uname = info.gname = "root"
            with open(path, "rb") as file:
                tar.addfile(info, file)
        # `python3` and `python` by those names, as the official image has them (pip is `python3 -m pip`).
        for name in ("python3", "python"):
            link = os.path.join(prefix_bin, name).lstrip("/")
            if os.path.join(prefix_bin, name) not in files:
                info = tarfile.TarInfo(link)
                info.type, info.linkname = tarfile.SYMTYPE, os.path.basename(os.path.realpath(sys.executable))
                tar.addfile(info)
        info = tarfile.TarInfo("etc/passwd")
        passwd = b"root:x:0:0:root:/root:/bin/false\nnonroot:x:65532:65532:nonroot:/nonexistent:/bin/false\n"
        info.size, info.mode = len(passwd), 0o644
        tar.addfile(info, io.BytesIO(passwd))


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__.strip().splitlines()[-1])
    requirements, out = sys.argv[1:]
    with open(requirements) as file:
        names = [Requirement(line.split("#")[0].strip()).name for line in file if line.split("#")[0].strip()]
    files = stdlib_files() + distribution_files(required(names))
    files += shared_libraries(files)
    prefix_bin = os.path.dirname(os.path.realpath(sys.executable))
    write_tar(out, files, prefix_bin)
    print(prefix_bin)


if __name__ == "__main__":
    main()
