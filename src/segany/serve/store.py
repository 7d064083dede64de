"""The project store: images and annotated objects in one SQLite file.

Every change is one SQLite transaction in WAL mode with ``synchronous=FULL``, so a change
the API has answered is on disk, a crash or a closed browser loses nothing, readers never
wait for writers, and a half-done change is never visible. Several server processes or
tabs may use the same file: writers queue on SQLite's lock (``BEGIN IMMEDIATE``), and an
object changes only when its ``version`` is the one the writer last saw (optimistic
concurrency; the API exposes it as the ETag), otherwise :class:`Conflict` is raised.

Masks are stored as compressed COCO RLE strings (pixels of the original image, as
pycocotools writes them); boxes are COCO XYWH from pycocotools' ``toBbox``.

Objects imported from a COCO file (:mod:`.importer`) are also remembered in ``imported``:
which mask came onto which image, as an accepted object or as a proposal, so importing a
file again adds nothing (not even the proposals deleted since), and the file's
``"segany"`` marks of each (a proposal's scores), which exports give back.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import sqlite3
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

from ..errors import SeganyError

SCHEMA_VERSION = 1
SOURCES = ("manual", "auto", "proposal")
Source = Literal["manual", "auto", "proposal"]

SCHEMA = """
CREATE TABLE IF NOT EXISTS images (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    source TEXT NOT NULL CHECK (source IN ('folder', 'upload')),
    name TEXT NOT NULL,                 -- relative to IMAGES_DIR or the uploads folder
    width INTEGER,                      -- known once the image has been read
    height INTEGER,
    added_at TEXT NOT NULL,
    UNIQUE (source, name)
);
CREATE TABLE IF NOT EXISTS objects (
    id INTEGER PRIMARY KEY AUTOINCREMENT,  -- never reused, so an id names one object forever
    image_id INTEGER NOT NULL REFERENCES images (id),
    label TEXT NOT NULL DEFAULT '',
    source TEXT NOT NULL CHECK (source IN ('manual', 'auto', 'proposal')),
    height INTEGER NOT NULL,
    width INTEGER NOT NULL,
    counts TEXT NOT NULL,               -- compressed COCO RLE counts
    area INTEGER NOT NULL,
    bbox TEXT NOT NULL,                 -- JSON [x, y, w, h]
    score REAL,                         -- the model's predicted IoU, if any
    prompts TEXT NOT NULL DEFAULT '{}', -- JSON {"points", "labels", "box"}
    version INTEGER NOT NULL DEFAULT 1,
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS objects_by_image ON objects (image_id, id);
-- Added after schema 1 was released, without a version change: older segany ignore the
-- table, and SQLite itself clears object_id when such a version deletes an object.
CREATE TABLE IF NOT EXISTS imported (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    image_id INTEGER NOT NULL REFERENCES images (id),
    mask_key TEXT NOT NULL,             -- SHA-256 of the mask's size and RLE counts
    proposal INTEGER NOT NULL,          -- 1: came in as a proposal, 0: as an accepted object
    object_id INTEGER REFERENCES objects (id) ON DELETE SET NULL,
    annotation_id TEXT NOT NULL,        -- JSON of the annotation's id in the file
    file TEXT NOT NULL,                 -- the COCO file it came from
    marks TEXT NOT NULL DEFAULT '{}',   -- JSON of the annotation's "segany" marks
    imported_at TEXT NOT NULL,
    UNIQUE (image_id, mask_key, proposal)
);
CREATE INDEX IF NOT EXISTS imported_by_object ON imported (object_id);
"""


class NotFound(SeganyError):
    """No image or object with that id."""


class Conflict(SeganyError):
    """The object was changed by someone else since the writer read it."""


@dataclass(frozen=True)
class StoredImage:
    """An image of the project; ``name`` is relative to its ``source`` folder."""

    id: int
    source: Literal["folder", "upload"]
    name: str
    width: int | None
    height: int | None


@dataclass(frozen=True)
class StoredObject:
    """One annotated object: a mask on an image, with its label and history.

    ``mask`` is a compressed COCO RLE ``{"size": [h, w], "counts": str}``; ``bbox`` is
    COCO XYWH; ``prompts`` holds the clicks (``points`` (N, 2) pixels, ``labels`` 1 =
    foreground / 0 = background) and ``box`` (XYXY) that produced the mask.
    """

    id: int
    image_id: int
    label: str
    source: Source
    mask: dict[str, Any]
    area: int
    bbox: list[float]
    score: float | None
    prompts: dict[str, Any]
    version: int
    created_at: str
    updated_at: str


@dataclass(frozen=True)
class NewObject:
    """The fields of an object to create or write (see :class:`StoredObject`)."""

    mask: dict[str, Any]
    area: int
    bbox: list[float]
    label: str = ""
    source: Source = "manual"
    score: float | None = None
    prompts: dict[str, Any] | None = None


@dataclass(frozen=True)
class ImportedObject:
    """An object from a COCO file for :meth:`ProjectStore.import_objects`.

    ``annotation_id`` is the annotation's id in the file (JSON, for reference only);
    ``marks`` its ``"segany"`` marks without ``"proposal"`` (scores of a proposal).
    """

    image_id: int
    object: NewObject
    annotation_id: str
    marks: dict[str, Any]


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def _image(row: sqlite3.Row) -> StoredImage:
    return StoredImage(row["id"], row["source"], row["name"], row["width"], row["height"])


def _object(row: sqlite3.Row) -> StoredObject:
    return StoredObject(
        id=row["id"],
        image_id=row["image_id"],
        label=row["label"],
        source=row["source"],
        mask={"size": [row["height"], row["width"]], "counts": row["counts"]},
        area=row["area"],
        bbox=json.loads(row["bbox"]),
        score=row["score"],
        prompts=json.loads(row["prompts"]),
        version=row["version"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
    )


def mask_key(mask: dict[str, Any]) -> str:
    """What names a compressed COCO RLE mask in ``imported``: SHA-256 of size and counts."""
    height, width = mask["size"]
    return hashlib.sha256(f"{height}x{width}:{mask['counts']}".encode()).hexdigest()


def _json_text(value: Any, what: str) -> str:
    """``value`` as strict JSON; SeganyError if it holds NaN or Infinity, which Python's
    ``json`` would write and read back but no export could then give out."""
    try:
        return json.dumps(value, allow_nan=False)
    except ValueError:
        raise SeganyError(f"{what} must hold finite numbers only") from None


def _object_columns(new: NewObject) -> dict[str, Any]:
    """Column values of ``new`` for INSERT/UPDATE (SeganyError for a non-finite number)."""
    height, width = new.mask["size"]
    if new.score is not None and not math.isfinite(new.score):
        raise SeganyError(f"score must be a finite number, got {new.score}")
    return {
        "label": new.label,
        "source": new.source,
        "height": int(height),
        "width": int(width),
        "counts": new.mask["counts"],
        "area": int(new.area),
        "bbox": _json_text([float(v) for v in new.bbox], "bbox"),
        "score": None if new.score is None else float(new.score),
        "prompts": _json_text(new.prompts or {}, "prompts"),
    }


class ProjectStore:
    """Images and objects of one project in the SQLite file ``path`` (created if missing)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise SeganyError(
                f"cannot create the project folder {self.path.parent}: {error.strerror}; "
                "choose another with --project DIR"
            ) from None
        with self._connection() as connection:
            # WAL lets readers (the UI) run while a writer commits; it is a property of the file.
            connection.execute("PRAGMA journal_mode = WAL")
            version = connection.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise SeganyError(
                    f"project {self.path} was written by a newer segany (schema {version}); "
                    "upgrade segany to open it"
                )
            connection.executescript(f"BEGIN IMMEDIATE; {SCHEMA} COMMIT;")
            connection.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    # -- connections --------------------------------------------------------------------

    @contextlib.contextmanager
    def _connection(self) -> Iterator[sqlite3.Connection]:
        """A fresh connection per operation: safe from any thread, nothing shared."""
        try:
            connection = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        except sqlite3.Error as error:
            raise SeganyError(f"cannot open project database {self.path}: {error}") from None
        try:
            connection.row_factory = sqlite3.Row
            connection.execute("PRAGMA foreign_keys = ON")
            connection.execute("PRAGMA synchronous = FULL")  # answered means on disk
            yield connection
        finally:
            connection.close()

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """A write transaction: all of it is committed, or none of it."""
        with self._connection() as connection:
            # IMMEDIATE takes the write lock up front, so two writers queue instead of
            # failing when both try to upgrade a read lock.
            connection.execute("BEGIN IMMEDIATE")
            try:
                yield connection
            except BaseException:
                connection.execute("ROLLBACK")
                raise
            connection.execute("COMMIT")

    # -- images -------------------------------------------------------------------------

    def add_images(self, source: Literal["folder", "upload"], names: Iterable[str]) -> None:
        """Register image files; names already known keep their ids."""
        with self._connection() as db:
            rows = db.execute("SELECT name FROM images WHERE source = ?", (source,))
            known = {row["name"] for row in rows}
        new = [name for name in names if name not in known]
        if not new:
            return  # the usual case: no write lock taken
        now = _now()
        with self._transaction() as db:
            db.executemany(
                "INSERT OR IGNORE INTO images (source, name, added_at) VALUES (?, ?, ?)",
                [(source, name, now) for name in new],
            )

    def image_by_name(self, source: Literal["folder", "upload"], name: str) -> StoredImage:
        with self._connection() as db:
            row = db.execute(
                "SELECT * FROM images WHERE source = ? AND name = ?", (source, name)
            ).fetchone()
        if row is None:
            raise NotFound(f"no {source} image named {name!r}")
        return _image(row)

    def images(self) -> list[StoredImage]:
        """All images: folder images by name, then uploads by id."""
        with self._connection() as db:
            rows = db.execute("SELECT * FROM images ORDER BY source = 'upload', name, id")
            return [_image(row) for row in rows]

    def object_counts(self, image_id: int | None = None) -> dict[int, dict[str, int]]:
        """Number of objects per image (all, or just ``image_id``) and source."""
        where, params = ("WHERE image_id = ?", (image_id,)) if image_id is not None else ("", ())
        counts: dict[int, dict[str, int]] = {}
        with self._connection() as db:
            for row in db.execute(
                f"SELECT image_id, source, COUNT(*) AS n FROM objects {where} "
                "GROUP BY image_id, source",
                params,
            ):
                counts.setdefault(row["image_id"], {})[row["source"]] = row["n"]
        return counts

    def image(self, image_id: int) -> StoredImage:
        with self._connection() as db:
            row = db.execute("SELECT * FROM images WHERE id = ?", (image_id,)).fetchone()
        if row is None:
            raise NotFound(f"no image with id {image_id}")
        return _image(row)

    def set_image_size(self, image_id: int, width: int, height: int) -> None:
        with self._transaction() as db:
            db.execute(
                "UPDATE images SET width = ?, height = ? WHERE id = ?", (width, height, image_id)
            )

    # -- objects ------------------------------------------------------------------------

    def create_objects(
        self, image_id: int, objects: Sequence[NewObject], replace_proposals: bool = False
    ) -> list[StoredObject]:
        """Add objects to an image in one transaction; with ``replace_proposals`` its
        earlier proposals are deleted in the same transaction."""
        now = _now()
        with self._transaction() as db:
            if db.execute("SELECT 1 FROM images WHERE id = ?", (image_id,)).fetchone() is None:
                raise NotFound(f"no image with id {image_id}")
            if replace_proposals:
                db.execute(
                    "DELETE FROM objects WHERE image_id = ? AND source = 'proposal'", (image_id,)
                )
            ids = [self._insert(db, image_id, new, now) for new in objects]
            rows = {
                row["id"]: row
                for row in db.execute(
                    f"SELECT * FROM objects WHERE id IN ({', '.join('?' * len(ids))})", ids
                )
            }
        return [_object(rows[i]) for i in ids]

    @staticmethod
    def _insert(db: sqlite3.Connection, image_id: int, new: NewObject, now: str) -> int:
        """INSERT one object; returns its id."""
        columns = {**_object_columns(new), "image_id": image_id}
        columns.update(created_at=now, updated_at=now)
        names = ", ".join(columns)
        marks = ", ".join("?" * len(columns))
        cursor = db.execute(
            f"INSERT INTO objects ({names}) VALUES ({marks})", tuple(columns.values())
        )
        return int(cursor.lastrowid)

    def import_objects(self, items: Sequence[ImportedObject], file: str) -> list[ImportedObject]:
        """Add the objects of a COCO file in one transaction (all of them or, on any
        error, none); returns the items added, in order.

        An item is skipped when its image already has an object with the very same mask
        (any source), or when the same mask came onto it before in the same role (accepted
        or proposal), even if that object has been deleted since: a rejected proposal stays
        rejected however often its file is imported.
        """
        now = _now()
        added = []
        with self._transaction() as db:
            for item in items:
                mask = item.object.mask
                key = mask_key(mask)
                proposal = int(item.object.source == "proposal")
                present = db.execute(
                    "SELECT 1 FROM objects WHERE image_id = ? AND height = ? AND width = ? "
                    "AND counts = ? UNION ALL SELECT 1 FROM imported WHERE image_id = ? "
                    "AND mask_key = ? AND proposal = ?",
                    (item.image_id, *mask["size"], mask["counts"], item.image_id, key, proposal),
                ).fetchone()
                if present is not None:
                    continue
                object_id = self._insert(db, item.image_id, item.object, now)
                db.execute(
                    "INSERT INTO imported (image_id, mask_key, proposal, object_id, "
                    "annotation_id, file, marks, imported_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        item.image_id,
                        key,
                        proposal,
                        object_id,
                        item.annotation_id,
                        file,
                        _json_text(item.marks, "segany marks"),
                        now,
                    ),
                )
                added.append(item)
        return added

    def import_marks(self) -> dict[int, dict[str, Any]]:
        """The ``"segany"`` marks (without ``"proposal"``) that imported objects came with,
        by object id; objects without marks are left out."""
        with self._connection() as db:
            rows = db.execute(
                "SELECT object_id, marks FROM imported WHERE object_id IS NOT NULL "
                "AND marks != '{}'"
            ).fetchall()
        return {row["object_id"]: json.loads(row["marks"]) for row in rows}

    def object(self, object_id: int) -> StoredObject:
        with self._connection() as db:
            row = db.execute("SELECT * FROM objects WHERE id = ?", (object_id,)).fetchone()
        if row is None:
            raise NotFound(f"no object with id {object_id}")
        return _object(row)

    def objects(
        self, image_id: int | None = None, sources: Sequence[str] = SOURCES
    ) -> list[StoredObject]:
        """Objects of one image (or all, by image), oldest first, of the given sources."""
        where = f"source IN ({', '.join('?' * len(sources))})"
        params: list[Any] = list(sources)
        if image_id is not None:
            where += " AND image_id = ?"
            params.append(image_id)
        with self._connection() as db:
            rows = db.execute(
                f"SELECT * FROM objects WHERE {where} ORDER BY image_id, id", params
            ).fetchall()
        return [_object(row) for row in rows]

    def update_object(
        self, object_id: int, changes: dict[str, Any], expected_version: int | None
    ) -> StoredObject:
        """Change some fields of :class:`NewObject` (``mask`` with ``area`` and ``bbox``).

        With ``expected_version`` the change applies only if the object still has it
        (else :class:`Conflict`); without, the last write wins. Bumps ``version``.
        """
        with self._transaction() as db:
            current = self._current(db, object_id, expected_version)
            merged = NewObject(
                mask=changes.get("mask", current.mask),
                area=changes.get("area", current.area),
                bbox=changes.get("bbox", current.bbox),
                label=changes.get("label", current.label),
                source=changes.get("source", current.source),
                score=changes.get("score", current.score),
                prompts=changes.get("prompts", current.prompts),
            )
            columns = _object_columns(merged)
            assignments = ", ".join(f"{name} = ?" for name in columns)
            db.execute(
                f"UPDATE objects SET {assignments}, version = version + 1, updated_at = ? "
                "WHERE id = ?",
                (*columns.values(), _now(), object_id),
            )
            row = db.execute("SELECT * FROM objects WHERE id = ?", (object_id,)).fetchone()
        return _object(row)

    def delete_object(self, object_id: int, expected_version: int | None) -> None:
        """Delete an object, if it still has ``expected_version`` (when given)."""
        with self._transaction() as db:
            self._current(db, object_id, expected_version)
            db.execute("DELETE FROM objects WHERE id = ?", (object_id,))

    @staticmethod
    def _current(
        db: sqlite3.Connection, object_id: int, expected_version: int | None
    ) -> StoredObject:
        row = db.execute("SELECT * FROM objects WHERE id = ?", (object_id,)).fetchone()
        if row is None:
            raise NotFound(f"no object with id {object_id}")
        if expected_version is not None and row["version"] != expected_version:
            raise Conflict(
                f"object {object_id} was changed elsewhere (now version {row['version']}, "
                f"you had version {expected_version}); reload it and try again"
            )
        return _object(row)

    def keep_proposals(self, image_id: int) -> int:
        """Turn an image's proposals into kept automatic objects; returns how many."""
        with self._transaction() as db:
            cursor = db.execute(
                "UPDATE objects SET source = 'auto', version = version + 1, updated_at = ? "
                "WHERE image_id = ? AND source = 'proposal'",
                (_now(), image_id),
            )
        return cursor.rowcount

    def delete_proposals(self, image_id: int) -> int:
        """Delete an image's proposals; returns how many."""
        with self._transaction() as db:
            cursor = db.execute(
                "DELETE FROM objects WHERE image_id = ? AND source = 'proposal'", (image_id,)
            )
        return cursor.rowcount
