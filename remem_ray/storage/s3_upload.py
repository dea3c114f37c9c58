"""A streamed S3 write that shows its object only once the writer succeeded.

pyarrow's S3 output stream has no abort: closing it, as its `with` block does after an error too
(a KeyboardInterrupt between parts, a failed part upload, an exception in torch.save), completes
the multipart upload with the parts sent so far, so the part written stood under the final name (a
resume state cut short, read by every retry). Here the bytes written go through a bounded queue
to s3transfer's managed upload in a thread of its own (parts in parallel, each retried by the
client); `commit` ends the stream and waits for the object; `abort` makes the upload's read fail,
and s3transfer then aborts the multipart upload: nothing is published.
"""

from __future__ import annotations

import queue
import threading
from typing import Any

PART_SIZE = 64 << 20  # S3 allows 10,000 parts: objects up to 640 GB
CONCURRENCY = 4  # parts in flight, and parts read ahead of them
QUEUE_ITEMS = 2  # writes queued: what one upload holds is about (2 x CONCURRENCY + QUEUE_ITEMS + 1) parts
PUT_WAIT_S = 1.0  # a writer blocked on a full queue looks this often whether the upload failed
ABORT_WAIT_S = 60.0  # how long an abort waits for the upload to end

_END = object()


class UploadAborted(Exception):
    """Raised into boto3's read of the stream: its writer failed, so the upload must not finish."""


class _QueueReader:
    """The file boto3 reads: what the writer queued, in order; b"" at the end."""

    def __init__(self, items: queue.Queue) -> None:
        self._items, self._held, self._ended = items, bytearray(), False

    def read(self, size: int = -1) -> bytes:
        while not self._ended and (size < 0 or len(self._held) < size):
            item = self._items.get()
            if item is _END:
                self._ended = True
            elif isinstance(item, BaseException):
                raise UploadAborted(str(item))
            else:
                self._held += item
        if size < 0:
            size = len(self._held)
        data = bytes(self._held[:size])
        del self._held[:size]
        return data


class S3Upload:
    """A write-only stream into s3://bucket/key (write, tell, flush), then `commit` or `abort`.
    A failure of the upload (a part refused, no such bucket) comes back as OSError from the next
    write, so a writer does not compute 20 GB for an upload that failed at its first part."""

    def __init__(self, client: Any, bucket: str, key: str) -> None:
        self._items: queue.Queue = queue.Queue(maxsize=QUEUE_ITEMS)
        self._position = 0
        self._failure: BaseException | None = None
        self._future: Any = None  # s3transfer's, once the upload is submitted
        self._ended = False  # the stream's end handed over: a transfer done now may have succeeded
        self._reader_told = False  # the reader was handed a failure
        self._thread = threading.Thread(target=self._upload, args=(client, bucket, key), daemon=True)
        self._thread.start()

    def _upload(self, client: Any, bucket: str, key: str) -> None:
        # s3transfer's manager, not boto3's upload_fileobj: its future tells a failed part at
        # once, and no CRT client is picked behind our back
        from s3transfer.manager import TransferConfig, TransferManager

        config = TransferConfig(
            multipart_threshold=PART_SIZE,
            multipart_chunksize=PART_SIZE,
            max_request_concurrency=CONCURRENCY,
            max_in_memory_upload_chunks=CONCURRENCY,
        )
        try:
            with TransferManager(client, config) as manager:
                self._future = manager.upload(_QueueReader(self._items), bucket, key)
                self._future.result()
        except BaseException as exc:  # noqa: BLE001 - handed to the writer's thread
            self._failure = exc
            _drain(self._items)  # a writer blocked on the full queue wakes, and sees the failure

    def write(self, data) -> int:
        piece = bytes(data)  # a copy: the caller may reuse its buffer
        self._put(piece)
        self._position += len(piece)
        return len(piece)

    def _put(self, item: object) -> None:
        while True:
            self._raise_failure()
            if not self._thread.is_alive():
                raise OSError("the upload ended before its stream did")
            try:
                self._items.put(item, timeout=PUT_WAIT_S)
                return
            except queue.Full:
                continue

    def _raise_failure(self) -> None:
        future = self._future
        if self._failure is None and not self._ended and future is not None and future.done():
            # a part failed while we wrote: the transfer waits for its reader to end before it
            # says why (its result() blocks until then), so end the reader first
            self._end_reader(OSError("the upload failed"))
        failure = self._failure
        if failure is not None:
            text = str(failure).strip().splitlines()
            raise OSError(f"{type(failure).__name__}: {text[0] if text else ''}")

    def tell(self) -> int:
        return self._position

    def flush(self) -> None:
        self._raise_failure()

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False

    def commit(self) -> None:
        """End the stream and wait until the whole object is stored. Interrupted before the end
        is handed over, the upload is aborted (its threads would hold the process at exit);
        after, the object may still be stored: whole."""
        try:
            self._put(_END)
        except BaseException as exc:
            self._end_reader(exc)
            raise
        self._ended = True
        self._thread.join()
        self._raise_failure()

    def abort(self, why: BaseException) -> None:
        """Fail the upload (s3transfer then aborts its multipart upload) and wait a while for it
        to end; raises nothing of its own. The writer is the queue's only producer: emptied, the
        queue has room for the failure at once, whatever the reader is doing."""
        self._end_reader(why)

    def _end_reader(self, why: BaseException) -> None:
        """Make the upload's next read raise `why`, and wait a while for the upload to end (once:
        a failure found on a write, then the abort that follows, wait for one end)."""
        if self._reader_told or not self._thread.is_alive():
            return
        self._reader_told = True
        _drain(self._items)
        self._items.put_nowait(why)
        self._thread.join(timeout=ABORT_WAIT_S)
        if self._failure is None:  # stuck on a part: it ends with the process; this stream is done
            self._failure = why


def _drain(items: queue.Queue) -> None:
    while True:
        try:
            items.get_nowait()
        except queue.Empty:
            return
