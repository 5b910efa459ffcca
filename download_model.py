#!/usr/bin/env python3
"""Downloads a released GPT-2 model: python download_model.py 124M [--models_dir models]."""
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "src"))

import cli  # noqa: E402
from hparams import SIZES, resolve_model_name  # noqa: E402

DEFAULT_BASE_URL = "https://openaipublic.blob.core.windows.net/gpt-2"
FILES = ("checkpoint", "encoder.json", "hparams.json", "model.ckpt.data-00000-of-00001", "model.ckpt.index",
         "model.ckpt.meta", "vocab.bpe")
TRIES = 5
CHUNK = 1 << 20
TIMEOUT_SECONDS = 60


class TransientError(Exception):
    """A failure worth another try: the connection, a timeout, a 5xx or 429, a short body."""


def backoff_seconds(attempt):
    """Exponential backoff; GPT2_DOWNLOAD_BACKOFF scales it (tests use 0)."""
    return float(os.environ.get("GPT2_DOWNLOAD_BACKOFF", "1")) * 2 ** attempt


def fetch_file(session, url, path, filename):
    """Downloads `url` to `path` through `path.part`, resuming a partial file, retrying
    transient errors. The final name appears only once the size is right."""
    import requests

    part = path + ".part"
    for attempt in range(TRIES):
        try:
            _fetch_once(session, url, part, filename)
            os.replace(part, path)
            return
        except TransientError as e:
            if attempt == TRIES - 1:
                raise cli.UserError(f"could not download {url} after {TRIES} tries ({e}): "
                                    "check your connection and run the same command again to resume") from None
        except requests.RequestException as e:
            if attempt == TRIES - 1:
                raise cli.UserError(f"could not download {url} ({type(e).__name__}): "
                                    "check your connection and run the same command again to resume") from None
        time.sleep(backoff_seconds(attempt))


def _fetch_once(session, url, part, filename):
    from tqdm import tqdm

    have = os.path.getsize(part) if os.path.exists(part) else 0
    headers = {"Range": f"bytes={have}-"} if have else {}
    with session.get(url, stream=True, timeout=TIMEOUT_SECONDS, headers=headers) as response:
        status = response.status_code
        if status == 416 and have:
            # The partial file is already whole (or longer than the file): start again cleanly.
            os.remove(part)
            raise TransientError("the partial file did not match the server's; restarting it")
        if status in (429,) or status >= 500:
            raise TransientError(f"HTTP {status}")
        if status == 404:
            raise cli.UserError(f"{url} was not found (HTTP 404): check the model name, or GPT2_BASE_URL if you set it")
        if status not in (200, 206):
            raise cli.UserError(f"{url} answered HTTP {status}: check GPT2_BASE_URL or try again later")
        if status == 200:
            have = 0  # the server ignored the Range header: the body is the whole file
        length = response.headers.get("Content-Length")
        total = have + int(length) if length is not None else None
        mode = "ab" if status == 206 else "wb"
        with open(part, mode) as f, tqdm(total=total, initial=have, desc="Fetching " + filename, unit="B",
                                         unit_scale=True, unit_divisor=1024, ncols=100) as bar:
            try:
                for chunk in response.iter_content(chunk_size=CHUNK):
                    f.write(chunk)
                    bar.update(len(chunk))
            except Exception as e:  # requests wraps dropped connections in several exception types
                raise TransientError(f"connection lost after {bar.n} bytes ({type(e).__name__})") from None
    size = os.path.getsize(part)
    if total is not None and size != total:
        raise TransientError(f"got {size} of {total} bytes")


def download_model(model_name, models_dir="models", base_url=None):
    """Downloads the seven files of a released model into `models_dir/<name>/`.

    Args:
        model_name: 124M, 355M, 774M or 1558M (117M and 345M are the old names of 124M and 355M).
        models_dir: Directory to put the model directory in (~ and $VARS are expanded).
        base_url: Server to download from; default GPT2_BASE_URL, else OpenAI's public bucket.

    Returns:
        The model directory.
    """
    import requests

    name = resolve_model_name(model_name)
    if name not in SIZES:
        raise cli.UserError(f"unknown model '{model_name}': choose one of {', '.join(SIZES)}")
    if name != str(model_name):
        print(f"{model_name} is the old name of {name}; downloading {name}", file=sys.stderr)
    base_url = (base_url or os.environ.get("GPT2_BASE_URL") or DEFAULT_BASE_URL).rstrip("/")
    directory = os.path.join(os.path.expanduser(os.path.expandvars(models_dir)), name)
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError as e:
        raise cli.UserError(f"cannot create {directory}: {e.strerror}") from None
    with requests.Session() as session:
        for filename in FILES:
            path = os.path.join(directory, filename)
            # Final names are only ever made by rename after a size check: present means whole.
            if os.path.exists(path):
                continue
            try:
                fetch_file(session, f"{base_url}/models/{name}/{filename}", path, filename)
            except OSError as e:
                raise cli.UserError(f"cannot write {path}: {e.strerror}") from None
    return directory


def main(model_name=None, models_dir="models"):
    """Downloads a released GPT-2 model.

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
