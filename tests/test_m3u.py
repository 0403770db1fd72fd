"""Parsing .m3u/.m3u8 playlists (talkplay_edge.m3u)."""

from __future__ import annotations

import os

import pytest

from talkplay_edge.m3u import MAX_PLAYLIST_BYTES, PlaylistEntry, parse_extinf, read_m3u


def test_entries_paths_uris_and_extinf(tmp_path):
    d = tmp_path / "lists"
    d.mkdir()
    (d / "p.m3u8").write_text(
        "\ufeff#EXTM3U\n"
        "#EXTINF:215,Norah Jones - Don't Know Why\n"
        "../music/don't know why.mp3\n"
        "\n"
        "# a comment\n"
        "/abs/x.flac\n"
        "file:///abs/with%20space.ogg\n"
        "#EXTINF:-1,Radio Station\n"
        "http://radio.example/stream\n"
        "sub\\win.mp3\n", encoding="utf-8")
    e = read_m3u(d / "p.m3u8")
    assert e[0] == PlaylistEntry(str(tmp_path / "music" / "don't know why.mp3"), "Norah Jones", "Don't Know Why")
    assert e[1] == PlaylistEntry("/abs/x.flac") and e[2] == PlaylistEntry("/abs/with space.ogg")
    assert e[3] == PlaylistEntry(None, None, "Radio Station")
    assert e[4].path == str(d / "sub" / "win.mp3") and len(e) == 5


def test_latin1_m3u_and_errors(tmp_path):
    p = tmp_path / "old.m3u"
    p.write_bytes("#EXTINF:100,Beyonc\xe9 - Halo\nhalo.mp3\n".encode("latin-1"))
    assert read_m3u(p) == [PlaylistEntry(str(tmp_path / "halo.mp3"), "Beyonc\xe9", "Halo")]
    assert parse_extinf("#EXTINF:12 tvg-id=\"x\",A - B - C") == ("A", "B - C")
    assert parse_extinf("#EXTINF:oops") == (None, None)
    with pytest.raises(OSError):
        read_m3u(tmp_path / "missing.m3u")
    big = tmp_path / "big.m3u"
    with open(big, "wb") as f:
        f.truncate(MAX_PLAYLIST_BYTES + 10)
    with pytest.raises(OSError, match="larger than"):
        read_m3u(big)
    assert os.path.getsize(big) > MAX_PLAYLIST_BYTES
