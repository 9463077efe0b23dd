"""Where C++ text comes from, and how each input is pinned.

Three kinds of source spec:

- ``system``: C/C++ headers already on this machine under /usr/include
  (libstdc++'s /usr/include/c++/* first). Every file is attributed to the
  Debian package that owns it (read from /var/lib/dpkg/info/*.list) and pinned
  to that package's installed version; files no package owns are skipped.
- ``debian:PKG`` (or ``debian:PKG=VERSION`` or ``debian:/path/to/file.deb``):
  a Debian package fetched with ``apt-get download`` into a cache and
  unpacked with ``dpkg-deb -x`` without installing; tarballs inside it (such
  as gcc-12-source's) are unpacked too, C/C++ members only. Pinned to the
  exact package version and the .deb's sha256.
- ``dir:PATH``: a local tree, pinned by a hash of its C/C++ file contents
  (and the commit, when it is a git checkout).

Each source resolves to pinned `Input` records (name, version, license,
sha256) and the list of candidate files with their raw sha256.
"""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import stat
import subprocess
import tarfile
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath

from megacpp.errors import DataError

CPP_EXTENSIONS = frozenset(
    ".c .cc .cpp .cxx .c++ .cp .h .hh .hpp .hxx .h++ .inl .ipp .tcc .tpp .txx .ixx .cppm".split()
)
TARBALL_SUFFIXES = (".tar.xz", ".tar.gz", ".tgz", ".tar.bz2", ".tar")
SYSTEM_ROOT = Path("/usr/include")
DPKG_INFO = Path("/var/lib/dpkg/info")
DPKG_STATUS = Path("/var/lib/dpkg/status")
# Packages whose C++ text FACTS.md measured; `data sources` reports their apt candidates.
SUGGESTED_DEBIAN = (
    "libboost1.81-dev",
    "gcc-12-source",
    "libeigen3-dev",
    "qtbase5-dev",
    "libdlib-dev",
    "libtorch-dev",
    "googletest",
    "libabsl-dev",
)


def is_cpp_path(path: str) -> bool:
    """True for C/C++ source and header names, including libstdc++'s extensionless headers."""
    name = path.rsplit("/", 1)[-1]
    dot = name.rfind(".")
    if dot > 0:
        return name[dot:].lower() in CPP_EXTENSIONS
    # <vector>, <map>, ... have no extension; they live under a c++/ directory.
    return "/c++/" in "/" + path


@dataclass(frozen=True)
class SourceFile:
    """One candidate file: `path` is the provenance name, `fs_path` where to read it."""

    input_id: int  # index into the owning Source's inputs
    path: str
    fs_path: str
    size: int
    sha256: str  # of the raw bytes
    tier: int = 1  # lower tiers are taken first when the corpus is capped


@dataclass
class Input:
    """A pinned input as recorded in the snapshot manifest."""

    source: str
    name: str
    version: str
    license: dict
    sha256: str
    files: int = 0
    bytes: int = 0
    details: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return asdict(self)


@dataclass
class Source:
    spec: str
    kind: str
    inputs: list[Input]
    files: list[SourceFile]
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> files not offered at all


def default_cache_dir() -> Path:
    return Path(os.environ.get("MEGACPP_CACHE", Path.home() / ".cache" / "megacpp"))


def resolve_source(spec: str, cache_dir: Path | None = None) -> Source:
    """Resolve one source spec into pinned inputs and candidate files."""
    spec = spec.strip()
    if spec == "system":
        return _system_source()
    if spec.startswith("debian:") and len(spec) > len("debian:"):
        return _debian_source(spec, Path(cache_dir) if cache_dir else default_cache_dir())
    if spec.startswith("dir:") and len(spec) > len("dir:"):
        return _dir_source(spec)
    raise DataError(f"--sources: unknown source '{spec}' (expected system, debian:PKG or dir:PATH)")


# ---------------------------------------------------------------- hashing / licenses


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def tree_digest(files: list[tuple[str, str]]) -> str:
    """sha256 over sorted (path, content sha256) pairs: pins a set of files."""
    h = hashlib.sha256()
    for path, digest in sorted(files):
        h.update(f"{path}\t{digest}\n".encode())
    return h.hexdigest()


_LICENSE_HINTS = (
    ("Apache-2.0", re.compile(r"Apache License,?\s+Version 2\.0", re.I)),
    ("MPL-2.0", re.compile(r"Mozilla Public License,?\s+(v\.|version)\s*2\.0", re.I)),
    ("GPL-3.0", re.compile(r"GNU GENERAL PUBLIC LICENSE\s+Version 3", re.I)),
    ("GPL-2.0", re.compile(r"GNU GENERAL PUBLIC LICENSE\s+Version 2", re.I)),
    ("LGPL", re.compile(r"GNU (LESSER|LIBRARY) GENERAL PUBLIC LICENSE", re.I)),
    ("GCC-exception-3.1", re.compile(r"GCC Runtime Library Exception", re.I)),
    ("BSL-1.0", re.compile(r"Boost Software License", re.I)),
    ("MIT", re.compile(r"Permission is hereby granted, free of charge", re.I)),
    ("BSD", re.compile(r"Redistribution and use in source and binary forms", re.I)),
)


