"""Tests for segany.weights against a local HTTP server on 127.0.0.1."""

from __future__ import annotations

import hashlib
import os
import re
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import platformdirs
import pytest

from segany import weights
from segany.build import MODEL_NAMES, SAM2_MODEL_CONFIGS
from segany.errors import SeganyError
from segany.weights import WEIGHTS, WeightsInfo, get_info

PAYLOAD = bytes(range(256)) * 10 + b"tail" + bytes(reversed(range(256))) * 6  # 4100 bytes
PAYLOAD_SHA = hashlib.sha256(PAYLOAD).hexdigest()


@dataclass
class Behaviour:
    """How the test server answers, and what it saw."""

    honour_range: bool = True
    status: int = 200
    cut_after: int | None = None  # close the connection after this many body bytes
    ranges: list[str | None] = field(default_factory=list)


def make_handler(behaviour: Behaviour) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            range_header = self.headers.get("Range")
            behaviour.ranges.append(range_header)
            if behaviour.status != 200:
                self.send_error(behaviour.status)
                return
            start = 0
            match = re.fullmatch(r"bytes=(\d+)-", range_header or "")
            if match and behaviour.honour_range:
                start = int(match.group(1))
                self.send_response(206)
                self.send_header(
                    "Content-Range", f"bytes {start}-{len(PAYLOAD) - 1}/{len(PAYLOAD)}"
                )
            else:
                self.send_response(200)
            body = PAYLOAD[start:]
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if behaviour.cut_after is not None:
                body = body[: behaviour.cut_after]
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            pass  # keep test output clean

    return Handler


@pytest.fixture
def server() -> Iterator[tuple[str, Behaviour]]:
    """A server on a random local port; yields its base URL and behaviour."""
    behaviour = Behaviour()
    httpd = HTTPServer(("127.0.0.1", 0), make_handler(behaviour))
    thread = threading.Thread(
        target=httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
    )
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", behaviour
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)


