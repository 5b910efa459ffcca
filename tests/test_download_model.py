"""download_model.py against a local HTTP server on 127.0.0.1 with injected faults."""
import errno
import http.server
import importlib.util
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import cli
from conftest import REPO_ROOT, run_main, run_script
from errors import UserError

_spec = importlib.util.spec_from_file_location("download_model", os.path.join(REPO_ROOT, "download_model.py"))
dm = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(dm)

FILES = dm.FILES
DATA = "model.ckpt.data-00000-of-00001"
RELEASED = {}  # file name -> bytes of the model the server sends


@pytest.fixture(scope="session", autouse=True)
def released_files(tiny_models_dir):
    """A tiny random model in the released format, so the files are real ones (~6.5 MB of data)."""
    for name in FILES:
        RELEASED[name] = Path(tiny_models_dir, "tiny", name).read_bytes()


def file_bytes(name):
    return RELEASED[name]


class QuietServer(http.server.ThreadingHTTPServer):
    """Keeps quiet when a client hangs up, as the downloader may between its tries: the traceback
    socketserver prints would land in the stderr that run_main catches from this process."""

    def handle_error(self, request, client_address):
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


class Server:
    """Serves `files` (the released ones unless a test changes them) as /models/124M/<file> with
    Range support. `faults` maps a file name to a list of behaviours consumed one per GET: '503',
    '404', '500' (an HTML error page), 'drop' (close half-way), 'short' (promise the whole file, send
    at most 100 bytes), 'html' (200 with a web page), 'page' (the same labelled as a binary file),
    'cut' (no Content-Length, close half-way), 'norange' (ignore Range), 'stall' (send headers, then
    wait 1 s); an empty list serves normally."""

    def __init__(self):
        self.files = dict(RELEASED)
        self.faults = {}
        self.requests = []  # (method, path, Range header)
        self.encodings = set()  # Accept-Encoding headers seen
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_HEAD(self):
                self._serve(head=True)

            def do_GET(self):
                self._serve(head=False)

            def _serve(self, head):
                name = self.path.rsplit("/", 1)[-1]
                server.requests.append((self.command, self.path, self.headers.get("Range")))
                server.encodings.add(self.headers.get("Accept-Encoding"))
                if not re.fullmatch(r"/models/124M/[\w.-]+", self.path) or name not in FILES:
                    return self._page(404, head)
                queue = [] if head else server.faults.get(name, [])
                fault = queue.pop(0) if queue else None
                if fault in ("503", "404", "500"):
                    return self._page(int(fault), head)
                if fault in ("html", "page"):
                    return self._page(200, head, "text/html" if fault == "html" else "application/octet-stream")
                body = server.files[name]
                if fault == "cut":
                    self.send_response(200)
                    self.send_header("Connection", "close")  # the body ends where the connection does
                    self.end_headers()
                    self.wfile.write(body[:len(body) // 2])
                    self.close_connection = True
                    return
                match = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "")
                start = int(match.group(1)) if match and fault not in ("norange", "short") else 0
                if start >= len(body) and match:
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{len(body)}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send_response(206 if start else 200)
                if start:
                    self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Content-Length", str(len(body) - start))
                self.end_headers()
                if head:
                    return
                part = body[start:]
                if fault in ("drop", "short", "stall"):
                    self.wfile.write(part[:len(part) // 2] if fault == "drop" else part[:min(100, len(part) // 2)])
                    self.wfile.flush()
                    if fault == "stall":
                        time.sleep(1)
                    self.close_connection = True
                    return
                self.wfile.write(part)

            def _page(self, code, head, content_type="text/html"):
                body = b"<html><body>error page</body></html>"
                self.send_response(code)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if not head:
                    self.wfile.write(body)

        self.httpd = QuietServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        # shutdown() waits out serve_forever's poll, 0.5 s by default, at every test's teardown.
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs=dict(poll_interval=0.02), daemon=True)
        self.thread.start()

    def gets(self, name=None):
        return [(path, rng) for method, path, rng in self.requests
                if method == "GET" and (name is None or path.endswith("/" + name))]

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(autouse=True)
def local_only(monkeypatch):
    """No proxy, no backoff, and (in this process) no connection to anything but 127.0.0.1."""
    for var in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("GPT2_DOWNLOAD_BACKOFF", "0")
    monkeypatch.setenv("GPT2_BASE_URL", "http://127.0.0.1:9")  # the discard port: never the real bucket
    connect = socket.socket.connect

    def guarded(sock, address):
        assert sock.family != socket.AF_INET or address[0] == "127.0.0.1", f"test contacted {address}"
        assert sock.family != socket.AF_INET6, f"test contacted {address}"
        return connect(sock, address)

    monkeypatch.setattr(socket.socket, "connect", guarded)


@pytest.fixture
def server(monkeypatch):
    s = Server()
    monkeypatch.setenv("GPT2_BASE_URL", s.url)
    yield s
    s.close()


def run(*args):
    """The script's __main__ with these arguments (in this process: conftest.run_main); GPT2_BASE_URL and
    friends come from the fixtures' environment."""
    return run_main("download_model.py", *args)


def assert_complete(directory):
    assert sorted(os.listdir(directory)) == sorted(FILES)
    for name in FILES:
        with open(os.path.join(directory, name), "rb") as f:
            assert f.read() == file_bytes(name), name


def assert_one_line_error(result, pattern):
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip() and "Fetching" not in line]
    assert len(lines) == 1, result.stderr
    assert re.search(pattern, lines[0]), lines[0]


def listing(directory):
    return os.listdir(directory) if os.path.isdir(directory) else []


def assert_no_error_page_saved(directory):
    for name in listing(directory):
        with open(os.path.join(directory, name), "rb") as f:
            assert b"error page" not in f.read(), name


def test_downloads_all_seven_files(server, tmp_path):
    result = run_script("download_model.py", "124M", "--models_dir", tmp_path, timeout=120)  # as a user runs it
    assert result.returncode == 0, result.stderr
    assert_complete(tmp_path / "124M")
    for name in FILES:
        assert f"Fetching {name}" in result.stderr
    assert sorted(path for path, _ in server.gets()) == sorted(f"/models/124M/{name}" for name in FILES)
    # Sizes and ranges count bytes on the wire, so the body must not come compressed.
    assert server.encodings == {"identity"}


def test_models_dir_expands_variables_and_home(server, tmp_path, monkeypatch):
    monkeypatch.setenv("GPT2_TEST_DIR", str(tmp_path))
    directory = dm.download_model("124M", "$GPT2_TEST_DIR/models")
    assert directory == os.path.join(str(tmp_path), "models", "124M")
    assert_complete(directory)


def test_dropped_connection_resumes_with_a_range_request(server, tmp_path):
    server.faults[DATA] = ["drop"]
    dm.download_model("124M", str(tmp_path))
    assert_complete(tmp_path / "124M")
    ranges = [rng for _, rng in server.gets(DATA)]
    assert len(ranges) == 2 and ranges[0] is None
    start = int(re.fullmatch(r"bytes=(\d+)-", ranges[1]).group(1))
    assert 0 < start < len(file_bytes(DATA))


def test_one_503_is_retried(server, tmp_path):
    server.faults["hparams.json"] = ["503"]
    dm.download_model("124M", str(tmp_path))
    assert_complete(tmp_path / "124M")
    assert len(server.gets("hparams.json")) == 2


def test_stalled_connection_times_out_and_is_retried(server, tmp_path, monkeypatch):
    monkeypatch.setattr(dm, "TIMEOUT_SECONDS", (5, 0.3))
    server.faults["vocab.bpe"] = ["stall"]
    dm.download_model("124M", str(tmp_path))
    assert_complete(tmp_path / "124M")
    assert len(server.gets("vocab.bpe")) == 2


def test_404_fails_at_once_with_one_line(server, tmp_path):
    server.faults["vocab.bpe"] = ["404"]
    result = run("124M", "--models_dir", tmp_path)
    assert_one_line_error(result, r"vocab\.bpe was not found \(HTTP 404\): check the model name")
    assert not (tmp_path / "124M" / "vocab.bpe").exists()
    assert len(server.gets("vocab.bpe")) == 1
    assert_no_error_page_saved(tmp_path / "124M")


def test_server_errors_forever_save_nothing(server, tmp_path):
    server.faults["encoder.json"] = ["500"] * 10
    result = run("124M", "--models_dir", tmp_path)
    assert_one_line_error(result, rf"after {dm.TRIES} tries \(HTTP 500\).*run the same command again")
    assert len(server.gets("encoder.json")) == dm.TRIES
    assert not (tmp_path / "124M" / "encoder.json").exists()
    assert_no_error_page_saved(tmp_path / "124M")


def test_web_page_with_status_200_is_never_saved(server, tmp_path):
    server.faults["hparams.json"] = ["html"]
    with pytest.raises(dm.cli.UserError, match="sent a web page instead of hparams.json"):
        dm.download_model("124M", str(tmp_path))
    assert not (tmp_path / "124M" / "hparams.json").exists()
    assert_no_error_page_saved(tmp_path / "124M")


def test_leftover_part_file_is_resumed(server, tmp_path):
    directory = tmp_path / "124M"
    directory.mkdir()
    (directory / (DATA + ".part")).write_bytes(file_bytes(DATA)[:5000])
    dm.download_model("124M", str(tmp_path))
    assert_complete(directory)
    assert server.gets(DATA) == [("/models/124M/" + DATA, "bytes=5000-")]


def test_whole_part_file_answered_416_is_kept(server, tmp_path):
    directory = tmp_path / "124M"
    directory.mkdir()
    (directory / (DATA + ".part")).write_bytes(file_bytes(DATA))
    dm.download_model("124M", str(tmp_path))
    assert_complete(directory)
    assert server.gets(DATA) == [("/models/124M/" + DATA, f"bytes={len(file_bytes(DATA))}-")]


def test_part_file_longer_than_the_servers_starts_again(server, tmp_path):
    directory = tmp_path / "124M"
    directory.mkdir()
    (directory / "vocab.bpe.part").write_bytes(b"x" * (len(file_bytes("vocab.bpe")) + 10))
    dm.download_model("124M", str(tmp_path))
    assert_complete(directory)
    assert [rng for _, rng in server.gets("vocab.bpe")] == [f"bytes={len(file_bytes('vocab.bpe')) + 10}-", None]


def test_server_ignoring_range_restarts_the_file(server, tmp_path):
    directory = tmp_path / "124M"
    directory.mkdir()
    # Wrong bytes in the part: appending the 200's whole body to them would corrupt the file.
    (directory / (DATA + ".part")).write_bytes(b"\0" * 5000)
    server.faults[DATA] = ["norange"]
    dm.download_model("124M", str(tmp_path))
    assert_complete(directory)
    assert len(server.gets(DATA)) == 1


def test_complete_files_are_skipped(server, tmp_path):
    dm.download_model("124M", str(tmp_path))
    count = len(server.gets())
    dm.download_model("124M", str(tmp_path))
    assert len(server.gets()) == count
    assert_complete(tmp_path / "124M")


def test_complete_files_need_no_network(server, tmp_path, monkeypatch):
    dm.download_model("124M", str(tmp_path))
    server.close()
    assert dm.download_model("124M", str(tmp_path)) == os.path.join(str(tmp_path), "124M")


def test_truncated_final_file_is_downloaded_again(server, tmp_path):
    # The original downloader wrote under the final name, so an interrupted run left this.
    dm.download_model("124M", str(tmp_path))
    path = tmp_path / "124M" / DATA
    path.write_bytes(file_bytes(DATA)[:1000])
    count = len(server.gets())
    dm.download_model("124M", str(tmp_path))
    assert_complete(tmp_path / "124M")
    assert server.gets()[count:] == [("/models/124M/" + DATA, None)]


def test_short_body_is_detected_and_never_renamed(server, tmp_path):
    server.faults["checkpoint"] = ["short"] * 10
    with pytest.raises(dm.cli.UserError, match=rf"checkpoint after {dm.TRIES} tries \(connection lost"):
        dm.download_model("124M", str(tmp_path))
    assert not (tmp_path / "124M" / "checkpoint").exists()
    assert len(server.gets("checkpoint")) == dm.TRIES


class StubResponse:
    """A 200 whose Content-Length promises more than the body holds, with no transport to notice."""

    status_code = 200

    def __init__(self, body, length):
        self.body, self.headers = body, {"Content-Length": str(length), "Content-Type": "application/octet-stream"}

    def iter_content(self, chunk_size):
        yield self.body

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class StubSession:
    def __init__(self):
        self.calls = 0

    def get(self, url, **kwargs):
        self.calls += 1
        return StubResponse(b"abc", 10)


def test_size_mismatch_against_content_length_is_detected(tmp_path):
    session, path = StubSession(), str(tmp_path / "hparams.json")
    with pytest.raises(dm.TransientError, match="got 3 of 10 bytes"):
        dm._fetch_once(session, "http://127.0.0.1:9/x", path + ".part", "hparams.json")
    with pytest.raises(dm.cli.UserError, match=rf"after {dm.TRIES} tries \(got 3 of 10 bytes\)"):
        dm.fetch_file(session, "http://127.0.0.1:9/x", path, "hparams.json")
    assert not os.path.exists(path)
    assert session.calls == 1 + dm.TRIES


def test_disk_error_is_not_retried(server, tmp_path, monkeypatch):
    real_open = open

    class FullDisk:
        def __init__(self, f):
            self.f = f

        def write(self, data):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    monkeypatch.setattr(dm, "open", lambda path, mode: FullDisk(real_open(path, mode)), raising=False)
    with pytest.raises(dm.cli.UserError, match=rf"cannot write .*{FILES[0]} \(No space left on device\): free some"):
        dm.download_model("124M", str(tmp_path))
    assert len(server.gets()) == 1
    assert not (tmp_path / "124M" / FILES[0]).exists()


def test_models_dir_that_is_a_file_is_one_line(server, tmp_path):
    (tmp_path / "models").write_text("not a directory")
    result = run("124M", "--models_dir", tmp_path / "models")
    assert_one_line_error(result, r"cannot create .*: pass another --models_dir")
    assert not server.requests


def test_bad_base_url_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("GPT2_BASE_URL", "openaipublic/gpt-2")
    with pytest.raises(dm.cli.UserError, match="must start with http:// or https://"):
        dm.download_model("124M", str(tmp_path))


def test_unknown_name_lists_the_valid_ones(server, tmp_path):
    result = run("125M", "--models_dir", tmp_path)
    assert_one_line_error(result, r"unknown model '125M': choose one of 124M, 355M, 774M, 1558M$")
    assert not server.requests
    assert not os.listdir(tmp_path)


def test_no_argument_prints_the_reference_message(server):
    result = run()
    assert result.returncode == 1
    assert result.stdout == "You must enter the model name as a parameter, e.g.: download_model.py 124M\n"
    assert not server.requests


def test_legacy_name_downloads_the_new_one(server, tmp_path):
    result = run("117M", "--models_dir", tmp_path)
    assert result.returncode == 0, result.stderr
    assert "117M is the old name of 124M" in result.stdout
    assert_complete(tmp_path / "124M")
    assert not (tmp_path / "117M").exists()
    assert all(path.startswith("/models/124M/") for _, path, _ in server.requests)


def test_unreachable_server_is_a_one_line_error(tmp_path, monkeypatch):
    with socket.socket() as s:  # a port on 127.0.0.1 that nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("GPT2_BASE_URL", f"http://127.0.0.1:{port}")
    result = run("124M", "--models_dir", tmp_path)
    assert_one_line_error(result, rf"could not download .*/{re.escape(FILES[0])} after {dm.TRIES} tries "
                                  r"\(ConnectionError\).*check your connection")
    assert not (tmp_path / "124M").exists()


def test_attempts_that_make_progress_do_not_count_against_the_tries(server, tmp_path):
    server.faults[DATA] = ["drop"] * (dm.TRIES + 1)
    dm.download_model("124M", str(tmp_path))
    assert_complete(tmp_path / "124M")
    assert len(server.gets(DATA)) == dm.TRIES + 2


def assert_nothing_of(directory, name):
    """Neither `name` nor a part of it is in `directory`."""
    assert not [n for n in listing(directory) if n.startswith(name)], listing(directory)


@pytest.mark.parametrize("name", FILES)
def test_web_page_labelled_as_a_file_is_refused(server, tmp_path, name):
    server.faults[name] = ["page"]
    with pytest.raises(dm.cli.UserError, match=rf"^{re.escape(name)} from \S+ is a web page: check GPT2_BASE_URL"):
        dm.download_model("124M", str(tmp_path))
    assert_nothing_of(tmp_path / "124M", name)
    assert_no_error_page_saved(tmp_path / "124M")


@pytest.mark.parametrize("name", ["hparams.json", "encoder.json", "vocab.bpe", "model.ckpt.index", "model.ckpt.meta",
                                  "checkpoint"])
def test_body_cut_short_without_a_length_is_refused(server, tmp_path, name):
    server.faults[name] = ["cut"]
    refused = rf"^{re.escape(name)} from \S+ (is not|ends mid-line).*: check GPT2_BASE_URL"
    with pytest.raises(dm.cli.UserError, match=refused):
        dm.download_model("124M", str(tmp_path))
    assert_nothing_of(tmp_path / "124M", name)


def test_data_cut_short_without_a_length_is_resumed_to_the_size_the_index_needs(server, tmp_path):
    server.faults[DATA] = ["cut"]
    dm.download_model("124M", str(tmp_path))
    assert_complete(tmp_path / "124M")
    assert [rng for _, rng in server.gets(DATA)] == [None, f"bytes={len(file_bytes(DATA)) // 2}-"]


def test_data_file_of_another_size_than_the_index_needs_is_refused(server, tmp_path):
    need = len(file_bytes(DATA))
    server.files[DATA] = file_bytes(DATA)[:-4]  # with a Content-Length that agrees
    with pytest.raises(dm.cli.UserError, match=rf"{DATA} from \S+ is {need - 4} bytes, but {dm.INDEX} needs {need}:"):
        dm.download_model("124M", str(tmp_path))
    assert_nothing_of(tmp_path / "124M", DATA)


def test_hparams_without_the_gpt2_settings_is_refused(server, tmp_path):
    server.files["hparams.json"] = json.dumps({"n_vocab": 50257, "n_ctx": 1024}).encode()
    refused = r"hparams.json from \S+ lacks the GPT-2 settings n_embd, n_head, n_layer:"
    with pytest.raises(dm.cli.UserError, match=refused):
        dm.download_model("124M", str(tmp_path))
    assert_nothing_of(tmp_path / "124M", "hparams.json")


@pytest.mark.parametrize("name, fault, problem", [("encoder.json", "page", "is a web page"),
                                                  ("model.ckpt.index", "cut", "is not a checkpoint index")])
def test_bad_content_is_a_one_line_error_with_status_2(server, tmp_path, name, fault, problem):
    server.faults[name] = [fault]
    result = run("124M", "--models_dir", tmp_path)
    assert result.returncode == 2
    assert_one_line_error(result, rf"^error: {re.escape(name)} from \S+ {problem}.*: check GPT2_BASE_URL")


def same_size_garbage(name):
    return b"<html>" + b" " * (len(file_bytes(name)) - 6)


def test_bad_files_already_there_are_downloaded_again(server, tmp_path):
    dm.download_model("124M", str(tmp_path))
    bad = ["encoder.json", "model.ckpt.index", "model.ckpt.meta"]
    for name in bad:  # the same sizes as the server's, so a size check passes them
        (tmp_path / "124M" / name).write_bytes(same_size_garbage(name))
    count = len(server.gets())
    dm.download_model("124M", str(tmp_path))
    assert_complete(tmp_path / "124M")
    assert sorted(path for path, _ in server.gets()[count:]) == sorted(f"/models/124M/{name}" for name in bad)


def test_bad_file_already_there_is_removed_when_the_server_is_unreachable(server, tmp_path):
    dm.download_model("124M", str(tmp_path))
    (tmp_path / "124M" / "vocab.bpe").write_bytes(b"not a vocabulary\n")
    server.close()
    with pytest.raises(dm.cli.UserError, match=r"could not download .*/vocab.bpe after"):
        dm.download_model("124M", str(tmp_path))
    assert not (tmp_path / "124M" / "vocab.bpe").exists()


def test_help_is_plain_and_does_not_load_tensorflow():
    code = ("import runpy, sys\nsys.argv = [sys.argv[1], '--help']\ntry:\n    runpy.run_path(sys.argv[0], "
            "run_name='__main__')\nexcept SystemExit:\n    pass\nprint('tensorflow' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code, os.path.join(REPO_ROOT, "download_model.py")],
                            capture_output=True, text=True, timeout=60, cwd=REPO_ROOT)
    assert "--models_dir" in result.stdout + result.stderr  # fire printed the help
    assert "GROUP" not in result.stdout + result.stderr  # no attribute of main shown as a command
    assert result.stdout.splitlines()[-1] == "False", result.stderr


def test_failed_run_removes_the_directories_it_made_and_left_empty(server, tmp_path):
    server.faults[FILES[0]] = ["404"]
    with pytest.raises(dm.cli.UserError, match="not found"):
        dm.download_model("124M", str(tmp_path / "new" / "models"))
    assert not os.listdir(tmp_path)


def test_failed_run_keeps_a_directory_that_was_there(server, tmp_path):
    (tmp_path / "124M").mkdir()
    server.faults[FILES[0]] = ["404"]
    with pytest.raises(dm.cli.UserError, match="not found"):
        dm.download_model("124M", str(tmp_path))
    assert (tmp_path / "124M").is_dir()


def test_failed_run_keeps_a_directory_with_a_part_to_resume(server, tmp_path):
    server.faults[FILES[0]] = ["short"] * (dm.TRIES + 1)
    with pytest.raises(dm.cli.UserError, match="after"):
        dm.download_model("124M", str(tmp_path))
    assert os.listdir(tmp_path / "124M") == [FILES[0] + ".part"]


def run_in(cwd, *args):
    """The script run from `cwd`, where relative paths (and the default ./models) land."""
    return subprocess.run([sys.executable, os.path.join(REPO_ROOT, "download_model.py"), *map(str, args)],
                          capture_output=True, text=True, timeout=120, cwd=cwd,
                          env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONIOENCODING="utf-8"))


