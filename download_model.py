#!/usr/bin/env python3
"""Downloads a released GPT-2 model: python download_model.py 124M [--models_dir models]."""
import json
import math
import os
import re
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "src"))

import cli  # noqa: E402
import runtime  # noqa: E402
from hparams import SIZES, resolve_model_name  # noqa: E402

DEFAULT_BASE_URL = "https://openaipublic.blob.core.windows.net/gpt-2"
INDEX, DATA = "model.ckpt.index", "model.ckpt.data-00000-of-00001"
# The index gives the data file's size, so it comes first; `checkpoint` is what TensorFlow finds a
# model by, so it comes last: an unfinished set never looks loadable.
FILES = ("hparams.json", "encoder.json", "vocab.bpe", INDEX, DATA, "model.ckpt.meta", "checkpoint")
GPT2_KEYS = ("n_vocab", "n_ctx", "n_embd", "n_head", "n_layer")
TRIES = 5  # attempts in a row that receive nothing; an attempt that gets bytes resets the count
CHUNK = 64 * 1024
TIMEOUT_SECONDS = (15, 60)  # connect, and between two reads
# Sizes and ranges count bytes on the wire; a compressed body would break both.
HEADERS = {"Accept-Encoding": "identity"}
RESUME_HINT = "check your connection (or try again later) and run the same command again to resume"


class TransientError(Exception):
    """A failure worth another try: the connection, a timeout, a 5xx or 429, a short body."""


def backoff_seconds(attempt):
    """Exponential backoff from 1 second; GPT2_DOWNLOAD_BACKOFF sets the base (tests use 0)."""
    raw = os.environ.get("GPT2_DOWNLOAD_BACKOFF", "1")
    try:
        base = float(raw)
    except ValueError:
        base = -1.0
    if not base >= 0:
        raise cli.UserError(f"GPT2_DOWNLOAD_BACKOFF must be a number of seconds >= 0, got {raw!r}")
    return base * 2 ** attempt


def _size(path):
    return os.path.getsize(path) if os.path.exists(path) else 0


def _discard(path):
    if os.path.exists(path):
        os.remove(path)


def fetch_file(session, url, path, filename, size=None):
    """Downloads `url` to `path` through `path.part`, resuming a partial file and retrying
    transient errors. The final name appears only once the size matches the server's (or `size`,
    when the server gives none) and the content passes `_problem`; a part that fails is deleted."""
    import requests

    part = path + ".part"
    failures = 0
    while True:
        before = _size(part)
        try:
            _fetch_once(session, url, part, filename, size)
            problem = _problem(part, filename, size)
            if problem:
                _discard(part)
                raise cli.UserError(f"{filename} from {url} {problem}: check GPT2_BASE_URL (or your proxy) "
                                    "and run the same command again")
            os.replace(part, path)
            return
        except TransientError as e:
            reason = str(e)
        except requests.RequestException as e:  # before OSError: requests' errors subclass it
            reason = type(e).__name__
        # Count only attempts that got nowhere, so a flaky link still finishes a 6 GB file.
        failures = 0 if _size(part) > before else failures + 1
        if failures == TRIES:
            raise cli.UserError(f"could not download {url} after {TRIES} tries ({reason}): {RESUME_HINT}")
        time.sleep(backoff_seconds(failures - 1))


def _check_status(response, url, filename):
    status = response.status_code
    if status in (408, 429) or status >= 500:
        raise TransientError(f"HTTP {status}")
    if status == 404:
        raise cli.UserError(f"{url} was not found (HTTP 404): check the model name, or GPT2_BASE_URL if you set it")
    if status not in (200, 206, 416):
        raise cli.UserError(f"{url} answered HTTP {status}: check GPT2_BASE_URL and your proxy settings")
    if response.headers.get("Content-Type", "").startswith("text/html"):
        # A captive portal or proxy answering 200 with a web page: never save that as a model file.
        raise cli.UserError(f"{url} sent a web page instead of {filename}: log in to your network or check "
                            "GPT2_BASE_URL and your proxy settings")


def _received(response):
    """The body's chunks; a dropped or stalled connection becomes a TransientError."""
    import requests
    import urllib3

    try:
        yield from response.iter_content(chunk_size=CHUNK)
    except (requests.RequestException, urllib3.exceptions.HTTPError) as e:
        raise TransientError(f"connection lost ({type(e).__name__})") from None


