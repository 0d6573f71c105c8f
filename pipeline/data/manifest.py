"""Scan an ImageFolder into a manifest (path, class, split, content hash, status), and read and write it."""

from __future__ import annotations

import csv
import hashlib
import logging
import os
import re
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

from tqdm import tqdm

from pipeline.core.errors import DataError
from pipeline.core.io import atomic_path
from pipeline.data.images import REASONS, ImageRejected, confined, decode_rgb, read_bytes
from pipeline.data.listing import files_under, is_junk

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")


# Operating-system droppings that are not the user's data: skipped, and counted.
@dataclass(frozen=True)
class ManifestRow:
    path: str  # relative to the data root, with forward slashes
    class_name: str
    split: str  # train, val or test; empty for a quarantined file
    sha256: str  # content hash of the file; empty when it could not be read
    status: str  # "ok" or "quarantined"
    reason: str = ""  # why a file was quarantined (a short code)
    detail: str = ""
    width: int = 0
    height: int = 0


@dataclass(frozen=True)
class Manifest:
    rows: list[ManifestRow]
    layout: str  # "flat" (class folders), or the split folders found, e.g. "train+val"
    skipped: list[str]  # hidden and system files, not images
    cross_split_duplicates: int = 0  # contents found in more than one given split folder

    @property
    def classes(self) -> list[str]:
        """Class names with at least one usable image, sorted: label i is classes[i]."""
        return sorted({r.class_name for r in self.rows if r.status == "ok"})

    def ok_rows(self) -> list[ManifestRow]:
        return [r for r in self.rows if r.status == "ok"]

    def quarantined(self) -> list[ManifestRow]:
        return [r for r in self.rows if r.status != "ok"]

    def median_short_side(self) -> float:
        """The median of the usable images' shorter sides, in pixels (0 for a manifest without sizes)."""
        sides = sorted(min(r.width, r.height) for r in self.ok_rows())
        if not sides:
            return 0.0
        middle = len(sides) // 2
        return float(sides[middle]) if len(sides) % 2 else (sides[middle - 1] + sides[middle]) / 2

    def counts(self) -> dict[str, int]:
        """Image counts for the stage's metrics."""
        ok = self.ok_rows()
        by_split = Counter(r.split for r in ok)
        reasons = Counter(r.reason for r in self.quarantined())
        return {
            "files": len(self.rows),
            "ok": len(ok),
            "quarantined": len(self.rows) - len(ok),
            "skipped_hidden": len(self.skipped),
            "cross_split_duplicates": self.cross_split_duplicates,
            "classes": len(self.classes),
            **{f"n_{s}": by_split.get(s, 0) for s in SPLITS},
            **{f"quarantined_{reason}": reasons.get(reason, 0) for reason in REASONS},
        }


def build_manifest(
    root: Path,
    val_fraction: float,
    test_fraction: float,
    seed: int,
    *,
    num_workers: int = 1,
    on_cross_split_duplicate: str = "error",
) -> Manifest:
    """Scan `root`, decode every file once (in `num_workers` processes), quarantine the unusable ones and split
    the rest. The manifest is the same, row for row, whatever the number of processes.

    A flat root (`root/<class>/...`) is split per class, seeded. A root with split folders keeps them:
    `train/val/test` as they are; `train/val` keeps train, carves val from it and uses the folder's val
    as test (the held-out set); `train` alone carves both. Mistakes in the layout are reported before
    any file is decoded; nothing under `root` is written.

    Identical files (same content hash) always share a split when the split is carved. When split folders
    put copies of one file in two splits, `on_cross_split_duplicate` decides: `error` stops with the first
    pair, `warn` keeps them (counted in `Manifest.cross_split_duplicates`), `drop_from_test` quarantines
    the copy in the later split (test, then val).
    """
    layout, files, skipped = scan(root)
    carve, _ = _carve_plan(layout, val_fraction, test_fraction)
    # Cheap checks on the listing first, so a layout mistake does not wait for every file to be decoded.
    _check_classes(root, {cls for _, cls, _ in files}, "images")
    _check_splittable(Counter(cls for _, cls, split in files if split in ("", "train")), carve, "image files")

    rows = inspect_files(root, files, num_workers)
    _check_classes(root, {r.class_name for r in rows if r.status == "ok"}, "usable images")
    rows = assign_splits(rows, layout, val_fraction, test_fraction, seed)
    duplicates = cross_split_duplicates(rows)
    rows = _apply_duplicate_policy(root, rows, duplicates, on_cross_split_duplicate)
    manifest = Manifest(rows, layout, skipped, len(duplicates))
    in_train = {r.class_name for r in manifest.ok_rows() if r.split == "train"}
    for cls in manifest.classes:
        if cls not in in_train:
            raise DataError(f"{root}: class '{cls}' has no usable images in train/; add some or remove the class")
    return manifest


