"""An S3-compatible server on loopback for the S3 backend tests (moto's server mode).

    python moto_s3.py PORT BUCKET

Starts moto on 127.0.0.1:PORT, creates BUCKET, prints "ready", and serves until its
stdin is closed. Needs `moto[server]` (scripts/requirements-test.txt; tested with 5.2.5).
"""
import logging
import sys

import boto3
from moto.server import ThreadedMotoServer


def main():
    port, bucket = int(sys.argv[1]), sys.argv[2]
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no per-request lines
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    boto3.client(
        "s3",
        endpoint_url=f"http://127.0.0.1:{port}",
        region_name="us-east-1",
        aws_access_key_id="test",
        aws_secret_access_key="test",
    ).create_bucket(Bucket=bucket)
    print("ready", flush=True)
    sys.stdin.read()
    server.stop()


if __name__ == "__main__":
    main()