@pytest.fixture(autouse=True)
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Never touch the real cache: every test gets its own SEGANY_HOME."""
    monkeypatch.setenv("SEGANY_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def register(
    monkeypatch: pytest.MonkeyPatch,
    url: str,
    sha256: str = PAYLOAD_SHA,
    size: int = len(PAYLOAD),
) -> WeightsInfo:
    info = WeightsInfo(
        name="tiny",
        model_type="vit_t",
        url=url,
        sha256=sha256,
        size_bytes=size,
        file_name="tiny.pt",
        description="test file",
    )
    monkeypatch.setitem(WEIGHTS, "tiny", info)
    return info


def part_of(path: Path) -> Path:
    return path.with_name(path.name + ".part")


# --------------------------------------------------------------------------- downloads


def test_fresh_download(server, monkeypatch, home: Path) -> None:
    url, behaviour = server
    register(monkeypatch, f"{url}/tiny.pt")
    assert not weights.is_downloaded("tiny")
    path = weights.download("tiny", progress=False)
    assert path == home / "checkpoints" / "tiny.pt"
    assert path.read_bytes() == PAYLOAD
    assert not part_of(path).exists()
    assert weights.is_downloaded("tiny")
    assert behaviour.ranges == [None]


def test_present_file_is_not_downloaded_again_unless_forced(server, monkeypatch) -> None:
    url, behaviour = server
    register(monkeypatch, f"{url}/tiny.pt")
    path = weights.download("tiny", progress=False)
    assert weights.download("tiny", progress=False) == path
    assert len(behaviour.ranges) == 1
    assert weights.download("tiny", progress=False, force=True) == path
    assert len(behaviour.ranges) == 2
    assert path.read_bytes() == PAYLOAD


def test_wrong_size_file_is_replaced(server, monkeypatch) -> None:
    url, _ = server
    register(monkeypatch, f"{url}/tiny.pt")
    path = weights.weights_path("tiny")
    path.parent.mkdir(parents=True)
    path.write_bytes(b"short")
    assert not weights.is_downloaded("tiny")
    weights.download("tiny", progress=False)
    assert path.read_bytes() == PAYLOAD


def test_resume_from_partial_file(server, monkeypatch) -> None:
    url, behaviour = server
    register(monkeypatch, f"{url}/tiny.pt")
    path = weights.weights_path("tiny")
    path.parent.mkdir(parents=True)
    part_of(path).write_bytes(PAYLOAD[:1000])
    weights.download("tiny", progress=False)
    assert behaviour.ranges == ["bytes=1000-"]
    assert path.read_bytes() == PAYLOAD
    assert not part_of(path).exists()


def test_server_ignoring_range_restarts_from_zero(server, monkeypatch) -> None:
    url, behaviour = server
    behaviour.honour_range = False
    register(monkeypatch, f"{url}/tiny.pt")
    path = weights.weights_path("tiny")
    path.parent.mkdir(parents=True)
    part_of(path).write_bytes(b"X" * 1000)  # wrong bytes: must be thrown away, not kept
    weights.download("tiny", progress=False)
    assert behaviour.ranges == ["bytes=1000-"]
    assert path.read_bytes() == PAYLOAD


def test_complete_part_is_verified_without_network(server, monkeypatch) -> None:
    url, behaviour = server
    register(monkeypatch, f"{url}/tiny.pt")
    path = weights.weights_path("tiny")
    path.parent.mkdir(parents=True)
    part_of(path).write_bytes(PAYLOAD)
    weights.download("tiny", progress=False)
    assert behaviour.ranges == []
    assert path.read_bytes() == PAYLOAD


def test_interrupted_download_keeps_part_and_resumes(server, monkeypatch) -> None:
    url, behaviour = server
    register(monkeypatch, f"{url}/tiny.pt")
    monkeypatch.setattr(weights, "CHUNK_BYTES", 512)  # so some chunks land before the cut
    behaviour.cut_after = 1500
    with pytest.raises(SeganyError, match="could not download tiny"):
        weights.download("tiny", progress=False)
    path = weights.weights_path("tiny")
    assert not path.exists()
    kept = part_of(path).stat().st_size
    assert 0 < kept <= 1500
    behaviour.cut_after = None
    weights.download("tiny", progress=False)
    assert behaviour.ranges == [None, f"bytes={kept}-"]
    assert path.read_bytes() == PAYLOAD


def test_checksum_mismatch(server, monkeypatch) -> None:
    url, _ = server
    wrong = hashlib.sha256(b"something else").hexdigest()
    register(monkeypatch, f"{url}/tiny.pt", sha256=wrong)
    with pytest.raises(SeganyError) as info:
        weights.download("tiny", progress=False)
    message = str(info.value)
    assert "checksum mismatch for tiny" in message
    assert f"expected sha256 {wrong}" in message
    assert f"got {PAYLOAD_SHA}" in message
    path = weights.weights_path("tiny")
    assert not path.exists()
    assert not part_of(path).exists()


def test_corrupt_partial_file_fails_checksum_and_is_removed(server, monkeypatch) -> None:
    url, behaviour = server
    register(monkeypatch, f"{url}/tiny.pt")
    path = weights.weights_path("tiny")
    path.parent.mkdir(parents=True)
    part_of(path).write_bytes(b"X" * 1000)
    with pytest.raises(SeganyError, match="checksum mismatch"):
        weights.download("tiny", progress=False)
    assert behaviour.ranges == ["bytes=1000-"]
    assert not part_of(path).exists()
    assert not path.exists()
    weights.download("tiny", progress=False)  # the next attempt starts clean
    assert path.read_bytes() == PAYLOAD


def test_http_error_message(server, monkeypatch) -> None:
    url, behaviour = server
    behaviour.status = 404
    register(monkeypatch, f"{url}/tiny.pt")
    with pytest.raises(SeganyError, match="HTTP 404") as info:
        weights.download("tiny", progress=False)
    assert f"could not download tiny from {url}/tiny.pt" in str(info.value)


def test_connection_refused_message(monkeypatch) -> None:
    # a bound socket that is not listening refuses connections, and nobody else can take the port
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{closed.getsockname()[1]}/tiny.pt"
        register(monkeypatch, url)
        with pytest.raises(SeganyError) as info:
            weights.download("tiny", progress=False, timeout=5)
    message = str(info.value)
    assert message.startswith(f"could not download tiny from {url}: ")
    assert "refused" in message.lower()
    assert message.endswith(
        "check the connection, or download it yourself and pass --checkpoint FILE"
    )
    assert "\n" not in message
    assert not weights.weights_path("tiny").exists()


def test_progress_bar_goes_to_stderr(server, monkeypatch, capsys) -> None:
    url, _ = server
    register(monkeypatch, f"{url}/tiny.pt")
    weights.download("tiny", progress=True)
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "tiny" in captured.err and "100%" in captured.err


def test_unknown_name() -> None:
    for call in (weights.download, weights.weights_path, weights.is_downloaded, weights.get_info):
        with pytest.raises(SeganyError) as info:
            call("sam_vit_xxl")
        message = str(info.value)
        assert "'sam_vit_xxl'" in message
        for name in ("sam_vit_h", "sam_vit_l", "sam_vit_b", "mobile_sam"):
            assert name in message


# --------------------------------------------------------------------------- where files live


def test_segany_home_is_honoured(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("SEGANY_HOME", str(tmp_path / "elsewhere"))
    assert weights.cache_dir() == tmp_path / "elsewhere" / "checkpoints"
    assert weights.weights_path("sam_vit_b") == (
        tmp_path / "elsewhere" / "checkpoints" / "sam_vit_b_01ec64.pth"
    )


def test_segany_home_receives_downloads(server, monkeypatch, tmp_path: Path) -> None:
    url, _ = server
    register(monkeypatch, f"{url}/tiny.pt")
    monkeypatch.setenv("SEGANY_HOME", str(tmp_path / "other"))
    path = weights.download("tiny", progress=False)
    assert path == tmp_path / "other" / "checkpoints" / "tiny.pt"
    assert path.read_bytes() == PAYLOAD


@pytest.mark.parametrize("value", [None, ""])
def test_default_cache_dir_without_segany_home(monkeypatch, value: str | None) -> None:
    if value is None:
        monkeypatch.delenv("SEGANY_HOME", raising=False)
    else:
        monkeypatch.setenv("SEGANY_HOME", value)
    expected = Path(platformdirs.user_cache_dir("segany")) / "checkpoints"
    assert weights.cache_dir() == expected


def test_is_downloaded_checks_size(monkeypatch) -> None:
    register(monkeypatch, "https://example.invalid/tiny.pt")
    path = weights.weights_path("tiny")
    path.parent.mkdir(parents=True)
    path.write_bytes(PAYLOAD[:-1])
    assert not weights.is_downloaded("tiny")
    path.write_bytes(PAYLOAD)
    assert weights.is_downloaded("tiny")


# --------------------------------------------------------------------------- registry


def test_registry_entries_are_well_formed() -> None:
    assert {"sam_vit_h", "sam_vit_l", "sam_vit_b", "mobile_sam"} <= set(WEIGHTS)
    for key, info in WEIGHTS.items():
        assert info.name == key
        assert re.fullmatch(r"[0-9a-f]{64}", info.sha256), key
        assert info.url.startswith("https://"), key
        assert info.model_type in MODEL_NAMES, key
        assert info.size_bytes > 1_000_000, key
        assert info.url.rsplit("/", 1)[1] == info.file_name, key
        assert info.description and "\n" not in info.description, key
    assert len({info.file_name for info in WEIGHTS.values()}) == len(WEIGHTS)


def test_official_model_types() -> None:
    expected = {"sam_vit_h": "vit_h", "sam_vit_l": "vit_l", "sam_vit_b": "vit_b"}
    for name, model_type in expected.items():
        assert WEIGHTS[name].model_type == model_type
        assert WEIGHTS[name].url.startswith("https://dl.fbaipublicfiles.com/segment_anything/")
    assert WEIGHTS["mobile_sam"].model_type == "vit_t"
    assert "ChaoningZhang/MobileSAM" in WEIGHTS["mobile_sam"].url


def test_every_sam2_model_has_its_official_checkpoint() -> None:
    """Meta's 8 files (named in its download_ckpts.sh), one per SAM 2 registry model."""
    base = "https://dl.fbaipublicfiles.com/segment_anything_2"
    sizes = {"t": "tiny", "s": "small", "b+": "base_plus", "l": "large"}
    for model in SAM2_MODEL_CONFIGS:
        version, size = model.split("_")
        folder = "092824" if version == "sam2.1" else "072824"
        info = get_info(model)  # a model name finds its checkpoint
        assert info.model_type == model
        assert info.url == f"{base}/{folder}/{version}_hiera_{sizes[size]}.pt"
        assert get_info(info.name) is info
    sam2_files = [info for info in WEIGHTS.values() if info.model_type in SAM2_MODEL_CONFIGS]
    assert len(sam2_files) == 8 == len({info.sha256 for info in sam2_files})


