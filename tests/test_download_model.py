"""download_model.py against a local HTTP server on 127.0.0.1 with injected faults."""
import http.server
import os
import re
import threading

import pytest

from conftest import REPO_ROOT, run_script

import importlib.util

_spec = importlib.util.spec_from_file_location("download_model", os.path.join(REPO_ROOT, "download_model.py"))
download_model = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(download_model)

FILES = download_model.FILES


def file_bytes(name):
    """Distinct content per file; the data file is large enough to arrive in several chunks."""
    size = 3 * download_model.CHUNK + 12345 if name.startswith("model.ckpt.data") else 1000 + len(name)
    return bytes((i * 7 + len(name)) % 251 for i in range(size))


class Server:
    """Serves /models/<name>/<file> with Range support. `faults` maps a file name to a list of
    behaviours consumed one per request: 'drop' (close half-way), '503', '404', '500', 'short'
    (promise more bytes than are sent); an empty list serves normally."""

    def __init__(self):
        self.faults = {}
        self.requests = []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_GET(self):
                name = self.path.rsplit("/", 1)[-1]
                server.requests.append((self.path, self.headers.get("Range")))
                if not re.fullmatch(r"/models/124M/[\w.-]+", self.path) or name not in FILES:
                    return self._status(404)
                queue = server.faults.get(name, [])
                fault = queue.pop(0) if queue else None
                if fault in ("503", "404", "500"):
                    return self._status(int(fault))
                body = file_bytes(name)
                start = 0
                match = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "")
                if match:
                    start = int(match.group(1))
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
                else:
                    self.send_response(200)
                part = body[start:]
                self.send_header("Content-Length", str(len(part)))
                self.end_headers()
                if fault in ("drop", "short"):
                    self.wfile.write(part[:len(part) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(part)

            def _status(self, code):
                body = b"<html><body>error page</body></html>"
                self.send_response(code)
                self.send_header("Content-Type", "text/html")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server(monkeypatch):
    s = Server()
    monkeypatch.setenv("GPT2_BASE_URL", s.url)
    monkeypatch.setenv("GPT2_DOWNLOAD_BACKOFF", "0")
    yield s
    s.close()


def run(server, *args):
    return run_script("download_model.py", *args, env={"GPT2_BASE_URL": server.url, "GPT2_DOWNLOAD_BACKOFF": "0"},
                      timeout=120)


def assert_complete(directory):
    assert sorted(os.listdir(directory)) == sorted(FILES)
    for name in FILES:
        with open(os.path.join(directory, name), "rb") as f:
            assert f.read() == file_bytes(name), name


def assert_one_line_error(result, pattern):
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip() and "Fetching" not in line
             and "%|" not in line]
    assert len(lines) == 1, result.stderr
    assert re.search(pattern, lines[0]), lines[0]


def test_downloads_all_seven_files(server, tmp_path):
    result = run(server, "124M", "--models_dir", tmp_path)
    assert result.returncode == 0, result.stderr
    assert_complete(tmp_path / "124M")
    for name in FILES:
        assert f"Fetching {name}" in result.stderr


def test_dropped_connection_resumes_with_a_range_request(server, tmp_path):
    server.faults["model.ckpt.data-00000-of-00001"] = ["drop"]
    download_model.download_model("124M", str(tmp_path))
    assert_complete(tmp_path / "124M")
    ranges = [r for path, r in server.requests if path.endswith("data-00000-of-00001")]
    assert ranges[0] is None and ranges[1] is not None and ranges[1] != "bytes=0-"


def test_one_503_is_retried(server, tmp_path):
    server.faults["hparams.json"] = ["503"]
    download_model.download_model("124M", str(tmp_path))
    assert_complete(tmp_path / "124M")
    assert sum(path.endswith("hparams.json") for path, _ in server.requests) == 2


def test_404_fails_at_once_with_one_line(server, tmp_path):
    server.faults["vocab.bpe"] = ["404"]
    result = run(server, "124M", "--models_dir", tmp_path)
    assert_one_line_error(result, r"not found \(HTTP 404\)")
    assert not (tmp_path / "124M" / "vocab.bpe").exists()
    assert sum(path.endswith("vocab.bpe") for path, _ in server.requests) == 1


def test_server_errors_forever_save_nothing(server, tmp_path):
    server.faults["encoder.json"] = ["500"] * 10
    result = run(server, "124M", "--models_dir", tmp_path)
    assert_one_line_error(result, r"after 5 tries \(HTTP 500\).*run the same command again")
    directory = tmp_path / "124M"
    assert not (directory / "encoder.json").exists()
    assert not (directory / "encoder.json.part").exists() or b"html" not in (directory / "encoder.json.part").read_bytes()


def test_leftover_part_file_is_resumed(server, tmp_path):
    directory = tmp_path / "124M"
    directory.mkdir()
    name = "model.ckpt.data-00000-of-00001"
    (directory / (name + ".part")).write_bytes(file_bytes(name)[:5000])
    download_model.download_model("124M", str(tmp_path))
    assert_complete(directory)
    assert ("/models/124M/" + name, "bytes=5000-") in server.requests


def test_complete_files_are_skipped(server, tmp_path):
    download_model.download_model("124M", str(tmp_path))
    count = len(server.requests)
    download_model.download_model("124M", str(tmp_path))
    assert len(server.requests) == count


def test_short_body_is_detected_and_never_renamed(server, tmp_path):
    server.faults["checkpoint"] = ["short"] * 10
    with pytest.raises(download_model.cli.UserError, match="after 5 tries"):
        download_model.download_model("124M", str(tmp_path))
    assert not (tmp_path / "124M" / "checkpoint").exists()


def test_unknown_name_lists_the_valid_ones(server, tmp_path):
    result = run(server, "125M", "--models_dir", tmp_path)
    assert_one_line_error(result, r"unknown model '125M': choose one of 124M, 355M, 774M, 1558M")
    assert not server.requests


def test_no_argument_prints_the_reference_message(server):
    result = run(server)
    assert result.returncode == 1
    assert "You must enter the model name as a parameter, e.g.: download_model.py 124M" in result.stdout


def test_legacy_name_downloads_the_new_one(server, tmp_path):
    result = run(server, "117M", "--models_dir", tmp_path)
    assert result.returncode == 0, result.stderr
    assert_complete(tmp_path / "124M")
    assert not (tmp_path / "117M").exists()
    assert all(path.startswith("/models/124M/") for path, _ in server.requests)


def test_unreachable_server_is_a_one_line_error(tmp_path, monkeypatch):
    # A port on 127.0.0.1 that nothing listens on.
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result = run_script("download_model.py", "124M", "--models_dir", tmp_path,
                        env={"GPT2_BASE_URL": f"http://127.0.0.1:{port}", "GPT2_DOWNLOAD_BACKOFF": "0"})
    assert_one_line_error(result, r"could not download .*ConnectionError.*check your connection")
