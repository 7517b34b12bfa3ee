"""The preprocessing job end to end on a local Ray cluster with tiny models."""

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from conf.preprocess import ComputeConf, ModelsConf, PreprocessConf, StageConf
from model.conditioning import TINY_TEXT
from pipelines import schema
from pipelines.make_shapes import MakeShapesConf
from pipelines.make_shapes import run as make_shapes
from pipelines.preprocess import run as preprocess
from pipelines.sources import InputError
from pipelines.storage import filesystem
from pipelines.synthetic.shapes import SHAPES, make_sample

ROOT = Path(__file__).resolve().parents[2]
N_GOOD = 12
BAD = {  # file stem -> the reason the job must record
    "bad-truncated": "cannot decode",
    "bad-not-an-image": "cannot decode",
    "bad-zero-bytes": "empty file",
    "bad-tiny": "too small",
    "bad-elongated": "extreme aspect ratio",
    "bad-bomb": "decompression bomb",
}


def png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def tiny_models_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tiny-models"))


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    out = tmp_path_factory.mktemp("shapes")
    make_shapes(MakeShapesConf(out=str(out), n=N_GOOD, seed=3, size=96, shard_size=5))
    folder = out / "folder"
    good = png(Image.new("RGB", (96, 96), (0, 128, 0)))
    (folder / "bad-truncated.png").write_bytes(good[: len(good) // 2])
    (folder / "bad-not-an-image.png").write_bytes(b"<html>not found</html>")
    (folder / "bad-zero-bytes.png").write_bytes(b"")
    (folder / "bad-tiny.png").write_bytes(png(Image.new("RGB", (1, 1))))
    (folder / "bad-elongated.png").write_bytes(png(Image.new("RGB", (400, 40))))
    (folder / "bad-bomb.png").write_bytes(png(Image.new("L", (1200, 1200))))
    for stem in BAD:
        (folder / f"{stem}.txt").write_text("a broken file")
    # normalised, not rejected: no caption, non-UTF-8 caption, a very long caption, CMYK and palette images
    (folder / "odd-no-caption.png").write_bytes(good)
    (folder / "odd-latin1.png").write_bytes(good)
    (folder / "odd-latin1.txt").write_bytes("un caf\xe9 rouge".encode("latin-1"))
    (folder / "odd-long.png").write_bytes(good)
    (folder / "odd-long.txt").write_text("a red circle " * 2000)
    buf = io.BytesIO()
    Image.new("RGB", (120, 90), (200, 10, 10)).convert("CMYK").save(buf, format="JPEG")
    (folder / "odd-cmyk.jpg").write_bytes(buf.getvalue())
    (folder / "odd-palette.png").write_bytes(png(Image.new("RGB", (90, 120), (10, 10, 200)).convert("P")))
    return out


def config(input_uri: str, output: str, models_dir: str, folder_shard_size: int = 6, **kw) -> PreprocessConf:
    stage = StageConf(batch_size=4, num_cpus=0.5)
    return PreprocessConf(
        input=input_uri, output=output, resolution=64, max_pixels=1_000_000, folder_shard_size=folder_shard_size,
        models=ModelsConf(kind="tiny", tiny_dir=models_dir, caption_max_new_tokens=8),
        compute=ComputeConf(decode_num_cpus=0.25, decode_batch_size=8, write_batch_size=8,
                            vae=stage, caption=stage, text=stage),
        **kw,
    )


def read_output(output: str) -> dict[str, dict]:
    """All data rows by id, from the files the manifest lists."""
    fs, root = filesystem(output)
    manifest = json.loads(fs.cat_file(f"{root}/{schema.MANIFEST}"))
    rows = {}
    for path in manifest["files"]:
        if f"/{schema.DATA_DIR}/" in path:
            for row in pq.read_table(pa.BufferReader(fs.cat_file(path))).to_pylist():
                    assert row[schema.ID] not in rows, f"duplicate row {row[schema.ID]}"
                    rows[row[schema.ID]] = row
    return rows


def read_rejects(output: str) -> dict[str, dict]:
    """All rejects rows by id, from the files the manifest lists."""
    fs, root = filesystem(output)
    manifest = json.loads(fs.cat_file(f"{root}/{schema.MANIFEST}"))
    return {r[schema.ID]: r for path in manifest["files"] if f"/{schema.REJECTS_DIR}/" in path
            for r in pq.read_table(pa.BufferReader(fs.cat_file(path))).to_pylist()}


@pytest.fixture(scope="module")
def folder_run(shapes, tiny_models_dir, ray_local, tmp_path_factory):
    output = str(tmp_path_factory.mktemp("out-folder"))
    return output, preprocess(config(str(shapes / "folder"), output, tiny_models_dir))


def test_counts_rejects_and_manifest(folder_run):
    output, manifest = folder_run
    n_odd = 5
    assert manifest["counts"] == {"read": N_GOOD + len(BAD) + n_odd, "written": N_GOOD + n_odd,
                                  "rejected": len(BAD)}
    assert manifest["rejected_by_stage"] == {"decode": len(BAD)}
    assert manifest["input_format"] == "folder" and manifest["buckets"] == ["64x64"]
    assert manifest["models"]["kind"] == "tiny" and manifest["code_version"]
    assert manifest["models"]["synthetic_captions"] == "model" and manifest["models"]["captioner"]
    fs, root = filesystem(output)
    rejects = {}
    for path in fs.find(f"{root}/{schema.REJECTS_DIR}"):
        rejects.update({r[schema.ID]: r for r in pq.read_table(path).to_pylist()})
    assert set(rejects) == set(BAD)
    for stem, reason in BAD.items():
        assert reason in rejects[stem][schema.REJECT_REASON], rejects[stem]
        assert rejects[stem][schema.SOURCE].endswith(f"{stem}.png")


def test_data_is_plain_parquet_with_native_tensors(folder_run):
    output, _ = folder_run
    rows = read_output(output)
    path = next(p for p in filesystem(output)[0].find(output) if "/data/bucket=64x64/" in p)
    table = pq.read_table(path)  # plain pyarrow, no Ray
    assert str(table.schema.field(schema.LATENT).type.extension_name) == "arrow.fixed_shape_tensor"
    latents = table.column(schema.LATENT).combine_chunks().to_numpy_ndarray()
    assert latents.shape[1:] == (16, 8, 8) and latents.dtype == np.float16
    t5 = table.column("original_t5").combine_chunks().to_numpy_ndarray()
    assert t5.shape[1:] == (TINY_TEXT.t5_tokens, 64)
    assert rows["odd-no-caption"][schema.CAPTION] == ""
    assert rows["odd-latin1"][schema.CAPTION] == "un caf\ufffd rouge"
    assert len(rows["odd-long"][schema.CAPTION]) == 2000
    assert all(isinstance(r[schema.SYNTHETIC_CAPTION], str) for r in rows.values())
    caption = next(r for r in rows.values() if r[schema.ID].startswith("0003-"))[schema.CAPTION]
    assert caption.startswith("a photo of") and any(shape in caption for shape in SHAPES)  # a GenEval prompt


def test_rerun_writes_nothing_new(folder_run, shapes, tiny_models_dir, capsys):
    output, manifest = folder_run
    fs, root = filesystem(output)
    before = {p: fs.info(p)["mtime"] for p in fs.find(root) if "/_manifest" not in p}
    again = preprocess(config(str(shapes / "folder"), output, tiny_models_dir))
    assert "0 to do" in capsys.readouterr().out
    after = {p: fs.info(p)["mtime"] for p in fs.find(root) if "/_manifest" not in p}
    assert before == after
    assert again["counts"] == manifest["counts"] and again["files"] == manifest["files"]


@pytest.mark.faults  # `make test-faults`
def test_killed_run_resumes_without_duplicates(folder_run, shapes, tiny_models_dir, tmp_path):
    reference, _ = folder_run
    output = tmp_path / "out"
    overrides = [f"input={shapes / 'folder'}", f"output={output}", "resolution=64", "max_pixels=1000000",
                 "folder_shard_size=2", f"models.tiny_dir={tiny_models_dir}", "models.caption_max_new_tokens=8",
                 "compute.write_batch_size=2", "compute.decode_batch_size=2", "compute.vae.batch_size=2",
                 "compute.text.batch_size=2", "compute.caption.batch_size=2"]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # its own local Ray, like a user run
    proc = subprocess.Popen([sys.executable, "-m", "pipelines.preprocess", *overrides], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                            env=env)
    markers = output / schema.MARKERS_DIR
    deadline = time.time() + 240
    # a finished marker, not its `.tmp` (a kill between the write and the rename leaves no shard done)
    while time.time() < deadline and not any(markers.glob("shard-*.json")):
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)  # the whole job, Ray workers included, mid-run
    proc.wait()
    done = {p.name: p.stat().st_mtime_ns for p in markers.glob("shard-*.json")}  # a redone shard rewrites its marker
    assert 1 <= len(done) < 12, "the kill should land after some shards and before the last"
    unfinished = next(i for i in range(12) if f"shard-{i:06d}.json" not in done)
    leftover = output / schema.DATA_DIR / "bucket=64x64" / f"{schema.shard_prefix(unfinished)}99999999.parquet"
    leftover.parent.mkdir(parents=True, exist_ok=True)
    leftover.write_bytes(b"half-written")  # what a kill during a write leaves
    manifest = preprocess(config(str(shapes / "folder"), str(output), tiny_models_dir, folder_shard_size=2))
    assert manifest["counts"]["read"] == manifest["counts"]["written"] + manifest["counts"]["rejected"]
    assert not leftover.exists()  # the unfinished shard was cleaned up and redone
    assert {name: (markers / name).stat().st_mtime_ns for name in done} == done  # finished shards were not redone
    assert len(list(markers.glob("shard-*.json"))) == 12
    resumed, uninterrupted = read_output(str(output)), read_output(reference)  # read_output rejects duplicates
    assert resumed.keys() == uninterrupted.keys()
    for key, row in uninterrupted.items():
        assert resumed[key][schema.CAPTION] == row[schema.CAPTION]
        # greedy decoding: the tiny captioner's captions do not depend on how rows are batched
        assert resumed[key][schema.SYNTHETIC_CAPTION] == row[schema.SYNTHETIC_CAPTION], key
        # Batches are composed differently after a resume, and batched CPU convolutions may differ in the last
        # bit, so tensors agree to fp16 rounding rather than bit for bit.
        for column in (schema.LATENT, "original_t5", "original_clip_g_pooled", "synthetic_t5",
                       "synthetic_clip_g_pooled"):
            assert np.allclose(resumed[key][column], row[column], rtol=2e-3, atol=2e-3), (key, column)


def drop_first_synthetic_caption(layout: Path, copy: Path) -> str:
    """A copy of a make_shapes WebDataset or Parquet layout whose first sample has no synthetic caption; its key."""
    shutil.copytree(layout, copy)
    first = sorted(copy.iterdir())[0]
    if first.suffix == ".parquet":
        table = pq.read_table(first)
        column = table.column_names.index("caption_synthetic")
        captions = table.column(column).to_pylist()
        pq.write_table(table.set_column(column, "caption_synthetic", pa.array([None, *captions[1:]], pa.string())),
                       first)
        return table.column("key")[0].as_py()
    with tarfile.open(first) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    key = members[0][0].name.split(".", 1)[0]
    with tarfile.open(first, "w") as tar:
        for member, data in members:
            if member.name != f"{key}.synthetic.txt":
                tar.addfile(member, io.BytesIO(data))
    return key


@pytest.mark.parametrize("fmt", ["webdataset", "parquet"])
def test_other_input_formats_with_their_own_synthetic_captions(shapes, tiny_models_dir, ray_local, tmp_path, fmt):
    """`models.synthetic_captions=input`: every row keeps the synthetic caption its input holds (no captioner runs),
    and a row that has none is a recorded reject."""
    missing = drop_first_synthetic_caption(shapes / fmt, tmp_path / fmt)
    cfg = config(str(tmp_path / fmt), str(tmp_path / "out"), tiny_models_dir)
    cfg.models.synthetic_captions = "input"
    manifest = preprocess(cfg)
    assert manifest["input_format"] == fmt
    assert manifest["counts"] == {"read": N_GOOD, "written": N_GOOD - 1, "rejected": 1}
    assert manifest["models"]["synthetic_captions"] == "input" and manifest["models"]["captioner"] is None
    (reject,) = read_rejects(str(tmp_path / "out")).values()
    assert reject[schema.ID] == missing and reject[schema.REJECT_STAGE] == "decode"
    reason = reject[schema.REJECT_REASON]
    assert "no synthetic caption in the input, which models.synthetic_captions=input needs" in reason, reason
    samples = [make_sample(3, i, 96) for i in range(N_GOOD)]  # the `shapes` fixture's
    rows = read_output(str(tmp_path / "out"))
    assert {key: row[schema.SYNTHETIC_CAPTION] for key, row in rows.items()} == {
        s.key: s.synthetic_caption for s in samples if s.key != missing}


@pytest.mark.parametrize(
    ("make_input", "message"),
    [
        (lambda tmp, s3: str(tmp / "does-not-exist"), "does not exist"),
        (lambda tmp, s3: (tmp / "empty").mkdir() or str(tmp / "empty"), "is empty"),
        (lambda tmp, s3: "s3://no-such-bucket/data", "no-such-bucket"),
    ],
)
def test_bad_input_fails_fast(tmp_path, s3, tiny_models_dir, make_input, message):
    start = time.perf_counter()
    with pytest.raises(InputError, match=message):
        preprocess(config(make_input(tmp_path, s3), str(tmp_path / "out"), tiny_models_dir))
    assert time.perf_counter() - start < 30
    assert not (tmp_path / "out").exists()


def test_output_that_is_an_s3_object_fails_fast(shapes, s3, tiny_models_dir):
    fs, _ = filesystem(s3.uri("taken"))
    fs.pipe_file(s3.uri("taken/out.parquet"), b"not a folder")
    with pytest.raises(FileExistsError, match=r"output='s3://test-bucket/taken/out\.parquet' is an existing file"):
        preprocess(config(str(shapes / "folder"), s3.uri("taken/out.parquet"), tiny_models_dir))
    assert fs.cat_file(s3.uri("taken/out.parquet")) == b"not a folder"


def test_cli_output_that_is_a_file_fails_before_ray(shapes, tmp_path):
    out = tmp_path / "out.parquet"
    out.write_bytes(b"not a folder")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.run(
        [sys.executable, "-m", "pipelines.preprocess", f"input={shapes / 'folder'}", f"output={out}"],
        cwd=ROOT, capture_output=True, text=True, timeout=180, env=env,
    )
    assert proc.returncode == 2, proc.stderr
    assert f"error: output={str(out)!r} is an existing file" in proc.stderr
    assert "Started a local Ray instance" not in proc.stdout + proc.stderr
    assert out.read_bytes() == b"not a folder"


def test_aspect_ratio_buckets(tiny_models_dir, ray_local, tmp_path):
    folder = tmp_path / "mixed"
    folder.mkdir()
    sizes = {"wide-0": (150, 100), "wide-1": (160, 96), "tall-0": (100, 150), "square-0": (90, 90)}
    for stem, size in sizes.items():
        (folder / f"{stem}.png").write_bytes(png(Image.new("RGB", size, (90, 160, 30))))
        (folder / f"{stem}.txt").write_text(stem)
    output = str(tmp_path / "out")
    manifest = preprocess(config(str(folder), output, tiny_models_dir, buckets=["64x64", "96x64", "64x96"]))
    assert manifest["buckets"] == ["64x64", "96x64", "64x96"]
    assert set(manifest["schema"]) == {"bucket=64x64", "bucket=96x64", "bucket=64x96"}
    rows = read_output(output)
    expected = {"wide-0": (96, 64, (16, 8, 12)), "wide-1": (96, 64, (16, 8, 12)), "tall-0": (64, 96, (16, 12, 8)),
                "square-0": (64, 64, (16, 8, 8))}
    for stem, (width, height, latent_shape) in expected.items():
        row = rows[stem]
        assert (row[schema.WIDTH], row[schema.HEIGHT]) == (width, height)
        path = next(f for f in manifest["files"] if f"/{schema.bucket_dir(width, height)}/" in f)
        assert tuple(pq.read_schema(path).field(schema.LATENT).type.shape) == latent_shape


def test_cli_models_group_selects_pretrained_and_fails_fast_offline(shapes, tmp_path):
    """`models=sd3` picks the pretrained ids; with no hub access it fails before any Ray work, naming the field."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run(
        [sys.executable, "-m", "pipelines.preprocess", f"input={shapes / 'folder'}", f"output={tmp_path / 'out'}",
         "models=sd3"],
        cwd=ROOT, capture_output=True, text=True, timeout=180, env=env,
    )
    assert proc.returncode != 0
    assert "models.sd3_repo='stabilityai/stable-diffusion-3-medium-diffusers'" in proc.stderr
    assert "Started a local Ray instance" not in proc.stdout + proc.stderr
    assert not (tmp_path / "out").exists()


def test_output_feeds_the_model(folder_run):
    """The written dataset passes training's start-up check and trains the debug MM-DiT (loss goes down)."""
    import torch

    from model import FLAVORS, MMDiT
    from model.objective import training_loss
    from workloads.train.data import TENSOR_COLUMNS, check_spec, choose_captions, read_spec, to_model_inputs

    output, _ = folder_run
    spec = read_spec(output)
    check_spec(spec, FLAVORS["debug"])
    (files,) = spec.files_by_bucket.values()
    table = pa.concat_tables(pq.read_table(f) for f in files)
    columns = {c: table.column(c).combine_chunks().to_numpy_ndarray() for c in TENSOR_COLUMNS}
    synthetic = np.arange(table.num_rows) % 2 == 1  # both captions' embeddings train
    batch = {k: torch.from_numpy(v) for k, v in choose_captions(columns, synthetic).items()}
    torch.manual_seed(0)
    net = MMDiT(FLAVORS["debug"])
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(40):
        x0, context, pooled = to_model_inputs(batch, spec.text, generator=gen)
        loss = training_loss(net, x0, context, pooled, generator=gen).per_sample.mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert np.mean(losses[-10:]) < 0.8 * np.mean(losses[:10])


def test_preference_pairs_in_pick_a_pics_layout_become_winner_and_loser_latents(shapes, tiny_models_dir, folder_run,
                                                                                 tmp_path):
    """`input_format=pairs`: Parquet with Pick-a-Pic v2's columns (caption, jpg_0, jpg_1, label_0). Each pair's
    preferred image becomes `latent`, the other `latent_loser` (the same VAE, the same bucket), the caption is both
    captions; ties and undecodable losers are recorded rejections, and the dataset reads as a preference dataset."""
    from workloads.train.data import read_spec

    images = sorted((shapes / "folder").glob("[0-9]*.png"))[:4]
    caption = [p.with_suffix(".txt").read_text().strip() for p in images]
    data = [p.read_bytes() for p in images]
    rows = [  # caption, jpg_0, jpg_1, label_0
        (caption[0], data[0], data[1], 1.0),
        (caption[0], data[1], data[0], 0.0),  # the same pair the other way round: label_0 = 0 prefers jpg_1
        (caption[2], data[2], data[3], 1.0),
        (caption[1], data[1], data[0], 0.5),  # a tie
        (caption[3], data[3], b"<html>not found</html>", 1.0),  # a broken loser
    ]
    table = pa.table({"caption": [r[0] for r in rows], "jpg_0": [r[1] for r in rows], "jpg_1": [r[2] for r in rows],
                      "label_0": [r[3] for r in rows], "id": [f"pair-{i}" for i in range(len(rows))]})
    (tmp_path / "picks").mkdir()
    pq.write_table(table, tmp_path / "picks" / "train-0000.parquet")
    out = str(tmp_path / "out")
    manifest = preprocess(config(str(tmp_path / "picks"), out, tiny_models_dir, input_format="pairs"))
    assert manifest["kind"] == "pairs" and manifest["counts"] == {"read": 5, "written": 3, "rejected": 2}
    assert manifest["rejected_by_stage"] == {"decode": 2}
    written = read_output(out)
    assert sorted(written) == ["pair-0", "pair-1", "pair-2"]
    assert read_spec(out).pairs
    for key in written:
        row = written[key]
        assert row[schema.CAPTION] == row[schema.SYNTHETIC_CAPTION]
        assert not np.array_equal(row[schema.LATENT], row[schema.LOSER_LATENT])
    plain = read_output(folder_run[0])  # the same images preprocessed one by one: which one won
    for key, (winner, loser) in {"pair-0": (0, 1), "pair-1": (0, 1), "pair-2": (2, 3)}.items():
        for column, image in ((schema.LATENT, winner), (schema.LOSER_LATENT, loser)):
            np.testing.assert_allclose(np.array(written[key][column], dtype=np.float32),
                                       np.array(plain[images[image].stem][schema.LATENT], dtype=np.float32),
                                       rtol=2e-3, atol=2e-3, err_msg=f"{key} {column}")
    reasons = {key: r[schema.REJECT_REASON] for key, r in read_rejects(out).items()}
    assert "a tie" in reasons["pair-3"] and "cannot decode" in reasons["pair-4"]