def _check_classes(root: Path, classes: set[str], what: str) -> None:
    if len(classes) < 2:
        raise DataError(
            f"{root}: need at least two classes with {what}, found {len(classes)} "
            f"({', '.join(sorted(classes)) or 'none'}); put each class's images in its own folder"
        )


def scan(root: Path) -> tuple[str, list[tuple[str, str, str]], list[str]]:
    """List (relative path, class, given split or "") for every candidate file under `root`.

    Also returns the layout ("flat" or e.g. "train+val") and the hidden or stray files that were skipped.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"data root {root} does not exist or is not a directory")
    top = _visible_dirs(root)
    split_dirs = [d.name for d in top if d.name in SPLITS]
    skipped: list[str] = []
    if not split_dirs:
        files = [(rel, cls, "") for cls, rel in _class_files(root, root, skipped)]
        return "flat", files, skipped
    others = sorted(d.name for d in top if d.name not in SPLITS)
    if others or "train" not in split_dirs:
        raise DataError(
            f"{root}: mixes split folders ({', '.join(split_dirs)}) with other folders "
            f"({', '.join(others) or 'no train/'}); use either <class>/ folders or train/ [val/] [test/]"
        )
    classes_by_split = {s: {d.name for d in _visible_dirs(root / s)} for s in split_dirs}
    for split, names in classes_by_split.items():
        extra = sorted(names - classes_by_split["train"])
        if extra:
            raise DataError(f"{root}: class '{extra[0]}' is in {split}/ but not in train/; add it to train/")
    files = [(rel, cls, split) for split in split_dirs for cls, rel in _class_files(root, root / split, skipped)]
    order = [s for s in SPLITS if s in split_dirs]
    return "+".join(order), files, skipped


def _visible_dirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not is_junk(p.name))


def _class_files(root: Path, folder: Path, skipped: list[str]) -> Iterable[tuple[str, str]]:
    """(class, path relative to root) for every file below each class folder, recursively, sorted.

    Hidden and system files (.DS_Store, ._*, Thumbs.db) go to `skipped`, not to the manifest. Every other
    entry that is not a folder is kept, a dangling symlink or a FIFO too, so that it is quarantined with its
    reason rather than silently lost.
    """
    for entry in sorted(folder.iterdir()):
        if is_junk(entry.name):
            if entry.is_file():
                skipped.append(entry.relative_to(root).as_posix())
            continue
        if not entry.is_dir():
            # A file next to the class folders belongs to no class: not silently used, not lost.
            log.warning("%s is not inside a class folder; ignored", entry)
            skipped.append(entry.relative_to(root).as_posix())
            continue
        found = False
        for path, junk in files_under(entry):
            rel = path.relative_to(root).as_posix()
            if junk:
                skipped.append(rel)
            else:  # a file, a dangling link, a FIFO or a device: each gets a row, the unusable ones a reason
                found = True
                yield entry.name, rel
        if not found:
            log.warning("class folder %s has no image files; ignored", entry)


def inspect_files(root: Path, files: list[tuple[str, str, str]], num_workers: int) -> list[ManifestRow]:
    """`_inspect` every listed file, in listing order. With several processes each takes the files in chunks
    (decoding dominates; the chunks keep the hand-offs rare), and the results come back in order."""
    jobs = [(Path(root), rel, cls, split) for rel, cls, split in files]
    progress = {"desc": "prepare", "unit": "img", "total": len(jobs)}
    if num_workers <= 1 or len(jobs) < 2:
        return [_inspect(*job) for job in tqdm(jobs, **progress)]
    chunk = max(1, min(64, len(jobs) // (64 * num_workers)))
    try:
        with ProcessPoolExecutor(num_workers) as pool:
            return list(tqdm(pool.map(_inspect, *zip(*jobs, strict=True), chunksize=chunk), **progress))
    except BrokenProcessPool as err:  # a decoding process died (out of memory, a crash in a decoder)
        raise DataError(
            f"a process decoding the images under {root} died ({err}); set prepare.num_workers to 1 to find the "
            "file (and to use the least memory)"
        ) from err


def _inspect(root: Path, rel: str, class_name: str, split: str) -> ManifestRow:
    """Decode one file completely; a failure becomes a quarantined row with its reason."""
    sha = ""
    if not _utf8(rel):  # the manifest is UTF-8 text: the row shows the name with its bad bytes escaped
        shown, shown_class = _escaped(rel), _escaped(class_name)
        detail = "the file name is not valid UTF-8; rename the file"
        return ManifestRow(shown, shown_class, split, sha, "quarantined", "bad_name", detail)
    try:
        data = read_bytes(confined(root, rel))
        sha = hashlib.sha256(data).hexdigest()
        img = decode_rgb(data)
    except ImageRejected as rejected:
        return ManifestRow(rel, class_name, split, sha, "quarantined", rejected.reason, rejected.detail)
    return ManifestRow(rel, class_name, split, sha, "ok", width=img.width, height=img.height)


def _utf8(name: str) -> bool:
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:  # undecodable bytes, kept by Python as lone surrogates
        return False
    return True


def _escaped(name: str) -> str:
    return os.fsencode(name).decode("utf-8", "backslashreplace")


def _carve_plan(layout: str, val_fraction: float, test_fraction: float) -> tuple[tuple[float, float], dict[str, str]]:
    """The (val, test) fractions to carve from each class's train pool, and how given split folders are renamed."""
    folders = set() if layout == "flat" else set(layout.split("+"))
    if folders >= {"val", "test"}:
        return (0.0, 0.0), {}
    if folders == {"train", "val"}:
        # The folder's val is the only held-out data, so it becomes test; val is carved from train.
        return (val_fraction, 0.0), {"val": "test"}
    if folders == {"train", "test"}:
        return (val_fraction, 0.0), {}
    return (val_fraction, test_fraction), {}


