"""Every part a job will read, verified before its first epoch: the parts of every split of its scheme (train, the
validation split, every test split), each read once with the checksum-verifying reader the stream uses
(`ShardDataset.read_part(verify=True)`: sha256 of the bytes against the manifest, schema, row count, image sizes).

Without it a damaged test part is found only at test evaluation, after the training has written validation records
and its own done marker. A part verified once in a worker process is not read again by the next job of the lane;
ranks share the work (rank r reads every world-th part) and gather what they found, so every rank fails alike. On a
one-worker lane every part read is also offered to the lane's part cache, where the stream would put it anyway: the
check then costs little more than the reads it moves ahead (docs/concepts.md gives the measured cost).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from platebench.datasets.errors import DatasetError
from platebench.datasets.shards import ShardDataset

from .lane import Lane

READ_THREADS = 4  # parts fetched and hashed at once (I/O and zstd/sha256 release the GIL)
_VERIFIED: set[tuple[str, str, str]] = set()  # (dataset url, part path, sha256) verified in this process


def verify_job_parts(ds: ShardDataset, scheme: str, lane: Lane) -> int:
    """Verify the parts of every split of `scheme` not verified yet in this process; a DatasetError naming the first
    damaged or missing part (and how many more) otherwise. Returns the number of parts this rank read."""
    from platebench.methods.distributed import all_gather_objects

    manifest = ds.manifest
    plates = {p for split in manifest.scheme(scheme).splits for p in manifest.plates_for(scheme, split)}
    parts = [p for plate in sorted(plates) for p in manifest.parts_of(plate)
             if (ds.url, p.path, p.sha256) not in _VERIFIED]
    mine = parts[lane.rank::lane.world]

    def check(part):
        try:
            return ds.read_part(part, verify=True, retries=3)
        except DatasetError as exc:
            return str(exc)

    ds.root  # noqa: B018 - opens the filesystem once, before the threads share it
    problems = []
    with ThreadPoolExecutor(max_workers=READ_THREADS) as pool:
        for start in range(0, len(mine), READ_THREADS):  # a few parts in memory at a time
            chunk = mine[start:start + READ_THREADS]
            for part, got in zip(chunk, pool.map(check, chunk)):
                if isinstance(got, str):
                    problems.append(got)
                elif lane.world == 1:  # this rank reads every part of the job: keep what fits, as the stream would
                    lane.cache.put(part.path, got)
    problems = all_gather_objects(problems)
    if problems:
        more = (f"; {len(problems) - 1} more damaged or missing part(s): `platebench inspect --data {ds.url} --verify` "
                "lists them") if len(problems) > 1 else ""
        raise DatasetError(f"{problems[0]} (found before training{more})")
    _VERIFIED.update((ds.url, p.path, p.sha256) for p in parts)
    return len(mine)
