"""Tar shards read member by member, every size checked from its header before a byte of it is read.

webdataset's tar reader (of which opt_ds keeps `gopen` and the key grouping) reads each member whole and ends a
shard silently at the first damaged header. Here a member larger than a sample may be is passed over unread (a
1 MB .tar.gz can hold a 1 GiB member: it is inflated in small blocks and dropped, never held), and a damaged header
is reported and stepped over, so one flipped byte costs its own member, not the rest of the shard. Compressed
tars (.tar.gz, .tar.bz2, .tar.xz) are read as streams under the same rules; HTTP(S) shards come through curl with
a limit on how long a server may send nothing, object-store shards (s3://, gs://) through fsspec.
"""

from __future__ import annotations

import contextlib
import os
import re
import tarfile
from typing import Callable, Iterable, Iterator, NamedTuple

from webdataset.gopen import Pipe, gopen
from webdataset.tariterators import group_by_keys

SKIPPED_NAMES = re.compile(r"__[^/]*__($|/)")  # webdataset's metadata members (__key__ etc.)


class UnreadMember(NamedTuple):
    """A member passed over because its header gives a size over the limit; it stands in for the bytes."""

    size: int


class DamagedHeaders(tarfile.TarError):
    """Header blocks that failed their checksum: the members they described are lost."""


class _CheckedHeader(tarfile.TarInfo):
    """Marks the tar when a header is damaged, and turns a damaged header behind an extended (pax) header into
    an invalid block too: tarfile steps over those one block at a time (ignore_zeros) where it would end the
    shard."""

    @classmethod
    def fromtarfile(cls, tar: tarfile.TarFile) -> tarfile.TarInfo:
        try:
            return super().fromtarfile(tar)
        except (tarfile.InvalidHeaderError, tarfile.SubsequentHeaderError) as exc:
            tar.damaged = True
            raise tarfile.InvalidHeaderError(str(exc)) from None


def ends_like_a_tar(path: str) -> bool:
    """Whether an uncompressed local tar ends with the zero blocks a complete one ends with (one cut at a member
    boundary reads as a clean end). Other files are not judged here."""
    if not path.endswith(".tar") or not os.path.isfile(path):
        return True
    size = os.path.getsize(path)
    if size < 1024 or size % 512:
        return False
    with open(path, "rb") as f:
        f.seek(size - 1024)
        return f.read(1024) == bytes(1024)


def _damage_reported(tar: tarfile.TarFile, url: str, at: int, on_error: Callable[[Exception], bool]) -> None:
    if getattr(tar, "damaged", False):
        tar.damaged = False
        on_error(DamagedHeaders(f"damaged tar headers before byte {at}: the members they held are lost", url))


def _members(opened: Iterable[dict], max_member_bytes: int, on_error: Callable[[Exception], bool]) -> Iterator[dict]:
    for source in opened:
        url, stream, closed = source["url"], source["stream"], False
        try:
            with tarfile.open(fileobj=stream, mode="r|*", ignore_zeros=True, tarinfo=_CheckedHeader) as tar:
                for info in tar:
                    tar.members = []  # a stream of millions of members: keep none
                    _damage_reported(tar, url, info.offset, on_error)
                    if not info.isreg() or SKIPPED_NAMES.match(info.name):
                        continue
                    if info.size > max_member_bytes:
                        data: bytes | UnreadMember = UnreadMember(info.size)
                    else:
                        data = tar.extractfile(info).read()
                    yield {"fname": info.name, "data": data, "__url__": url}
                _damage_reported(tar, url, tar.offset, on_error)
            closed = True
            stream.close()  # a pipe's close reports its command's failure (curl: a 404, a dropped connection)
        except Exception as exn:  # noqa: BLE001  a shard's damage ends that shard only
            exn.args = (*exn.args, url)
            on_error(exn)
        finally:
            if not closed:  # after an error (already counted), or when the reader stops early
                with contextlib.suppress(Exception):
                    stream.close()
        yield {}  # the shard's end: no sample spans two shards


OBJECT_STORES = ("s3://", "gs://")  # read through fsspec (s3fs, gcsfs); webdataset's gopen has no s3


def open_object(url: str, stall_s: float):
    """An object-store shard as a stream read in 16 MiB ranges. Credentials and endpoint come from the store's
    usual environment (AWS_ACCESS_KEY_ID, AWS_ENDPOINT_URL, GOOGLE_APPLICATION_CREDENTIALS...); an S3 read that
    receives nothing for `stall_s` seconds fails after botocore's retries, and the shard is counted."""
    import fsspec

    options: dict = {}
    if url.startswith("s3://"):
        retries = {"max_attempts": 3, "mode": "standard"}
        options["config_kwargs"] = {"connect_timeout": 30, "read_timeout": stall_s, "retries": retries}
    store, path = fsspec.core.url_to_fs(url, **options)
    return store.open(path, "rb", block_size=16 << 20, cache_type="readahead")


def open_shard(url: str, stall_s: float):
    """A shard's byte stream. HTTP(S) through curl as webdataset does, and also given up when it delivers nothing
    for `stall_s` seconds (webdataset's curl waits for ever on a server that stops sending); object stores through
    fsspec; the rest by gopen."""
    if url.startswith(OBJECT_STORES):
        return open_object(url, stall_s)
    if not url.startswith(("http://", "https://")):
        return gopen(url)
    curl = ["curl", "--fail", "--silent", "--location", "--connect-timeout", "30", "--retry", "2", "--retry-delay", "2"]
    stalls = ["--speed-limit", "1", "--speed-time", str(max(1, round(stall_s)))]
    return Pipe([*curl, *stalls, url], mode="rb", bufsize=1 << 16, ignore_status=[141, 23])


def _opened(urls: Iterable[str], stall_s: float, on_error: Callable[[Exception], bool]) -> Iterator[dict]:
    for url in urls:
        try:
            yield {"url": url, "stream": open_shard(url, stall_s)}
        except Exception as exn:  # noqa: BLE001  a shard that does not open is counted like a damaged one
            exn.args = (*exn.args, url)
            on_error(exn)


def tar_samples(
    urls: Iterable[str], max_member_bytes: int, on_error: Callable[[Exception], bool], stall_s: float = 60.0
) -> Iterator[dict]:
    """Samples (key -> member bytes, or UnreadMember) of the tars at `urls`, in order. `on_error(exception)` is
    told of every damaged or unreadable part (the exception's last argument is the shard)."""
    return group_by_keys(_members(_opened(urls, stall_s, on_error), max_member_bytes, on_error), handler=on_error)