def test_mistyped_flag_fails_before_any_work(server, tmp_path):
    result = run_in(tmp_path, "124M", "--model_dir", "elsewhere")
    assert result.returncode == 2
    assert_one_line_error(result, r"^error: unknown flag --model_dir \(did you mean --models_dir\?\)$")
    assert not server.requests
    assert not os.listdir(tmp_path)


@pytest.mark.parametrize("args", [["124M"], ["124M", "--models_dir", "x"], ["--models_dir=x", "124M"],
                                  ["--models-dir", "x", "124M"], ["--model_name", "124M"], ["124M", "-models_dir", "x"],
                                  ["124M", "--models_dir", "-5"]])
def test_real_flags_pass_the_check(args):
    cli.command_line(dm.main, args)


@pytest.mark.parametrize("args, error", [
    (["124M", "--model_dir", "x"], "unknown flag --model_dir (did you mean --models_dir?)"),
    (["--modelname=124M"], "unknown flag --modelname (did you mean --model_name?)"),
])
def test_unknown_flags_are_named_with_the_nearest_real_one(args, error):
    with pytest.raises(UserError) as caught:
        cli.command_line(dm.main, args)
    assert str(caught.value) == error


@pytest.mark.parametrize("args, models_dir", [(["--models_dir", "2019"], "2019"), (["--models_dir=2019.10"], "2019.10"),
                                              (["1_000"], "1_000")])
def test_models_dir_that_looks_like_a_number_is_taken_as_typed(server, tmp_path, args, models_dir):
    result = run_main("download_model.py", "124M", *args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert_complete(tmp_path / models_dir / "124M")
    assert os.listdir(tmp_path) == [models_dir]