def describe_license(path: Path | None) -> dict:
    """License record: the file, its sha256 and the license names found in it.

    Debian machine-readable copyright files (DEP-5) list their `License:`
    fields; free-form files get names from a few well-known phrases. The file
    hash pins the full text either way.
    """
    if path is None or not path.is_file():
        return {"file": str(path) if path else None, "sha256": None, "ids": ["unknown"], "format": "missing"}
    raw = path.read_bytes()
    text = raw.decode("utf-8", errors="replace")
    if text.startswith("Format:"):
        ids = sorted({m.group(1).strip() for m in re.finditer(r"^License:[ \t]*(\S[^\n]*)", text, re.M)})
        fmt = "dep5"
    else:
        ids = [name for name, pattern in _LICENSE_HINTS if pattern.search(text)]
        fmt = "free-form"
    return {"file": str(path), "sha256": hashlib.sha256(raw).hexdigest(), "ids": ids or ["unknown"], "format": fmt}


def _regular_file(path: str) -> os.stat_result | None:
    st = os.lstat(path)
    return st if stat.S_ISREG(st.st_mode) else None


# ---------------------------------------------------------------- system


def _cpp_files(base: Path, skipped: dict[str, int], skip_hidden: bool):
    """(relative path, full path, stat) of each regular C/C++ file under base, in
    sorted order; symlinks and special files are counted in `skipped`."""
    for dirpath, dirnames, filenames in os.walk(base):
        # VCS metadata and hidden trees of a local checkout are not source text
        dirnames[:] = sorted(d for d in dirnames if not (skip_hidden and d.startswith(".")))
        for fname in sorted(filenames):
            full = os.path.join(dirpath, fname)
            rel = Path(full).relative_to(base).as_posix()
            if not is_cpp_path(rel):
                continue
            st = _regular_file(full)
            if st is None:
                skipped["symlink_or_special"] = skipped.get("symlink_or_special", 0) + 1
                continue
            yield rel, full, st


def _dpkg_owners(prefix: str) -> dict[str, str]:
    """path -> package (list-file stem, e.g. 'libstdc++-12-dev:amd64') for paths under prefix."""
    owners: dict[str, str] = {}
    for lst in sorted(DPKG_INFO.glob("*.list")):
        pkg = lst.name[: -len(".list")]
        with open(lst, encoding="utf-8", errors="surrogateescape") as f:
            for line in f:
                if line.startswith(prefix):
                    owners.setdefault(line.rstrip("\n"), pkg)
    return owners


def _dpkg_versions() -> dict[str, str]:
    """Installed versions keyed both 'pkg' and 'pkg:arch'."""
    versions: dict[str, str] = {}
    if not DPKG_STATUS.is_file():
        return versions
    for stanza in DPKG_STATUS.read_text(encoding="utf-8", errors="replace").split("\n\n"):
        fields = dict(re.findall(r"^([A-Za-z-]+): ?(.*)$", stanza, re.M))
        if "Package" in fields and "Version" in fields and "installed" in fields.get("Status", ""):
            versions.setdefault(fields["Package"], fields["Version"])
            versions[f"{fields['Package']}:{fields.get('Architecture', '')}"] = fields["Version"]
    return versions


def _system_source() -> Source:
    if not SYSTEM_ROOT.is_dir():
        raise DataError(f"system: {SYSTEM_ROOT} does not exist (no C/C++ headers installed)")
    owners = _dpkg_owners(str(SYSTEM_ROOT) + "/")
    versions = _dpkg_versions()
    skipped: dict[str, int] = {}
    by_pkg: dict[str, list[tuple[str, int, str]]] = {}
    for dirpath, dirnames, filenames in os.walk(SYSTEM_ROOT):
        dirnames.sort()
        for name in sorted(filenames):
            full = os.path.join(dirpath, name)
            if not is_cpp_path(full):
                continue
            st = _regular_file(full)
            if st is None:
                skipped["symlink_or_special"] = skipped.get("symlink_or_special", 0) + 1
                continue
            pkg = owners.get(full)
            if pkg is None:
                skipped["no_owning_package"] = skipped.get("no_owning_package", 0) + 1
                continue
            by_pkg.setdefault(pkg, []).append((full, st.st_size, sha256_file(full)))
    inputs: list[Input] = []
    files: list[SourceFile] = []
    for input_id, pkg in enumerate(sorted(by_pkg)):
        entries = by_pkg[pkg]
        name = pkg.split(":", 1)[0]
        version = versions.get(pkg) or versions.get(name) or "unknown"
        inputs.append(
            Input(
                source="system",
                name=pkg,
                version=version,
                license=describe_license(Path("/usr/share/doc") / name / "copyright"),
                sha256=tree_digest([(p, d) for p, _, d in entries]),
                files=len(entries),
                bytes=sum(s for _, s, _ in entries),
            )
        )
        for path, size, digest in entries:
            tier = 0 if path.startswith(str(SYSTEM_ROOT / "c++") + "/") else 1
            files.append(SourceFile(input_id, path, path, size, digest, tier))
    return Source("system", "system", inputs, files, skipped)


