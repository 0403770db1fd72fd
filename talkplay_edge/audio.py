"""Audio descriptors of a music file: decode, DSP (tempo, key, mode, loudness) and musicnn tags.

This is the library behind "bring your own music folder": ``analyze_file(path)`` turns one audio file
into the catalog's audio-descriptor vector (the keys ``modalities.audio_vector`` reads) plus the
file's top musicnn tags, which stand in for genre tags when a file has none.

Runtime dependencies: numpy, onnxruntime and ``soundfile`` (libsndfile, shipped inside the wheel:
wav, flac, ogg/vorbis, opus, mp3 since libsndfile 1.1). PyAV (``av``, FFmpeg inside the wheel) is used
when it is installed, for what libsndfile cannot read (m4a/aac/wma/…); it is optional because its
wheel is ~36 MB. No torch, no tensorflow, no librosa.

Decoding
--------
``load_audio(path)`` → mono float32 at 16 kHz (channels averaged while reading in 10 s blocks, then
band-limited FFT resampling in overlapping blocks, so memory stays bounded; ``analyze_file`` decodes
at most the first 10 minutes). Anything that cannot be decoded — missing file, unknown or corrupt
format, no samples — raises ``AudioDecodeError(path, reason)``; a batch catches that one exception
per file and goes on.

DSP descriptors (numpy only; on the middle ≤ 120 s, loudness on everything decoded)
-----------------------------------------------------------------------------------
- tempo: onset-strength envelope (positive log-mel spectral flux, 64 bands, 100 frames/s) minus its
  1 s moving average → autocorrelation; each period T for 40..240 bpm scores
  ACF(T) + ½·ACF(2T) + ¼·ACF(T/2), times a log-normal prior (110 bpm, σ = 1 octave); the winner is
  folded by octaves into [70, 140) bpm (the perceptual mid range: octave errors are the typical
  failure of any estimator, and double/half time is ambiguous anyway). 0 when there are no onsets.
- key, mode: chroma = mean STFT magnitude (8192-point, 16 kHz) within each semitone C2..B6, log-
  compressed, folded onto 12 pitch classes and summed over time; correlated with the 24 rotated
  Krumhansl–Kessler profiles. ``key`` 0=C … 11=B, ``mode`` 1 major / 0 minor; key -1 when the best
  correlation is under 0.2 or the chroma is flat (no tonal centre, e.g. silence).
- loudness: ITU-R BS.1770 integrated loudness in dB (LUFS) — K-weighting applied in the frequency
  domain to 100 ms sub-blocks, 400 ms gating blocks with 75 % overlap, absolute gate -70 LUFS,
  relative gate -10 LU; -70 for silence. That is the scale of Spotify's ``loudness`` (about -60..0,
  commercial music typically -14..-5). Computed on the 16 kHz mono mix: within 0.2 dB of pyloudnorm
  at the files' native rate on the test clips.
- speech cues (Scheirer & Slaney 1997), from the same 100 frames/s spectrogram: ``low_energy`` (share
  of frames under half the mean RMS of their 1 s window), ``centroid_cv`` (variation of the spectral
  centroid), ``mod4`` (share of the mel-band envelopes' modulation energy at 3..6 Hz).
- duration_s: the whole file's duration (from its header when only part was decoded).

Perceptual descriptors (``provenance = "estimated"``)
------------------------------------------------------
Spotify's perceptual features come from proprietary models; here they are estimated by a simple,
documented mapping from the musicnn MSD tag posteriors ``p[tag]`` (averaged over the 3 s patches of
at most 30 s from the middle of the track) and the DSP measures. Tag groups are weighted:
``S(G) = Σ w·p[tag]`` (weight 1 unless given); ``ratio(A, B) = (S(A) + 0.025) / (S(A) + S(B) + 0.05)``
(½ when neither group is present); everything is clipped to [0, 1].

=================  ==============================================================================
feature            estimate
=================  ==============================================================================
speechiness        ``sp`` = mean of clip((low_energy − 0.05) / 0.35), clip((centroid_cv − 0.4) / 1)
                   and clip((mod4 − 0.18) / 0.15); speechiness =
                   ``0.03 + 2.5·max(0, sp − 0.6) + 0.3·p[Hip-Hop]``
acousticness       ``ratio(ACOUSTIC, ELECTRIC)``; ACOUSTIC = acoustic, folk, instrumental, easy
                   listening, beautiful, oldies, country, jazz ½, Mellow ½, sad ½, blues ½;
                   ELECTRIC = electronic, electronica, electro, House, dance, metal, hard rock,
                   heavy metal, punk, rock ½, alternative rock ½, party ½, Hip-Hop ½
instrumentalness   ``ratio(INSTRUMENTAL, VOCAL) · (1 − speechiness)``; INSTRUMENTAL = instrumental,
                   ambient, experimental, easy listening, beautiful ½, chillout ½; VOCAL = female
                   vocalists, male vocalists, female vocalist, Hip-Hop, rnb, soul, pop, sexy
energy             ``0.45·loud + 0.25·flux + 0.30·ratio(ENERGETIC, CALM)``; loud =
                   clip((loudness + 30) / 24), flux = clip(mean onset strength / 6); ENERGETIC =
                   rock, metal, hard rock, heavy metal, punk, electronic, dance, House, party,
                   electro; CALM = Mellow, chill, chillout, ambient, easy listening, sad,
                   beautiful, acoustic
danceability       ``0.45·clip(pulse / 0.5) + 0.20·tempo_fit + 0.35·ratio(DANCE, STILL)``; pulse =
                   the onset autocorrelation at the chosen beat period, tempo_fit =
                   exp(−log2(tempo/115)² / 0.18); DANCE = dance, House, party, electro, funk,
                   Hip-Hop, rnb, catchy, sexy, pop; STILL = ambient, Mellow, sad, beautiful,
                   experimental, chillout
valence            ``0.65·ratio(HAPPY, SAD) + 0.15·mode + 0.20·clip((tempo − 60) / 100)``; HAPPY =
                   happy, party, catchy, funk, dance, pop, country, oldies, soul; SAD = sad,
                   Mellow, beautiful, ambient, metal, heavy metal, experimental
liveness           ``0.08 + 0.5·S(jazz, blues, classic rock, 60s, 70s, oldies) / 3`` — a weak prior
                   only: MSD has no "live" tag and no live-recording detection is attempted
tempo, key, mode,  the DSP values above, directly
loudness
=================  ==============================================================================

These are coarse estimates meant to place a file in the catalog's audio-descriptor space, not to
reproduce Spotify's numbers; the tests check orderings on real recordings (speech vs music,
orchestra vs jazz loop), not exact values. ``top_tags`` are the k most probable MSD tags (they can
serve as a file's semantic tags when it has no genre tag).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

SR = 16000          # musicnn's sample rate (configuration.SR)
N_FFT = 512         # musicnn's FFT_SIZE
HOP = 256           # musicnn's FFT_HOP
N_MELS = 96         # musicnn's N_MELS
PATCH_FRAMES = 187  # 3 s patches: librosa.time_to_frames(3, sr=16000, n_fft=512, hop_length=256) + 1
PATCH_SAMPLES = (PATCH_FRAMES - 1) * HOP  # shortest waveform that yields one patch (center=True framing)

MAX_ANALYSIS_SECONDS = 600.0  # analyze_file decodes at most this much of a file
MODEL_DIR = Path(__file__).resolve().parent / "models" / "musicnn"
MODEL_FILE = "musicnn_wave.onnx"  # waveform → tags + embedding (log-mel inside the graph)

KEY_NAMES = ("C", "C#", "D", "D#", "E", "F", "F#", "G", "G#", "A", "A#", "B")
FEATURE_KEYS = ("danceability", "energy", "key", "mode", "loudness", "speechiness", "acousticness",
                "instrumentalness", "liveness", "valence", "tempo")


class AudioModelError(RuntimeError):
    """The musicnn ONNX files are damaged or unreadable."""


class AudioModelMissing(AudioModelError, FileNotFoundError):
    """The musicnn ONNX files are not where they were looked for."""


class AudioDecodeError(Exception):
    """A file that cannot be decoded into audio samples (missing, corrupt, unsupported, empty)."""

    def __init__(self, path, reason: str):
        self.path = str(path)
        self.reason = str(reason)
        super().__init__(f"cannot decode audio file {self.path}: {self.reason}")


# ----------------------------------------------------------------------------------------------
# decoding and resampling

_SOUNDFILE_FIRST = {".wav", ".wave", ".flac", ".ogg", ".oga", ".opus", ".mp3", ".aif", ".aiff", ".au",
                    ".caf", ".w64", ".rf64"}


def _decode_soundfile(path: Path, max_seconds: float | None) -> tuple[np.ndarray, int, float]:
    import soundfile as sf

    with sf.SoundFile(str(path)) as f:
        sr = int(f.samplerate)
        total = f.frames / sr if f.frames > 0 else 0.0
        limit = int(max_seconds * sr) if max_seconds is not None else None
        chunks, n = [], 0
        while limit is None or n < limit:     # blocks of 10 s, channels averaged as they come
            want = sr * 10 if limit is None else min(sr * 10, limit - n)
            block = f.read(want, dtype="float32", always_2d=True)
            if block.shape[0] == 0:
                break
            chunks.append(block.mean(axis=1))
            n += block.shape[0]
    y = np.concatenate(chunks) if chunks else np.zeros(0, np.float32)
    return y, sr, max(total, y.size / sr)


def _decode_pyav(path: Path, max_seconds: float | None) -> tuple[np.ndarray, int, float]:
    import av  # optional dependency

    with av.open(str(path)) as container:
        streams = container.streams.audio
        if not streams:
            raise ValueError("no audio stream")
        stream = streams[0]
        total = float(container.duration) / 1e6 if container.duration else 0.0
        chunks, n, sr = [], 0, None
        for frame in container.decode(stream):
            arr = frame.to_ndarray()
            sr = frame.sample_rate
            if arr.dtype.kind in "iu":
                arr = arr.astype(np.float32) / float(np.iinfo(arr.dtype).max)
            arr = arr.astype(np.float32, copy=False)
            if frame.format.is_planar:      # (channels, samples)
                chunks.append(arr.mean(axis=0))
            else:                           # (1, samples · channels), interleaved
                chunks.append(arr.reshape(-1, len(frame.layout.channels)).mean(axis=1))
            n += chunks[-1].size
            if max_seconds is not None and n >= max_seconds * sr:
                break
        if not chunks or sr is None:
            raise ValueError("no audio frames")
        y = np.concatenate(chunks)
        if max_seconds is not None:
            y = y[: int(max_seconds * sr)]
        return y, int(sr), max(total, y.size / sr)


def decode_audio(path, max_seconds: float | None = None) -> tuple[np.ndarray, int, float]:
    """(mono float32 samples, sample rate, whole file's duration in s) at the file's own rate.

    Only the first ``max_seconds`` are decoded when given. Raises AudioDecodeError.
    """
    path = Path(path)
    if not path.is_file():
        raise AudioDecodeError(path, "no such file")
    errors = []
    decoders = [_decode_soundfile, _decode_pyav]
    if path.suffix.lower() not in _SOUNDFILE_FIRST:
        decoders.reverse()
    for decoder in decoders:
        try:
            y, sr, duration = decoder(path, max_seconds)
        except ImportError:
            errors.append("m4a/aac and other FFmpeg-only formats need PyAV (pip install av)"
                          if decoder is _decode_pyav else "soundfile is not installed")
            continue
        except Exception as e:  # noqa: BLE001 - any decoder failure becomes one clear error
            errors.append(f"{decoder.__name__.removeprefix('_decode_')}: {e}".strip())
            continue
        if y.size == 0 or sr <= 0:
            errors.append("no audio samples")
            continue
        return np.nan_to_num(y, nan=0.0, posinf=0.0, neginf=0.0).astype(np.float32, copy=False), sr, duration
    raise AudioDecodeError(path, "; ".join(errors))


def resample(y: np.ndarray, sr_in: int, sr_out: int = SR, block_s: float = 20.0) -> np.ndarray:
    """Band-limited (FFT) resampling in overlapping blocks; output length round(len·sr_out/sr_in)."""
    y = np.asarray(y, dtype=np.float32)
    if sr_in == sr_out or y.size == 0:
        return y
    g = math.gcd(int(sr_in), int(sr_out))
    up, down = sr_out // g, sr_in // g
    n_out = int(round(y.size * up / down))
    m = max(1, int(block_s * sr_in) // down)     # block = m·down input samples → m·up output samples
    c = max(1, int(0.25 * sr_in) // down)        # context on each side, discarded after resampling
    blk_in, blk_out, ctx_in, ctx_out = m * down, m * up, c * down, c * up
    n_blocks = -(-y.size // blk_in)
    padded = np.pad(y, (ctx_in, n_blocks * blk_in - y.size + ctx_in), mode="reflect"
                    if y.size > ctx_in + 1 else "constant")
    out = np.empty(n_blocks * blk_out, dtype=np.float32)
    seg_in, seg_out = blk_in + 2 * ctx_in, blk_out + 2 * ctx_out
    for b in range(n_blocks):
        seg = padded[b * blk_in: b * blk_in + seg_in]
        spec = np.fft.rfft(seg.astype(np.float64))
        n_keep = min(spec.size, seg_out // 2 + 1)
        res = np.fft.irfft(spec[:n_keep], n=seg_out) * (seg_out / seg_in)
        out[b * blk_out:(b + 1) * blk_out] = res[ctx_out: ctx_out + blk_out]
    return out[:n_out]


def load_audio(path, sr: int = SR, max_seconds: float | None = None) -> np.ndarray:
    """Decode ``path`` (at most its first ``max_seconds``) to mono float32 at ``sr`` (default 16 kHz).

    Raises AudioDecodeError.
    """
    y, file_sr, _ = decode_audio(path, max_seconds)
    return resample(y, file_sr, sr)


# ----------------------------------------------------------------------------------------------
# spectra

def _frames(y: np.ndarray, n_fft: int, hop: int, center: bool = True) -> np.ndarray:
    if center:
        mode = "reflect" if y.size > n_fft // 2 else "constant"
        y = np.pad(y, n_fft // 2, mode=mode)
    if y.size < n_fft:
        y = np.pad(y, (0, n_fft - y.size))
    n = 1 + (y.size - n_fft) // hop
    return np.lib.stride_tricks.as_strided(y, shape=(n, n_fft), strides=(y.strides[0] * hop, y.strides[0]))


def hann(n: int) -> np.ndarray:
    """Periodic Hann window (librosa/scipy ``get_window('hann', n, fftbins=True)``)."""
    return (0.5 - 0.5 * np.cos(2 * np.pi * np.arange(n) / n)).astype(np.float64)


def power_spectrogram(y: np.ndarray, n_fft: int = N_FFT, hop: int = HOP) -> np.ndarray:
    """|STFT|² with a periodic Hann window, centred frames, reflect padding: (frames, n_fft//2+1)."""
    fr = _frames(np.asarray(y, dtype=np.float32), n_fft, hop)
    spec = np.fft.rfft(fr * hann(n_fft).astype(np.float32), axis=1)
    return (spec.real ** 2 + spec.imag ** 2).astype(np.float32)


def _hz_to_mel(f):
    """Slaney mel scale (librosa's default, htk=False)."""
    f = np.asarray(f, dtype=np.float64)
    f_sp, min_log_hz = 200.0 / 3, 1000.0
    min_log_mel, logstep = min_log_hz / f_sp, np.log(6.4) / 27.0
    return np.where(f >= min_log_hz, min_log_mel + np.log(np.maximum(f, 1e-10) / min_log_hz) / logstep, f / f_sp)


def _mel_to_hz(m):
    m = np.asarray(m, dtype=np.float64)
    f_sp, min_log_hz = 200.0 / 3, 1000.0
    min_log_mel, logstep = min_log_hz / f_sp, np.log(6.4) / 27.0
    return np.where(m >= min_log_mel, min_log_hz * np.exp(logstep * (m - min_log_mel)), f_sp * m)


def mel_filterbank(sr: int = SR, n_fft: int = N_FFT, n_mels: int = N_MELS, fmin: float = 0.0,
                   fmax: float | None = None) -> np.ndarray:
    """librosa.filters.mel(sr, n_fft, n_mels) with its defaults (Slaney scale and area norm): (n_mels, bins)."""
    fmax = sr / 2 if fmax is None else fmax
    fft_freqs = np.linspace(0, sr / 2, n_fft // 2 + 1)
    mel_f = _mel_to_hz(np.linspace(_hz_to_mel(fmin), _hz_to_mel(fmax), n_mels + 2))
    fdiff = np.diff(mel_f)
    ramps = mel_f[:, None] - fft_freqs[None, :]
    lower = -ramps[:-2] / fdiff[:-1, None]
    upper = ramps[2:] / fdiff[1:, None]
    weights = np.maximum(0, np.minimum(lower, upper))
    weights *= (2.0 / (mel_f[2: n_mels + 2] - mel_f[:n_mels]))[:, None]
    return weights.astype(np.float32)


def musicnn_log_mel(y16k: np.ndarray) -> np.ndarray:
    """musicnn's input representation in float32: log10(10000·mel + 1), (frames, 96).

    (musicnn's own extractor casts the mel to float16 before the log, which overflows for loud
    input; the ONNX graph and this reference stay in float32.)
    """
    mel = power_spectrogram(y16k) @ mel_filterbank().T
    return np.log10(10000.0 * mel + 1.0).astype(np.float32)


def mel_patches(log_mel: np.ndarray) -> np.ndarray:
    """Non-overlapping 187-frame patches as musicnn's ``batch_data`` cuts them: (n, 187, 96)."""
    n = log_mel.shape[0] // PATCH_FRAMES
    return log_mel[: n * PATCH_FRAMES].reshape(n, PATCH_FRAMES, log_mel.shape[1])


# ----------------------------------------------------------------------------------------------
# musicnn tagger (ONNX)

def _middle(y: np.ndarray, max_seconds: float | None, sr: int = SR) -> np.ndarray:
    if max_seconds is None or y.size <= int(max_seconds * sr):
        return y
    n = int(max_seconds * sr)
    start = (y.size - n) // 2
    return y[start: start + n]


def _repeat_pad(y: np.ndarray, n: int) -> np.ndarray:
    """musicnn's training used 'repeat-pad' for clips shorter than a patch."""
    if y.size >= n:
        return y
    return np.tile(y, -(-n // y.size))[:n]


class AudioTagger:
    """musicnn (MSD_musicnn: 50 Million-Song-Dataset tags + 200-d embedding) on onnxruntime.

    The ONNX graph computes musicnn's log-mel itself from a 16 kHz mono waveform, cuts it into 3 s
    patches and tags each; ``tags``/``embed`` average over the patches of at most ``max_seconds``
    taken from the middle of the waveform.
    """

    def __init__(self, model_dir=None, threads: int = 2, max_seconds: float | None = 30.0):
        import onnxruntime as ort

        self.model_dir = Path(model_dir) if model_dir is not None else MODEL_DIR
        path = self.model_dir / MODEL_FILE
        for f in (path, self.model_dir / "tags.json"):
            if not f.is_file():
                raise AudioModelMissing(f"{f} is missing: restore it (`git checkout {f.parent.name}`) or run "
                                        "`python -m export.audio_encoder` to rebuild it")
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = max(1, int(threads))
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        try:
            self.labels: list[str] = json.loads((self.model_dir / "tags.json").read_text())
            self.session = ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
        except Exception as e:  # noqa: BLE001 — onnxruntime raises its own types for a damaged file
            raise AudioModelError(f"{self.model_dir}: cannot load the musicnn ONNX model ({e}); restore the files or "
                                  "run `python -m export.audio_encoder` to rebuild them") from e
        self.max_seconds = max_seconds

    def predict(self, waveform_16k: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Per-patch (tag posteriors (n, 50), embeddings (n, 200)) of the middle ``max_seconds``."""
        y = np.asarray(waveform_16k, dtype=np.float32).reshape(-1)
        if y.size == 0:
            raise ValueError("empty waveform")
        y = _repeat_pad(_middle(y, self.max_seconds), PATCH_SAMPLES)
        tags, emb = self.session.run(["tags", "embedding"], {"waveform": y})
        return tags, emb

    def tag_vector(self, waveform_16k: np.ndarray) -> np.ndarray:
        return self.predict(waveform_16k)[0].mean(axis=0)

    def tags(self, waveform_16k: np.ndarray) -> dict[str, float]:
        """Tag → posterior (mean over 3 s patches), in the model's tag order."""
        return {t: float(p) for t, p in zip(self.labels, self.tag_vector(waveform_16k))}

    def embed(self, waveform_16k: np.ndarray) -> np.ndarray:
        """musicnn's 200-d penultimate features, averaged over patches."""
        return self.predict(waveform_16k)[1].mean(axis=0)


_DEFAULT_TAGGER: dict[tuple, AudioTagger] = {}


def default_tagger(model_dir=None, threads: int = 2) -> AudioTagger:
    key = (str(model_dir), threads)
    if key not in _DEFAULT_TAGGER:
        _DEFAULT_TAGGER[key] = AudioTagger(model_dir, threads=threads)
    return _DEFAULT_TAGGER[key]


# ----------------------------------------------------------------------------------------------
# DSP descriptors

ONSET_FPS = 100                 # onset envelope frame rate (hop 160 at 16 kHz)
_KK_MAJOR = np.array([6.35, 2.23, 3.48, 2.33, 4.38, 4.09, 2.52, 5.19, 2.39, 3.66, 2.29, 2.88])
_KK_MINOR = np.array([6.33, 2.68, 3.52, 5.38, 2.60, 3.53, 2.54, 4.75, 3.98, 2.69, 3.34, 3.17])


def onset_envelope(power_1024: np.ndarray) -> np.ndarray:
    """Positive log-mel spectral flux (64 bands) of a (frames, 513) power spectrogram, mean over bands."""
    mel = power_1024 @ mel_filterbank(SR, 1024, 64).T
    db = 10.0 * np.log10(np.maximum(mel, 1e-10))
    db = np.maximum(db, db.max() - 80.0)
    flux = np.maximum(0.0, np.diff(db, axis=0)).mean(axis=1)
    return np.concatenate([[0.0], flux]).astype(np.float64)


def speech_measures(power_1024: np.ndarray, fps: float = ONSET_FPS) -> dict[str, float]:
    """Classic speech/music cues (Scheirer & Slaney 1997) from a (frames, 513) power spectrogram.

    - low_energy: mean share, over 1 s windows, of frames with RMS under half the window's mean RMS
    - centroid_cv: coefficient of variation of the spectral centroid over non-silent frames
    - mod4: share of the mel-band envelopes' modulation energy at 3..6 Hz (syllable rate)
    """
    energy = power_1024.sum(axis=1)
    rms = np.sqrt(energy + 1e-20)
    w = int(fps)
    low = [float((rms[i:i + w] < 0.5 * rms[i:i + w].mean()).mean()) for i in range(0, max(1, rms.size - w + 1), w // 2)]
    active = energy > 1e-4 * np.percentile(energy, 90) if energy.size else energy
    freqs = np.linspace(0, SR / 2, power_1024.shape[1])
    cent = (power_1024[active] @ freqs) / np.maximum(energy[active], 1e-20)
    centroid_cv = float(cent.std() / cent.mean()) if cent.size > 1 and cent.mean() > 0 else 0.0
    env = np.sqrt(power_1024 @ mel_filterbank(SR, 1024, 40).T)
    n = 2 * w
    if env.shape[0] < n:
        env = np.pad(env, ((0, n - env.shape[0]), (0, 0)))
    spec = np.zeros(n // 2 + 1)
    win = np.hanning(n)[:, None]
    for i in range(0, env.shape[0] - n + 1, w):
        seg = env[i:i + n]
        seg = seg / (seg.mean(axis=0) + 1e-9) - 1.0
        spec += (np.abs(np.fft.rfft(seg * win, axis=0)) ** 2).sum(axis=1)
    f = np.fft.rfftfreq(n, 1.0 / fps)
    total = spec[(f > 0.4) & (f < 30)].sum()
    mod4 = float(spec[(f >= 3) & (f <= 6)].sum() / total) if total > 0 else 0.0
    return {"low_energy": float(np.mean(low)), "centroid_cv": centroid_cv, "mod4": mod4}


def _acf(x: np.ndarray) -> np.ndarray:
    x = x - x.mean()
    n = 1 << int(np.ceil(np.log2(2 * x.size)))
    f = np.fft.rfft(x, n)
    r = np.fft.irfft(f * np.conj(f), n)[: x.size]
    return r / r[0] if r[0] > 0 else np.zeros_like(r)


def estimate_tempo(onset_env: np.ndarray, fps: float = ONSET_FPS, lo: float = 40.0, hi: float = 240.0,
                   prior_bpm: float = 110.0, fold: tuple[float, float] = (70.0, 140.0)) -> tuple[float, float]:
    """(bpm, pulse clarity) from the onset envelope's autocorrelation (see the module docstring).

    Each candidate period T is scored ACF(T) + ½·ACF(2T) + ¼·ACF(T/2) times a log-normal prior
    (``prior_bpm``, one octave), and the winner is folded by factors of 2 into ``fold`` (the
    perceptual mid range; octave errors are the common failure of any estimator).
    """
    if onset_env.size < 2 * fps or not np.any(onset_env > 0):
        return 0.0, 0.0
    k = int(fps)  # remove the slow trend (1 s moving average) so crescendos do not dominate
    r = _acf(onset_env - np.convolve(onset_env, np.ones(k) / k, mode="same"))
    rr = np.maximum(r, 0.0)

    def at(lag):
        lag = np.asarray(lag, dtype=np.float64)
        i = np.floor(lag).astype(int)
        frac = lag - i
        ok = i < r.size - 2
        i = np.minimum(i, r.size - 2)
        return np.where(ok, rr[i] * (1 - frac) + rr[i + 1] * frac, 0.0)

    bpms = np.arange(lo, hi, 0.1)
    periods = 60.0 * fps / bpms
    score = (at(periods) + 0.5 * at(2 * periods) + 0.25 * at(periods / 2)) * \
        np.exp(-0.5 * np.log2(bpms / prior_bpm) ** 2)
    if not np.any(score > 0):
        return 0.0, 0.0
    i = int(np.argmax(score))
    bpm, pulse = float(bpms[i]), float(at(periods[i]))
    while bpm >= fold[1]:
        bpm /= 2
    while bpm < fold[0]:
        bpm *= 2
    return round(bpm, 1), pulse


def chroma(y16k: np.ndarray, n_fft: int = 8192, hop: int = 4096) -> np.ndarray:
    """Pitch-class profile per frame (frames, 12), C = 0: mean STFT magnitude within each semitone
    C2..B6 (65 Hz..2 kHz), log-compressed relative to the loudest, folded onto 12 classes."""
    fr = _frames(np.asarray(y16k, dtype=np.float32), n_fft, hop)
    mag = np.abs(np.fft.rfft(fr * hann(n_fft).astype(np.float32), axis=1))
    freqs = np.fft.rfftfreq(n_fft, 1.0 / SR)
    midi = np.arange(36, 96)
    semis = np.zeros((mag.shape[0], midi.size), dtype=np.float64)
    for j, m in enumerate(midi):
        lo_f, hi_f = 440.0 * 2 ** ((m - 69.5) / 12), 440.0 * 2 ** ((m - 68.5) / 12)
        sel = np.flatnonzero((freqs >= lo_f) & (freqs < hi_f))
        if sel.size == 0:
            sel = [int(np.argmin(np.abs(freqs - 440.0 * 2 ** ((m - 69) / 12))))]
        semis[:, j] = mag[:, sel].mean(axis=1)
    semis = np.log1p(100.0 * semis / max(float(semis.max()), 1e-12))
    out = np.zeros((mag.shape[0], 12))
    for j, m in enumerate(midi):
        out[:, m % 12] += semis[:, j]
    return out


def estimate_key(chroma_frames: np.ndarray) -> tuple[int, int, float]:
    """(key 0..11 or -1, mode 1/0, clarity = best Krumhansl correlation) from chroma frames."""
    if chroma_frames.size == 0:
        return -1, 1, 0.0
    prof = chroma_frames.sum(axis=0)
    if not np.isfinite(prof).all() or prof.std() < 1e-6 * max(prof.mean(), 1e-12):
        return -1, 1, 0.0
    best = (-2.0, -1, 1)
    for mode, ref in ((1, _KK_MAJOR), (0, _KK_MINOR)):
        for key in range(12):
            c = float(np.corrcoef(prof, np.roll(ref, key))[0, 1])
            if c > best[0]:
                best = (c, key, mode)
    clarity, key, mode = best
    if clarity < 0.2:
        return -1, mode, max(clarity, 0.0)
    return key, mode, clarity


def _k_weighting_power(freqs: np.ndarray) -> np.ndarray:
    """|H(f)|² of the BS.1770 K-weighting (shelf + RLB high-pass), from its 48 kHz biquads."""
    z = np.exp(-2j * np.pi * freqs / 48000.0)
    def biquad(b, a):
        return (b[0] + b[1] * z + b[2] * z ** 2) / (a[0] + a[1] * z + a[2] * z ** 2)
    h = biquad((1.53512485958697, -2.69169618940638, 1.19839281085285), (1.0, -1.69065929318241, 0.73248077421585))
    h *= biquad((1.0, -2.0, 1.0), (1.0, -1.99004745483398, 0.99007225036621))
    return np.abs(h) ** 2


def loudness_blocks(y: np.ndarray, sr: int = SR) -> np.ndarray:
    """K-weighted mean square of each BS.1770 gating block (400 ms, 75 % overlap).

    The K-weighting is applied to the spectra of consecutive 100 ms sub-blocks (Parseval, so the
    unweighted energy is exact); each 400 ms block is the mean of 4 sub-blocks.
    """
    n = sr // 10
    y = np.asarray(y, dtype=np.float32)
    if y.size < 4 * n:
        y = np.pad(y, (0, 4 * n - y.size))
    sub = y[: (y.size // n) * n].reshape(-1, n)
    spec = np.fft.rfft(sub, axis=1)
    p = (spec.real ** 2 + spec.imag ** 2) * _k_weighting_power(np.fft.rfftfreq(n, 1.0 / sr))
    p[:, 1: (n + 1) // 2] *= 2.0                 # one-sided spectrum: double all but DC (and Nyquist)
    e = p.sum(axis=1) / (n * n)
    return np.convolve(e, np.ones(4) / 4, mode="valid")


def integrated_loudness(y: np.ndarray, sr: int = SR) -> float:
    """BS.1770-4 gated integrated loudness (LUFS ≈ dB) of a mono signal; -70 for silence."""
    z = loudness_blocks(y, sr)
    lk = -0.691 + 10 * np.log10(np.maximum(z, 1e-12))
    z = z[lk > -70.0]
    if z.size == 0:
        return -70.0
    rel = -0.691 + 10 * np.log10(z.mean()) - 10.0
    z2 = z[(-0.691 + 10 * np.log10(z)) > rel]
    return float(-0.691 + 10 * np.log10(z2.mean() if z2.size else z.mean()))


# ----------------------------------------------------------------------------------------------
# perceptual estimates (the table in the module docstring) and the per-file analysis

# tag groups: {MSD tag: weight}; S(group) = Σ weight · p[tag]
ACOUSTIC = {"acoustic": 1, "folk": 1, "instrumental": 1, "easy listening": 1, "beautiful": 1, "oldies": 1,
            "country": 1, "jazz": 0.5, "Mellow": 0.5, "sad": 0.5, "blues": 0.5}
ELECTRIC = {"electronic": 1, "electronica": 1, "electro": 1, "House": 1, "dance": 1, "metal": 1, "hard rock": 1,
            "heavy metal": 1, "punk": 1, "rock": 0.5, "alternative rock": 0.5, "party": 0.5, "Hip-Hop": 0.5}
INSTRUMENTAL = {"instrumental": 1, "ambient": 1, "experimental": 1, "easy listening": 1, "beautiful": 0.5,
                "chillout": 0.5}
VOCAL = {"female vocalists": 1, "male vocalists": 1, "female vocalist": 1, "Hip-Hop": 1, "rnb": 1, "soul": 1,
         "pop": 1, "sexy": 1}
ENERGETIC = dict.fromkeys(("rock", "metal", "hard rock", "heavy metal", "punk", "electronic", "dance", "House",
                           "party", "electro"), 1)
CALM = dict.fromkeys(("Mellow", "chill", "chillout", "ambient", "easy listening", "sad", "beautiful", "acoustic"), 1)
DANCE = dict.fromkeys(("dance", "House", "party", "electro", "funk", "Hip-Hop", "rnb", "catchy", "sexy", "pop"), 1)
STILL = dict.fromkeys(("ambient", "Mellow", "sad", "beautiful", "experimental", "chillout"), 1)
HAPPY = dict.fromkeys(("happy", "party", "catchy", "funk", "dance", "pop", "country", "oldies", "soul"), 1)
SAD = dict.fromkeys(("sad", "Mellow", "beautiful", "ambient", "metal", "heavy metal", "experimental"), 1)
LIVE = dict.fromkeys(("jazz", "blues", "classic rock", "60s", "70s", "oldies"), 1)


def _clip(x: float) -> float:
    return float(min(1.0, max(0.0, x)))


def estimate_perceptual(tags: dict[str, float], dsp: dict[str, float]) -> dict[str, float]:
    """The seven perceptual descriptors from tag posteriors and DSP measures (module docstring table).

    ``dsp`` needs: tempo, mode, loudness, flux (mean onset strength), pulse, low_energy,
    centroid_cv, mod4.
    """
    def s(group):
        return sum(w * float(tags.get(t, 0.0)) for t, w in group.items())

    def ratio(a, b):  # → ½ when neither group is present
        return (s(a) + 0.025) / (s(a) + s(b) + 0.05)

    speech_score = (_clip((dsp["low_energy"] - 0.05) / 0.35) + _clip((dsp["centroid_cv"] - 0.4) / 1.0)
                    + _clip((dsp["mod4"] - 0.18) / 0.15)) / 3.0
    speechiness = _clip(0.03 + 2.5 * max(0.0, speech_score - 0.6) + 0.3 * float(tags.get("Hip-Hop", 0.0)))
    tempo = dsp["tempo"]
    loud = _clip((dsp["loudness"] + 30.0) / 24.0)
    tempo_fit = math.exp(-(math.log2(tempo / 115.0) ** 2) / 0.18) if tempo > 0 else 0.0
    return {
        "speechiness": speechiness,
        "acousticness": _clip(ratio(ACOUSTIC, ELECTRIC)),
        "instrumentalness": _clip(ratio(INSTRUMENTAL, VOCAL) * (1.0 - speechiness)),
        "energy": _clip(0.45 * loud + 0.25 * _clip(dsp["flux"] / 6.0) + 0.30 * ratio(ENERGETIC, CALM)),
        "danceability": _clip(0.45 * _clip(dsp["pulse"] / 0.5) + 0.20 * tempo_fit + 0.35 * ratio(DANCE, STILL)),
        "valence": _clip(0.65 * ratio(HAPPY, SAD) + 0.15 * dsp["mode"] + 0.20 * _clip((tempo - 60.0) / 100.0)),
        "liveness": _clip(0.08 + 0.5 * s(LIVE) / 3.0),
    }


@dataclass
class AudioAnalysis:
    """What ``analyze_file`` measures. ``features`` uses the catalog's key names (``audio_vector``)."""

    path: str
    duration_s: float
    tempo: float
    key: int                    # 0=C … 11=B, -1 when no tonal centre
    mode: int                   # 1 major, 0 minor
    loudness: float             # dB (BS.1770 integrated)
    features: dict[str, float]
    top_tags: list[tuple[str, float]]
    provenance: str = "estimated"
    dsp: dict[str, float] = field(default_factory=dict)  # intermediate measures (pulse, key clarity, …)

    @property
    def key_name(self) -> str:
        return "none" if self.key < 0 else f"{KEY_NAMES[self.key]} {'major' if self.mode else 'minor'}"


def analyze_waveform(y16k: np.ndarray, tagger: AudioTagger | None = None, path: str = "",
                     top_k: int = 5, max_dsp_seconds: float = 120.0) -> AudioAnalysis:
    """Analyse a mono 16 kHz waveform (see ``analyze_file``)."""
    y = np.asarray(y16k, dtype=np.float32).reshape(-1)
    if y.size == 0:
        raise ValueError("empty waveform")
    tagger = tagger or default_tagger()
    duration = y.size / SR
    loudness = integrated_loudness(y)
    mid = _middle(y, max_dsp_seconds)
    p1024 = power_spectrogram(mid, n_fft=1024, hop=SR // ONSET_FPS)
    env = onset_envelope(p1024)
    tempo, pulse = estimate_tempo(env)
    key, mode, clarity = estimate_key(chroma(mid))
    dsp = {"tempo": tempo, "pulse": pulse, "key_clarity": clarity, "mode": float(mode), "loudness": loudness,
           "flux": float(env.mean()), **speech_measures(p1024)}
    tag_probs = tagger.tags(y)
    feats = estimate_perceptual(tag_probs, dsp)
    features = {"danceability": feats["danceability"], "energy": feats["energy"], "key": key, "mode": mode,
                "loudness": round(loudness, 2), "speechiness": feats["speechiness"],
                "acousticness": feats["acousticness"], "instrumentalness": feats["instrumentalness"],
                "liveness": feats["liveness"], "valence": feats["valence"], "tempo": tempo}
    features = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in features.items()}
    top = sorted(tag_probs.items(), key=lambda kv: -kv[1])[:top_k]
    return AudioAnalysis(path=path, duration_s=round(duration, 3), tempo=tempo, key=key, mode=mode,
                         loudness=round(loudness, 2), features=features,
                         top_tags=[(t, round(p, 4)) for t, p in top], dsp=dsp)


def analyze_file(path, tagger: AudioTagger | None = None, top_k: int = 5) -> AudioAnalysis:
    """Decode ``path`` and estimate its audio descriptors; raises AudioDecodeError for undecodable files.

    ``tagger`` defaults to a shared ``AudioTagger()`` (2 threads) loaded on first use. Only the first
    ``MAX_ANALYSIS_SECONDS`` (10 min) are decoded and analysed (memory and time stay bounded for long
    mixes); ``duration_s`` is the whole file's, from its header.
    """
    y, file_sr, duration = decode_audio(path, max_seconds=MAX_ANALYSIS_SECONDS)
    y = resample(y, file_sr, SR)
    if y.size < SR // 10:
        raise AudioDecodeError(path, f"only {y.size} samples after decoding (under 0.1 s)")
    a = analyze_waveform(y, tagger=tagger, path=str(path), top_k=top_k)
    a.duration_s = round(duration, 3)
    return a


def analyze_files(paths, tagger: AudioTagger | None = None, top_k: int = 5):
    """Yield ``(path, AudioAnalysis)`` or ``(path, AudioDecodeError)`` per file: a bad file never stops a batch."""
    tagger = tagger or default_tagger()
    for path in paths:
        try:
            yield path, analyze_file(path, tagger=tagger, top_k=top_k)
        except AudioDecodeError as e:
            yield path, e
