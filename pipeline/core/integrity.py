"""One seal for every artifact: the sha256 of its bytes, recorded when it is written and checked before any parser
reads it, and one way to set a damaged file aside.

A file that can hold a header (the HDF5 files: store, heads, cache shards; fine-tuning checkpoints) starts with a
seal line, `transfer-pipeline sha256 <hex>` and a newline, padded with zero bytes to the header's size; the digest
covers every byte after the header. HDF5 keeps its user block for such use (the superblock follows it), and
torch.load's zip reader checks no CRC: zeroed bytes inside a tensor would load as zeros. A folder of files that
others read as they are (the fine-tuned model's safetensors and config) carries `SHA256SUMS` in the format of
`sha256sum`, so `sha256sum -c SHA256SUMS` checks it too. Written by hand: neither format has such a check.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

from pipeline.core.errors import PipelineError

log = logging.getLogger(__name__)

SEAL = b"transfer-pipeline sha256 "
SEAL_LINE = len(SEAL) + 64 + 1  # the seal line's bytes: the smallest header
CHECKSUMS = "SHA256SUMS"

# A file whose seal was checked in this process is not hashed again while it is the same file: the same device,
# inode, size, and modification and change times. A stage opens its feature store several times (its split sizes,
# then its rows, then the test rows; each reader of the store's attributes once more), and at 10^6 rows each hash
# of 5 GB takes seconds. Only from this size: file times move in steps of a few milliseconds, within which a small
# file can be written again unseen, and hashing a small one costs less than a step.
REMEMBER_FROM_BYTES = 64 << 20
_checked: set[tuple] = set()


class DamagedFile(PipelineError):
    """A file's bytes are not the ones written: its recorded sha256 does not match, or it is cut short."""


def sha256_file(path: Path, start: int = 0) -> str:
    """The sha256 of a file's bytes from offset `start` on, read a megabyte at a time."""
    digest = hashlib.sha256()
    with open(path, "rb") as raw:
        raw.seek(start)
        while block := raw.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def seal(path: Path, header: int = SEAL_LINE) -> None:
    """Write the seal into the first `header` bytes of `path`, which the writer left for it: the digest of the rest."""
    line = SEAL + sha256_file(path, header).encode() + b"\n"
    with open(path, "r+b") as raw:
        raw.write(line.ljust(header, b"\0"))


def is_sealed(path: Path) -> bool:
    """Whether the file starts with a seal line (checked or not)."""
    with open(path, "rb") as raw:
        return raw.read(len(SEAL)) == SEAL


def check_seal(path: Path, header: int = SEAL_LINE, fix: str = "", kind: str = "sealed file") -> None:
    """`DamagedFile` unless the file starts with a seal whose digest is that of its bytes after `header`; the
    message names the `kind` of file expected and ends with `fix`. A large file found intact before in this process,
    and the same file since (`REMEMBER_FROM_BYTES`), is not hashed again."""
    then = f"; {fix}" if fix else ""
    st = os.stat(path)  # what says a file is the one checked before
    identity = (os.path.realpath(path), header, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    if identity in _checked:
        return
    with open(path, "rb") as raw:
        head = raw.read(header)
    if not head.startswith(SEAL):
        raise DamagedFile(
            f"{path} is not a {kind} of this pipeline (damaged, truncated, or another kind of file){then}"
        )
    recorded = head[len(SEAL) : len(SEAL) + 64].decode("ascii", "replace")
    actual = sha256_file(path, header)
    if actual != recorded:
        raise DamagedFile(
            f"{path} is damaged or truncated: its bytes hash to sha256 {actual[:16]}, it was written as "
            f"{recorded[:16]}{then}"
        )
    if st.st_size >= REMEMBER_FROM_BYTES:
        _checked.add(identity)


def set_aside(path: Path, what: str, why: object, then: str) -> Path:
    """Rename a damaged file to `<name>.corrupt` (kept for a look, never read again) and say so in one warning:
    `what` it was, `why` it counts as damaged, and what happens `then`."""
    aside = Path(path).with_name(Path(path).name + ".corrupt")
    os.replace(path, aside)
    log.warning("%s %s is damaged (%s): moved aside to %s; %s", what, path, why, aside.name, then)
    return aside


def write_checksums(folder: Path, names: tuple[str, ...]) -> None:
    """`folder/SHA256SUMS` for the files `names` of the folder (sha256sum's format: digest, two spaces, name)."""
    Path(folder, CHECKSUMS).write_text("".join(f"{sha256_file(Path(folder, name))}  {name}\n" for name in names))


def check_checksums(folder: Path, names: tuple[str, ...], fix: str) -> None:
    """`DamagedFile` unless each of `names` has the digest `folder/SHA256SUMS` recorded; the message ends with `fix`."""
    sums = Path(folder, CHECKSUMS)
    if not sums.is_file():
        raise DamagedFile(f"{folder} has no {CHECKSUMS} (saved by an older version); {fix}")
    recorded = {}
    for line in sums.read_text(errors="replace").splitlines():
        digest, _, name = line.partition("  ")
        recorded[name] = digest
    for name in names:
        path = Path(folder, name)
        if not path.is_file() or recorded.get(name) != sha256_file(path):
            raise DamagedFile(f"{path} is damaged or truncated: its sha256 is not the one {CHECKSUMS} recorded; {fix}")