# ---------------------------------------------------------------- debian


def _run(cmd: list[str], cwd: Path | None = None, what: str = "") -> str:
    try:
        proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, check=False)
    except FileNotFoundError:
        raise DataError(f"{what}: '{cmd[0]}' is not installed") from None
    if proc.returncode != 0:
        last = (proc.stderr.strip() or proc.stdout.strip()).splitlines()
        raise DataError(f"{what}: {' '.join(cmd)} failed: {last[-1] if last else proc.returncode}")
    return proc.stdout


def _fetch_deb(arg: str, cache: Path, spec: str) -> Path:
    """The .deb for `arg` (a path, PKG or PKG=VERSION), downloaded into the cache if needed."""
    if arg.endswith(".deb"):
        deb = Path(arg).expanduser()
        if not deb.is_file():
            raise DataError(f"{spec}: file {deb} does not exist")
        return deb.resolve()
    debs = cache / "debs"
    debs.mkdir(parents=True, exist_ok=True)
    pkg, _, want = arg.partition("=")
    show = _run(["apt-cache", "show", "--no-all-versions", arg], what=spec)
    fields = dict(re.findall(r"^([A-Za-z0-9-]+): ?(.*)$", show.split("\n\n")[0], re.M))
    if "Filename" in fields:
        cached = debs / PurePosixPath(fields["Filename"]).name
        if cached.is_file() and fields.get("SHA256") == sha256_file(cached):
            return cached  # already fetched and intact: no network needed
    before = set(debs.glob("*.deb"))
    _run(["apt-get", "download", arg], cwd=debs, what=spec)
    new = sorted(set(debs.glob("*.deb")) - before)
    if new:
        return new[0]
    # apt-get may rewrite an existing file in place; find it by package name.
    matches = sorted(debs.glob(f"{pkg}_*.deb"))
    if not matches:
        raise DataError(f"{spec}: apt-get download produced no .deb in {debs}")
    return matches[-1]


def _safe_member(name: str) -> str | None:
    parts = [p for p in PurePosixPath(name).parts if p not in ("", ".")]
    if not parts or parts[0] == "/" or ".." in parts:
        return None
    return "/".join(parts)


def _unpack_tarball(tarball: Path, dest: Path) -> None:
    """Extract only C/C++ members (by name) of a tarball into dest."""
    with tarfile.open(tarball, "r|*") as tf:
        for member in tf:
            if not member.isfile() or not is_cpp_path(member.name):
                continue
            rel = _safe_member(member.name)
            if rel is None:
                continue
            target = dest / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            src = tf.extractfile(member)
            if src is not None:
                target.write_bytes(src.read())