def assign_splits(
    rows: list[ManifestRow], layout: str, val_fraction: float, test_fraction: float, seed: int
) -> list[ManifestRow]:
    """Stratified, seeded split of the usable rows; quarantined rows get no split.

    Within each class, rows are ranked by a seeded hash of their content, so the split does not depend
    on file names or on the order of the listing, identical files land side by side, and adding images
    moves few of the existing ones.
    """
    carve, rename = _carve_plan(layout, val_fraction, test_fraction)
    out: list[ManifestRow] = []
    pools: dict[str, list[ManifestRow]] = defaultdict(list)
    for row in rows:
        if row.status != "ok":
            out.append(replace(row, split=""))
        elif row.split in ("", "train"):
            pools[row.class_name].append(row)
        else:
            out.append(replace(row, split=rename.get(row.split, row.split)))
    for cls, pool in sorted(pools.items()):
        out.extend(_split_class(cls, pool, *carve, seed))
    order = {r.path: i for i, r in enumerate(rows)}
    return sorted(out, key=lambda r: order[r.path])


def _check_splittable(pool_sizes: Counter[str], carve: tuple[float, float], what: str) -> None:
    for cls, n in sorted(pool_sizes.items()):
        _split_sizes(cls, n, *carve, what)


def _split_sizes(cls: str, n: int, val_f: float, test_f: float, what: str) -> tuple[int, int]:
    """How many of a class's `n` images go to val and to test; at least one of each that is asked for."""
    n_test = max(1, round(n * test_f)) if test_f > 0 else 0
    n_val = max(1, round(n * val_f)) if val_f > 0 else 0
    if n - n_test - n_val < 1:
        raise DataError(
            f"class '{cls}' has {n} {what}: too few to split into train"
            f"{'/val' if n_val else ''}{'/test' if n_test else ''}; "
            f"add images (at least {n_val + n_test + 1}) or remove the class folder"
        )
    return n_val, n_test


def _split_class(cls: str, pool: list[ManifestRow], val_f: float, test_f: float, seed: int) -> list[ManifestRow]:
    """Split a class's distinct contents: copies of one file go together, so no copy can leak across splits."""
    copies: dict[str, list[ManifestRow]] = defaultdict(list)
    for r in pool:
        copies[r.sha256].append(r)
    n_val, n_test = _split_sizes(cls, len(copies), val_f, test_f, "distinct usable images")
    ranked = sorted(copies, key=lambda sha: hashlib.sha256(f"{seed}:{sha}".encode()).hexdigest())
    splits = ["test"] * n_test + ["val"] * n_val + ["train"] * (len(copies) - n_test - n_val)
    return [replace(r, split=s) for sha, s in zip(ranked, splits, strict=True) for r in copies[sha]]


