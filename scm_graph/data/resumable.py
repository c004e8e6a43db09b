"""A long shard job that survives being stopped: rerun the same command and it continues where it stopped.

The job works in a fixed folder beside the set, `<out>/.<name>.partial/`:

    job.json                 what fixes the output (source folder, file list digest, codec settings, shard size)
    writer.pid               the process writing it (a second writer is refused while it lives)
    set/shard-000007.tar     finished shards (written to a temp name, then renamed)
    done/shard-000007.json   the shard's sidecar: its count, exact moment sums and the files it skipped

Input file i goes to shard i // shard_size, so a shard's content is fixed by the job, and a shard counts as
done when its sidecar exists (and its tar has the recorded size). Unreadable images are skipped and
counted (`scm_graph.data.imagenet.read_image`). When every shard is done, the manifest is written to
`set/`, `set/` is renamed to `<out>/<name>` (an existing set is replaced only with --force, as
`scm_graph.data.writer` does) and the partial folder is removed. A partial folder of other settings is
left alone unless --force (which starts over); one of the same settings is always resumed.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from scm_graph.data.codec import LatentCodec, PixelCodec, Sums
from scm_graph.data.imagenet import ClassFiles, read_images
from scm_graph.data.manifest import CHECKSUM, MANIFEST, Manifest, sample_digest
from scm_graph.data.writer import _swap_into_place, _write_error, check_destination
from scm_graph.errors import UserError
from scm_graph.paths import pid_alive, remove_dead_temps, write_atomic
from scm_graph.progress import Progress

Codec = PixelCodec | LatentCodec


@dataclass(frozen=True)
class Written:
    """What `write_resumable` did."""

    manifest: Manifest
    resumed_shards: int
    """Shards already done by an earlier run."""
    images_now: int
    """Input files this run read (readable or not)."""
    seconds: float
    """Wall time of this run's shard writing (listing and loading excluded)."""
    unreadable: tuple[tuple[str, str], ...]
    """(file, reason) of every image skipped because it could not be decoded, in file order."""


def partial_folder(out: Path, name: str) -> Path:
    return out / f".{name}.partial"


def _read_json(path: Path) -> dict | None:
    try:
        d = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return d if isinstance(d, dict) else None


def _write_json(path: Path, d: dict) -> None:
    text = json.dumps(d, indent=1) + "\n"
    write_atomic(path, lambda f: f.write(text.encode()))


def _holder(partial: Path) -> int | None:
    """The pid in `writer.pid` if that process is alive (and not us), else None."""
    try:
        pid = int((partial / "writer.pid").read_text().strip())
    except (OSError, ValueError):
        return None
    return pid if pid != os.getpid() and pid_alive(pid) else None


def _refuse_if_busy(partial: Path) -> None:
    pid = _holder(partial)
    if pid is not None:
        raise UserError(f"{partial} is being written by process {pid}; wait for it or stop it "
                        f"(if {pid} is not a shard writer, delete {partial / 'writer.pid'})")


def _differences(old: dict, new: dict) -> str:
    """`resolution 64 -> 32, the list of files` for the keys whose values differ."""
    parts = []
    for k in sorted(set(old) | set(new)):
        if old.get(k) != new.get(k):
            parts.append("the list of files" if k == "files" else f"{k} {old.get(k)} -> {new.get(k)}")
    return ", ".join(parts)


def _prepare(partial: Path, job: dict, force: bool) -> bool:
    """Make `partial` ours for `job`: resume it (True) or start it afresh (False)."""
    if partial.exists() and not partial.is_dir():
        raise UserError(f"{partial} exists and is not a folder; move it away")
    _refuse_if_busy(partial)
    resumed = False
    if partial.is_dir():
        old = _read_json(partial / "job.json")
        if old == job:
            resumed = True
        elif force or (old is None and not (partial / "done").exists()):  # --force, or killed before it began
            shutil.rmtree(partial)
        else:
            why = _differences(old, job) if old is not None else "its job.json is unreadable"
            raise UserError(f"{partial} holds an unfinished job with other settings ({why}); "
                            "pass --force to discard it and start over")
    (partial / "set").mkdir(parents=True, exist_ok=True)
    (partial / "done").mkdir(exist_ok=True)
    (partial / "writer.pid").write_text(f"{os.getpid()}\n")
    _refuse_if_busy(partial)  # two writers started at once: the one whose pid is left keeps it
    if not resumed:
        _write_json(partial / "job.json", job)
    for folder in (partial / "set", partial / "done"):
        remove_dead_temps(folder)  # shards a killed run left half-written
    return resumed


