"""Runs gcp-storage-emulator (same arguments as its `gcp-storage-emulator` command) with one fix
that TensorStore needs: object downloads carry the object's generation in the
`x-goog-generation` header, as real GCS sends it; with EMO_GCS_EMULATOR_STATS=FILE set, FILE
holds the total bytes of object data served so far (the tests count partial reads). Without it TensorStore cannot update an object
conditionally (an OCDBT manifest written twice fails with "Malformed StorageGeneration")."""

import functools
import os
import sys

from gcp_storage_emulator.handlers import objects

_download = objects.download
STATS = os.environ.get("EMO_GCS_EMULATOR_STATS")  # file: total object bytes downloaded
_served = [0]


@functools.wraps(_download)
def download(request, response, storage, *args, **kwargs):
    try:
        obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
    except Exception:  # noqa: BLE001 (the original handler answers 404)
        obj = None
    if obj is not None:
        response["x-goog-generation"] = str(obj.get("generation", "1"))
        response["x-goog-metageneration"] = str(obj.get("metageneration", "1"))
    if STATS:  # counts the bytes of object data served, for tests of partial reads
        write_file = response.write_file

        def counted(data, *a, **k):
            _served[0] += len(data)
            with open(STATS, "w", encoding="ascii") as f:
                f.write(str(_served[0]))
            return write_file(data, *a, **k)

        response.write_file = counted
    return _download(request, response, storage, *args, **kwargs)


objects.download = download  # before the server module builds its routes

from gcp_storage_emulator.__main__ import main  # noqa: E402  pylint: disable=g-import-not-at-top

if __name__ == "__main__":
    sys.exit(main())