def cross_split_duplicates(rows: list[ManifestRow]) -> dict[str, list[ManifestRow]]:
    """Usable rows by content hash, for every content found in more than one split."""
    copies: dict[str, list[ManifestRow]] = defaultdict(list)
    for r in rows:
        if r.status == "ok":
            copies[r.sha256].append(r)
    return {sha: group for sha, group in copies.items() if len({r.split for r in group}) > 1}


def _apply_duplicate_policy(
    root: Path, rows: list[ManifestRow], duplicates: dict[str, list[ManifestRow]], policy: str
) -> list[ManifestRow]:
    if not duplicates:
        return rows
    first = sorted(min(duplicates.values(), key=lambda g: g[0].path), key=lambda r: SPLITS.index(r.split))
    example = f"{first[0].path} ({first[0].split}) and {first[-1].path} ({first[-1].split})"
    if policy == "error":
        raise DataError(
            f"{root}: {len(duplicates)} files have an identical copy in another split, e.g. {example}; a test image "
            "seen in training inflates every score. Remove the copies, or set prepare.on_cross_split_duplicate "
            "to drop_from_test (quarantine the later copy) or warn (keep them)"
        )
    if policy == "warn":
        log.warning("%d files have an identical copy in another split, e.g. %s", len(duplicates), example)
        return rows
    earliest = {sha: min(group, key=lambda r: SPLITS.index(r.split)) for sha, group in duplicates.items()}
    return [_dropped(r, earliest[r.sha256]) if r.sha256 in earliest else r for r in rows]


def _dropped(row: ManifestRow, kept: ManifestRow) -> ManifestRow:
    if row.status != "ok" or SPLITS.index(row.split) <= SPLITS.index(kept.split):
        return row
    detail = f"identical to {kept.path} in {kept.split}"
    return replace(row, split="", status="quarantined", reason="duplicate_across_splits", detail=detail)


# --- manifest files -----------------------------------------------------------------------------

_COLUMNS = [f.name for f in fields(ManifestRow)]


def write_manifest(manifest: Manifest, path: Path) -> None:
    _write_rows(manifest.rows, path)


def write_quarantine(manifest: Manifest, path: Path) -> None:
    _write_rows(manifest.quarantined(), path)


def _write_rows(rows: Sequence[ManifestRow], path: Path) -> None:
    with atomic_path(path) as tmp, tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=_COLUMNS)
        writer.writeheader()
        writer.writerows(asdict(r) for r in rows)


def read_manifest(path: Path, root: Path | None = None) -> Manifest:
    """The manifest at `path`, every row checked first: prepare wrote it, but it is a CSV a person can edit. A row
    is ok or quarantined; an ok row has a split, a content hash (64 hex digits) and, when `root` (the data root) is
    given, a path inside it (`confined`: no absolute path, no `..`, no link out). A bad row is a one-line error that
    names it, raised before anything looks a row up in the embedding cache (a hit reads no file, so the check at
    read time would never see it)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"manifest {path} not found; run the prepare stage first")
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        rows = []
        for r in reader:
            try:
                row = ManifestRow(**{**r, "width": int(r["width"]), "height": int(r["height"])})
            except (TypeError, ValueError) as err:
                raise DataError(f"{path}, line {reader.line_num}: not a manifest row ({err}); {_REWRITE}") from err
            _check_row(row, root, f"{path}, line {reader.line_num} ({row.path})")
            rows.append(row)
    return Manifest(rows, layout="", skipped=[])


_REWRITE = "the manifest is prepare's output: run `dvc repro` to write it again"
_SHA256 = re.compile(r"[0-9a-f]{64}")


def _check_row(row: ManifestRow, root: Path | None, where: str) -> None:
    if row.status not in ("ok", "quarantined"):
        raise DataError(f"{where}: status {row.status!r}, expected ok or quarantined; {_REWRITE}")
    if row.status != "ok":
        return
    if row.split not in SPLITS:
        raise DataError(f"{where}: split {row.split!r}, expected one of {', '.join(SPLITS)}; {_REWRITE}")
    if not _SHA256.fullmatch(row.sha256):
        raise DataError(f"{where}: content hash {row.sha256!r} is not 64 hex digits; {_REWRITE}")
    if root is not None:
        try:
            confined(root, row.path)
        except ImageRejected as err:
            raise DataError(f"{where}: {err.detail}; {_REWRITE}") from err


def manifest_sha256(manifest: Manifest) -> str:
    """Hash of the usable rows (path, class, split, content): what a feature store was built from."""
    digest = hashlib.sha256()
    for r in manifest.ok_rows():
        digest.update(f"{r.path}\0{r.class_name}\0{r.split}\0{r.sha256}\n".encode())
    return digest.hexdigest()
