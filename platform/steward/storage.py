"""Cluster storage: run folders at a URI (s3://, gs://, any filesystem pyarrow and so Ray understand).

The design, in one place:

- Ray Train writes its checkpoints straight to the URI (RunConfig.storage_path), so a restarted worker on any
  node resumes from them.
- steward's own run-folder files (spec.yaml, data_info.json, history.jsonl, model/, metrics.json, model card...) are
  written to a local *staging* folder, `<cache>/runs/<scheme>/<bucket>/<path>/<name>/<run-id>`, and copied to the
  URI at well-defined points: when the run starts (spec and a `running` status), before the workers start (what
  they read: data_info.json, tokenizer/), by rank 0 after each epoch (history.jsonl) and at the end (model/), and
  by the driver when the run ends.
- A sweep (Ray Tune) gets the sweep's URI as its storage_path: Tune syncs its experiment state and every trial's
  checkpoints there itself, so `--resume` restores it from any machine. Each trial's own run folder
  (`trials/<trial id>/`) is staged on the node that runs the trial and published to `<run URI>/trials/<trial id>`
  like a training run's (the trial's Train checkpoints go beside it, in `train-<hex>/`). The driver downloads the
  trial folders (checkpoints left behind) once the sweep ends, and publishes the sweep's own files as for training.
- status.json is uploaded last, after every other file, so a run whose upload was cut short still says `running`
  (or `failed`) and never looks succeeded.
- A run read back from a URI (`steward evaluate URI`, `steward serve --run URI`) is downloaded to the same
  cache folder first, and only when its status says `succeeded`. A `--resume URI` downloads it there too and
  continues from the checkpoints Ray wrote to the URI.

Query parameters of the URI (`?endpoint_override=host:port&scheme=http`, `?region=...`) are kept on every path
derived from it: pyarrow and Ray both read them. Credentials come from the environment, as the AWS / Google
clients read them (AWS_ACCESS_KEY_ID..., GOOGLE_APPLICATION_CREDENTIALS), never from the spec.
"""

import os
import re
import shutil
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from steward.errors import StewardError

URI = re.compile(r"^[a-z][a-z0-9+.-]*://")
STATUS = "status.json"
# Never copied with a run folder: Ray Train (train/, a trial's train-<hex>/) and Ray Tune (tune/) write their
# checkpoints to the URI themselves, and a read-back needs none; trials/ is published by each trial itself.
NOT_COPIED = {"train", "trials", "tune"}
TRIAL_TRAIN_RUN = "train-"  # the prefix of a trial's Train run folders (one per start of the trial)


def is_uri(path: str | Path) -> bool:
    """True for `scheme://...` (s3://, gs://, file://), false for a plain path."""
    return isinstance(path, str) and bool(URI.match(path))


def join(uri: str, *parts: str) -> str:
    """`uri` with path parts appended, its query parameters (endpoint_override...) kept."""
    split = urlsplit(uri)
    path = "/".join([split.path.rstrip("/"), *(p.strip("/") for p in parts)])
    return urlunsplit(split._replace(path=path))


def open_uri(uri: str, field: str) -> tuple[Any, str]:
    """(pyarrow filesystem, path inside it) for `uri`; StewardError naming `field` when pyarrow cannot open it."""
    import pyarrow.fs as pafs

    try:
        return pafs.FileSystem.from_uri(uri)
    except (ValueError, OSError) as err:  # pyarrow's ArrowInvalid is a ValueError
        raise StewardError(
            f"{field} {uri}: cannot open it ({_first_line(err)}); use s3://bucket/path, gs://bucket/path "
            "(with ?endpoint_override=host:port&scheme=http for an S3-compatible server) or a shared folder"
        ) from None


def copied(name: str) -> bool:
    """Whether a run folder's entry `name` is copied with it (checkpoint folders Ray writes to the URI are not)."""
    return name not in NOT_COPIED and not name.startswith(TRIAL_TRAIN_RUN)


def folders(uri: str, field: str) -> list[str]:
    """The names of the folders directly inside the URI folder (none when it does not exist)."""
    import pyarrow.fs as pafs

    fs, root = open_uri(uri, field)
    infos = fs.get_file_info(pafs.FileSelector(root, allow_not_found=True))
    return sorted(i.path.rsplit("/", 1)[-1] for i in infos if i.type == pafs.FileType.Directory)