def _fetch_once(session, url, part, filename, size=None):
    """One GET that appends to `part` (or restarts it); raises TransientError unless `part` ends whole
    (as long as the server says, or else `size` if given)."""
    from tqdm import tqdm

    have = _size(part)
    headers = dict(HEADERS, Range=f"bytes={have}-") if have else HEADERS
    with session.get(url, stream=True, timeout=TIMEOUT_SECONDS, headers=headers) as response:
        _check_status(response, url, filename)
        content_range = response.headers.get("Content-Range", "")
        if response.status_code == 416:
            # Nothing left past our offset: the part is whole if the server's size says so.
            match = re.fullmatch(r"bytes \*/(\d+)", content_range.strip())
            if have and match and int(match.group(1)) == have:
                return
            _discard(part)
            raise TransientError("the partial file is longer than the server's; starting it again")
        length = response.headers.get("Content-Length")
        total = int(length) if length is not None and length.isdigit() else size
        if response.status_code == 206:
            match = re.fullmatch(r"bytes (\d+)-(\d+)/(\d+)", content_range.strip())
            if not match or int(match.group(1)) != have:
                _discard(part)
                raise TransientError(f"the server sent the wrong range ({content_range or 'none'}); starting again")
            total = int(match.group(3))
        else:
            have = 0  # a 200 ignores the Range header: the body is the whole file
        with open(part, "ab" if have else "wb") as f, \
                tqdm(total=total, initial=have, desc="Fetching " + filename, unit="B", unit_scale=True,
                     unit_divisor=1024, ncols=100) as bar:
            for chunk in _received(response):
                f.write(chunk)
                bar.update(len(chunk))
    got = _size(part)
    if total is not None and got != total:
        raise TransientError(f"got {got} of {total} bytes")


def _problem(path, filename, size=None):
    """What is wrong with `path` as the released `filename`, as a phrase ("is not JSON (...)"), or None.
    `size` is the data file's size that the index needs."""
    with open(path, "rb") as f:
        head = f.read(1024)
    if re.match(rb"\s*<(!doctype html|html)", head, re.IGNORECASE):
        return "is a web page"
    if filename == DATA:  # gigabytes: its size is the check
        have = os.path.getsize(path)
        return None if size is None or have == size else f"is {have} bytes, but {INDEX} needs {size}"
    if filename == INDEX:
        try:
            _data_size(path)
        except ValueError as e:
            return f"is not a checkpoint index TensorFlow can read ({e})"
        return None
    with open(path, "rb") as f:
        content = f.read()
    if filename.endswith(".json"):
        try:
            value = json.loads(content.decode("utf-8"))
        except ValueError as e:  # JSONDecodeError and UnicodeDecodeError both are
            return f"is not JSON ({e})"
        if not isinstance(value, dict):
            return "is not a JSON object"
        missing = [key for key in GPT2_KEYS if key not in value] if filename == "hparams.json" else []
        if missing:
            return f"lacks the GPT-2 settings {', '.join(missing)}"
    elif filename in ("vocab.bpe", "checkpoint"):
        first = b"#version" if filename == "vocab.bpe" else b"model_checkpoint_path:"
        if not content.startswith(first):
            return f"does not start with {first.decode()}"
        if not content.endswith(b"\n"):
            return "ends mid-line (cut short)"  # as a body with no length to check against most likely does
    elif filename == "model.ckpt.meta":
        from google.protobuf.message import DecodeError

        try:
            runtime.import_tensorflow().compat.v1.MetaGraphDef.FromString(content)
        except DecodeError:
            return "is not a TensorFlow graph"
    return None


def _data_size(index_path):
    """The data file's size in bytes that the checkpoint index at `index_path` needs; ValueError if
    TensorFlow cannot read the index."""
    tf = runtime.import_tensorflow()
    with tempfile.TemporaryDirectory() as scratch:
        # TensorFlow opens an index only by its prefix, `<prefix>.index`, which a .part is not; it
        # reads the data file only for values, so the index alone gives the shapes.
        shutil.copyfile(index_path, os.path.join(scratch, "model.ckpt.index"))
        try:
            reader = tf.train.load_checkpoint(os.path.join(scratch, "model.ckpt"))
        except (tf.errors.OpError, ValueError) as e:
            message = str(getattr(e, "message", e)).strip()
            raise ValueError(message.splitlines()[0] if message else type(e).__name__) from None
        shapes, dtypes = reader.get_variable_to_shape_map(), reader.get_variable_to_dtype_map()
        del reader  # closes the index before its directory goes
    return sum(math.prod(shape) * dtypes[name].size for name, shape in shapes.items())