# --------------------------------------------------------------------------- integrity


def _fail_hashing(monkeypatch: pytest.MonkeyPatch) -> None:
    def hashed(path: Path) -> str:
        raise AssertionError(f"{path} was hashed again")

    monkeypatch.setattr(weights, "_file_sha256", hashed)


def test_zero_filled_checkpoint_of_the_right_size_is_corrupt(monkeypatch) -> None:
    """Issue 20: listed as downloaded before, then a misleading torch error on use."""
    register(monkeypatch, "https://example.invalid/tiny.pt")  # never contacted
    path = weights.weights_path("tiny")
    path.parent.mkdir(parents=True)
    path.write_bytes(bytes(len(PAYLOAD)))
    assert weights.checkpoint_state("tiny") == "corrupt"
    assert not weights.is_downloaded("tiny")
    with pytest.raises(SeganyError) as info:
        weights.download("tiny", progress=False)
    message = str(info.value)
    assert f"checkpoint {path} is corrupt" in message
    assert "segany weights download tiny --force" in message
    assert path.read_bytes() == bytes(len(PAYLOAD))  # not replaced unasked


def test_force_download_replaces_a_corrupt_checkpoint(server, monkeypatch) -> None:
    url, _ = server
    register(monkeypatch, f"{url}/tiny.pt")
    path = weights.weights_path("tiny")
    path.parent.mkdir(parents=True)
    path.write_bytes(bytes(len(PAYLOAD)))
    assert weights.download("tiny", progress=False, force=True) == path
    assert path.read_bytes() == PAYLOAD
    assert weights.checkpoint_state("tiny") == "downloaded"


def test_download_records_the_checked_sum(server, monkeypatch) -> None:
    """A fresh download is not hashed again when it is listed or used."""
    url, _ = server
    register(monkeypatch, f"{url}/tiny.pt")
    path = weights.download("tiny", progress=False)
    _fail_hashing(monkeypatch)
    assert weights.is_downloaded("tiny")
    assert weights.download("tiny", progress=False) == path


def test_hand_placed_checkpoint_is_hashed_once_and_again_when_changed(monkeypatch) -> None:
    register(monkeypatch, "https://example.invalid/tiny.pt")
    path = weights.weights_path("tiny")
    path.parent.mkdir(parents=True)
    path.write_bytes(PAYLOAD)
    assert weights.checkpoint_state("tiny") == "downloaded"  # hashed, and recorded
    with monkeypatch.context() as patched:
        _fail_hashing(patched)
        assert weights.checkpoint_state("tiny") == "downloaded"
    path.write_bytes(bytes(len(PAYLOAD)))  # damaged later: same size, new time
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert weights.checkpoint_state("tiny") == "corrupt"