def check_reachable(uri: str, field: str) -> None:
    """Refuse a URI whose bucket does not exist or whose server does not answer, before a run starts."""
    import pyarrow.fs as pafs

    fs, path = open_uri(uri, field)
    top = path.split("/", 1)[0] if not isinstance(fs, pafs.LocalFileSystem) else path
    try:
        found = fs.get_file_info(top)
    except OSError as err:
        raise StewardError(
            f"{field} {uri}: cannot reach the storage ({_first_line(err)}); check the endpoint and the credentials "
            "in the environment (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, GOOGLE_APPLICATION_CREDENTIALS)"
        ) from None
    if found.type == pafs.FileType.NotFound and not isinstance(fs, pafs.LocalFileSystem):
        raise StewardError(f"{field} {uri}: bucket {top!r} does not exist; create it first or fix the URI")


def cache_dir() -> Path:
    """steward's own local folder: $STEWARD_CACHE, default ~/.cache/steward."""
    return Path(os.environ.get("STEWARD_CACHE") or Path.home() / ".cache" / "steward")


def staging_dir(uri: str) -> Path:
    """The local folder that mirrors `uri`: <cache_dir>/runs/<scheme>/<path>."""
    split = urlsplit(uri)
    return cache_dir() / "runs" / split.scheme / (split.netloc + split.path).strip("/")


def upload(local: Path, uri: str, names: list[str] | None = None) -> None:
    """Copy `names` (files or folders) of the local folder to the URI folder; all of them but NOT_COPIED when None.

    status.json, when among them, goes last: a reader never sees a final status before the files it describes.
    """
    import pyarrow.fs as pafs

    fs, root = open_uri(uri, "output_dir")
    chosen = names if names is not None else [p.name for p in local.iterdir() if copied(p.name)]
    present = [n for n in chosen if (local / n).exists()]
    try:
        for name in sorted(present, key=lambda n: n == STATUS):
            source, target = local / name, f"{root}/{name}"
            if source.is_dir():
                fs.create_dir(target)
                pafs.copy_files(str(source), target, destination_filesystem=fs)
            else:
                with open(source, "rb") as data, fs.open_output_stream(target) as out:
                    shutil.copyfileobj(data, out)
    except OSError as err:
        raise StewardError(
            f"output_dir {uri}: cannot write there ({_first_line(err)}); check that the credentials in the "
            "environment may write to the bucket"
        ) from None


def download(uri: str, local: Path, names: list[str] | None = None) -> None:
    """Copy `names` (or everything but NOT_COPIED) of the URI folder into the local folder; missing names skipped."""
    import pyarrow.fs as pafs

    fs, root = open_uri(uri, "--storage")
    infos = fs.get_file_info(pafs.FileSelector(root, allow_not_found=True))
    local.mkdir(parents=True, exist_ok=True)
    for info in infos:
        name = info.path.rsplit("/", 1)[-1]
        if (names is not None and name not in names) or (names is None and not copied(name)):
            continue
        if info.type == pafs.FileType.Directory:
            shutil.rmtree(local / name, ignore_errors=True)
            (local / name).mkdir()  # copy_files creates the folders below, not the target itself
            pafs.copy_files(info.path, str(local / name), source_filesystem=fs)
        else:
            with fs.open_input_stream(info.path) as data, open(local / name, "wb") as out:
                shutil.copyfileobj(data, out)


def exists(uri: str, field: str) -> bool:
    """True when there is a file at `uri`."""
    import pyarrow.fs as pafs

    fs, path = open_uri(uri, field)
    return bool(fs.get_file_info(path).type == pafs.FileType.File)


def read_text(uri: str, field: str) -> str | None:
    """The text of the file at `uri`, or None when there is none."""
    import pyarrow.fs as pafs

    fs, path = open_uri(uri, field)
    if fs.get_file_info(path).type != pafs.FileType.File:
        return None
    with fs.open_input_stream(path) as stream:
        return stream.read().decode()


def fetch_run(uri: str, field: str) -> Path:
    """Download a succeeded run folder at `uri` (checkpoints left behind) to its staging folder; return that."""
    import json

    check_reachable(uri, field)
    status = read_text(join(uri, STATUS), field)
    if status is None:
        raise StewardError(f"{field} {uri}: not a run folder (no {STATUS}); `steward runs --storage URI` lists runs")
    state = json.loads(status)["state"]
    if state != "succeeded":
        raise StewardError(
            f"{field} {uri}: the run is {state}, not succeeded (failed, still running, or its upload was cut "
            "short); pick a succeeded run from `steward runs --storage URI`"
        )
    local = staging_dir(uri)
    shutil.rmtree(local, ignore_errors=True)  # a stale copy must not mix with the run as stored now
    download(uri, local)
    return local


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
