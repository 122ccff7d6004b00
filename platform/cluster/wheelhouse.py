#!/usr/bin/env python3
"""Build a wheelhouse for an offline (air-gapped) install of this project.

    python platform/cluster/wheelhouse.py --out wheelhouse
    python platform/cluster/wheelhouse.py --out wheelhouse --python-version 3.12 \\
        --platform manylinux_2_28_x86_64 --base-packages platform/cluster/base-images/nvidia-cuda-py312.txt

The folder holds the wheels that an environment which already has torch and torchvision
(and, with ``--base-packages``, a base image's other packages) lacks to run this project:
its ``pyproject.toml`` dependencies minus what the base provides, plus the build backend
(setuptools, wheel) that ``pip install -e .`` needs without an index. On the offline
machine, from the checkout:

    pip install --no-index --find-links wheelhouse -e .

What the platform never uses is left out: Ray's wheel is repacked without its Java jars,
RLlib, Serve, the LLM library, the dashboard's JavaScript source maps and the runtime-env
agent's private copy of aiohttp (ray[default] installs aiohttp itself); the symbol tables of
the binaries in the wheels are emptied as `strip` does (never loaded; crash backtraces then
show addresses); virtualenv loses the seed wheels of other Pythons and large wheels their
``tests/`` folders. A repacked wheel keeps its name and version, gets a RECORD written anew
and says what was done in ``*.dist-info/WHEELHOUSE_REPACK``. MLflow comes as
``mlflow-skinny`` (a core dependency of the project; the full ``mlflow`` with the web UI is
the ``mlflow-server`` extra). Where a package publishes a pure-Python wheel beside its
compiled ones, the pure one is taken (not for protobuf).

The resolution is pip's own (``pip install --dry-run --report``; for another Python or
platform with ``--python-version/--platform/--implementation --only-binary=:all:``), then
the dependency graph is walked again with the *target's* environment markers, which pip
evaluates with the running interpreter's (a requirement missing for the target is added
and the resolve repeated). Packages that exist only as source archives (for instance
antlr4-python3-runtime, needed by hydra/omegaconf) are built into wheels here; for a
foreign target they must come out pure-Python.

Only the standard library and pip (>= 22.2) are used. It needs access to a package index
(PyPI or a mirror, as pip is configured), prints a table of package, version and size,
writes ``wheelhouse.json`` (the manifest) beside the wheels, and exits 1 when the wheels
add up to more than ``--max-mib`` (default 60).
"""

from __future__ import annotations

import argparse
import csv
import fnmatch
import hashlib
import io
import json
import os
import platform as _platform
import re
import shutil
import subprocess
import struct
import sys
import tempfile
import time
import zipfile
from base64 import urlsafe_b64encode
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Set, Tuple

try:  # pip's vendored packaging: this script must run where only pip is installed
    from pip._vendor.packaging.markers import Marker, default_environment
    from pip._vendor.packaging.requirements import InvalidRequirement, Requirement
    from pip._vendor.packaging.utils import canonicalize_name
except ImportError:  # pragma: no cover - pip without vendored packaging
    from packaging.markers import Marker, default_environment  # type: ignore
    from packaging.requirements import InvalidRequirement, Requirement  # type: ignore
    from packaging.utils import canonicalize_name  # type: ignore

REPO_ROOT = Path(__file__).resolve().parents[2]
MANIFEST = "wheelhouse.json"
REPACK_NOTE = "WHEELHOUSE_REPACK"

# What the base environment always has: these and their dependencies are never shipped.
ALWAYS_BASE = ("torch", "torchvision")
# The build backend for `pip install --no-index --find-links DIR -e .` (build isolation
# installs it from the wheelhouse, whatever the environment already has).
BUILD_EXTRA = ("wheel",)

# Parts of the ray wheel this platform never uses (paths inside the wheel, fnmatch
# patterns; a pattern ending in "/" is a folder). Nothing kept imports them at import
# time: ray.tune's registry, `ray serve` in the CLI and the dashboard's serve module import
# rllib/serve lazily and treat an ImportError as "not installed".
RAY_EXCLUDES = (
    "ray/jars/",  # Java workers and the cross-language jar (~31 MiB compressed)
    "ray/rllib/",  # reinforcement learning
    "ray/serve/",  # model serving
    "ray/llm/",  # LLM batch inference / serving
    "ray/dashboard/client/build/*.map",  # JavaScript source maps of the web UI (not served to users)
    # A private copy of aiohttp & co. for the runtime-env agent, which puts it first on
    # sys.path; ray[default] installs the same packages into site-packages, which the
    # agent then uses.
    "ray/_private/runtime_env/agent/thirdparty_files/",
)

# Compiled wheels kept even where a pure-Python wheel exists: protobuf's pure-Python
# implementation is many times slower, and Ray speaks protobuf all the time.
KEEP_COMPILED = ("protobuf",)

MiB = 1024 * 1024


class WheelhouseError(RuntimeError):
    pass


