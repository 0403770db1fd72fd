"""Audio descriptors (talkplay_edge.audio) on real recordings and synthetic signals.

The real clips are read from ``../shared/data/audio`` (or ``$TALKPLAY_AUDIO_DIR``), never copied into
the repository. Each clip has a ``.txt`` file beside it with its source and licence (CC-BY 3.0/4.0 or
public domain): LibriSpeech 198-209-0000 (CC-BY 4.0), Brahms' Hungarian Dance No. 5 by the US Army
Strings (Musopen, public domain), Karissa Hobbs "Let's Go Fishin'" and Kevin MacLeod "Dance of the
Sugar Plum Fairy" / "Vibe Ace" (Free Music Archive, CC-BY 3.0), Mihai Sorohan's solo trumpet loop
(Freesound 77711, CC-BY 3.0), NPS Glacier Bay humpback whale song (public domain).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from talkplay_edge import audio as A

AUDIO_DIR = Path(os.environ.get("TALKPLAY_AUDIO_DIR", Path(__file__).resolve().parents[2] / "shared" / "data" / "audio"))
TRUMPET = "sorohanro_-_solo-trumpet-06.ogg"
SPEECH = "198-209-0000.ogg"
HUNGARIAN = "Hungarian_Dance_number_5_-_Allegro_in_F_sharp_minor_(string_orchestra).ogg"
SUGAR_PLUM = "Kevin_MacLeod_-_P_I_Tchaikovsky_Dance_of_the_Sugar_Plum_Fairy.ogg"
VIBE_ACE = "Kevin_MacLeod_-_Vibe_Ace.ogg"

needs_clips = pytest.mark.skipif(not AUDIO_DIR.is_dir(), reason=f"real audio clips not found at {AUDIO_DIR}")


@pytest.fixture(scope="module")
def tagger():
    return A.AudioTagger(threads=2)


@pytest.fixture(scope="module")
def analyses(tagger):
    if not AUDIO_DIR.is_dir():
        pytest.skip(f"real audio clips not found at {AUDIO_DIR}")
    return {f.name: A.analyze_file(f, tagger=tagger) for f in sorted(AUDIO_DIR.glob("*.ogg"))}


# ---------------------------------------------------------------------------------------------- real clips

@needs_clips
def test_trumpet_loop_tempo_and_key(analyses):
    a = analyses[TRUMPET]          # "Jazz Trumpet Loops Pack in F 90 bpm"
    assert abs(a.tempo - 90) <= 6, a.tempo
    assert A.KEY_NAMES[a.key] == "F", a.key_name
    assert a.features["tempo"] == a.tempo and a.features["key"] == 5
    assert 5.0 < a.duration_s < 5.6


@needs_clips
def test_speech_clip_is_the_most_speech_like(analyses):
    speech = analyses[SPEECH].features["speechiness"]
    assert speech > 0.66  # Spotify: above 0.66 = "probably made entirely of spoken words"
    for name, a in analyses.items():
        if name != SPEECH:
            assert a.features["speechiness"] < speech - 0.3, (name, a.features["speechiness"])
    assert analyses[SPEECH].features["instrumentalness"] < 0.2


@needs_clips
def test_classical_more_acoustic_and_instrumental_than_jazz_loop(analyses):
    jazz = analyses[VIBE_ACE].features
    for name in (HUNGARIAN, SUGAR_PLUM):
        f = analyses[name].features
        assert f["acousticness"] > jazz["acousticness"] + 0.05, (name, f["acousticness"], jazz["acousticness"])
        assert f["instrumentalness"] > jazz["instrumentalness"], (name, f["instrumentalness"], jazz["instrumentalness"])
        assert f["instrumentalness"] > 0.5


@needs_clips
def test_features_fit_the_catalog_schema(analyses, tagger):
    from talkplay_edge.modalities import AUDIO_SCHEMA, audio_vector

    for name, a in analyses.items():
        assert a.provenance == "estimated"
        assert set(a.features) == set(A.FEATURE_KEYS)
        for k in ("danceability", "energy", "speechiness", "acousticness", "instrumentalness", "liveness", "valence"):
            assert 0.0 <= a.features[k] <= 1.0, (name, k)
        assert -60 < a.loudness < 0 and a.features["mode"] in (0, 1) and -1 <= a.features["key"] <= 11
        assert 40 <= a.tempo <= 240
        vec = audio_vector(a.features)
        assert vec is not None and vec.shape == (len(AUDIO_SCHEMA),) and np.isfinite(vec).all()
        assert len(a.top_tags) == 5 and all(t in tagger.labels for t, _ in a.top_tags)
        assert a.top_tags == sorted(a.top_tags, key=lambda tp: -tp[1])


@needs_clips
def test_top_tags_are_sensible(analyses):
    assert analyses[TRUMPET].top_tags[0][0] == "jazz"
    assert "female vocalists" in dict(analyses["Karissa_Hobbs_-_Lets_Go_Fishin.ogg"].top_tags)


@needs_clips
def test_tagger_is_stable_and_matches_patchwise_model(tagger):
    y = A.load_audio(AUDIO_DIR / VIBE_ACE)
    t1, t2 = tagger.tags(y), tagger.tags(y.copy())
    assert list(t1) == tagger.labels and len(t1) == 50
    assert t1 == t2
    # the waveform graph's log-mel front end = the numpy reference, and tags = tagger on those patches
    mid = A._middle(y, 30.0)
    import onnxruntime as ort

    s = ort.InferenceSession(str(A.MODEL_DIR / "musicnn.onnx"), providers=["CPUExecutionProvider"])
    tags_ref = s.run(["tags"], {"mel": A.mel_patches(A.musicnn_log_mel(mid))})[0].mean(axis=0)
    assert np.abs(np.array(list(t1.values())) - tags_ref).max() < 1e-4


# ---------------------------------------------------------------------------------------------- decoding

def test_corrupt_file_raises_decode_error(tmp_path):
    bad = tmp_path / "corrupt.ogg"
    bad.write_bytes(b"OggS" + os.urandom(3000))
    with pytest.raises(A.AudioDecodeError) as e:
        A.analyze_file(bad)
    assert e.value.path == str(bad) and e.value.reason
    assert str(bad) in str(e.value)


@pytest.mark.parametrize("name,content", [("empty.flac", b""), ("text.mp3", b"not audio at all\n" * 50),
                                          ("missing.wav", None)])
def test_undecodable_inputs_raise_decode_error(tmp_path, name, content):
    p = tmp_path / name
    if content is not None:
        p.write_bytes(content)
    with pytest.raises(A.AudioDecodeError):
        A.load_audio(p)


def test_batch_goes_on_after_a_bad_file(tmp_path, tagger):
    import soundfile as sf

    good = tmp_path / "tone.wav"
    t = np.arange(44100 * 4) / 44100
    sf.write(good, (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32), 44100)
    bad = tmp_path / "bad.flac"
    bad.write_bytes(b"fLaC" + b"\0" * 100)
    out = list(A.analyze_files([bad, good], tagger=tagger))
    assert [p for p, _ in out] == [bad, good]
    results = [r for _, r in out if isinstance(r, A.AudioAnalysis)]
    errors = [r for _, r in out if isinstance(r, A.AudioDecodeError)]
    assert len(results) == 1 and len(errors) == 1 and errors[0].path == str(bad)
    assert A.KEY_NAMES[results[0].key] == "A" and results[0].duration_s == pytest.approx(4.0, abs=0.01)


def test_stereo_wav_resampled_to_16k_mono(tmp_path):
    import soundfile as sf

    sr = 22050
    t = np.arange(sr * 2) / sr
    st = np.stack([np.sin(2 * np.pi * 1000 * t), np.sin(2 * np.pi * 1000 * t)], axis=1).astype(np.float32) * 0.5
    p = tmp_path / "st.wav"
    sf.write(p, st, sr)
    y = A.load_audio(p)
    assert y.dtype == np.float32 and y.ndim == 1 and y.size == 32000
    spec = np.abs(np.fft.rfft(y))
    assert abs(np.argmax(spec) * 16000 / y.size - 1000) < 2
    assert np.sqrt(np.mean(y[2000:-2000] ** 2)) == pytest.approx(0.5 / np.sqrt(2), rel=0.01)


@pytest.mark.parametrize("ext,subtype", [("mp3", "MPEG_LAYER_III"), ("ogg", "VORBIS"), ("flac", "PCM_16"),
                                         ("wav", "PCM_24")])
def test_formats_decoded_by_soundfile(tmp_path, ext, subtype):
    import soundfile as sf

    t = np.arange(44100 * 3) / 44100
    p = tmp_path / f"tone.{ext}"
    sf.write(p, (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32), 44100, subtype=subtype)
    y = A.load_audio(p)
    assert abs(y.size / A.SR - 3.0) < 0.06
    assert abs(np.argmax(np.abs(np.fft.rfft(y))) * A.SR / y.size - 440) < 2


def test_decode_cap_keeps_the_whole_files_duration(tmp_path, monkeypatch):
    import soundfile as sf

    p = tmp_path / "long.flac"
    sf.write(p, (0.1 * np.random.default_rng(0).standard_normal(8000 * 12)).astype(np.float32), 8000)
    y, sr, duration = A.decode_audio(p, max_seconds=5)
    assert sr == 8000 and y.size == 40000 and duration == pytest.approx(12.0)
    assert A.load_audio(p, max_seconds=5).size == 80000
    monkeypatch.setattr(A, "MAX_ANALYSIS_SECONDS", 4.0)
    a = A.analyze_file(p)
    assert a.duration_s == pytest.approx(12.0)


def test_m4a_via_pyav(tmp_path):
    av = pytest.importorskip("av", reason="PyAV (optional, for m4a/aac) is not installed")
    p = tmp_path / "tone.m4a"
    sr = 44100
    t = np.arange(sr * 2) / sr
    with av.open(str(p), "w") as c:
        s = c.add_stream("aac", rate=sr)
        s.layout = "mono"
        frame = av.AudioFrame.from_ndarray((0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)[None, :],
                                           format="fltp", layout="mono")
        frame.sample_rate = sr
        for pkt in s.encode(frame):
            c.mux(pkt)
        for pkt in s.encode(None):
            c.mux(pkt)
    y = A.load_audio(p)
    assert abs(y.size / 16000 - 2.0) < 0.1


# ---------------------------------------------------------------------------------------------- DSP units

def test_loudness_of_a_full_scale_1k_sine_is_minus_3_lufs():
    t = np.arange(16000 * 5) / 16000
    assert A.integrated_loudness(np.sin(2 * np.pi * 1000 * t).astype(np.float32)) == pytest.approx(-3.01, abs=0.1)
    assert A.integrated_loudness(np.zeros(16000, np.float32)) == -70.0


def test_tempo_of_a_click_track():
    sr, bpm = 16000, 120
    y = np.zeros(sr * 12, np.float32)
    click = np.exp(-np.arange(400) / 60) * np.sin(2 * np.pi * 1500 * np.arange(400) / sr)
    for b in range(int(12 * bpm / 60)):
        i = int(b * 60 / bpm * sr)
        y[i:i + 400] += click[: y.size - i]
    env = A.onset_envelope(A.power_spectrogram(y, n_fft=1024, hop=160))
    tempo, pulse = A.estimate_tempo(env)
    assert tempo == pytest.approx(120, abs=2) and pulse > 0.3


@pytest.mark.parametrize("root,mode", [(0, 1), (9, 0), (7, 1)])
def test_key_of_synthetic_triads(root, mode):
    sr = 16000
    t = np.arange(sr * 2) / sr
    third = 4 if mode else 3
    y = np.zeros(0, np.float32)
    # I – IV – V – I in the key, each chord 2 s, harmonic tones
    for step in (0, 5, 7, 0):
        r = root + step
        chord_third = (4 if (mode or step == 7) else 3) if step else third
        notes = [48 + r, 48 + r + chord_third, 48 + r + 7]
        seg = sum(np.sin(2 * np.pi * 440 * 2 ** ((n - 69) / 12) * h * t) / h for n in notes for h in (1, 2, 3))
        y = np.concatenate([y, seg.astype(np.float32)])
    key, m, clarity = A.estimate_key(A.chroma(y))
    assert (key, m) == (root, mode) and clarity > 0.5


def test_estimates_stay_in_range_for_extreme_inputs(tagger):
    lo = {"tempo": 0.0, "mode": 0.0, "loudness": -70.0, "flux": 0.0, "pulse": 0.0, "low_energy": 0.0,
          "centroid_cv": 0.0, "mod4": 0.0}
    hi = {"tempo": 240.0, "mode": 1.0, "loudness": 0.0, "flux": 50.0, "pulse": 1.0, "low_energy": 1.0,
          "centroid_cv": 5.0, "mod4": 1.0}
    for dsp in (lo, hi):
        for tags in ({}, dict.fromkeys(tagger.labels, 1.0)):
            est = A.estimate_perceptual(tags, dsp)
            assert all(0.0 <= v <= 1.0 for v in est.values()), est


def test_short_and_silent_waveforms(tagger):
    a = A.analyze_waveform(np.zeros(16000, np.float32), tagger=tagger)   # 1 s of silence: repeat-padded to a patch
    assert a.loudness == -70.0 and a.key == -1 and a.tempo == 0.0
    assert all(0 <= a.features[k] <= 1 for k in ("energy", "speechiness", "valence"))
    with pytest.raises(ValueError):
        tagger.tags(np.zeros(0, np.float32))


def test_model_files_match_info_json():
    import hashlib
    import json

    info = json.loads((A.MODEL_DIR / "info.json").read_text())
    for name, meta in info["files"].items():
        data = (A.MODEL_DIR / name).read_bytes()
        assert hashlib.sha256(data).hexdigest() == meta["sha256"], name
        assert len(data) < 50 * 1024 * 1024
    assert len(json.loads((A.MODEL_DIR / "tags.json").read_text())) == 50
    assert info["licence"] == "ISC" and "Universitat Pompeu Fabra" in (A.MODEL_DIR / "LICENSE").read_text()
    assert info["agreement_with_tensorflow"]["summary"]["tagger_tags_max_abs_diff"] < 1e-4
