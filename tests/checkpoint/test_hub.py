"""Hub ids (hub.py): a cache laid out by the test, HF_HUB_OFFLINE, local paths first. No network."""

import lora_course as lc
from lora_course.checkpoint import hub

import mlx.core as mx
import pytest

SHA = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def saved(tiny_model, tmp_path):
    text = [f"the quick brown fox jumps over the lazy dog {i} times" for i in range(100)]
    tok = lc.train_tokenizer(text, 100, tmp_path / "tok" / "tokenizer", byte_fallback=False)
    return lc.save(tiny_model, tok, tmp_path / "saved")


@pytest.fixture
def cache(saved, tmp_path, monkeypatch):
    """A Hub cache holding org/tiny at revision main, as huggingface_hub lays it out."""
    root = tmp_path / "hf_home" / "hub"
    repo = root / "models--org--tiny"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(SHA)
    (repo / "blobs").mkdir()
    snap = repo / "snapshots" / SHA
    snap.mkdir(parents=True)
    for f in saved.iterdir():  # blobs by content, snapshot entries link to them
        blob = repo / "blobs" / f"blob-{f.name}"
        blob.write_bytes(f.read_bytes())
        (snap / f.name).symlink_to(blob)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return root


def test_offline_load_from_the_cache(cache, tiny_model, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert hub.cache_dir() == cache
    model, tok = lc.load("org/tiny")
    ids = mx.array([[1, 5, 9, 2]])
    assert mx.array_equal(model(ids), tiny_model(ids))
    assert tok.vocab_size == 100


def test_offline_without_a_copy_says_how_to_get_it(cache, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(hub.HubError) as e:
        lc.load("org/missing")
    msg = str(e.value)
    assert msg.startswith("org/missing:") and "\n" not in msg
    assert "huggingface-cli download org/missing" in msg and "HF_HUB_OFFLINE" in msg


def test_hf_hub_cache_wins_over_hf_home(cache, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "elsewhere"))
    monkeypatch.chdir(tmp_path)
    assert hub.cache_dir() == tmp_path / "elsewhere"
    with pytest.raises(hub.HubError, match="not .completely. in the Hub cache"):
        lc.load("org/tiny")


def test_a_local_path_wins_over_a_hub_id(cache, saved, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "org").mkdir()
    (tmp_path / "org" / "tiny").symlink_to(saved)  # same name as the cached repo
    calls = []
    monkeypatch.setattr(hub, "download", lambda *a, **k: calls.append(a))
    lc.load("org/tiny")
    assert calls == []


def test_online_download_asks_only_for_the_files_we_read(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "c"))
    seen = {}

    def fake(repo_id, **kw):  # stands in for the network
        seen.update(kw, repo_id=repo_id)
        return str(tmp_path)

    monkeypatch.setattr(hub.huggingface_hub, "snapshot_download", fake)
    assert hub.download("org/x") == tmp_path
    assert seen["repo_id"] == "org/x" and seen["cache_dir"] == tmp_path / "c"
    assert seen["local_files_only"] is False
    assert "*.safetensors" not in seen["allow_patterns"] and "config.json" in seen["allow_patterns"]


@pytest.mark.parametrize(
    "name,ok",
    [
        ("org/name", True),
        ("meta-llama/Llama-3.2-1B", True),
        ("./org/name", False),
        ("/abs/path", False),
        ("a/b/c", False),
        ("name", False),
        ("../x/y", False),
    ],
)
def test_hub_id_shape(name, ok):
    assert hub.is_hub_id(name) == ok