def log(msg: str) -> None:
    print(f"[wheelhouse] {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- inputs

def _load_toml(path: Path) -> dict:
    try:
        import tomllib  # Python 3.11+
    except ImportError:  # pragma: no cover - Python 3.10
        from pip._vendor import tomli as tomllib  # type: ignore
    with open(path, "rb") as f:
        return tomllib.load(f)


def project_requirements(pyproject: Path, extras: Iterable[str] = ()) -> Tuple[str, List[str], List[str]]:
    """(project name, runtime requirements incl. the chosen extras, build-system requires)."""
    data = _load_toml(pyproject)
    proj = data.get("project", {})
    name = proj.get("name", "")
    reqs = list(proj.get("dependencies", []))
    optional = proj.get("optional-dependencies", {})
    todo, seen = [canonicalize_name(e) for e in extras], set()
    while todo:
        extra = todo.pop()
        if extra in seen:
            continue
        seen.add(extra)
        group = {canonicalize_name(k): v for k, v in optional.items()}.get(extra)
        if group is None:
            raise WheelhouseError(f"{pyproject}: no optional-dependencies group {extra!r} "
                                  f"(there are: {', '.join(optional) or 'none'})")
        for r in group:
            req = Requirement(r)
            if canonicalize_name(req.name) == canonicalize_name(name):  # self-reference: dev = ["x[server]"]
                todo.extend(canonicalize_name(e) for e in req.extras)
            else:
                reqs.append(r)
    build = list(data.get("build-system", {}).get("requires", ["setuptools>=40.8.0"]))
    return name, reqs, build


_BASE_LINE = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:\[[^\]]*\])?\s*(?:==\s*([^\s;#,]+))?")


def read_base_packages(path: Optional[Path]) -> Dict[str, Optional[str]]:
    """Names (and, in `pip freeze` style `name==version` lines, versions) of a base image.

    One package a line; `#` starts a comment; `-e ...`, `--...` lines are skipped.
    """
    base: Dict[str, Optional[str]] = {}
    if path is None:
        return base
    for raw in Path(path).read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line or line.startswith("-"):
            continue
        m = _BASE_LINE.match(line)
        if not m:
            raise WheelhouseError(f"{path}: cannot read the line {raw!r}")
        base[canonicalize_name(m.group(1))] = m.group(2)
    return base


# ----------------------------------------------------------------------------- target

def expand_platforms(platforms: List[str]) -> List[str]:
    """manylinux_2_28_x86_64 -> itself plus every older manylinux tag it runs (as pip does at
    run time on such a system; pip's --platform does not expand the PEP 600 names)."""
    legacy = {"manylinux2014": (2, 17), "manylinux2010": (2, 12), "manylinux1": (2, 5)}
    out: List[str] = []

    def add(p: str) -> None:
        if p not in out:
            out.append(p)

    for plat in platforms:
        for p in plat.replace(",", " ").split():
            add(p)
            m = re.match(r"^manylinux_(\d+)_(\d+)_(.+)$", p)
            lm = re.match(r"^(manylinux2014|manylinux2010|manylinux1)_(.+)$", p)
            if m:
                major, minor, arch = int(m.group(1)), int(m.group(2)), m.group(3)
            elif lm:
                (major, minor), arch = legacy[lm.group(1)], lm.group(2)
            else:
                continue
            for n in range(minor, 4, -1):
                add(f"manylinux_{major}_{n}_{arch}")
            for name, (ma, mi) in legacy.items():
                if (ma, mi) <= (major, minor):
                    add(f"{name}_{arch}")
    return out


class Target:
    """The interpreter and platform the wheels are for, and its marker environment."""

    def __init__(self, python_version: Optional[str], platforms: List[str], implementation: str = "cp"):
        host_py = f"{sys.version_info.major}.{sys.version_info.minor}"
        self.foreign = bool(python_version or platforms)
        self.python_version = python_version or host_py
        if not re.match(r"^\d+\.\d+$", self.python_version):
            raise WheelhouseError(f"--python-version {self.python_version!r}: give MAJOR.MINOR, e.g. 3.12")
        self.implementation = implementation
        if self.foreign and not platforms:
            platforms = [_host_platform_tag()]
        self.platforms = expand_platforms(platforms) if platforms else []
        env = dict(default_environment())
        if self.foreign:
            plat = self.platforms[0]
            machine = _machine_of(plat)
            if plat.startswith(("manylinux", "musllinux", "linux")):
                sys_platform, system, os_name = "linux", "Linux", "posix"
            elif plat.startswith("macosx"):
                sys_platform, system, os_name = "darwin", "Darwin", "posix"
            elif plat.startswith("win"):
                sys_platform, system, os_name = "win32", "Windows", "nt"
            else:
                sys_platform, system, os_name = env["sys_platform"], env["platform_system"], env["os_name"]
            impl = {"cp": ("cpython", "CPython"), "pp": ("pypy", "PyPy")}.get(implementation, ("cpython", "CPython"))
            env.update(python_version=self.python_version, python_full_version=f"{self.python_version}.0",
                       implementation_version=f"{self.python_version}.0", implementation_name=impl[0],
                       platform_python_implementation=impl[1], sys_platform=sys_platform,
                       platform_system=system, os_name=os_name, platform_machine=machine,
                       platform_release="", platform_version="")
        self.env = env

    def describe(self) -> str:
        if not self.foreign:
            return f"this interpreter (Python {self.python_version}, {_host_platform_tag()})"
        more = f" (+{len(self.platforms) - 1} older tags)" if len(self.platforms) > 1 else ""
        return f"Python {self.python_version} ({self.implementation}), {self.platforms[0]}{more}"

    def pip_options(self) -> List[str]:
        if not self.foreign:
            return []
        opts = ["--python-version", self.python_version, "--implementation", self.implementation]
        for p in self.platforms:
            opts += ["--platform", p]
        return opts


def _machine_of(plat: str) -> str:
    if plat.startswith("win"):
        return {"win_amd64": "AMD64", "win32": "x86", "win_arm64": "ARM64"}.get(plat, "AMD64")
    if plat.startswith("macosx"):
        return plat.split("_")[-1]
    for arch in ("x86_64", "aarch64", "ppc64le", "s390x", "i686", "armv7l", "riscv64"):
        if plat.endswith(arch):
            return arch
    return _platform.machine()


def _host_platform_tag() -> str:
    m = _platform.machine()
    if sys.platform.startswith("linux"):
        return f"manylinux_2_17_{m}"
    import sysconfig
    return sysconfig.get_platform().replace("-", "_").replace(".", "_")


# ----------------------------------------------------------------------------- pip

def _pip(args: List[str], what: str, quiet: bool = True) -> None:
    cmd = [sys.executable, "-m", "pip", *args, "--disable-pip-version-check"]
    if quiet:
        cmd.append("--quiet")
    t0 = time.monotonic()
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if proc.returncode != 0:
        tail = "\n".join(line for line in proc.stdout.splitlines() if "is ignored: it is neither" not in line)
        raise WheelhouseError(f"{what} failed (pip exit {proc.returncode}):\n  {' '.join(cmd)}\n{tail[-6000:]}")
    log(f"{what}: {time.monotonic() - t0:.0f} s")


class Item:
    """One distribution of a pip report."""

    def __init__(self, entry: dict):
        meta = entry["metadata"]
        self.name = canonicalize_name(meta["name"])
        self.display = meta["name"]
        self.version = meta["version"]
        self.requires = [Requirement(r) for r in meta.get("requires_dist") or [] if _parses(r)]
        info = entry["download_info"]
        self.url = info["url"]
        hashes = info.get("archive_info", {}).get("hashes") or {}
        if not hashes and "hash" in info.get("archive_info", {}):
            algo, _, value = info["archive_info"]["hash"].partition("=")
            hashes = {algo: value}
        self.sha256 = hashes.get("sha256")
        self.filename = self.url.rsplit("/", 1)[-1].split("#", 1)[0]
        self.is_wheel = self.filename.endswith(".whl")

    @property
    def pure(self) -> bool:
        return self.is_wheel and self.filename[:-4].endswith("-none-any")


def _parses(req: str) -> bool:
    try:
        Requirement(req)
        return True
    except InvalidRequirement:
        log(f"warning: skipping an unparsable requirement {req!r}")
        return False


def resolve(reqs: List[str], target: Target, work: Path, find_links: List[Path],
            constraints: Optional[Path], binary_only: bool, tag: str) -> Dict[str, Item]:
    """pip's resolution of ``reqs`` for ``target`` (nothing is installed or downloaded in full)."""
    report = work / f"report-{tag}.json"
    args = ["install", "--dry-run", "--ignore-installed", "--report", str(report)]
    if target.foreign:  # pip < 24 wants --target with the platform options, even for --dry-run
        args += ["--target", str(work / f"target-{tag}"), *target.pip_options()]
    args += ["--only-binary=:all:"] if binary_only else ["--prefer-binary"]
    for fl in find_links:
        args += ["--find-links", str(fl)]
    if constraints is not None:
        args += ["--constraint", str(constraints)]
    _pip(args + reqs, f"resolving {len(reqs)} requirements for {'the target' if target.foreign else 'this Python'}")
    data = json.loads(report.read_text())
    return {item.name: item for item in (Item(e) for e in data.get("install", []))}


# ----------------------------------------------------------------------------- graph

def _norm_extra(e: str) -> str:
    return re.sub(r"[-_.]+", "-", e).lower()


def _marker_ok(marker: Optional[Marker], env: dict, extras: Iterable[str]) -> bool:
    if marker is None:
        return True
    for e in {"", *extras}:
        for variant in {e, _norm_extra(e), _norm_extra(e).replace("-", "_")}:
            try:
                if marker.evaluate({**env, "extra": variant}):
                    return True
            except Exception:  # noqa: BLE001 - an unknown marker variable: not for this target
                pass
    return False


def walk(items: Dict[str, Item], roots: List[Requirement], env: dict,
         stop: Set[str] = frozenset()) -> Tuple[Dict[str, Set[str]], Dict[str, str]]:
    """Closure of ``roots`` over ``items`` with ``env``'s markers.

    Returns ({name: extras requested}, {missing name: the requirement that asked for it}).
    Names in ``stop`` are reached but only their extras' own dependencies are followed
    (the base environment installed them, with their plain dependencies).
    """
    reached: Dict[str, Set[str]] = {}
    missing: Dict[str, str] = {}
    todo: List[Tuple[Requirement, Set[str]]] = [(r, {""}) for r in roots]
    while todo:
        req, parent_extras = todo.pop()
        if not _marker_ok(req.marker, env, parent_extras):
            continue
        name = canonicalize_name(req.name)
        extras = {_norm_extra(e) for e in req.extras}
        item = items.get(name)
        if item is None or (req.specifier and not req.specifier.contains(item.version, prereleases=True)):
            # absent (pip's host markers skipped it) or a version that this target's markers exclude
            missing.setdefault(name, f"{req.name}{req.specifier}")
            continue
        known = reached.get(name)
        if known is not None and extras <= known:
            continue
        new_extras = extras - (known or set())
        first = known is None
        reached.setdefault(name, set()).update(extras)
        for dep in item.requires:
            if name in stop:  # only what the requested extras add
                if not new_extras or _marker_ok(dep.marker, env, ()) or not _marker_ok(dep.marker, env, new_extras):
                    continue
            elif not first and _marker_ok(dep.marker, env, ()):
                continue  # followed the first time
            todo.append((dep, ({""} | extras) if first else new_extras))
    return reached, missing


# ----------------------------------------------------------------------------- ray repack

def _record_hash(data: bytes) -> str:
    return "sha256=" + urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def _excluded(path: str, patterns: Iterable[str]) -> bool:
    for pat in patterns:
        if pat.endswith("/"):
            if path.startswith(pat):
                return True
        elif fnmatch.fnmatchcase(path, pat):
            return True
    return False


def repack_wheel(path: Path, patterns: Iterable[str], note: str,
                 transform: Optional[Callable[[str, bytes], bytes]] = None) -> Tuple[int, List[str]]:
    """Rewrite the wheel at ``path`` without the files matching ``patterns`` (and with
    ``transform(name, data)`` applied to the kept ones).

    Same file name; RECORD is written anew from what the wheel holds (plus a note file
    saying what was done). Returns (bytes saved, the patterns that removed something).
    """
    patterns = list(patterns)
    before = path.stat().st_size
    tmp = path.with_suffix(".whl.tmp")
    removed: Set[str] = set()
    with zipfile.ZipFile(path) as zin:
        names = zin.namelist()
        records = [n for n in names if n.endswith(".dist-info/RECORD") and n.count("/") == 1]
        if len(records) != 1:
            raise WheelhouseError(f"{path.name}: expected one .dist-info/RECORD, found {records}")
        record = records[0]
        note_name = f"{record.rsplit('/', 1)[0]}/{REPACK_NOTE}"
        rows = []
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as zout:
            for info in zin.infolist():
                name = info.filename
                if name in (record, note_name):
                    continue
                hit = next((p for p in patterns if _excluded(name, [p])), None)
                if hit is not None:
                    removed.add(hit)
                    continue
                data = zin.read(info)
                if transform is not None and not name.endswith("/"):
                    data = transform(name, data)
                info.compress_type = zipfile.ZIP_DEFLATED
                zout.writestr(info, data)
                if not name.endswith("/"):
                    rows.append([name, _record_hash(data), str(len(data))])
            text = note.encode()
            zout.writestr(_zinfo(note_name), text)
            rows.append([note_name, _record_hash(text), str(len(text))])
            rows.append([record, "", ""])
            buf = io.StringIO()
            csv.writer(buf, lineterminator="\n").writerows(rows)
            zout.writestr(_zinfo(record), buf.getvalue().encode())
    check_record(tmp)
    os.replace(tmp, path)
    return before - path.stat().st_size, sorted(removed)


# ELF64 little-endian: the symbol table and debug sections are never loaded (no SHF_ALLOC)
# and serve only debuggers and crash-time symbolisation; zeroed, they compress to nothing.
_SHF_ALLOC, _SHT_NOBITS = 0x2, 8


def zero_elf_symbols(data: bytes) -> Tuple[bytes, int]:
    """``data`` with .symtab/.strtab/.debug_* emptied (contents zeroed, size 0), as
    `strip --strip-debug --strip-unneeded` would for what the loader sees: the dynamic
    symbols (.dynsym) and every loaded segment stay as they are. Returns (data, bytes zeroed)."""
    if len(data) < 64 or data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        return data, 0
    (_, _, _, _, _, e_phoff, e_shoff, _, _, e_phentsize, e_phnum, e_shentsize, e_shnum,
     e_shstrndx) = struct.unpack_from("<16sHHIQQQIHHHHHH", data, 0)
    if not e_shoff or not e_shnum or e_shentsize != 64 or e_shstrndx >= e_shnum \
            or e_shoff + e_shnum * 64 > len(data):
        return data, 0
    sections = [struct.unpack_from("<IIQQQQIIQQ", data, e_shoff + i * 64) for i in range(e_shnum)]
    str_off, str_size = sections[e_shstrndx][4], sections[e_shstrndx][5]
    protected = [(0, 64), (e_shoff, e_shoff + e_shnum * 64), (str_off, str_off + str_size)]
    if e_phoff and e_phentsize == 56:
        protected.append((e_phoff, e_phoff + e_phnum * 56))
        for i in range(e_phnum):
            ph = struct.unpack_from("<IIQQQQQQ", data, e_phoff + i * 56)
            protected.append((ph[2], ph[2] + ph[5]))  # p_offset, p_filesz
    buf, zeroed = bytearray(data), 0
    for i, (sh_name, sh_type, sh_flags, _, off, size, *_rest) in enumerate(sections):
        end = data.find(b"\0", str_off + sh_name, str_off + str_size)
        name = data[str_off + sh_name:end].decode("ascii", "replace") if end >= 0 else ""
        if not (name in (".symtab", ".strtab") or name.startswith(".debug_")):
            continue
        if sh_flags & _SHF_ALLOC or sh_type == _SHT_NOBITS or not size or off + size > len(data):
            continue
        if any(off < b and a < off + size for a, b in protected):
            continue
        buf[off:off + size] = bytes(size)
        struct.pack_into("<Q", buf, e_shoff + i * 64 + 32, 0)  # sh_size
        zeroed += size
    return bytes(buf), zeroed


def virtualenv_other_seeds(path: Path, python_version: str) -> List[str]:
    """The seed wheels embedded in a virtualenv wheel for Pythons other than the target's."""
    import ast

    with zipfile.ZipFile(path) as z:
        embed = "virtualenv/seed/wheels/embed/"
        try:
            tree = ast.parse(z.read(embed + "__init__.py").decode())
        except KeyError:
            return []
        support = None
        for node in ast.walk(tree):
            if isinstance(node, ast.Assign):
                targets = node.targets
            elif isinstance(node, ast.AnnAssign):
                targets = [node.target]
            else:
                continue
            if any(isinstance(t, ast.Name) and t.id == "BUNDLE_SUPPORT" for t in targets) and node.value is not None:
                try:
                    support = ast.literal_eval(node.value)
                except ValueError:
                    return []
        if not isinstance(support, dict) or python_version not in support:
            return []
        keep = set(support[python_version].values())
        return [n for n in z.namelist() if n.startswith(embed) and n.endswith(".whl") and n[len(embed):] not in keep]


def _zinfo(name: str) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name, date_time=(2020, 1, 1, 0, 0, 0))
    info.external_attr = 0o644 << 16
    info.compress_type = zipfile.ZIP_DEFLATED
    return info


def check_record(path: Path) -> None:
    """Every file of the wheel is in its RECORD with the right hash, and nothing else is."""
    with zipfile.ZipFile(path) as z:
        record = next(n for n in z.namelist() if n.endswith(".dist-info/RECORD") and n.count("/") == 1)
        rows = {r[0]: r for r in csv.reader(io.StringIO(z.read(record).decode())) if r}
        files = {n for n in z.namelist() if not n.endswith("/")}
        if set(rows) != files:
            extra, lacking = sorted(set(rows) - files)[:5], sorted(files - set(rows))[:5]
            raise WheelhouseError(f"{path.name}: RECORD does not match the files (listed, absent: {extra}; "
                                  f"present, unlisted: {lacking})")
        for name, row in rows.items():
            if name == record or not row[1]:
                continue
            if row[1] != _record_hash(z.read(name)):
                raise WheelhouseError(f"{path.name}: hash mismatch for {name} in RECORD")


# ----------------------------------------------------------------------------- build

def build_sdists(items: Iterable[Item], dest: Path, pure_only: bool) -> None:
    """Wheels, built here, for what exists only as a source archive."""
    items = list(items)
    if not items:
        return
    dest.mkdir(parents=True, exist_ok=True)
    urls = [f"{i.url}#sha256={i.sha256}" if i.sha256 and "#" not in i.url else i.url for i in items]
    _pip(["wheel", "--no-deps", "--wheel-dir", str(dest), *urls],
         f"building wheels from source archives ({', '.join(i.display + ' ' + i.version for i in items)})")
    if pure_only:
        for whl in dest.glob("*.whl"):
            if not whl.name[:-4].endswith("-none-any"):
                raise WheelhouseError(f"{whl.name} was built from source here and is not pure Python: "
                                      "it cannot serve another Python or platform. Build the wheelhouse "
                                      "on a machine like the target (without --python-version/--platform).")


def pure_alternative(item: Item, target: Target, work: Path) -> Optional[Item]:
    """The py3-none-any wheel of the same version, if the index has one."""
    report = work / f"pure-{item.name}.json"
    args = ["install", "--dry-run", "--ignore-installed", "--no-deps", "--only-binary=:all:",
            "--target", str(work / f"pure-target-{item.name}"), "--report", str(report),
            "--python-version", target.python_version, "--implementation", "py", "--abi", "none",
            "--platform", "any", f"{item.name}=={item.version}"]
    cmd = [sys.executable, "-m", "pip", *args, "--quiet", "--disable-pip-version-check"]
    proc = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    if proc.returncode != 0 or not report.exists():
        return None
    found = [Item(e) for e in json.loads(report.read_text()).get("install", [])]
    return found[0] if found and found[0].pure and found[0].version == item.version else None


def download(items: List[Item], target: Target, dest: Path, built: Path) -> Dict[str, Path]:
    """Fetch the wheels of ``items`` into ``dest`` (pip checks each file's sha256)."""
    dest.mkdir(parents=True, exist_ok=True)
    out: Dict[str, Path] = {}
    urls = []
    for item in items:
        if not item.is_wheel:  # built from its source archive earlier
            whl = [w for w in built.glob("*.whl")
                   if canonicalize_name(w.name.split("-")[0]) == item.name and w.name.split("-")[1] == item.version]
            if not whl:
                raise WheelhouseError(f"no wheel was built for {item.display} {item.version}")
            shutil.copy2(whl[0], dest / whl[0].name)
            out[item.name] = dest / whl[0].name
            continue
        url = item.url
        if item.sha256 and "#" not in url:
            url += f"#sha256={item.sha256}"
        urls.append(url)
        out[item.name] = dest / _unquote(item.filename)
    if urls:
        _pip(["download", "--no-deps", "--dest", str(dest), *target.pip_options(), *urls],
             f"downloading {len(urls)} wheels")
    for name, path in out.items():
        if not path.exists():
            raise WheelhouseError(f"pip did not leave {path.name} in {dest}")
    return out


def _unquote(name: str) -> str:
    from urllib.parse import unquote
    return unquote(name)


# ----------------------------------------------------------------------------- main

def build(args: argparse.Namespace) -> int:
    t_start = time.monotonic()
    import pip

    if tuple(int(x) for x in re.findall(r"\d+", pip.__version__)[:2]) < (22, 2):
        raise WheelhouseError(f"pip {pip.__version__} is too old: --dry-run --report needs pip >= 22.2 "
                              "(python -m pip install -U pip)")
    target = Target(args.python_version, args.platform or [], args.implementation)
    pyproject = Path(args.project).resolve() / "pyproject.toml"
    project, reqs, build_reqs = project_requirements(pyproject, args.extras)
    base = read_base_packages(args.base_packages)
    for name in ALWAYS_BASE:
        base.setdefault(name, None)
    build_names = {canonicalize_name(Requirement(r).name) for r in [*build_reqs, *BUILD_EXTRA]}
    out = Path(args.out).resolve()
    _prepare_out(out)
    log(f"target: {target.describe()}")
    log(f"project {project}: {len(reqs)} requirements; base environment: {len(base)} packages "
        f"({', '.join(sorted(base)[:8])}{', ...' if len(base) > 8 else ''})")

    with tempfile.TemporaryDirectory(prefix="wheelhouse-") as tmp:
        work = Path(tmp)
        built = work / "built"
        constraints = None
        pins = {n: v for n, v in base.items() if v}
        extra_constraints = "".join(Path(c).read_text() + "\n" for c in args.constraint)
        if pins or extra_constraints:
            constraints = work / "constraints.txt"
            constraints.write_text("".join(f"{n}=={v}\n" for n, v in sorted(pins.items())) + extra_constraints)
        all_reqs = [*reqs, *build_reqs, *BUILD_EXTRA]
        # 1. This interpreter, source archives allowed: which packages exist only as sources?
        host = Target(None, [])
        items = resolve(all_reqs, host, work, [], constraints, binary_only=False, tag="host")
        sdists = [i for i in items.values() if not i.is_wheel]
        build_sdists(sdists, built, pure_only=target.foreign)
        # 2. The target (wheels only; the ones built above are found in `built`), then again
        #    as long as the target's markers ask for something pip's host markers did not.
        roots = [Requirement(r) for r in all_reqs]
        extra_reqs: List[str] = []
        for attempt in range(6):
            if target.foreign:
                items = resolve(all_reqs + extra_reqs, target, work, [built] if built.exists() else [],
                                constraints, binary_only=True, tag=f"target{attempt}")
            base_roots = [Requirement(n) for n in base if n in items]
            base_set, _ = walk(items, base_roots, target.env)
            needed, missing = walk(items, roots + [Requirement(r) for r in extra_reqs], target.env,
                                   stop=set(base_set) - build_names)
            if not missing:
                break
            if not target.foreign:
                raise WheelhouseError(f"pip's resolution lacks {sorted(missing)}")
            log(f"the target's markers also need {', '.join(sorted(missing.values()))}: resolving again")
            extra_reqs += [r for r in missing.values() if r not in extra_reqs]
        else:
            raise WheelhouseError(f"the resolution does not settle; still missing {sorted(missing)}")

        ship = sorted(n for n in needed if n not in base_set or n in build_names)
        ship += sorted(n for n in build_names if n in items and n not in ship)
        ship_items = [items[n] for n in ship]
        # 3. Pure-Python wheels where the same version has one.
        notes: Dict[str, List[str]] = {n: [] for n in ship}
        if not args.no_prefer_pure:
            from concurrent.futures import ThreadPoolExecutor

            keep = {*args.keep_compiled, *KEEP_COMPILED}
            candidates = [i for i in ship_items if i.is_wheel and not i.pure and i.name not in keep]
            t0 = time.monotonic()
            with ThreadPoolExecutor(4) as pool:
                alts = dict(zip([i.name for i in candidates],
                                pool.map(lambda i: pure_alternative(i, target, work), candidates)))
            log(f"looking for pure-Python wheels of {len(candidates)} compiled ones: {time.monotonic() - t0:.0f} s")
            chosen = []
            for item in ship_items:
                alt = alts.get(item.name)
                if alt is not None:
                    notes[item.name].append(f"pure-Python wheel instead of {item.filename.split('-', 2)[-1]}")
                chosen.append(alt or item)
            ship_items = chosen
        for item in ship_items:
            if not item.is_wheel or item.url.startswith(built.as_uri()):
                notes[item.name].append("built here from its source archive")
        paths = download(ship_items, target, out, built)

    # 4. Slim: ray without what the platform never uses, virtualenv without the seed wheels
    #    of other Pythons, large wheels without their test suites.
    repacks = slim(paths, target, args, notes)

    rows = []
    for item in ship_items:
        p = paths[item.name]
        rows.append({"name": item.display, "version": item.version, "file": p.name, "bytes": p.stat().st_size,
                     "notes": notes.get(item.name, [])})
    total = sum(r["bytes"] for r in rows)
    print_table(rows, total)
    manifest = {
        "project": project, "target": {"python_version": target.python_version,
                                       "implementation": target.implementation,
                                       "platforms": target.platforms or [_host_platform_tag()],
                                       "this_interpreter": not target.foreign},
        "base_packages": sorted(base), "provided_by_base": sorted(base_set),
        "requirements": reqs, "extras": list(args.extras), "wheels": rows, "total_bytes": total,
        "repacked": repacks, "max_mib": args.max_mib,
        "install": f"pip install --no-index --find-links {out.name} -e .",
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    log(f"{len(rows)} wheels in {out} ({time.monotonic() - t_start:.0f} s); install offline, from the "
        f"checkout: pip install --no-index --find-links {out} -e .")
    if args.max_mib and total > args.max_mib * MiB:
        print(f"FAIL: {total / MiB:.1f} MiB is over --max-mib {args.max_mib:g}", file=sys.stderr)
        return 1
    return 0


def _symbol_bytes(path: Path, skip: Iterable[str] = ()) -> int:
    """How many bytes of ELF symbol tables the wheel's binaries hold (uncompressed)."""
    total = 0
    with zipfile.ZipFile(path) as z:
        for info in z.infolist():
            if info.file_size < 4096 or info.filename.endswith(("/", ".py", ".pyi", ".txt", ".json")) \
                    or _excluded(info.filename, skip):
                continue
            with z.open(info) as f:
                if f.read(4) != b"\x7fELF":
                    continue
            total += zero_elf_symbols(z.read(info))[1]
    return total


def _test_dirs(path: Path, min_bytes: int) -> List[str]:
    """Folders named tests/ inside the wheel's packages, if they hold at least ``min_bytes`` compressed."""
    sizes: Dict[str, int] = {}
    with zipfile.ZipFile(path) as z:
        for info in z.infolist():
            n = info.filename
            if "/tests/" in n and ".dist-info/" not in n and ".data/" not in n:
                d = n[:n.index("/tests/") + 7]
                sizes[d] = sizes.get(d, 0) + info.compress_size
    return sorted(sizes) if sum(sizes.values()) >= min_bytes else []


def slim(paths: Dict[str, Path], target: Target, args: argparse.Namespace,
         notes: Dict[str, List[str]]) -> Dict[str, dict]:
    """Repack wheels without what is never used here; returns what was done, by package."""
    repacks: Dict[str, dict] = {}
    for name, path in sorted(paths.items()):
        if name == "ray" and args.keep_full_ray:
            continue
        t0 = time.monotonic()
        patterns: List[str] = []
        why: List[str] = []
        if name == "ray":
            patterns += [*RAY_EXCLUDES, *args.ray_exclude]
            why.append("parts this platform never uses")
        if name == "virtualenv":
            seeds = virtualenv_other_seeds(path, target.python_version)
            if seeds:
                patterns += seeds
                why.append(f"seed wheels for Pythons other than {target.python_version}")
        if not args.keep_tests:
            tests = _test_dirs(path, MiB // 2)
            if tests:
                patterns += tests
                why.append("test suites")
        symbols = 0 if args.keep_symbols else _symbol_bytes(path, patterns)
        strip = symbols >= MiB // 2
        if not patterns and not strip:
            continue
        zeroed = [0]

        def transform(fname: str, data: bytes) -> bytes:
            if not strip or data[:4] != b"\x7fELF":
                return data
            new, n = zero_elf_symbols(data)
            zeroed[0] += n
            return new

        note = "Repacked by platform/cluster/wheelhouse.py (dinov3-ray's offline install).\n"
        if patterns:
            note += f"Removed ({', '.join(why)}):\n" + "".join(f"  {p}\n" for p in patterns)
        if strip:
            note += ("Emptied the symbol tables (.symtab/.strtab/.debug_*) of its ELF binaries, as `strip` "
                     "does: crash backtraces show addresses instead of function names.\n")
        saved, removed = repack_wheel(path, patterns, note, transform)
        if strip:
            why.append(f"{zeroed[0] / MiB:.0f} MiB of ELF symbol tables emptied")
        repacks[name] = {"removed": removed, "saved_bytes": saved, "symbol_bytes_emptied": zeroed[0],
                         "why": why}
        shown = removed if len(removed) <= 6 else removed[:5] + [f"... {len(removed) - 5} more"]
        notes.setdefault(name, []).append(f"repacked -{saved / MiB:.1f} MiB: {'; '.join(why)}"
                                          + (f" ({', '.join(shown)})" if shown else ""))
        log(f"repacked {path.name}: -{saved / MiB:.1f} MiB ({time.monotonic() - t0:.0f} s)")
    return repacks


def _prepare_out(out: Path) -> None:
    if out.exists():
        entries = list(out.iterdir())
        if entries and not (out / MANIFEST).exists():
            raise WheelhouseError(f"{out} exists and is not an earlier wheelhouse (no {MANIFEST}): "
                                  "give an empty or new folder")
        for e in entries:  # an earlier wheelhouse: replace its wheels
            if e.name == MANIFEST or e.suffix in (".whl", ".tmp"):
                e.unlink()
    out.mkdir(parents=True, exist_ok=True)


def print_table(rows: List[dict], total: int) -> None:
    w = max([len(r["name"]) for r in rows] + [7])
    v = max([len(r["version"]) for r in rows] + [7])
    print(f"{'package':<{w}}  {'version':<{v}}  {'MiB':>7}  notes")
    for r in sorted(rows, key=lambda r: -r["bytes"]):
        print(f"{r['name']:<{w}}  {r['version']:<{v}}  {r['bytes'] / MiB:7.2f}  {'; '.join(r['notes'])}")
    print(f"{'total':<{w}}  {len(rows):<{v}}  {total / MiB:7.2f}  MiB in {len(rows)} wheels")


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog="Then, offline, from the checkout: pip install --no-index --find-links DIR -e .",
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True,
                   help="folder for the wheels (created; an earlier wheelhouse there is replaced)")
    p.add_argument("--python-version", help="target Python MAJOR.MINOR (default: this interpreter's)")
    p.add_argument("--platform", action="append",
                   help="target platform tag, e.g. manylinux_2_28_x86_64 (repeat or comma-separate for several; "
                        "older manylinux tags are added); default: this machine")
    p.add_argument("--implementation", default="cp", help="target implementation tag (default cp)")
    p.add_argument("--base-packages", type=Path,
                   help="file listing what the target environment already has besides torch and torchvision "
                        "(one name a line, or pip-freeze 'name==version' lines; '#' comments)")
    p.add_argument("--extras", action="append", default=[],
                   help="also the project's optional dependencies of this group (e.g. gpu); repeatable")
    p.add_argument("--constraint", action="append", default=[], type=Path,
                   help="a pip constraints file for the resolution (e.g. to choose older, leaner releases)")
    p.add_argument("--max-mib", type=float, default=60.0,
                   help="fail if the wheels add up to more (default 60; 0: no limit)")
    p.add_argument("--keep-full-ray", action="store_true", help="ship the ray wheel as published")
    p.add_argument("--keep-symbols", action="store_true",
                   help="keep the symbol tables of the binaries (named C++/Rust backtraces; ~5.5 MiB more)")
    p.add_argument("--keep-tests", action="store_true", help="keep the test suites inside large wheels")
    p.add_argument("--ray-exclude", action="append", default=[],
                   help="one more path pattern to drop from the ray wheel (folder ending in '/', or fnmatch)")
    p.add_argument("--no-prefer-pure", action="store_true",
                   help="keep pip's compiled wheels even where a pure-Python wheel of the same version exists")
    p.add_argument("--keep-compiled", action="append", default=[],
                   help="package whose compiled wheel to keep even if a pure-Python one exists; repeatable")
    p.add_argument("--project", default=str(REPO_ROOT), help="the checkout whose pyproject.toml to read")
    args = p.parse_args(argv)
    args.keep_compiled = {canonicalize_name(n) for n in args.keep_compiled}
    return args


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    try:
        return build(args)
    except WheelhouseError as err:
        print(f"wheelhouse: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
