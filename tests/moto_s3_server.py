"""The tests' S3 server (conftest.S3Server): `moto_server` with one fix, so that pyarrow's native S3 client (Ray
Train / Tune storage) can write to it.

moto names the root of its CompleteMultipartUpload answer `CompleteMultipartUploadResponse`; S3 answers
`CompleteMultipartUploadResult`, and pyarrow (which checks that name for errors hidden in a 200 OK) treats anything
else as a failed upload, so every object pyarrow writes to moto fails. Usage: python moto_s3_server.py -H HOST -p PORT
"""

import sys

from moto.core.responses import BaseResponse
from moto.server import main

_serialized = BaseResponse.serialized


def _fixed(self, action_result):
    status, headers, body = _serialized(self, action_result)
    if self.data.get("Action") == "CompleteMultipartUpload":
        wrong, right = "CompleteMultipartUploadResponse", "CompleteMultipartUploadResult"
        body = body.replace(wrong.encode(), right.encode()) if isinstance(body, bytes) else body.replace(wrong, right)
    return status, headers, body


BaseResponse.serialized = _fixed

if __name__ == "__main__":
    main(sys.argv[1:])