def _debian_source(spec: str, cache: Path) -> Source:
    arg = spec[len("debian:") :]
    deb = _fetch_deb(arg, cache, spec)
    fields = _run(["dpkg-deb", "-f", str(deb), "Package", "Version", "Architecture"], what=spec)
    meta = dict(re.findall(r"^([A-Za-z-]+): ?(.*)$", fields, re.M))
    name, version = meta.get("Package", ""), meta.get("Version", "")
    if not name or not version:
        raise DataError(f"{deb}: control field Package/Version missing")
    deb_sha = sha256_file(deb)
    unpacked = cache / "unpacked" / f"{name}_{version.replace(':', '%3a')}_{deb_sha[:12]}"
    root, tars = unpacked / "root", unpacked / "tarballs"
    if not (unpacked / ".complete").is_file():
        # Unpack into a scratch dir and rename, so an interrupted run never leaves a half tree.
        scratch = unpacked.with_name(unpacked.name + ".partial")
        if scratch.exists():
            shutil.rmtree(scratch)
        (scratch / "root").mkdir(parents=True)
        _run(["dpkg-deb", "-x", str(deb), str(scratch / "root")], what=spec)
        for dirpath, dirnames, filenames in os.walk(scratch / "root"):
            dirnames.sort()
            for fname in sorted(filenames):
                full = Path(dirpath) / fname
                if fname.endswith(TARBALL_SUFFIXES) and _regular_file(str(full)):
                    rel = full.relative_to(scratch / "root").as_posix()
                    _unpack_tarball(full, scratch / "tarballs" / rel)
        (scratch / ".complete").write_text(deb_sha + "\n")
        if unpacked.exists():
            shutil.rmtree(unpacked)
        scratch.rename(unpacked)
    entries: list[tuple[str, str, int, str]] = []  # (provenance path, fs path, size, sha)
    skipped: dict[str, int] = {}
    for base, in_tarball in ((root, False), (tars, True)):
        if not base.is_dir():
            continue
        for rel, full, st in _cpp_files(base, skipped, skip_hidden=False):
            # tarballs/<path of tarball>/<member> is named <tarball>!/<member> for provenance
            prov = f"{name}/{_tar_member_name(rel) if in_tarball else rel}"
            entries.append((prov, full, st.st_size, sha256_file(full)))
    license_path = root / "usr" / "share" / "doc" / name / "copyright"
    inp = Input(
        source=spec,
        name=name,
        version=version,
        license=describe_license(license_path if license_path.is_file() else None),
        sha256=deb_sha,
        files=len(entries),
        bytes=sum(e[2] for e in entries),
        details={"deb": deb.name, "architecture": meta.get("Architecture", ""), "content_sha256": tree_digest([(p, d) for p, _, _, d in entries])},
    )
    if inp.license["file"] is not None:
        inp.license["file"] = f"{name}/usr/share/doc/{name}/copyright"  # in-package path, not the cache's
    files = [SourceFile(0, p, f, s, d) for p, f, s, d in entries]
    return Source(spec, "debian", [inp], files, skipped)


def _tar_member_name(rel: str) -> str:
    """Turn 'usr/src/x.tar.xz/gcc/a.h' into 'usr/src/x.tar.xz!/gcc/a.h'."""
    for suffix in TARBALL_SUFFIXES:
        idx = rel.find(suffix + "/")
        if idx >= 0:
            cut = idx + len(suffix)
            return rel[:cut] + "!" + rel[cut:]
    return rel


# ---------------------------------------------------------------- dir


def _git_pin(path: Path) -> dict:
    try:
        proc = subprocess.run(["git", "-C", str(path), "rev-parse", "--show-toplevel", "HEAD"], capture_output=True, text=True)
    except FileNotFoundError:
        return {}
    if proc.returncode != 0:
        return {}
    top, commit = proc.stdout.split()[:2]
    dirty = subprocess.run(["git", "-C", str(path), "status", "--porcelain", "--", "."], capture_output=True, text=True).stdout.strip()
    return {"git_commit": commit, "git_dirty": bool(dirty), "git_toplevel": top}


def _dir_source(spec: str) -> Source:
    root = Path(spec[len("dir:") :]).expanduser()
    if not root.is_dir():
        raise DataError(f"{spec}: {root} is not a directory")
    root = root.resolve()
    entries: list[tuple[str, str, int, str]] = []
    skipped: dict[str, int] = {}
    for rel, full, st in _cpp_files(root, skipped, skip_hidden=True):
        entries.append((rel, full, st.st_size, sha256_file(full)))
    digest = tree_digest([(p, d) for p, _, _, d in entries])
    git = _git_pin(root)
    if git:
        version = "git:" + git["git_commit"] + ("+dirty" if git["git_dirty"] else "")
    else:
        version = "sha256:" + digest[:16]
    license_file = next(
        (p for p in sorted(root.iterdir()) if p.is_file() and re.match(r"(LICEN[CS]E|COPYING|COPYRIGHT)", p.name, re.I)),
        None,
    )
    inp = Input(
        source=spec,
        name=root.name,
        version=version,
        license=describe_license(license_file),
        sha256=digest,
        files=len(entries),
        bytes=sum(e[2] for e in entries),
        details={"path": str(root), **git},
    )
    files = [SourceFile(0, f"{root.name}/{p}", f, s, d) for p, f, s, d in entries]
    return Source(spec, "dir", [inp], files, skipped)


# ---------------------------------------------------------------- listing


def apt_candidate(pkg: str) -> str | None:
    """Candidate version from the local apt lists (no network), or None."""
    try:
        out = subprocess.run(["apt-cache", "policy", pkg], capture_output=True, text=True).stdout
    except FileNotFoundError:
        return None
    m = re.search(r"Candidate:\s*(\S+)", out)
    return m.group(1) if m and m.group(1) != "(none)" else None


def cached_debs(cache: Path | None = None) -> list[dict]:
    """Debian packages already downloaded into the cache, with their pins."""
    debs = (Path(cache) if cache else default_cache_dir()) / "debs"
    out = []
    for deb in sorted(debs.glob("*.deb")) if debs.is_dir() else []:
        parts = deb.stem.split("_")
        out.append({"file": str(deb), "name": parts[0], "version": parts[1].replace("%3a", ":") if len(parts) > 1 else "?"})
    return out
