"""Sources: a local .deb (with a tarball inside), the system headers, and the CLI."""
from __future__ import annotations

import dataclasses
import io
import json
import random
import shutil
import subprocess
import tarfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from data_testutil import SMALL, cpp_file, make_tree

from megacpp.cli import main
from megacpp.data.prepare import prepare_snapshot
from megacpp.data.sources import is_cpp_path, resolve_source


def test_cpp_path_rules():
    assert is_cpp_path("/usr/include/c++/12/vector")
    assert is_cpp_path("a/b/x.HPP") and is_cpp_path("k.cc") and is_cpp_path("t.tcc")
    assert not is_cpp_path("a/README") and not is_cpp_path("x.py") and not is_cpp_path("a/.hidden")


def _build_deb(tmp_path: Path) -> Path:
    rng = random.Random(4)
    root = tmp_path / "pkg"
    (root / "DEBIAN").mkdir(parents=True)
    (root / "DEBIAN" / "control").write_text(
        "Package: fake-cpp-dev\nVersion: 1:2.0-3\nArchitecture: all\n"
        "Maintainer: Test <test@example.invalid>\nDescription: test package\n"
    )
    inc = root / "usr" / "include" / "fake"
    inc.mkdir(parents=True)
    for i in range(12):
        (inc / f"h{i}.hpp").write_text(cpp_file(rng))
    doc = root / "usr" / "share" / "doc" / "fake-cpp-dev"
    doc.mkdir(parents=True)
    (doc / "copyright").write_text(
        "Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/\n\n"
        "Files: *\nCopyright: 2024 Test\nLicense: BSL-1.0\n"
    )
    src = root / "usr" / "src" / "fake"
    src.mkdir(parents=True)
    with tarfile.open(src / "fake-2.0.tar.gz", "w:gz") as tf:
        for name, text in [("fake-2.0/lib/impl.cpp", cpp_file(rng)), ("fake-2.0/lib/more.cc", cpp_file(rng)),
                           ("fake-2.0/NEWS", "not code"), ("../escape.cpp", "int evil;")]:
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    deb = tmp_path / "fake-cpp-dev_2.0-3_all.deb"
    subprocess.run(["dpkg-deb", "--root-owner-group", "--build", str(root), str(deb)], check=True, capture_output=True)
    return deb


@pytest.mark.skipif(shutil.which("dpkg-deb") is None, reason="needs dpkg-deb")
def test_debian_package_is_unpacked_pinned_and_licensed(tmp_path):
    deb = _build_deb(tmp_path)
    cache = tmp_path / "cache"
    src = resolve_source(f"debian:{deb}", cache)
    (inp,) = src.inputs
    assert (inp.name, inp.version) == ("fake-cpp-dev", "1:2.0-3")
    assert inp.license["ids"] == ["BSL-1.0"] and inp.license["format"] == "dep5"
    assert len(inp.sha256) == 64 and inp.details["deb"] == deb.name
    paths = sorted(f.path for f in src.files)
    assert "fake-cpp-dev/usr/src/fake/fake-2.0.tar.gz!/fake-2.0/lib/impl.cpp" in paths
    assert not any("escape" in p or "NEWS" in p for p in paths)
    assert len(paths) == 14
    # A second resolve reuses the unpacked cache and pins the same.
    again = resolve_source(f"debian:{deb}", cache)
    assert again.inputs[0].to_json() == inp.to_json()
    snap = prepare_snapshot(tmp_path / "snap", [f"debian:{deb}"], SMALL, cache_dir=cache)
    assert snap.manifest["inputs"][0]["version"] == "1:2.0-3"


@pytest.mark.skipif(not Path("/usr/include/c++").is_dir() or not Path("/var/lib/dpkg/info").is_dir(),
                    reason="needs Debian-installed C++ headers")