def _stale(session, path, url, filename, size):
    """Why the file already at `path` must be downloaded again, or None if it is good."""
    problem = _problem(path, filename, size)
    if problem:
        return problem
    # Also catches a file left truncated by the original downloader, which wrote in place.
    remote = _remote_size(session, url)
    if remote is not None and remote != os.path.getsize(path):
        return f"is {os.path.getsize(path)} bytes, the server's is {remote}"
    return None


def _remote_size(session, url):
    """The server's size of `url` from a HEAD request, or None if it cannot say."""
    import requests

    try:
        response = session.head(url, timeout=TIMEOUT_SECONDS, headers=HEADERS, allow_redirects=True)
    except requests.RequestException:
        return None  # offline: files already here are trusted
    length = response.headers.get("Content-Length", "")
    return int(length) if response.status_code == 200 and length.isdigit() else None


def download_model(model_name, models_dir="models", base_url=None):
    """Downloads the seven files of a released model into `models_dir/<name>/`.

    Args:
        model_name: 124M, 355M, 774M or 1558M (117M and 345M are the old names of 124M and 355M).
        models_dir: Directory to put the model directory in (~ and $VARS are expanded).
        base_url: Server to download from; default GPT2_BASE_URL, else OpenAI's public bucket.

    Returns:
        The model directory.
    """
    name = resolve_model_name(model_name)
    if name not in SIZES:
        raise cli.UserError(f"unknown model '{model_name}': choose one of {', '.join(SIZES)}")
    base_url = (base_url or os.environ.get("GPT2_BASE_URL") or DEFAULT_BASE_URL).rstrip("/")
    if not re.match(r"https?://", base_url):
        raise cli.UserError(f"the download URL must start with http:// or https://, got {base_url!r} "
                            "(from GPT2_BASE_URL?)")
    directory = os.path.join(os.path.expanduser(os.path.expandvars(str(models_dir))), name)
    if name != str(model_name):
        print(f"{model_name} is the old name of {name}: downloading {name} into {directory}", flush=True)
    created = _missing_dirs(directory)
    try:
        _download_files(directory, f"{base_url}/models/{name}")
    except BaseException:
        for path in created:  # deepest first; rmdir refuses one holding anything, such as a .part to resume
            try:
                os.rmdir(path)
            except OSError:
                break
        raise
    return directory


def _missing_dirs(directory):
    """`directory` and those of its parents that do not exist yet, deepest first."""
    missing, path = [], os.path.abspath(directory)
    while not os.path.isdir(path) and path != os.path.dirname(path):
        missing.append(path)
        path = os.path.dirname(path)
    return missing


def _download_files(directory, base_url):
    """Downloads or checks each of FILES in `directory`, from `base_url/<file>`."""
    import requests

    try:
        os.makedirs(directory, exist_ok=True)
    except OSError as e:
        raise cli.UserError(f"cannot create {directory} ({e.strerror}): pass another --models_dir") from None
    disk_hint = "free some disk space or pass another --models_dir, then run the same command again"
    with requests.Session() as session:
        data_size = None
        for filename in FILES:
            path = os.path.join(directory, filename)
            url = f"{base_url}/{filename}"
            size = data_size if filename == DATA else None
            try:
                reason = os.path.exists(path) and _stale(session, path, url, filename, size)
                if reason:
                    print(f"{path} {reason}: downloading it again", flush=True)
                    os.remove(path)  # a bad file must not outlive a download that fails
                if not os.path.exists(path):
                    fetch_file(session, url, path, filename, size)
            except OSError as e:
                raise cli.UserError(f"cannot write {path} ({e.strerror}): {disk_hint}") from None
            if filename == INDEX:
                data_size = _data_size(path)


def main(model_name: str = None, models_dir: str = "models"):
    """Downloads a released GPT-2 model into MODELS_DIR/MODEL_NAME/; run it again to resume.

    Args:
        model_name: 124M, 355M, 774M or 1558M (117M and 345M are the old names of 124M and 355M).
        models_dir: Directory to put the model directory in (~ and $VARS are expanded).
    """
    if model_name is None:
        print("You must enter the model name as a parameter, e.g.: download_model.py 124M")
        sys.exit(1)
    download_model(str(model_name), models_dir)


if __name__ == "__main__":
    cli.run(main)