def _shard_name(k: int) -> str:
    return f"shard-{k:06d}"


@dataclass(frozen=True)
class _Job:
    """One resumable job: its inputs, how samples are stored, and where."""

    files: ClassFiles
    codec: Codec
    out: Path
    name: str
    shard_size: int
    force: bool

    @property
    def partial(self) -> Path:
        return partial_folder(self.out, self.name)

    @property
    def num_shards(self) -> int:
        return -(-len(self.files.files) // self.shard_size)

    def inputs(self, k: int) -> range:
        """The input files of shard k: fixed by the job."""
        return range(k * self.shard_size, min((k + 1) * self.shard_size, len(self.files.files)))

    def identity(self) -> dict:
        """What job.json holds: a partial folder with other values is not resumed."""
        return {"src": str(self.files.root), "count": len(self.files.files), "files": self.files.digest(),
                "shard_size": self.shard_size, **self.codec.settings()}

    def finished(self, k: int) -> dict | None:
        """Shard k's sidecar, if the shard is done (its tar, if it has samples, has the recorded size)."""
        side = _read_json(self.partial / "done" / f"{_shard_name(k)}.json")
        if side is None or not isinstance(side.get("count"), int) or not isinstance(side.get("skipped"), list):
            return None
        try:
            Sums.from_dict(side["sums"], self.codec.shape[0])
        except (KeyError, TypeError, ValueError):
            return None
        tar = self.partial / "set" / f"{_shard_name(k)}.tar"
        if side["count"] > 0 and not (tar.is_file() and tar.stat().st_size == side.get("bytes")):
            return None
        return side


def _write_shard(job: _Job, k: int, images: Iterator, bar: Progress) -> dict:
    """Write shard k (its inputs decoded by `images`) to a temp name, rename it, then write its sidecar."""
    import webdataset as wds

    files, codec = job.files, job.codec
    name = _shard_name(k)
    tmp = job.partial / "set" / f".{name}.tar.tmp-{os.getpid()}"
    width = max(8, len(str(len(files.files))))
    sums = Sums.zeros(codec.shape[0])
    skipped: list[list[str]] = []
    batch: list[tuple[int, np.ndarray]] = []
    count, start = 0, bar.done

    def flush(writer) -> None:
        nonlocal count
        payloads, s = codec.encode(np.stack([im for _, im in batch]))
        for (i, _), payload in zip(batch, payloads):
            sample = {"__key__": f"{i:0{width}d}", codec.member: payload, "cls": str(files.labels[i]).encode("ascii")}
            sample[CHECKSUM] = sample_digest(sample).encode("ascii")
            writer.write(sample)
        sums.add(s)
        count += len(batch)
        batch.clear()

    try:
        with open(tmp, "wb") as f:
            writer = wds.TarWriter(f, encoder=False, mtime=0)
            for n, i in enumerate(job.inputs(k), 1):
                got = next(images)
                if isinstance(got, str):
                    skipped.append([files.files[i], got])
                    continue
                batch.append((i, got))
                if len(batch) == codec.batch:
                    flush(writer)
                    bar.update(start + n)
            if batch:
                flush(writer)
            writer.close()
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    bar.update(start + len(job.inputs(k)))
    tar = job.partial / "set" / f"{name}.tar"
    if count:
        os.replace(tmp, tar)
    else:  # every image of the shard was unreadable: no shard file
        tmp.unlink()
        tar.unlink(missing_ok=True)
    side = {"count": count, "bytes": tar.stat().st_size if count else 0, "sums": sums.to_dict(), "skipped": skipped}
    _write_json(job.partial / "done" / f"{name}.json", side)
    return side


def write_resumable(files: ClassFiles, codec: Codec, out: str | Path, name: str, shard_size: int = 10000,
                    force: bool = False, jobs: int = 1, progress: bool = True, description: str = "",
                    say: Callable[[str], None] = print) -> Written:
    """Write `files` through `codec` to `<out>/<name>/`, resuming `<out>/.<name>.partial/` if it holds this job.

    `jobs` processes decode the images; `description` (default: the source folder) starts the manifest's
    `source`, which ends with the count of unreadable images; `say` prints the "resuming: ..." line."""
    if shard_size <= 0:
        raise UserError(f"--shard-size must be positive, not {shard_size}")
    if not files.files:
        raise UserError(f"{files.root}: no images found")
    job = _Job(files, codec, Path(out), name, shard_size, force)
    check_destination(job.out, name, force)
    try:
        job.out.mkdir(parents=True, exist_ok=True)
        resumed = _prepare(job.partial, job.identity(), force)
        try:
            return _run(job, jobs, progress, description or str(files.root), say, resumed)
        finally:
            pid_file = job.partial / "writer.pid"
            if pid_file.exists() and _holder(job.partial) is None:
                pid_file.unlink(missing_ok=True)
    except OSError as e:
        raise _write_error(e, job.partial) from None


def _run(job: _Job, jobs: int, progress: bool, description: str, say: Callable[[str], None], resumed: bool) -> Written:
    """Write the shards not done yet, then finish the set."""
    sides: dict[int, dict] = {}
    if resumed:
        sides = {k: side for k in range(job.num_shards) if (side := job.finished(k)) is not None}
        say(f"resuming: {len(sides)} of {job.num_shards} shards done ({job.partial})")
    todo = [k for k in range(job.num_shards) if k not in sides]
    pending = [job.files.root / job.files.files[i] for k in todo for i in job.inputs(k)]
    total = len(job.files.files)
    t0 = time.perf_counter()
    images = read_images(pending, job.codec.resolution, jobs)
    with Progress("writing shards", total, done=total - len(pending), mode="auto" if progress else "off",
                  every_s=30.0) as bar:
        try:
            for k in todo:
                sides[k] = _write_shard(job, k, images, bar)
        finally:
            images.close()  # stops the decoding processes
    seconds = time.perf_counter() - t0
    manifest = _finish(job, description, [sides[k] for k in range(job.num_shards)])
    unreadable = tuple((f, why) for k in range(job.num_shards) for f, why in sides[k]["skipped"])
    return Written(manifest, job.num_shards - len(todo), len(pending), seconds, unreadable)


def _finish(job: _Job, description: str, sides: list[dict]) -> Manifest:
    """Add up the sidecars in shard order, write the manifest, move the set into place, remove the partial folder."""
    kept = [k for k, side in enumerate(sides) if side["count"] > 0]
    if not kept:
        raise UserError(f"{job.files.root}: none of the {len(job.files.files)} images could be read")
    sums = Sums.zeros(job.codec.shape[0])
    for side in sides:
        sums.add(Sums.from_dict(side["sums"], job.codec.shape[0]))
    mean, std = sums.mean_std()
    for c, s in enumerate(std):
        if not s > 0:
            raise UserError(f"channel {c} of the set is constant (std {s}); it cannot be normalised")
    unread = sum(len(side["skipped"]) for side in sides)
    manifest = Manifest(
        name=job.name,
        count=sum(side["count"] for side in sides),
        shape=job.codec.shape,
        dtype=job.codec.dtype,
        format=job.codec.format,
        mean=mean,
        std=std,
        num_classes=len(job.files.class_names),
        labels=True,
        class_names=job.files.class_names,
        source=f"{description}; {unread} unreadable image{'' if unread == 1 else 's'} skipped",
        shards=tuple(f"{_shard_name(k)}.tar" for k in kept),
        shard_counts=tuple(sides[k]["count"] for k in kept),
        shard_bytes=tuple(sides[k]["bytes"] for k in kept),
        sample_checksum=CHECKSUM,
        latent=job.codec.latent_info(),
    )
    text = manifest.to_json()
    write_atomic(job.partial / "set" / MANIFEST, lambda f: f.write(text.encode()))
    dest = check_destination(job.out, job.name, job.force)  # still ours to write?
    _swap_into_place(job.partial / "set", dest)
    shutil.rmtree(job.partial, ignore_errors=True)
    return manifest