def test_system_source_small_snapshot(tmp_path):
    cfg = dataclasses.replace(SMALL, max_bytes=1 << 20, vocab_size=1024, seq_len=64)
    snap = prepare_snapshot(tmp_path / "sys", ["system"], cfg)
    m = snap.manifest
    std = [i for i in m["inputs"] if i["name"].startswith("libstdc++")]
    assert std and std[0]["version"] != "unknown" and std[0]["license"]["sha256"]
    assert m["corpus"]["drops"]["over_budget"]["files"] > 0
    docs = pq.read_table(snap.path / "documents.parquet", columns=["path"]).column("path").to_pylist()
    # libstdc++ is taken first, so a small budget is all /usr/include/c++ text.
    assert docs and all(p.startswith("/usr/include/c++/") for p in docs)
    assert sum(m["splits"][s]["bytes"] for s in m["splits"]) <= (1 << 20) + 200_000


def test_cli_prepare_check_and_errors(tmp_path, capsys):
    tree = make_tree(tmp_path / "src", n_files=30)
    out = tmp_path / "snap"
    common = ["--vocab-size", "400", "--seq-len", "32", "--split", "0.6,0.2,0.2", "--quiet"]
    assert main(["data", "prepare", "--sources", f"dir:{tree}", "--out", str(out), "--json", *common]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["seq_len"] == 32 and summary["splits"]["train"]["documents"] > 0
    assert main(["data", "check", str(out)]) == 0
    assert summary["snapshot_id"][:16] in capsys.readouterr().out
    assert main(["data", "sources", "--sources", f"dir:{tree}", "--json"]) == 0
    listing = json.loads(capsys.readouterr().out)
    assert listing["sources"][0]["files"] == 30

    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["data", "prepare", "--sources", f"dir:{empty}", "--out", str(tmp_path / "x"), *common]) == 2
    err = capsys.readouterr().err.strip()
    assert "no C/C++ files" in err and str(empty) in err and len(err.splitlines()) == 1
    assert main(["data", "prepare", "--sources", f"dir:{tree}", "--out", str(tmp_path / "y"), "--split", "a,b", "--quiet"]) == 2
    assert "--split" in capsys.readouterr().err
    (out / "train" / "shard-00000.parquet").write_bytes(b"PAR1")
    assert main(["data", "check", str(out)]) == 2
    assert "train/shard-00000.parquet" in capsys.readouterr().err


def test_cli_takes_sizes_from_recipe(tmp_path, capsys):
    megacpp = pytest.importorskip("megacpp")
    try:
        recipe = megacpp.load_recipe("nam-tiny")
    except Exception:
        pytest.skip("preset nam-tiny not available")
    tree = make_tree(tmp_path / "src", n_files=30)
    out = tmp_path / "snap"
    assert main(["data", "prepare", "--sources", f"dir:{tree}", "--out", str(out), "--recipe", "nam-tiny",
                 "--seq-len", "48", "--split", "0.6,0.2,0.2", "--quiet"]) == 0
    m = json.loads((out / "snapshot.json").read_text())
    assert m["config"]["vocab_size"] == recipe.model.vocab_size and m["seq_len"] == 48
    assert m["provenance"]["recipe"]["hash"] == recipe.hash
    assert m["provenance"]["vocab_size_from"] == "recipe" and m["provenance"]["seq_len_from"] == "flag"


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_dir_source_in_git_checkout_is_pinned_to_commit(tmp_path):
    tree = make_tree(tmp_path / "repo", n_files=5)
    git = ["git", "-C", str(tree), "-c", "user.name=t", "-c", "user.email=t@example.invalid"]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "."], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "x"], check=True)
    head = subprocess.run([*git, "rev-parse", "HEAD"], check=True, capture_output=True, text=True).stdout.strip()
    (inp,) = resolve_source(f"dir:{tree}").inputs
    assert inp.version == f"git:{head}" and inp.details["git_dirty"] is False
    (tree / "mod0" / "new.cpp").write_text("int x;\n")
    (inp2,) = resolve_source(f"dir:{tree}").inputs
    assert inp2.version == f"git:{head}+dirty" and inp2.sha256 != inp.sha256
