"""Shared fixtures: a real S3 server on loopback for `s3://` paths, and one local Ray cluster per session."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass

import pytest


@dataclass(frozen=True)
class S3Server:
    """A moto S3 server on 127.0.0.1 with one empty bucket."""

    endpoint_url: str
    bucket: str

    def uri(self, prefix: str) -> str:
        return f"s3://{self.bucket}/{prefix.strip('/')}"


@pytest.fixture(scope="session")
def s3() -> Iterator[S3Server]:
    """Moto's threaded S3 server on a free loopback port, reached through the standard AWS environment variables.

    Environment variables rather than in-process mocks, so boto3, s3fs, pyarrow and worker processes (Ray) started
    during the session all find the server the same way production code finds a real store.
    """
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)  # port 0: the OS picks a free one
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    env = pytest.MonkeyPatch()
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_ENDPOINT_URL_S3"):
        env.delenv(name, raising=False)  # a developer's own settings must not win over the test server
    env.setenv("AWS_ACCESS_KEY_ID", "testing")
    env.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    env.setenv("AWS_DEFAULT_REGION", "us-east-1")
    env.setenv("AWS_ENDPOINT_URL", endpoint)
    env.setenv("AWS_CONFIG_FILE", os.devnull)
    env.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
    env.setenv("AWS_EC2_METADATA_DISABLED", "true")
    no_proxy = ",".join(filter(None, [os.environ.get("NO_PROXY"), "127.0.0.1", "localhost"]))
    env.setenv("NO_PROXY", no_proxy)
    env.setenv("no_proxy", no_proxy)
    try:
        import boto3

        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="test-bucket")
        yield S3Server(endpoint_url=endpoint, bucket="test-bucket")
    finally:
        env.undo()
        server.stop()


@pytest.fixture(scope="session")
def ray_local(s3: S3Server) -> Iterator[None]:
    """One local Ray for the session, started after the S3 environment so its workers inherit it, with its address
    exported as a job's is (`start_local_ray`), so a cluster of another process on the machine does not confuse it.

    More logical CPUs than the 2 cores: the job's decode tasks and three model actor pools (fractional CPUs) must be
    schedulable at once, or the pipeline waits forever (FIELD_NOTES).
    """
    from pipelines.runtime import start_local_ray, stop_local_ray
    from workloads.runtime import local_train_environment

    local_train_environment(health_check_s=0.2)  # the controller notices a report or a run's end sooner still
    # With its dashboard: Ray Train's placement-group cleaner asks the state API whether the run's controller lives,
    # and a cluster without a dashboard is answered by whichever cluster's dashboard holds the default port (another
    # job's on this machine), which knows no such actor: the cleaner then removes the run's placement group.
    start_local_ray(4, configure_logging=False)
    try:
        yield
    finally:
        stop_local_ray()


@pytest.fixture(scope="session")
def train_dataset(ray_local, tmp_path_factory) -> str:
    """A preprocessed shapes dataset for training tests: 48 square and 16 wide images in two aspect buckets
    (64x64 and 80x48 pixels), encoded by the tiny models through the real preprocessing job."""
    import shutil

    from PIL import Image

    from conf.preprocess import ComputeConf, ModelsConf, PreprocessConf, StageConf
    from pipelines.make_shapes import MakeShapesConf
    from pipelines.make_shapes import run as make_shapes
    from pipelines.preprocess import run as preprocess

    root = tmp_path_factory.mktemp("train-data")
    make_shapes(MakeShapesConf(out=str(root / "shapes"), n=48, seed=5, size=96, shard_size=8))
    folder = root / "shapes" / "folder"
    for png in sorted(folder.glob("*.png"))[:16]:
        Image.open(png).crop((0, 19, 96, 77)).save(folder / f"wide-{png.name}")
        shutil.copy(png.with_suffix(".txt"), folder / f"wide-{png.stem}.txt")
    stage = StageConf(batch_size=8, num_cpus=0.5)
    preprocess(PreprocessConf(
        input=str(folder), output=str(root / "data"), buckets=["64x64", "80x48"], folder_shard_size=8,
        models=ModelsConf(kind="tiny", tiny_dir=str(root / "tiny"), caption_max_new_tokens=8),
        compute=ComputeConf(decode_num_cpus=0.25, decode_batch_size=8, write_batch_size=8, vae=stage, caption=stage,
                            text=stage)))
    return str(root / "data")


@pytest.fixture(scope="session")
def planted(tmp_path_factory) -> tuple[str, dict]:
    """A folder of images with planted copies for the dedup job (and its ground truth), plus one broken PNG."""
    from support import PLANTED_COPIED, PLANTED_ORIGINALS

    from pipelines.synthetic.planted import write_planted

    folder = tmp_path_factory.mktemp("planted") / "images"
    truth = write_planted(str(folder), PLANTED_ORIGINALS, PLANTED_COPIED, seed=4, size=64)
    (folder / "zz-broken.png").write_bytes(b"\x89PNG not really")
    (folder / "zz-broken.txt").write_text("a photo of nothing")
    return str(folder), truth
