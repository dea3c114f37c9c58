"""A streamed S3 write that shows its object only once the writer succeeded.

pyarrow's S3 output stream has no abort: closing it, as its `with` block does after an error too
(a KeyboardInterrupt between parts, a failed part upload, an exception in torch.save), completes
the multipart upload with the parts sent so far, so the part written stood under the final name (a
resume state cut short, read by every retry). Here the bytes written go through a bounded queue
to boto3's managed upload in a thread of its own (parts in parallel, each retried by the client);
`commit` ends the stream and waits for the object; `abort` makes the upload's read fail, and
boto3 then aborts the multipart upload: nothing is published.
"""

from __future__ import annotations

import queue
import threading
from typing import Any

PART_SIZE = 64 << 20  # S3 allows 10,000 parts: objects up to 640 GB
CONCURRENCY = 4  # parts in flight; with the queue, what one upload holds in memory is about
QUEUE_ITEMS = 2  # (CONCURRENCY + QUEUE_ITEMS + 1) x PART_SIZE at most
PUT_WAIT_S = 1.0  # a writer blocked on a full queue looks this often whether the upload died

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
    Errors of the upload come back as OSError from the next write or from commit."""

    def __init__(self, client: Any, bucket: str, key: str) -> None:
        self._items: queue.Queue = queue.Queue(maxsize=QUEUE_ITEMS)
        self._position = 0
        self._failure: BaseException | None = None
        self._thread = threading.Thread(target=self._upload, args=(client, bucket, key), daemon=True)
        self._thread.start()

    def _upload(self, client: Any, bucket: str, key: str) -> None:
        from boto3.s3.transfer import TransferConfig

        config = TransferConfig(
            multipart_threshold=PART_SIZE, multipart_chunksize=PART_SIZE, max_concurrency=CONCURRENCY
        )
        try:
            client.upload_fileobj(_QueueReader(self._items), bucket, key, Config=config)
        except BaseException as exc:  # noqa: BLE001 - handed to the writer's thread
            self._failure = exc
            while True:  # a writer blocked on the full queue wakes, and sees the failure
                try:
                    self._items.get_nowait()
                except queue.Empty:
                    break

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
        if self._failure is not None:
            text = str(self._failure).strip().splitlines()
            raise OSError(f"{type(self._failure).__name__}: {text[0] if text else ''}")

    def tell(self) -> int:
        return self._position

    def flush(self) -> None:
        self._raise_failure()

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False

    def commit(self) -> None:
        """End the stream and wait until the whole object is stored."""
        self._put(_END)
        self._thread.join()
        self._raise_failure()

    def abort(self, why: BaseException) -> None:
        """Fail the upload (boto3 aborts its multipart upload); never raises."""
        if self._thread.is_alive():
            try:
                self._items.put(why, timeout=PUT_WAIT_S * 30)
            except queue.Full:  # the upload is stuck on a part: it ends with the process
                return
            self._thread.join(timeout=60)
