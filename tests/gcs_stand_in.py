"""A local Google Cloud Storage for tests: `gcp-storage-emulator` (PyPI), serving in memory.

Run as `python tests/gcs_stand_in.py PORT BUCKET`. One gap in the emulator is closed first: real GCS sends
an object's generation as the `x-goog-generation` header of a media download, which TensorStore
(Orbax's array writer) reads before it rewrites an OCDBT manifest; the emulator leaves it out, so every
checkpoint with more than a few arrays fails with "Malformed StorageGeneration". Nothing else is changed.
"""

from __future__ import annotations

import sys

from gcp_storage_emulator import server
from gcp_storage_emulator.handlers import objects

_download = objects.download


def download(request, response, storage, *args, **kwargs):
  _download(request, response, storage, *args, **kwargs)
  try:
    obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
  except Exception:  # noqa: BLE001 - not found: the emulator has answered 404 already
    return
  response["x-goog-generation"] = obj["generation"]
  response["x-goog-metageneration"] = obj.get("metageneration", "1")


def main() -> None:
  objects.download = download
  for _, handlers in server.HANDLERS:
    for method, fn in list(handlers.items()):
      if fn is _download:
        handlers[method] = download
  srv = server.create_server("127.0.0.1", int(sys.argv[1]), in_memory=True, default_bucket=sys.argv[2])
  srv.run()


if __name__ == "__main__":
  main()
